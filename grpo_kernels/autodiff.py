"""Autodiff helpers: ``torch.func`` gradients inside the custom ops, and when a backward may hand
out the gradients computed in the forward.

The loss ops run below the autograd dispatch key, where only functorch still differentiates;
``gradients`` is the one way the loss paths take dL/dlogp of an objective there, and
``functorch_keys_enabled`` keeps it working under a ``TorchDispatchMode``.
"""
from __future__ import annotations

import contextlib

import torch


def functorch_keys_enabled():
    """Re-enable functorch's dispatch keys for an inner ``torch.func`` transform.

    Under a ``TorchDispatchMode`` (torch.compile's first-call custom-op aliasing check,
    FlopCounterMode, ...) an op runs with every key above Python excluded, functorch's
    included, and ``torch.func.grad`` fails with "Cannot access storage of TensorWrapper".
    """
    K = torch._C.DispatchKey
    keys = [K.FuncTorchDynamicLayerFrontMode, K.FuncTorchDynamicLayerBackMode, K.FuncTorchGradWrapper,
            K.FuncTorchBatched, K.FuncTorchVmapMode]
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not hasattr(torch._C, "_ForceDispatchKeyGuard") or not any(excluded.has(k) for k in keys):
        return contextlib.nullcontext()
    for k in keys:
        excluded = excluded.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def gradients(fn, logp: torch.Tensor, entropy: torch.Tensor, has_aux: bool = False):
    """(dL/dlogp, dL/dentropy, L) of a scalar ``fn(logp, entropy)``, with ``torch.func`` (this runs
    inside a custom op, below the autograd dispatch key, where only functorch still differentiates).
    ``has_aux``: ``fn`` returns ``(L, aux)`` and the third result is ``(L, aux)``, aux detached."""
    with functorch_keys_enabled():
        (dlogp, dent), value = torch.func.grad_and_value(fn, argnums=(0, 1), has_aux=has_aux)(logp, entropy)
    return dlogp, dent, value


def grad_is_one(grad_loss: torch.Tensor) -> bool:
    """True when grad_loss is a concrete 1 (loss.backward()). Costs one device sync, saves a
    [V, H] multiply; under torch.compile the product is always taken."""
    if torch.compiler.is_compiling() or grad_loss.numel() != 1:
        return False
    try:
        return bool(grad_loss == 1)
    except RuntimeError:  # fake or meta tensors
        return False


def graph_is_kept() -> bool:
    """Whether this backward keeps the graph (retain_graph=True, autograd.grad(...,
    retain_graph=True)): the saved gradients then outlive it. Unknown -> True (safe)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None or torch.compiler.is_compiling():
        return True
    try:
        return bool(probe())
    except RuntimeError:  # not inside an engine-driven backward
        return True

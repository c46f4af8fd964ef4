"""Autodiff helpers: ``torch.func`` gradients inside the custom ops.

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

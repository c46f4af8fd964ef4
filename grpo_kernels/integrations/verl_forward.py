"""A fused-kernels backend for verl 0.9.1's forward: ``linear_cross_entropy`` by ``token_logprobs``.

``linear_cross_entropy`` has the signature and semantics of ``verl.utils.kernel.linear_cross_entropy``.
``enable()`` (``grpo_kernels.integrations.verl``) installs the two wrappers below: verl's
``patch_forward_with_backends`` then accepts ``fused_kernels_backend="grpo_kernels"`` (it installs
verl's own per-family fused forward and marks the class), and verl's ``linear_cross_entropy`` answers
with this module's function inside such a model's forward, with verl's own kernel elsewhere.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import torch

from grpo_kernels.api import token_logprobs, token_statistics
from grpo_kernels.integrations.verl_config import SETTINGS

__all__ = ["BACKEND_NAME", "linear_cross_entropy", "wrap_linear_cross_entropy", "wrap_patch_forward_with_backends",
           "capture_sum_pi_squared"]

#: the ``fused_kernel_options.impl_backend`` value ``enable()`` registers
BACKEND_NAME = "grpo_kernels"
_IN_OUR_FORWARD = contextvars.ContextVar("grpo_kernels_verl_forward", default=False)
#: a list while ``capture_sum_pi_squared`` is active: the forward's ``linear_cross_entropy`` appends
#: its per-token sum_pi_squared (hidden's leading shape) there
_SUM_PI_SQUARED = contextvars.ContextVar("grpo_kernels_verl_sum_pi_squared", default=None)


@contextlib.contextmanager
def capture_sum_pi_squared():
    """Within the block, the grpo_kernels forward's ``linear_cross_entropy`` calls compute verl's
    ``sum_pi_squared`` in their vocabulary sweep (forward only, no gradient) and append it, shaped like
    hidden's leading dimensions, to the yielded list."""
    captured = []
    token = _SUM_PI_SQUARED.set(captured)
    try:
        yield captured
    finally:
        _SUM_PI_SQUARED.reset(token)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none", dist_process_group=None, *,
                         backend: Optional[str] = None, chunk_size: Optional[int] = None,
                         keep_shape: bool = False):
    """verl's ``linear_cross_entropy``: ``(logprobs, entropy)`` of ``softmax(hidden @ weight.T / temperature)``.

    hidden [..., H], weight [V, H] (this rank's rows ``[rank * V_local, (rank + 1) * V_local)`` with
    ``dist_process_group``, labels global ids), labels [...]. ``reduction="none"``: logprobs [N]
    (flattened, as verl's kernel returns them; ``keep_shape=True``: hidden's leading shape); "sum" /
    "mean": their sum / mean, a 0-d tensor. entropy is per token either way. fp32 (fp64 for fp64
    inputs), differentiable in hidden and weight; under a process group ``grad_hidden`` is this rank's
    partial gradient, as verl's kernel leaves it (the caller's tensor-parallel layer reduces it).
    ``backend`` / ``chunk_size``: ``token_logprobs``'s (default: ``enable()``'s).
    """
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise NotImplementedError("linear_cross_entropy takes one temperature (verl's kernel does too)")
        temperature = float(temperature)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1).to(torch.int64)
    captured = _SUM_PI_SQUARED.get()
    if captured is not None:
        _check_forward_only(hidden, weight, dist_process_group)
        logp, ent, spi = token_statistics(h, weight, t, temperature=float(temperature), return_entropy=True,
                                          backend=backend or SETTINGS.backend,
                                          chunk_size=chunk_size if chunk_size is not None else SETTINGS.chunk_size)
        captured.append(spi.reshape(lead))
        return _reduced(logp, ent, reduction.lower(), lead, keep_shape)
    kwargs = {}
    if dist_process_group is not None:
        kwargs = dict(process_group=dist_process_group, reduce_grad_hidden=False)
    logp, ent = token_logprobs(h, weight, t, temperature=float(temperature), return_entropy=True,
                               backend=backend or SETTINGS.backend,
                               chunk_size=chunk_size if chunk_size is not None else SETTINGS.chunk_size, **kwargs)
    return _reduced(logp, ent, reduction.lower(), lead, keep_shape)


def _reduced(logp, ent, r: str, lead, keep_shape: bool):
    if r == "sum":
        return logp.sum(), ent.reshape(lead) if keep_shape else ent
    if r == "mean":
        return logp.mean(), ent.reshape(lead) if keep_shape else ent
    if keep_shape:
        return logp.reshape(lead), ent.reshape(lead)
    return logp, ent


def _check_forward_only(hidden, weight, dist_process_group) -> None:
    """sum_pi_squared is verl's forward-only data: its sweep has no vocab-parallel form and no gradient."""
    if dist_process_group is not None:
        raise NotImplementedError("calculate_sum_pi_squared with the grpo_kernels forward has no vocab-parallel "
                                  "form (dist_process_group)")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        raise NotImplementedError("calculate_sum_pi_squared with the grpo_kernels forward is computed in the "
                                  "forward-only (no_grad) log-prob pass, as verl's trainer requests it")


def wrap_linear_cross_entropy(original):
    """What ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` becomes under ``enable()``:
    ours inside a model whose backend is ``"grpo_kernels"``, verl's own elsewhere."""

    @functools.wraps(original)
    def dispatch(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        if _IN_OUR_FORWARD.get():
            # the engine squeezes [1, nnz] (packed) or masks [B, L] (padded): keep the leading shape
            return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group,
                                        keep_shape=True)
        return original(hidden, weight, labels, temperature, reduction, dist_process_group)

    dispatch._grpo_kernels_original = original
    return dispatch


def wrap_patch_forward_with_backends(original):
    """What verl's ``monkey_patch.patch_forward_with_backends`` becomes under ``enable()``: for
    ``fused_kernels_backend="grpo_kernels"``, verl's "triton" per-family forward, run with this module's
    ``linear_cross_entropy``; any other backend is verl's own."""

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if not (use_fused_kernels and fused_kernels_backend == BACKEND_NAME):
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        cls = model.__class__
        if getattr(cls, "_grpo_kernels_verl_forward", False):
            model._verl_fused_kernels_backend = BACKEND_NAME
            return None
        original(model, use_fused_kernels=True, fused_kernels_backend="triton")  # verl's per-family forward
        family_forward = cls.forward

        @functools.wraps(family_forward)
        def forward(self, *args, **kwargs):
            token = _IN_OUR_FORWARD.set(True)
            try:
                return family_forward(self, *args, **kwargs)
            finally:
                _IN_OUR_FORWARD.reset(token)

        cls.forward = forward
        cls._grpo_kernels_verl_forward = True
        model._verl_fused_kernels_backend = BACKEND_NAME
        print(f"Using grpo_kernels backend for fused kernels in {cls.__name__}")
        return None

    patch_forward_with_backends._grpo_kernels_original = original
    return patch_forward_with_backends

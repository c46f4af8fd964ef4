"""The chunked vocabulary pass shared by every row backend.

Rows (tokens) are processed in chunks; for each chunk the logits come from one
matmul into a buffer bounded in bytes, a row backend sweeps it (statistics, then the
gradient in place), and two more matmuls turn the gradient into grad_hidden and
grad_weight. No [N, V] tensor exists at any time.

Shapes: hidden [n, H], weight [V, H], bias [V] or None, targets [n] int64 (a row
with target < 0 has no target in this vocabulary slice).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch

from grpo_kernels.backends.base import RowBackend, RowStats, accumulation_dtype

#: default byte budget of one chunk (logits buffer plus the backend's temporaries)
DEFAULT_CHUNK_BYTES = int(os.environ.get("GRPO_KERNELS_CHUNK_BYTES", 256 * 2**20))


def chunk_rows(n: int, vocab: int, dtype: torch.dtype, backend: RowBackend, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit the byte budget."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n, 1)))
    per_row = vocab * (torch.empty((), dtype=dtype).element_size() + backend.temp_bytes_per_elem)
    return max(1, min(max(n, 1), DEFAULT_CHUNK_BYTES // max(per_row, 1)))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if bias is None:
        return h @ weight.t()
    return torch.addmm(bias, h, weight.t())


def _add_outer_fp32(acc: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a_t @ b with acc in fp32 (or fp64) and a_t, b possibly half precision."""
    if a_t.dtype == acc.dtype:
        acc.addmm_(a_t, b)
        return
    if acc.is_cuda:
        try:  # cuBLAS writes the fp32 sum directly: no half-precision partial, no rounding
            torch.addmm(acc, a_t, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.add_(a_t @ b)


class GradBuffers:
    """grad_hidden [n, H] (hidden dtype), grad_weight [V, H] and grad_bias [V] (fp32 accumulators)."""

    def __init__(self, hidden, weight, bias, need_hidden=True, need_weight=True, need_bias=True):
        acc = accumulation_dtype(weight.dtype)
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        self.bias = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if (bias is not None and need_bias) else None
        )

    def accumulate(self, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, start: int) -> None:
        if self.hidden is not None:
            torch.mm(grad_logits, weight, out=self.hidden[start : start + grad_logits.shape[0]])
        if self.weight is not None:
            _add_outer_fp32(self.weight, grad_logits.t(), h)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def finish(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        gw = None if self.weight is None else self.weight.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, gw, gb


def _chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _empty_stats(n: int, dtype: torch.dtype, device) -> RowStats:
    acc = accumulation_dtype(dtype)
    return RowStats(*(torch.empty(n, dtype=acc, device=device) for _ in range(3)))


def forward_stats(
    backend: RowBackend,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    chunk_size: Optional[int] = None,
) -> RowStats:
    """Per-row lse, entropy and target logit, [n] each (no gradient work)."""
    n = hidden.shape[0]
    out = _empty_stats(n, hidden.dtype, hidden.device)
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, chunk_size)
    for s, e in _chunks(n, rows):
        st = backend.row_stats(_logits(hidden[s:e], weight, bias), targets[s:e], temperature, softcap)
        out.lse[s:e], out.entropy[s:e], out.target_logit[s:e] = st.lse, st.entropy, st.target_logit
    return out


def backward_grads(
    backend: RowBackend,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    lse: torch.Tensor,
    entropy: torch.Tensor,
    dlogp: torch.Tensor,
    dentropy: Optional[torch.Tensor],
    chunk_size: Optional[int] = None,
    needs: Tuple[bool, bool, bool] = (True, True, True),
):
    """grad_hidden, grad_weight, grad_bias of ``sum(dlogp * logp + dentropy * entropy)``,
    recomputing the logits chunk by chunk from the saved row statistics."""
    n = hidden.shape[0]
    grads = GradBuffers(hidden, weight, bias, *needs)
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, chunk_size)
    for s, e in _chunks(n, rows):
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        backend.row_grad_(
            z, targets[s:e], lse[s:e], entropy[s:e], dlogp[s:e],
            None if dentropy is None else dentropy[s:e], temperature, softcap,
        )
        grads.accumulate(z, h, weight, s)
    return grads.finish(weight, bias)


def fused_forward_backward(
    backend: RowBackend,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    epilogue: Callable,
    chunk_size: Optional[int] = None,
    needs: Tuple[bool, bool, bool] = (True, True, True),
):
    """The loss's forward with its gradients, in one sweep of the vocabulary.

    ``epilogue(start, end)`` returns ``(token_inputs, options)`` for rows [start, end),
    handed to ``backend.row_fused_``. Returns ``(stats, loss_per_token, dlogp, grad_hidden,
    grad_weight, grad_bias)``: 6NHV matmul flops, no recomputation.
    """
    n = hidden.shape[0]
    stats = _empty_stats(n, hidden.dtype, hidden.device)
    loss_t = torch.empty(n, dtype=stats.lse.dtype, device=hidden.device)
    dlogp = torch.empty_like(loss_t)
    grads = GradBuffers(hidden, weight, bias, *needs)
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, chunk_size)
    for s, e in _chunks(n, rows):
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        token_inputs, options = epilogue(s, e)
        st, epi = backend.row_fused_(z, targets[s:e], temperature, softcap, token_inputs, options)
        stats.lse[s:e], stats.entropy[s:e], stats.target_logit[s:e] = st.lse, st.entropy, st.target_logit
        loss_t[s:e], dlogp[s:e] = epi.loss, epi.dlogp
        grads.accumulate(z, h, weight, s)
    return (stats, loss_t, dlogp) + grads.finish(weight, bias)

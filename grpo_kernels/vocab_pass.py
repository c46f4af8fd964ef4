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

_MiB = 2**20
#: byte budget of one chunk (logits buffer plus the backend's temporaries); the environment
#: variable overrides it on every device
_ENV_CHUNK_BYTES = os.environ.get("GRPO_KERNELS_CHUNK_BYTES")
DEFAULT_CHUNK_BYTES = int(_ENV_CHUNK_BYTES or 256 * _MiB)
#: on CUDA every extra chunk costs one more read-modify-write of grad_weight (1.2 GB at
#: V=151936, H=4096 bf16, ~0.75 ms on an H100), so chunks are larger there. Measured on an
#: H100 at N=8192, H=4096, V=151936 (bench/RESULTS.md): 320 MiB 41.7 ms / 681 MiB beyond
#: inputs+grads, 384 MiB 39.4 ms / 809 MiB, 512 MiB 39.5 ms / 1064 MiB.
CUDA_CHUNK_BYTES = int(_ENV_CHUNK_BYTES or 384 * _MiB)


def chunk_budget(device=None) -> int:
    """Bytes one chunk may use on ``device``."""
    return CUDA_CHUNK_BYTES if (device is not None and torch.device(device).type == "cuda") else DEFAULT_CHUNK_BYTES


def chunk_rows(n: int, vocab: int, dtype: torch.dtype, backend: RowBackend, chunk_size: Optional[int],
               device=None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit the byte budget."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n, 1)))
    per_row = vocab * (torch.empty((), dtype=dtype).element_size() + backend.temp_bytes_per_elem)
    return max(1, min(max(n, 1), chunk_budget(device) // max(per_row, 1)))


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


def grad_weight_in_fp32(weight: torch.Tensor, n_chunks: int) -> bool:
    """Whether grad_weight gets a separate fp32 [V, H] accumulator.

    Only a half-precision weight seen by more than one chunk needs one. Each chunk's GEMM sums
    its rows in fp32 inside cuBLAS/MKL either way; without the accumulator the chunks' sums are
    added in the weight's dtype (one rounding per chunk instead of one in all). ``auto`` keeps
    the accumulator while it costs at most half a chunk budget, so memory beyond inputs and
    grads stays O(chunk): at V=151936, H=4096 it would be 2.4 GB. The environment variable
    GRPO_KERNELS_GRAD_WEIGHT_ACCUM=fp32|native|auto overrides the rule.
    """
    if accumulation_dtype(weight.dtype) == weight.dtype or n_chunks <= 1:
        return False
    mode = os.environ.get("GRPO_KERNELS_GRAD_WEIGHT_ACCUM", "auto")
    if mode not in ("auto", "fp32", "native"):
        raise ValueError(f"GRPO_KERNELS_GRAD_WEIGHT_ACCUM must be auto, fp32 or native, got {mode!r}")
    if mode != "auto":
        return mode == "fp32"
    return weight.numel() * 4 <= chunk_budget(weight.device) // 2


class GradBuffers:
    """grad_hidden [n, H] (hidden dtype), grad_weight [V, H] (fp32 or the weight's dtype, see
    grad_weight_in_fp32) and grad_bias [V] (fp32 accumulator), filled chunk by chunk."""

    def __init__(self, hidden, weight, bias, need_hidden=True, need_weight=True, need_bias=True, n_chunks=2):
        acc = accumulation_dtype(weight.dtype)
        self.hidden = torch.empty_like(hidden) if need_hidden else None
        self.weight = None
        if need_weight:
            wdt = acc if grad_weight_in_fp32(weight, n_chunks) else weight.dtype
            self.weight = torch.empty(weight.shape, dtype=wdt, device=weight.device)
        self._weight_written = False
        self.bias = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if (bias is not None and need_bias) else None
        )

    def accumulate(self, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, start: int) -> None:
        if self.hidden is not None:
            torch.mm(grad_logits, weight, out=self.hidden[start : start + grad_logits.shape[0]])
        if self.weight is not None:
            if not self._weight_written:  # the first chunk writes, no zero-fill and no read
                if grad_logits.dtype == self.weight.dtype:
                    torch.mm(grad_logits.t(), h, out=self.weight)
                else:
                    self.weight.zero_()
                    _add_outer_fp32(self.weight, grad_logits.t(), h)
                self._weight_written = True
            elif grad_logits.dtype == self.weight.dtype:
                self.weight.addmm_(grad_logits.t(), h)
            else:
                _add_outer_fp32(self.weight, grad_logits.t(), h)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def finish(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        gw = self.weight
        if gw is not None:
            if not self._weight_written:  # no rows at all
                gw.zero_()
            gw = gw.to(weight.dtype)
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
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, chunk_size, hidden.device)
    for s, e in _chunks(n, rows):
        st = backend.row_stats(_logits(hidden[s:e], weight, bias), targets[s:e], temperature, softcap)
        out.put_(s, e, st)
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
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, chunk_size, hidden.device)
    grads = GradBuffers(hidden, weight, bias, *needs, n_chunks=-(-n // rows))
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
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, chunk_size, hidden.device)
    grads = GradBuffers(hidden, weight, bias, *needs, n_chunks=-(-n // rows))
    for s, e in _chunks(n, rows):
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        token_inputs, options = epilogue(s, e)
        st, epi = backend.row_fused_(z, targets[s:e], temperature, softcap, token_inputs, options)
        stats.put_(s, e, st)
        loss_t[s:e], dlogp[s:e] = epi.loss, epi.dlogp
        grads.accumulate(z, h, weight, s)
    return (stats, loss_t, dlogp) + grads.finish(weight, bias)


def sequence_chunks(lengths, max_rows: int):
    """Row ranges ``[start, end)`` that each hold whole sequences and at most ``max_rows``
    rows, packed greedily in order; ``None`` when one sequence alone has more rows.

    ``lengths`` are the (unmasked) row counts of consecutive sequences; empty ones are
    absorbed by their neighbours.
    """
    bounds, start, end = [], 0, 0
    for length in lengths:
        if length > max_rows:
            return None
        if end + length - start > max_rows:
            bounds.append((start, end))
            start = end
        end += length
    if end > start:
        bounds.append((start, end))
    return bounds


def sequence_forward_backward(
    backend: RowBackend,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    softcap: Optional[float],
    bounds,
    coefficient: Callable,
    needs: Tuple[bool, bool, bool] = (True, True, True),
):
    """The loss's forward with its gradients when a token's coefficient depends on its whole
    sequence (sequence-level importance sampling): 6NHV matmul flops, no recomputation.

    ``bounds`` (from ``sequence_chunks``) keeps every sequence inside one chunk, so once the
    chunk's statistics are known, ``coefficient(start, end, stats)`` returns dL/dlogp [end -
    start] of those rows while their logits are still in the buffer; the gradient is then
    written in place as in ``fused_forward_backward``. Returns ``(stats, grad_hidden,
    grad_weight, grad_bias)``.
    """
    n = hidden.shape[0]
    stats = _empty_stats(n, hidden.dtype, hidden.device)
    grads = GradBuffers(hidden, weight, bias, *needs, n_chunks=len(bounds))
    for s, e in bounds:
        h = hidden[s:e]
        z = _logits(h, weight, bias)
        st = backend.row_stats(z, targets[s:e], temperature, softcap)
        stats.put_(s, e, st)
        dlogp = coefficient(s, e, st)
        backend.row_grad_(z, targets[s:e], st.lse, st.entropy, dlogp, None, temperature, softcap)
        grads.accumulate(z, h, weight, s)
    return (stats,) + grads.finish(weight, bias)

"""The chunk loop over the vocabulary: the one place that computes logits.

``sweep`` walks a plan's chunks of rows; for each chunk one matmul makes its logits in a
buffer bounded in bytes, a callback does the per-path row work on it (statistics, or the
gradient written in place), and, when gradients are wanted, two more matmuls turn the
chunk's logits gradient into grad_hidden rows and a grad_weight term. No [N, V] tensor
exists at any time.

The row primitives under a plan (``stats``, ``grad_``, ``fused_``) add what the plan asks
on top of the backend: the statistics combined over the ranks under vocab parallelism, and
the composition stats -> ``epilogue.token_epilogue`` -> gradient where the backend has no
fused kernel (or the statistics must be combined first).

Shapes: hidden [n, H], weight [V, H], bias [V] or None, targets [n] int64 (a row with
target < 0 has no target in this vocabulary slice).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from grpo_kernels import objective
from grpo_kernels.backends.base import RowStats
from grpo_kernels.epilogue import TokenInputs, accumulation_dtype
from grpo_kernels.plan import Plan


#: rows of every matmul under ``batch_invariant``: a GEMM's row i then depends on row i of its
#: input alone (the library's blocking is fixed by the shape), whatever the batch, the row's
#: position or the chunking; the last tile of a chunk is padded to it. Measured with MKL: the
#: same row's logits differ bitwise between GEMMs of 1, 7, 256, 1000 and 4096 rows.
BATCH_INVARIANT_ROWS = 256


def _tiled_mm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, tile: int) -> None:
    """out = a @ b (+ bias) as GEMMs of exactly ``tile`` rows each."""
    n = a.shape[0]
    for s in range(0, n, tile):
        e = min(n, s + tile)
        if e - s == tile:
            if bias is None:
                torch.mm(a[s:e], b, out=out[s:e])
            else:
                torch.addmm(bias, a[s:e], b, out=out[s:e])
            continue
        # the last tile, padded: the GEMM keeps its shape, the padding rows are dropped
        rows = a.new_zeros((tile, a.shape[1]))
        rows[: e - s] = a[s:e]
        out[s:e] = (torch.mm(rows, b) if bias is None else torch.addmm(bias, rows, b))[: e - s]


def logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           tile: Optional[int] = None) -> torch.Tensor:
    """One chunk's raw logits [rows, V] (a fresh buffer, overwritten by the gradient later);
    ``tile``: in GEMMs of that many rows (batch invariance)."""
    if tile is not None:
        out = h.new_empty((h.shape[0], weight.shape[0]))
        _tiled_mm(h, weight.t(), bias, out, tile)
        return out
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
    """grad_hidden [n, H] (hidden dtype), grad_weight [V, H] (in ``plan.grad_weight_dtype``)
    and grad_bias [V] (fp32 accumulator), filled chunk by chunk."""

    def __init__(self, hidden, weight, bias, needs, grad_weight_dtype: Optional[torch.dtype],
                 tile: Optional[int] = None):
        acc = accumulation_dtype(weight.dtype)
        self.tile = tile  # grad_hidden rows in GEMMs of this many rows (batch invariance)
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = None
        if needs[1]:
            self.weight = torch.empty(weight.shape, dtype=grad_weight_dtype or weight.dtype, device=weight.device)
        self._weight_written = False
        self.bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if (bias is not None and needs[2]) else None

    def accumulate(self, grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, start: int) -> None:
        if self.hidden is not None:
            rows = self.hidden[start : start + grad_logits.shape[0]]
            if self.tile is None:
                torch.mm(grad_logits, weight, out=rows)
            else:
                _tiled_mm(grad_logits, weight, None, rows, self.tile)
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
        """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes; None where not wanted."""
        gw = self.weight
        if gw is not None:
            if not self._weight_written:  # no rows at all
                gw.zero_()
            gw = gw.to(weight.dtype)
        gb = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, gw, gb


def sweep(plan: Plan, hidden, weight, bias, row_work: Callable, needs=(False, False, False)):
    """The chunk loop. ``row_work(start, end, z)`` does one chunk's row work on its logits
    ``z``; when ``needs`` asks for gradients it must leave dL/dz in ``z``. Returns
    (grad_hidden, grad_weight, grad_bias), None where not needed."""
    tile = BATCH_INVARIANT_ROWS if plan.execution.batch_invariant else None
    grads = GradBuffers(hidden, weight, bias, needs, plan.grad_weight_dtype, tile) if any(needs) else None
    for s, e in plan.bounds:
        h = hidden[s:e]
        z = logits(h, weight, bias, tile)
        row_work(s, e, z)
        if grads is not None:
            grads.accumulate(z, h, weight, s)
        # free this chunk before the next one's matmul: otherwise two chunk buffers are alive at
        # the peak (measured: token_logprobs at N=4096, V=32768 fp32 peaked at 423 MiB, 269 before)
        del z
    if grads is None:
        return None, None, None
    gh, gw, gb = grads.finish(weight, bias)
    if plan.vocab is not None:
        plan.vocab.finish_grad_hidden(gh)
    return gh, gw, gb


# ---------------------------------------------------------------- the row primitives under a plan


def stats(plan: Plan, z, targets) -> RowStats:
    st = plan.backend.row_stats(z, targets, plan.options, plan.execution, need_entropy=plan.need_entropy)
    return st if plan.vocab is None else plan.vocab.combine(st)


def grad_(plan: Plan, z, targets, st: RowStats, dlogp, dentropy=None) -> None:
    plan.backend.row_grad_(z, targets, st, dlogp, dentropy, plan.options, plan.execution)


def fused_(plan: Plan, z, targets, token_inputs: TokenInputs):
    """(RowStats, TokenEpilogue) of one chunk of a token-scope objective, its gradient left in ``z``:
    the backend's fused kernel where it computes the objective, else statistics, the epilogue in
    torch (``objective.token_epilogue_any``: the entropy term's gradient included) and the gradient."""
    if plan.fused:
        return plan.backend.row_fused_(z, targets, token_inputs, plan.options, plan.execution)
    st = stats(plan, z, targets)
    epi, dentropy = objective.token_epilogue_any(st.logp, st.entropy, token_inputs, plan.options)
    grad_(plan, z, targets, st, epi.dlogp, dentropy)
    return st, epi


def forward_stats(plan: Plan, hidden, weight, bias, targets, around: Optional[Callable] = None) -> RowStats:
    """Per-row lse, entropy and target logit, [n] each (no gradient work). ``around``: wraps the
    per-chunk callback (more work on the same logits: the exact KL), as in ``backward_grads``."""
    out = RowStats.empty(hidden.shape[0], hidden.dtype, hidden.device)

    def row_work(s, e, z):
        out.put_(s, e, stats(plan, z, targets[s:e]))

    sweep(plan, hidden, weight, bias, row_work if around is None else around(row_work))
    return out


def backward_grads(plan: Plan, hidden, weight, bias, targets, st: RowStats, dlogp, dentropy, needs,
                   around: Optional[Callable] = None):
    """grad_hidden, grad_weight, grad_bias of ``sum(dlogp * logp + dentropy * entropy)``,
    recomputing the logits chunk by chunk from the saved row statistics ``st``. ``around``: wraps
    the per-chunk callback (a term whose gradient is not one of logp and entropy: the exact KL)."""

    def row_work(s, e, z):
        chunk = RowStats(st.lse[s:e], st.entropy[s:e], st.target_logit[s:e])
        grad_(plan, z, targets[s:e], chunk, dlogp[s:e], None if dentropy is None else dentropy[s:e])

    return sweep(plan, hidden, weight, bias, row_work if around is None else around(row_work), needs)

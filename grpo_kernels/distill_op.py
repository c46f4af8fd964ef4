"""The distillation loss's one sweep, run inside the ``grpo_kernels::distill_loss`` custom op
(``grpo_kernels.ops``, which also registers its autograd).

Per chunk of the real (unmasked) rows, the sweep (``grpo_kernels.sweep``) makes the student's
logits and, in the row callback, the teacher's (no gradient ever goes to the teacher); the row
backend's divergence pass (``backends.divergence_backend``; the contract: ``grpo_kernels.divergence``)
turns the student's chunk into the loss's gradient with respect to its raw logits, and the
sweep's two matmuls give ``grad_hidden`` and ``grad_weight`` (and ``grad_bias``). Four matmuls
per row of the head (two logits, two gradients: 4NHV flops), nothing recomputed: the op's
backward only scales the saved gradients by ``grad_output``.

Chunks hold both heads' logits, so the chunk rule (``plan.chunk_rows``) counts the bytes of both
per row. Under vocab parallelism (``DistillCall.vocab_parallel``) both heads hold the same slice
of the vocabulary on each rank; the ranks agree on one chunking (``collective.exchange``), each
chunk's row sums are all-reduced inside the divergence pass and ``grad_hidden`` once at the end.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from grpo_kernels import collective, plan as planning, sweep
from grpo_kernels.backends import divergence_backend
from grpo_kernels.calls import DistillCall
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel


def _vocab_group(vp: VocabParallel, h: torch.Tensor, weight: torch.Tensor, tokens: int,
                 rows: int) -> Optional[collective.VocabGroup]:
    if not vp.enabled:
        return None
    return collective.exchange(vp.group_name, vp.vocab_start, weight.shape[0], tokens, h.shape[1], h.shape[0], rows,
                               vp.reduce_grad_hidden, h.device)


def divergence_plan(h: torch.Tensor, weight: torch.Tensor, teacher_dtype: torch.dtype, execution: ExecutionOptions,
                    vocab_parallel: VocabParallel, tokens: int, needs: Tuple[bool, bool, bool]) -> planning.Plan:
    """The plan of one divergence sweep over the real rows ``h`` [n, H] of a call of ``tokens``
    positions: the row backend with a divergence row pass, rows per chunk from the device's chunk
    rule counting both heads' logits (``chunk_size`` when given; one chunking agreed by every rank
    under vocab parallelism), grad_weight's accumulation dtype. Depends on shapes and options
    alone, so a deterministic run makes the same chunks every time."""
    n, vocab = h.shape[0], weight.shape[0]
    backend, _why = divergence_backend(execution, h.device, h.dtype, vocab_parallel.enabled)
    rows = planning.chunk_rows(n, vocab, h.dtype, None, execution.chunk_size, h.device,
                               bytes_per_logit=h.dtype.itemsize + teacher_dtype.itemsize
                               + backend.divergence_temp_bytes(h.device))
    group = _vocab_group(vocab_parallel, h, weight, tokens, rows)
    rows = rows if group is None else group.chunk_rows
    bounds = tuple(planning.uniform_chunks(n, rows))
    return planning.Plan(
        backend=backend, options=GRPOOptions(), execution=execution, rows=n, chunk_rows=rows, bounds=bounds,
        path="one_sweep" if any(needs) else "forward", entropy_sweep=False,
        grad_weight_dtype=planning.grad_weight_dtype(weight, len(bounds)) if needs[1] else None,
        vocab=group, fused=False,
    )


def divergence_sweep(call: DistillCall, h, ht, coef: Optional[torch.Tensor]):
    """Per-row divergence and student entropy ([n], accumulation dtype) of the real rows ``h``
    [n, H] / ``ht`` [n, H_t], and with ``coef`` (dLoss/dD, [] or [n]) the loss's gradients
    (grad_hidden [n, H], grad_weight, grad_bias; None where ``call.needs`` does not ask)."""
    needs, execution = call.needs, call.execution
    plan = divergence_plan(h, call.weight, call.teacher_weight.dtype, execution, call.vocab_parallel,
                           call.hidden.shape[0], needs)
    tile = sweep.BATCH_INVARIANT_ROWS if execution.batch_invariant else None
    acc = accumulation_dtype(h.dtype)
    div = torch.empty(h.shape[0], dtype=acc, device=h.device)
    ent = torch.empty_like(div)
    coef = coef if any(needs) else None

    def row_work(s, e, z):
        with torch.no_grad():  # the teacher is a constant: never a graph, never a gradient
            zt = sweep.logits(ht[s:e], call.teacher_weight, call.teacher_bias, tile)
        div[s:e], ent[s:e] = plan.backend.divergence_rows_(z, zt, call.spec, coef, execution, vocab=plan.vocab)

    gh, gw, gb = sweep.sweep(plan, h, call.weight, call.bias, row_work, needs)
    return div, ent, gh, gw, gb


def distill_forward(call: DistillCall):
    """(loss [], divergence [N], entropy [N], grad_hidden [N, H], grad_weight, grad_bias) of a
    call; the divergence, entropy and grad_hidden rows of the positions not kept are 0, a gradient
    not in ``call.needs`` is None. The loss and the per-row values are in the accumulation dtype."""
    hidden, keep = call.hidden, call.keep
    acc = accumulation_dtype(hidden.dtype)
    total = hidden.shape[0]
    rows = None if bool(keep.all()) else torch.nonzero(keep).squeeze(1)  # padding leaves before the vocabulary
    denom = (keep.sum().clamp(min=1) if call.num_items is None else call.num_items).to(device=hidden.device, dtype=acc)
    h = hidden if rows is None else hidden.index_select(0, rows)
    ht = call.teacher_hidden if rows is None else call.teacher_hidden.index_select(0, rows)
    with torch.no_grad():
        div, ent, gh, gw, gb = divergence_sweep(call, h, ht, (1.0 / denom) if any(call.needs) else None)
    loss = div.sum() / denom
    if rows is not None:  # the masked positions: divergence, entropy and grad_hidden rows are 0
        div = div.new_zeros(total).index_copy_(0, rows, div)
        ent = ent.new_zeros(total).index_copy_(0, rows, ent)
        if gh is not None:
            gh = gh.new_zeros((total, gh.shape[1])).index_copy_(0, rows, gh)
    return loss, div, ent, gh, gw, gb

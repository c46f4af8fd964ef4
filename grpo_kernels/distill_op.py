"""The distillation loss's one sweep and its autograd wrapper.

Per chunk of the real (unmasked) rows, the sweep (``grpo_kernels.sweep``) makes the student's
logits and, in the row callback, the teacher's (no gradient ever goes to the teacher); the
divergence row pass (``backends.torch_divergence``) turns the student's chunk into the loss's
gradient with respect to its raw logits, and the sweep's two matmuls give ``grad_hidden`` and
``grad_weight`` (and ``grad_bias``). Four matmuls per row of the head (two logits, two
gradients: 4NHV flops), nothing recomputed: the backward only scales the saved gradients by
``grad_output``, under the same rules as the GRPO op (``grpo_kernels.ops``): a gradient not
wanted is not computed, ``create_graph=True`` raises rather than give a silently zero second
derivative, and a backward that frees the graph hands the buffers out without a copy.

Chunks hold both heads' logits, so the chunk rule (``plan.chunk_rule``) is applied to the bytes
of both per row.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from grpo_kernels import autodiff, plan as planning, sweep
from grpo_kernels.backends import divergence_backend
from grpo_kernels.divergence import DivergenceSpec
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import ExecutionOptions, GRPOOptions


def divergence_plan(h: torch.Tensor, weight: torch.Tensor, teacher_dtype: torch.dtype, execution: ExecutionOptions,
                    needs: Tuple[bool, bool, bool]) -> planning.Plan:
    """The plan of one divergence sweep over the real rows ``h`` [n, H]: the row backend with a
    divergence row pass (``backends.divergence_backend``), rows per chunk from the device's chunk rule counting both heads' logits (``chunk_size``
    when given), grad_weight's accumulation dtype. Depends on shapes and options alone, so a
    deterministic run makes the same chunks every time."""
    n, vocab = h.shape[0], weight.shape[0]
    backend, _why = divergence_backend(execution, h.device, h.dtype)
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    rows = planning.chunk_rows(n, vocab, h.dtype, None, execution.chunk_size, h.device,
                               bytes_per_logit=size(h.dtype) + size(teacher_dtype) + backend.divergence_temp_bytes(h.device))
    bounds = tuple(planning.uniform_chunks(n, rows))
    return planning.Plan(
        backend=backend,
        options=GRPOOptions(), execution=execution, rows=n, chunk_rows=rows, bounds=bounds,
        path="one_sweep" if any(needs) else "forward", entropy_sweep=False,
        grad_weight_dtype=planning.grad_weight_dtype(weight, len(bounds)) if needs[1] else None,
        vocab=None, fused=False,
    )


def divergence_sweep(h, weight, bias, ht, teacher_weight, teacher_bias, spec: DivergenceSpec,
                     execution: ExecutionOptions, coef: Optional[torch.Tensor], needs):
    """Per-row divergence and student entropy ([n], accumulation dtype) of the real rows ``h``
    [n, H] / ``ht`` [n, H_t], and with ``coef`` (dLoss/dD, [] or [n]) the loss's gradients
    (grad_hidden [n, H], grad_weight, grad_bias; None where ``needs`` does not ask)."""
    plan = divergence_plan(h, weight, teacher_weight.dtype, execution, needs)
    tile = sweep.BATCH_INVARIANT_ROWS if execution.batch_invariant else None
    acc = accumulation_dtype(h.dtype)
    div = torch.empty(h.shape[0], dtype=acc, device=h.device)
    ent = torch.empty_like(div)
    want = any(needs)

    def row_work(s, e, z):
        with torch.no_grad():  # the teacher is a constant: never a graph, never a gradient
            zt = sweep.logits(ht[s:e], teacher_weight, teacher_bias, tile)
        div[s:e], ent[s:e] = plan.backend.divergence_rows_(z, zt, spec, coef if want else None, execution)

    gh, gw, gb = sweep.sweep(plan, h, weight, bias, row_work, needs)
    return div, ent, gh, gw, gb


class DistillFunction(torch.autograd.Function):
    """(loss [], divergence [N], entropy [N]) of hidden [N, H] (rows ``rows`` real, or all when
    None); the gradients are computed in the forward and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, rows, denom, spec,
                execution, needs):
        ctx.set_materialize_grads(False)
        acc = accumulation_dtype(hidden.dtype)
        total = hidden.shape[0]
        h = hidden if rows is None else hidden.index_select(0, rows)
        ht = teacher_hidden if rows is None else teacher_hidden.index_select(0, rows)
        inv = (1.0 / denom).to(acc) if any(needs) else None
        div, ent, gh, gw, gb = divergence_sweep(h, weight, bias, ht, teacher_weight, teacher_bias, spec, execution,
                                                inv, needs)
        loss = div.sum() / denom.to(acc)
        if rows is not None:  # the masked positions: divergence, entropy and grad_hidden rows are 0
            div = div.new_zeros(total).index_copy_(0, rows, div)
            ent = ent.new_zeros(total).index_copy_(0, rows, ent)
            if gh is not None:
                gh = gh.new_zeros((total, gh.shape[1])).index_copy_(0, rows, gh)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(div, ent)
        return loss, div, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_ent):
        nones = (None,) * 8
        if grad_loss is None:
            return (None,) * 3 + nones
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "distill_loss has no double backward: backward(create_graph=True) cannot differentiate its "
                "gradients again (they are constants computed in the forward). Use backend='reference' "
                "(materialized logits) for a second-order quantity."
            )
        # the saved gradients are handed out as they are only when this backward frees them (then
        # .grad owns the only reference); otherwise a fresh product, so that zeroing .grad cannot
        # change what a later retained backward hands out
        hand_out = autodiff.grad_is_one(grad_loss) and not autodiff.graph_is_kept()

        def scale(g, i):
            if g is None or not ctx.needs_input_grad[i]:
                return None
            return g if hand_out else g * grad_loss.to(g.dtype)

        gh, gw, gb = ctx.saved_tensors
        return (scale(gh, 0), scale(gw, 1), scale(gb, 2)) + nones

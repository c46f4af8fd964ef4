"""Top-k distillation rows (verl 0.9.1's ``forward_kl_topk``) from hidden states, without [N, V] logits.

Per token, with ``u`` the student's softcapped, temperature-scaled logits, ``ls_k = u[id_k] - lse(u)``
the student's log-probs at the teacher's top-k ids (a gather of K targets per row) and ``lt_k`` the
teacher's top-k log-probs, both clamped from below at ``log_prob_min_clamp`` when it is set:

- ``losses = sum_k exp(lt_k) * (lt_k - ls_k)`` (the forward KL over the top-k), differentiable in the
  student's hidden, weight and bias;
- ``student_mass = sum_k exp(ls_k)``, ``teacher_mass = sum_k exp(lt_k)`` (before the clamp);
- ``overlap_count``: how many of the teacher's ids are among the student's own top-k (``torch.topk``
  of the chunk's logits), ``overlap_token_advantage``: the mean of ``-exp(lt_k) * (lt_k - ls_k)``
  over those ids (0 where none).

The forward sweeps the vocabulary once per chunk of rows (one matmul, then the row work in torch);
the backward recomputes each chunk's logits (``token_logprobs``' recomputing pass: 6NHV flops in all)
and turns the upstream per-token gradient into ``grad_hidden`` / ``grad_weight`` / ``grad_bias``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from grpo_kernels import plan as planner, sweep, validation as check
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import VocabParallel, split_options

__all__ = ["TopKRows", "topk_forward_kl"]


class TopKRows(NamedTuple):
    """Per-token results, each [...] (the ids' leading shape), accumulation dtype; only ``losses``
    carries a gradient (to the student's head inputs)."""

    losses: torch.Tensor
    student_mass: torch.Tensor
    teacher_mass: torch.Tensor
    overlap_count: torch.Tensor  # int64
    overlap_token_advantage: torch.Tensor


def _scaled(z: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    u = z.to(accumulation_dtype(z.dtype), copy=True)
    if softcap is not None:
        u.div_(softcap).tanh_().mul_(softcap)
    return u.div_(temperature) if temperature != 1.0 else u


def _clamped(x: torch.Tensor, floor: Optional[float]) -> torch.Tensor:
    return x if floor is None else x.clamp_min(floor)


def _rows_forward(u, ids, lt, floor):
    """One chunk's per-row results from its scaled logits ``u`` [n, V]."""
    lse = torch.logsumexp(u, dim=-1, keepdim=True)
    ls = u.gather(1, ids) - lse
    own = torch.topk(u, k=ids.shape[1], dim=-1).indices
    student_mass, teacher_mass = ls.exp().sum(-1), lt.exp().sum(-1)
    ls_c, lt_c = _clamped(ls, floor), _clamped(lt, floor)
    token_kl = lt_c.exp() * (lt_c - ls_c)
    overlap = (ids.unsqueeze(-1) == own.unsqueeze(-2)).any(-1)
    count = overlap.sum(-1)
    adv = (-token_kl * overlap).sum(-1) / count.clamp_min(1)
    adv = torch.where(count > 0, adv, torch.zeros_like(adv))
    return token_kl.sum(-1), student_mass, teacher_mass, count, adv


class _TopKForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, lt, plan, floor):
        n, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
        outs = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3)]
        count = torch.empty(n, dtype=torch.int64, device=hidden.device)
        adv = torch.empty(n, dtype=acc, device=hidden.device)
        opts = plan.options

        def row_work(s, e, z):
            r = _rows_forward(_scaled(z, opts.temperature, opts.logit_softcap), ids[s:e], lt[s:e], floor)
            for buf, val in zip((*outs, count, adv), r):
                buf[s:e] = val

        sweep.sweep(plan, hidden, weight, bias, row_work)
        ctx.save_for_backward(hidden, weight, bias, ids, lt)
        ctx.plan, ctx.floor = plan, floor
        ctx.mark_non_differentiable(*outs[1:], count, adv)
        return (*outs, count, adv)

    @staticmethod
    def backward(ctx, grad_losses, *_):
        hidden, weight, bias, ids, lt = ctx.saved_tensors
        plan, floor = ctx.plan, ctx.floor
        opts = plan.options
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        up = grad_losses.to(accumulation_dtype(hidden.dtype))

        def row_work(s, e, z):
            u = _scaled(z, opts.temperature, opts.logit_softcap)
            lse = torch.logsumexp(u, dim=-1, keepdim=True)
            ls = u.gather(1, ids[s:e]) - lse
            keep = torch.ones_like(ls) if floor is None else (ls >= floor).to(ls.dtype)
            g = -_clamped(lt[s:e], floor).exp() * keep * up[s:e].unsqueeze(1)  # dL/d ls_k
            grad_u = u.sub_(lse).exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(1, ids[s:e], g)
            if opts.temperature != 1.0:
                grad_u.div_(opts.temperature)
            if opts.logit_softcap is not None:
                t = torch.tanh(z.to(grad_u.dtype) / opts.logit_softcap)
                grad_u.mul_(1 - t * t)
            z.copy_(grad_u)

        gh, gw, gb = sweep.sweep(plan, hidden, weight, bias, row_work, needs)
        return gh, gw, gb, None, None, None, None


def topk_forward_kl(hidden: torch.Tensor, weight: torch.Tensor, teacher_topk_ids: torch.Tensor,
                    teacher_topk_logps: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                    temperature: float = 1.0, logit_softcap: Optional[float] = None,
                    log_prob_min_clamp: Optional[float] = None, chunk_size: Optional[int] = None) -> TopKRows:
    """verl's top-k forward KL rows (module docstring) of the student ``hidden @ weight.T + bias``.

    hidden [..., H] float, weight [V, H], bias [V] or None, teacher_topk_ids [..., K] int (ids in
    [0, V)), teacher_topk_logps [..., K] float. Returns ``TopKRows``, each [...] (fp32; fp64 for fp64
    inputs); ``losses`` is differentiable (the gradient recomputes the logits chunk by chunk).
    """
    options, execution = split_options(dict(temperature=temperature, logit_softcap=logit_softcap,
                                            backend="torch", chunk_size=chunk_size))
    check.tensor("hidden", hidden, floating=True)
    check.lm_head(hidden, weight, bias)
    lead, K = hidden.shape[:-1], teacher_topk_ids.shape[-1] if teacher_topk_ids.dim() else 0
    check.tensor("teacher_topk_ids", teacher_topk_ids)
    check.shape("teacher_topk_ids", teacher_topk_ids, (*lead, K), " (hidden's leading dimensions, K)")
    if not 0 < K <= weight.shape[0]:
        raise ValueError(f"teacher_topk_ids must hold 1 <= K <= V ids per token, got K = {K} with V = {weight.shape[0]}")
    check.token_ids("teacher_topk_ids", teacher_topk_ids, weight.shape[0])
    check.tensor("teacher_topk_logps", teacher_topk_logps, floating=True)
    check.shape("teacher_topk_logps", teacher_topk_logps, (*lead, K), " (teacher_topk_ids' shape)")
    if log_prob_min_clamp is not None:
        log_prob_min_clamp = float(log_prob_min_clamp)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    acc = accumulation_dtype(hidden.dtype)
    ids = teacher_topk_ids.reshape(-1, K).to(torch.int64)
    lt = teacher_topk_logps.detach().reshape(-1, K).to(acc)
    plan = planner.plan_call(h2, weight, options, execution, VocabParallel(), need_grads=(True, True, True))
    out = _TopKForwardKL.apply(h2, weight, bias, ids, lt, plan, log_prob_min_clamp)
    return TopKRows(*(t.reshape(lead) for t in out))

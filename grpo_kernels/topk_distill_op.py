"""The top-k distillation rows' two sweeps, run inside the ``grpo_kernels::topk_forward_kl`` custom op
and its backward op (``grpo_kernels.ops``, which also registers the autograd; the public function and
the rows' definitions: ``grpo_kernels.topk_distill``).

The forward sweeps the vocabulary once per chunk of rows (one matmul, then the row work in torch).
The backward recomputes each chunk's logits and turns the upstream per-token gradient of ``losses``
into ``grad_hidden`` / ``grad_weight`` / ``grad_bias`` (token_logprobs' recomputing pass: 6NHV flops
in all). The gradient cannot be computed in the forward instead (as ``distill_loss`` does): the
losses are a vector [n], and the upstream gradient that weighs its rows is known only in the backward;
keeping what the forward would need for it (dL/dz per row) is the [N, V] tensor this avoids.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from grpo_kernels import plan as planner, sweep
from grpo_kernels.backends.torch_chunked import scaled_chain_into_, scaled_logits
from grpo_kernels.calls import TopKCall, TopKGradCall
from grpo_kernels.epilogue import accumulation_dtype


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


def _plan(call: TopKCall, needs: Tuple[bool, bool, bool]) -> planner.Plan:
    # the chunking depends on shapes and options alone: the backward recomputes the forward's chunks
    return planner.plan_call(call.hidden, call.weight, call.options, call.execution, call.vocab_parallel,
                             need_grads=needs)


def topk_forward(call: TopKCall):
    """(losses, student_mass, teacher_mass, overlap_count, overlap_token_advantage), [n] each, of
    ``call``: accumulation dtype, ``overlap_count`` int64. Nothing here is differentiable."""
    hidden = call.hidden
    n, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    outs = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3)]
    count = torch.empty(n, dtype=torch.int64, device=hidden.device)
    adv = torch.empty(n, dtype=acc, device=hidden.device)
    opts, ids, lt = call.options, call.teacher_topk_ids, call.teacher_topk_logps

    def row_work(s, e, z):
        r = _rows_forward(scaled_logits(z, opts.temperature, opts.logit_softcap, copy=True), ids[s:e], lt[s:e], call.log_prob_min_clamp)
        for buf, val in zip((*outs, count, adv), r):
            buf[s:e] = val

    with torch.no_grad():
        sweep.sweep(_plan(call, (False, False, False)), hidden, call.weight, call.bias, row_work)
    return (*outs, count, adv)


def topk_backward(grad: TopKGradCall):
    """(grad_hidden [n, H], grad_weight [V, H], grad_bias [V]) of ``sum(grad.grad_losses * losses)``;
    None where ``grad.needs`` does not ask."""
    call, needs = grad.forward, grad.needs
    opts, ids, floor = call.options, call.teacher_topk_ids, call.log_prob_min_clamp
    lt_floor = _clamped(call.teacher_topk_logps, floor)
    up = grad.grad_losses.to(accumulation_dtype(call.hidden.dtype))

    def row_work(s, e, z):
        u = scaled_logits(z, opts.temperature, opts.logit_softcap, copy=True)
        lse = torch.logsumexp(u, dim=-1, keepdim=True)
        ls = u.gather(1, ids[s:e]) - lse
        keep = torch.ones_like(ls) if floor is None else (ls >= floor).to(ls.dtype)
        g = -lt_floor[s:e].exp() * keep * up[s:e].unsqueeze(1)  # dL/d ls_k
        grad_u = u.sub_(lse).exp_().mul_(-g.sum(-1, keepdim=True)).scatter_add_(1, ids[s:e], g)
        scaled_chain_into_(grad_u, z, opts.temperature, opts.logit_softcap)

    with torch.no_grad():
        return sweep.sweep(_plan(call, needs), call.hidden, call.weight, call.bias, row_work, needs)

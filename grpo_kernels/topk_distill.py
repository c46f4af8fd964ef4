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
Both sweeps (``grpo_kernels.topk_distill_op``) run inside the custom ops ``grpo_kernels::topk_forward_kl``
and its backward (``grpo_kernels.ops``), so a ``torch.compile(fullgraph=True)`` step calls this
without a graph break.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from grpo_kernels import validation as check
from grpo_kernels.calls import TopKCall
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.ops import topk_forward_kl_op
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
    out = topk_forward_kl_op(TopKCall(
        hidden=h2, weight=weight, bias=bias, teacher_topk_ids=ids, teacher_topk_logps=lt,
        log_prob_min_clamp=log_prob_min_clamp, options=options, execution=execution, vocab_parallel=VocabParallel()))
    return TopKRows(*(t.reshape(lead) for t in out))

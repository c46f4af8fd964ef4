"""The whole GRPO loss over the vocabulary, eagerly (no autograd here): the plan's path, run.

Given flattened hidden states and per-token inputs, returns the loss together with its
gradients (computed in the forward pass) and the per-token logps / entropy. Padding rows
(mask == 0) are dropped before the vocabulary pass and get zeros. The paths are those of
``grpo_kernels.plan``; each is one ``sweep`` with its own per-chunk callback.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from grpo_kernels import autodiff, epilogue, metrics, objective, sweep, validation
from grpo_kernels.backends.base import RowStats
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel
from grpo_kernels.plan import Plan, plan_call


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    out = values.new_zeros((total,) + tuple(values.shape[1:]))
    return out.index_copy_(0, rows, values)


def plan_loss(hidden, weight, mask, options: GRPOOptions, execution: ExecutionOptions, vocab_parallel: VocabParallel,
              needs) -> Tuple[Plan, torch.Tensor, torch.Tensor]:
    """(plan, real row indices, their hidden states) of a loss call on hidden [B*T, H], mask [B, T]."""
    B, T = mask.shape
    rows = torch.nonzero(mask.reshape(-1) != 0).squeeze(1)
    lengths = None
    if any(needs) and objective.scope(options) == "sequence":
        # a meta mask (shape checks) has no values: every position counts, as in nonzero()
        lengths = [T] * B if mask.is_meta else (mask != 0).sum(-1).tolist()
    h = hidden.index_select(0, rows)
    plan = plan_call(h, weight, options, execution, vocab_parallel, need_grads=needs, sequence_lengths=lengths,
                     loss=True, tokens=B * T)
    return plan, rows, h


def grpo_loss_forward(
    hidden: torch.Tensor,  # [B*T, H]
    weight: torch.Tensor,  # [V, H] (this rank's rows under vocab parallelism)
    bias: Optional[torch.Tensor],  # [V]
    targets: torch.Tensor,  # [B*T] int64, global ids
    inputs: objective.LossInputs,  # the per-call tensors, [B, T] (adv, is_ratio may be [B, 1])
    options: GRPOOptions,
    execution: ExecutionOptions,
    vocab_parallel: VocabParallel,
    needs: Tuple[bool, bool, bool],  # grads wanted for (hidden, weight, bias)
):
    """Returns (loss, logp [B*T], entropy [B*T], grad_hidden, grad_weight, grad_bias, advantages);
    grads are None when not needed; advantages [B] when computed from ``inputs.rewards`` (else None).

    Rewards: on the fused one-sweep path the row kernel's epilogue computes each token's advantage
    from the rewards itself (no separate group-normalize launch); on every other path they are
    computed once here (``epilogue.reward_advantages``, torch) before the sweep."""
    mask = inputs.mask
    B, T = mask.shape
    total = B * T
    acc = accumulation_dtype(hidden.dtype)
    plan, rows, h = plan_loss(hidden, weight, mask, options, execution, vocab_parallel, needs)
    advantages = None
    in_kernel = inputs.rewards is not None and plan.fused and plan.path == "one_sweep"
    if inputs.rewards is not None and not in_kernel:
        advantages = epilogue.reward_advantages(inputs.rewards, inputs.reward_weights, options)
        inputs = dataclasses.replace(inputs, adv=advantages.unsqueeze(1))
    tgt = _targets(plan, targets.index_select(0, rows))
    # padding positions may hold junk (even inf) old/ref/sampling logps: they must not reach a sum
    keep = mask != 0
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    clean = lambda t: None if t is None else torch.where(keep, t.to(acc), zero)  # noqa: E731
    inputs = dataclasses.replace(inputs, old=clean(inputs.old), ref=clean(inputs.ref), sampling=clean(inputs.sampling))

    def pick(t):
        return None if t is None else t.expand(B, T).reshape(-1).index_select(0, rows).to(acc)

    logp_full = ent_full = sel_stats = None
    if plan.path in ("forward", "two_sweeps") or plan.entropy_sweep:
        sel_stats = sweep.forward_stats(plan, h, weight, bias, tgt)
        logp_full = _scatter_rows(sel_stats.logp, rows, total)
        ent_full = _scatter_rows(sel_stats.entropy, rows, total)
    if options.top_entropy_quantile < 1.0:
        inputs = dataclasses.replace(inputs, entropy_mask=metrics.high_entropy_mask(
            ent_full.view(B, T), mask, options.top_entropy_quantile))
    weights = objective.objective_weights(mask, options, acc, inputs.num_items, inputs.num_sequences,
                                          inputs.entropy_mask)

    def loss_of(logp_full, ent_full):
        return objective.objective_loss(logp_full.view(B, T), ent_full.view(B, T), inputs, options, weights)

    gh = gw = gb = None
    if plan.path == "forward":
        return loss_of(logp_full, ent_full).detach(), logp_full, ent_full, None, None, None, advantages
    if plan.path == "one_sweep":
        policy_scale = inputs.is_ratio
        if inputs.entropy_mask is not None:
            em = inputs.entropy_mask.to(acc)
            policy_scale = em if policy_scale is None else policy_scale.to(acc) * em
        token_inputs = epilogue.TokenInputs(
            old=pick(inputs.old), adv=None if in_kernel else pick(inputs.adv), weight=pick(weights.policy),
            ref=pick(inputs.ref), policy_scale=pick(policy_scale),
            kl_weight=None if weights.kl is weights.policy else pick(weights.kl),
            entropy_weight=pick(weights.entropy) if options.entropy_coef != 0.0 else None,
            **(_reward_inputs(inputs, rows, T, acc) if in_kernel else {}),
        )
        n = h.shape[0]
        stats = RowStats.empty(n, h.dtype, h.device)
        loss_t = torch.empty(n, dtype=stats.lse.dtype, device=h.device)
        adv_rows = torch.empty(n, dtype=stats.lse.dtype, device=h.device) if in_kernel else None

        def one_sweep(s, e, z):
            st, epi = sweep.fused_(plan, z, tgt[s:e], token_inputs.select(slice(s, e)))
            stats.put_(s, e, st)
            loss_t[s:e] = epi.loss
            if adv_rows is not None:
                adv_rows[s:e] = epi.adv

        gh, gw, gb = sweep.sweep(plan, h, weight, bias, one_sweep, needs)
        loss = loss_t.sum()
        if in_kernel:
            advantages = _sequence_advantages(adv_rows, token_inputs.seq, inputs, options, B)
        logp_full = _scatter_rows(stats.logp, rows, total)
        ent_full = _scatter_rows(stats.entropy, rows, total)
    elif plan.path == "sequence_sweep":
        logp_full = torch.zeros(total, dtype=acc, device=h.device)
        ent_full = torch.zeros(total, dtype=acc, device=h.device)

        def sequence_sweep(s, e, z):
            st = sweep.stats(plan, z, tgt[s:e])
            # rows of later sequences still hold 0: they do not reach these rows' coefficients
            logp_full.index_copy_(0, rows[s:e], st.logp)
            ent_full.index_copy_(0, rows[s:e], st.entropy)
            dlogp, dent, _ = autodiff.gradients(loss_of, logp_full, ent_full)
            sweep.grad_(plan, z, tgt[s:e], st, dlogp.index_select(0, rows[s:e]),
                        dent.index_select(0, rows[s:e]) if options.entropy_coef != 0.0 else None)

        gh, gw, gb = sweep.sweep(plan, h, weight, bias, sequence_sweep, needs)
        loss = loss_of(logp_full, ent_full).detach()
    else:  # two_sweeps
        dlogp_full, dent_full, loss = autodiff.gradients(loss_of, logp_full, ent_full)
        dent = dent_full.index_select(0, rows) if options.entropy_coef != 0.0 else None
        gh, gw, gb = sweep.backward_grads(plan, h, weight, bias, tgt, sel_stats, dlogp_full.index_select(0, rows),
                                          dent, needs)
    gh_full = _scatter_rows(gh, rows, total) if gh is not None else None
    return loss, logp_full, ent_full, gh_full, gw, gb, advantages


def _reward_inputs(inputs: objective.LossInputs, rows: torch.Tensor, T: int, acc: torch.dtype) -> dict:
    """The fused epilogue's reward inputs (``epilogue.TokenInputs``): rewards [B, R] and weights [R]
    in the accumulation dtype (``epilogue.reward_matrix``), each real row's sequence index."""
    r, w = epilogue.reward_matrix(inputs.rewards, inputs.reward_weights, acc)
    return dict(rewards=r, reward_weights=w, seq=torch.div(rows, T, rounding_mode="floor"))


def _sequence_advantages(adv_rows, seq, inputs: objective.LossInputs, options: GRPOOptions, B: int):
    """[B] advantages of the fused kernels' per-row ones (every row of a sequence holds the same value:
    its first row's is taken), in the rewards' accumulation dtype; a sequence without a real token
    (reaching no gradient) gets the torch formula's value."""
    dtype = accumulation_dtype(inputs.rewards.dtype)
    out = torch.zeros(B, dtype=dtype, device=adv_rows.device)
    first = torch.ones_like(seq, dtype=torch.bool)
    first[1:] = seq[1:] != seq[:-1]
    out[seq[first]] = adv_rows[first].to(dtype)
    covered = torch.zeros(B, dtype=torch.bool, device=adv_rows.device)
    covered[seq] = True
    if out.is_meta or not bool(covered.all()):
        fallback = epilogue.reward_advantages(inputs.rewards, inputs.reward_weights, options)
        out = torch.where(covered, out, fallback.to(dtype))
    return out


def token_logprobs_forward(hidden, weight, bias, targets, options: GRPOOptions, execution: ExecutionOptions,
                           vocab_parallel: VocabParallel, need_entropy: bool = True):
    """(RowStats [n], plan) of hidden [n, H]: log-probs of ``targets`` and entropies (0 without
    ``need_entropy``)."""
    plan = plan_call(hidden, weight, options, execution, vocab_parallel, need_entropy=need_entropy)
    return sweep.forward_stats(plan, hidden, weight, bias, _targets(plan, targets)), plan


def token_logprobs_backward(hidden, weight, bias, targets, stats, grad_logp, grad_entropy, options, execution,
                            vocab_parallel, needs):
    plan = plan_call(hidden, weight, options, execution, vocab_parallel, need_grads=needs)
    return sweep.backward_grads(plan, hidden, weight, bias, _targets(plan, targets), stats, grad_logp, grad_entropy,
                                needs)


def _targets(plan: Plan, targets):
    """The row backends' targets: global ids, or under vocab parallelism (checked against
    the whole vocabulary, known only once the ranks have exchanged their slices) local ones."""
    if plan.vocab is None:
        return targets
    validation.token_ids("targets", targets, plan.vocab.vocab_size)
    return plan.vocab.local_targets(targets)

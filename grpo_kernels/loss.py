"""The whole GRPO loss over the vocabulary, eagerly (no autograd here): the plan's path, run.

Given flattened hidden states and per-token inputs, returns the loss together with its
gradients (computed in the forward pass) and the per-token logps / entropy. Padding rows
(mask == 0) are dropped before the vocabulary pass and get zeros. The paths are those of
``grpo_kernels.plan``; each is one ``sweep`` with its own per-chunk callback.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from grpo_kernels import objective, sweep, validation
from grpo_kernels.backends.base import RowStats, accumulation_dtype
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel
from grpo_kernels.plan import Plan, plan_call


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    out = values.new_zeros((total,) + tuple(values.shape[1:]))
    return out.index_copy_(0, rows, values)


def _functorch_keys_enabled():
    """Re-enable functorch's dispatch keys for an inner ``torch.func`` transform.

    Under a ``TorchDispatchMode`` (torch.compile's first-call custom-op aliasing check,
    FlopCounterMode, ...) an op runs with every key above Python excluded, functorch's
    included, and ``torch.func.grad`` fails with "Cannot access storage of TensorWrapper".
    """
    K = torch._C.DispatchKey
    keys = [K.FuncTorchDynamicLayerFrontMode, K.FuncTorchDynamicLayerBackMode, K.FuncTorchGradWrapper,
            K.FuncTorchBatched, K.FuncTorchVmapMode]
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not hasattr(torch._C, "_ForceDispatchKeyGuard") or not any(excluded.has(k) for k in keys):
        return contextlib.nullcontext()
    for k in keys:
        excluded = excluded.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def plan_loss(hidden, weight, mask, options: GRPOOptions, execution: ExecutionOptions, vocab_parallel: VocabParallel,
              needs) -> Tuple[Plan, torch.Tensor, torch.Tensor]:
    """(plan, real row indices, their hidden states) of a loss call on hidden [B*T, H], mask [B, T]."""
    B, T = mask.shape
    rows = torch.nonzero(mask.reshape(-1) != 0).squeeze(1)
    lengths = None
    if any(needs) and options.importance_sampling_level == "sequence":
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
    mask: torch.Tensor,  # [B, T]
    adv: torch.Tensor,  # [B, T] (broadcast)
    old: Optional[torch.Tensor],  # [B, T]
    ref: Optional[torch.Tensor],  # [B, T]
    is_ratio: Optional[torch.Tensor],  # [B, T] (broadcast)
    num_items: Optional[torch.Tensor],  # [] dapo/cispo normalizer
    options: GRPOOptions,
    execution: ExecutionOptions,
    vocab_parallel: VocabParallel,
    needs: Tuple[bool, bool, bool],  # grads wanted for (hidden, weight, bias)
):
    """Returns (loss, logp [B*T], entropy [B*T], grad_hidden, grad_weight, grad_bias);
    grads are None when not needed."""
    B, T = mask.shape
    total = B * T
    acc = accumulation_dtype(hidden.dtype)
    plan, rows, h = plan_loss(hidden, weight, mask, options, execution, vocab_parallel, needs)
    tgt = _targets(plan, targets.index_select(0, rows))
    pick = lambda t: None if t is None else t.reshape(-1).index_select(0, rows).to(acc)  # noqa: E731
    # padding positions may hold junk (even inf) old/ref logps: they must not reach a sum
    keep = mask != 0
    old = None if old is None else torch.where(keep, old.to(acc), torch.zeros((), dtype=acc, device=old.device))
    ref = None if ref is None else torch.where(keep, ref.to(acc), torch.zeros((), dtype=acc, device=ref.device))

    logp_full = ent_full = sel_stats = None
    if plan.path in ("forward", "two_sweeps") or plan.entropy_sweep:
        sel_stats = sweep.forward_stats(plan, h, weight, bias, tgt)
        logp_full = _scatter_rows(sel_stats.logp, rows, total)
        ent_full = _scatter_rows(sel_stats.entropy, rows, total)

    policy_scale = is_ratio
    if options.top_entropy_quantile < 1.0:
        entropy_mask = objective.high_entropy_mask(ent_full.view(B, T), mask, options.top_entropy_quantile)
        policy_scale = entropy_mask.to(acc) if policy_scale is None else policy_scale.to(acc) * entropy_mask

    def loss_of(logp_full):
        return objective.objective_loss(logp_full.view(B, T), mask, adv, options, old=old, ref=ref,
                                        policy_scale=policy_scale, num_items=num_items)

    def grad_and_loss(logp_full):
        # torch.func rather than torch.autograd: this runs inside a custom op, below the
        # autograd dispatch key, where only functorch's own transform still differentiates
        with _functorch_keys_enabled():
            return torch.func.grad_and_value(loss_of)(logp_full)

    gh = gw = gb = None
    if plan.path == "forward":
        return loss_of(logp_full).detach(), logp_full, ent_full, None, None, None
    if plan.path == "one_sweep":
        token_inputs = objective.TokenInputs(
            old=pick(old), adv=pick(adv), weight=pick(objective.token_weights(mask, options, acc, num_items)),
            ref=pick(ref), policy_scale=pick(policy_scale),
        )
        n = h.shape[0]
        stats = RowStats.empty(n, h.dtype, h.device)
        loss_t = torch.empty(n, dtype=stats.lse.dtype, device=h.device)

        def one_sweep(s, e, z):
            st, epi = sweep.fused_(plan, z, tgt[s:e], token_inputs.select(slice(s, e)))
            stats.put_(s, e, st)
            loss_t[s:e] = epi.loss

        gh, gw, gb = sweep.sweep(plan, h, weight, bias, one_sweep, needs)
        loss = loss_t.sum()
        logp_full = _scatter_rows(stats.logp, rows, total)
        ent_full = _scatter_rows(stats.entropy, rows, total)
    elif plan.path == "sequence_sweep":
        logp_full = torch.zeros(total, dtype=acc, device=h.device)
        entropy = torch.empty(h.shape[0], dtype=acc, device=h.device)

        def sequence_sweep(s, e, z):
            st = sweep.stats(plan, z, tgt[s:e])
            entropy[s:e] = st.entropy
            # rows of later sequences still hold 0: they do not reach these rows' coefficients
            logp_full.index_copy_(0, rows[s:e], st.logp)
            dlogp = grad_and_loss(logp_full)[0].index_select(0, rows[s:e])
            sweep.grad_(plan, z, tgt[s:e], st, dlogp)

        gh, gw, gb = sweep.sweep(plan, h, weight, bias, sequence_sweep, needs)
        loss = loss_of(logp_full).detach()
        ent_full = _scatter_rows(entropy, rows, total)
    else:  # two_sweeps
        dlogp_full, loss = grad_and_loss(logp_full)
        gh, gw, gb = sweep.backward_grads(plan, h, weight, bias, tgt, sel_stats, dlogp_full.index_select(0, rows),
                                          None, needs)
    gh_full = _scatter_rows(gh, rows, total) if gh is not None else None
    return loss, logp_full, ent_full, gh_full, gw, gb


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

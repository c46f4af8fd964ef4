"""The whole GRPO loss over the vocabulary, eagerly (no autograd here): the plan's path, run.

Given a ``calls.LossCall`` (flattened hidden states and the per-token inputs, padding already
neutral), returns the loss together with its gradients (computed in the forward pass) and the
per-token logps / entropy. Padding rows (mask == 0) are dropped before the vocabulary pass and
get zeros. ``grpo_kernels.plan`` decides everything (the path, whether the fused epilogue
computes the advantages from rewards, ...); each path below is one function that carries it
out with one ``sweep`` and its own per-chunk callback.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from grpo_kernels import autodiff, epilogue, metrics, objective, plan as planner, sweep, validation
from grpo_kernels.exact_kl import ExactKL
from grpo_kernels.backends.base import RowStats
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.calls import LogprobsCall, LogprobsGradCall, LossCall
from grpo_kernels.options import GRPOOptions
from grpo_kernels.plan import Plan


class LossResult(NamedTuple):
    """A loss call's results: loss [], logp [B*T], entropy [B*T], the gradients (None when not
    wanted), the advantages [B] when computed from rewards (else None), and the exact KL [B*T]
    (``kl_estimator="full"``; else None)."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    grad_hidden: Optional[torch.Tensor]
    grad_weight: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]
    advantages: Optional[torch.Tensor]
    kl: Optional[torch.Tensor] = None


@dataclass
class RealRows:
    """A planned loss call on its real (unmasked) rows: what every path reads."""

    call: LossCall
    plan: Plan
    rows: torch.Tensor  # [n] int64: the real rows' positions in [B*T]
    hidden: torch.Tensor  # [n, H]
    targets: torch.Tensor  # [n]: the row backends' targets (``_targets``)
    #: [B, T] in the accumulation dtype; ``adv`` from the rewards unless the kernel computes it
    inputs: objective.LossInputs
    advantages: Optional[torch.Tensor]  # [B]: computed from the rewards in torch (else None)
    #: the exact KL term (``kl_estimator="full"``): ``call.options`` are then without it
    kl: Optional[ExactKL] = None

    @property
    def acc(self) -> torch.dtype:
        return accumulation_dtype(self.hidden.dtype)

    def full(self, values: torch.Tensor) -> torch.Tensor:
        """Per-real-row ``values`` [n, ...] scattered to all B*T rows (zeros at padding)."""
        out = values.new_zeros((self.call.hidden.shape[0],) + tuple(values.shape[1:]))
        return out.index_copy_(0, self.rows, values)

    def pick(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A [B, T] (or [B, 1]) tensor at the real rows, [n] in the accumulation dtype."""
        if t is None:
            return None
        B, T = self.inputs.mask.shape
        return t.expand(B, T).reshape(-1).index_select(0, self.rows).to(self.acc)


def real_rows(call: LossCall) -> RealRows:
    """Drops the padding rows and plans the call on the rest. The padding of old/ref/sampling was
    made neutral by the argument checks; here they only move to the accumulation dtype. With the
    exact KL the rest of the call runs with the KL term off (``GRPOOptions.without_exact_kl``) and
    ``RealRows.kl`` adds it (``grpo_kernels.exact_kl``)."""
    inputs = call.inputs
    rows = torch.nonzero(inputs.mask.reshape(-1) != 0).squeeze(1)
    h = call.hidden.index_select(0, rows)
    exact = call.options.exact_kl
    if exact and (call.ref_hidden is None or call.ref_weight is None):
        raise ValueError("kl_estimator='full' with beta != 0 needs ref_hidden and ref_weight")
    options = call.options.without_exact_kl()
    plan = planner.plan_loss(h, call.weight, inputs.mask, options, call.execution, call.vocab_parallel,
                             call.needs, rewards=inputs.rewards is not None,
                             ref_dtype=call.ref_weight.dtype if exact else None)
    kl = None
    if exact:
        kl = ExactKL.of(call.ref_hidden, call.ref_weight, call.ref_bias, rows, call.options, plan)
        call = dataclasses.replace(call, options=options)
    acc = accumulation_dtype(call.hidden.dtype)
    to_acc = lambda t: None if t is None else t.to(acc)  # noqa: E731
    inputs = dataclasses.replace(inputs, old=to_acc(inputs.old), ref=to_acc(inputs.ref),
                                 sampling=to_acc(inputs.sampling))
    advantages = None
    if inputs.rewards is not None and not plan.rewards_in_kernel:
        advantages = epilogue.reward_advantages(inputs.rewards, inputs.reward_weights, call.options)
        inputs = dataclasses.replace(inputs, adv=advantages.unsqueeze(1))
    return RealRows(call, plan, rows, h, _targets(plan, call.targets.index_select(0, rows)), inputs, advantages, kl)


def grpo_loss_forward(call: LossCall) -> LossResult:
    """The loss of ``call`` by its plan's path. Rewards: on the fused one-sweep path the row
    kernel's epilogue computes each token's advantage from the rewards itself (no separate
    group-normalize launch); on every other path ``real_rows`` computes them once (torch)."""
    r = real_rows(call)
    return _PATHS[r.plan.path](r)


def _stats_sweep(r: RealRows, with_kl: bool = False):
    """(row statistics [n], logp [B*T], entropy [B*T], exact KL [n] or None) of a statistics-only
    sweep; the exact KL of every row (when the call has it) with ``with_kl``."""
    kl = torch.empty(r.hidden.shape[0], dtype=r.acc, device=r.hidden.device) if with_kl and r.kl is not None else None
    around = None if kl is None else (lambda work: r.kl.around(work, kl))
    st = sweep.forward_stats(r.plan, r.hidden, r.call.weight, r.call.bias, r.targets, around=around)
    return st, r.full(st.logp), r.full(st.entropy), kl


def _kl_rows(r: RealRows, weights: objective.ObjectiveWeights):
    """(KL [n] to fill, its coefficients dLoss/dKL_t [n] or None without gradients) of a call with the
    exact KL; (None, None) without it."""
    if r.kl is None:
        return None, None
    kl = torch.empty(r.hidden.shape[0], dtype=r.acc, device=r.hidden.device)
    return kl, (r.kl.coef(r.pick(weights.kl)) if any(r.call.needs) else None)


def _around(r: RealRows, row_work, kl, coef):
    """A sweep's per-chunk callback with the exact KL's work around it (``ExactKL.around``)."""
    return row_work if r.kl is None else r.kl.around(row_work, kl, coef)


def _result(r: RealRows, loss, logp, ent, grads, weights, kl, advantages=None) -> LossResult:
    """The path's results with the exact KL's term added to the loss and its values scattered to
    [B*T] (when the call has it)."""
    gh, gw, gb = grads
    kl_full = None
    if r.kl is not None:
        loss = loss + r.kl.loss(kl, r.pick(weights.kl))
        kl_full = r.full(kl)
    return LossResult(loss, logp, ent, _full_or_none(r, gh), gw, gb, advantages, kl_full)


def _aggregation(r: RealRows, entropy: Optional[torch.Tensor]):
    """(inputs, weights): the per-token aggregation weights, after TRL's high-entropy selection
    (which needs every token's ``entropy`` [B*T]: ``plan.entropy_sweep``)."""
    inputs, options = r.inputs, r.call.options
    B, T = inputs.mask.shape
    if options.top_entropy_quantile < 1.0:
        inputs = dataclasses.replace(inputs, entropy_mask=metrics.high_entropy_mask(
            entropy.view(B, T), inputs.mask, options.top_entropy_quantile))
    weights = objective.objective_weights(inputs.mask, options, r.acc, inputs.num_items, inputs.num_sequences,
                                          inputs.entropy_mask)
    return inputs, weights


def _objective(r: RealRows, inputs: objective.LossInputs, weights):
    """The loss as a function of logp and entropy [B*T] (what ``autodiff.gradients`` differentiates)."""
    B, T = inputs.mask.shape

    def loss_of(logp, entropy):
        return objective.objective_loss(logp.view(B, T), entropy.view(B, T), inputs, r.call.options, weights)

    return loss_of


def _forward(r: RealRows) -> LossResult:
    """No gradient wanted: one statistics sweep, then the objective."""
    _, logp, ent, kl = _stats_sweep(r, with_kl=True)
    inputs, weights = _aggregation(r, ent)
    loss = _objective(r, inputs, weights)(logp, ent).detach()
    return _result(r, loss, logp, ent, (None, None, None), weights, kl, r.advantages)


def _token_inputs(r: RealRows, inputs: objective.LossInputs, weights) -> epilogue.TokenInputs:
    """The fused epilogue's per-token inputs [n] at the real rows."""
    policy_scale = inputs.is_ratio
    if inputs.entropy_mask is not None:
        em = inputs.entropy_mask.to(r.acc)
        policy_scale = em if policy_scale is None else policy_scale.to(r.acc) * em
    in_kernel = r.plan.rewards_in_kernel
    B, T = inputs.mask.shape
    return epilogue.TokenInputs(
        old=r.pick(inputs.old), adv=None if in_kernel else r.pick(inputs.adv), weight=r.pick(weights.policy),
        ref=r.pick(inputs.ref), policy_scale=r.pick(policy_scale),
        kl_weight=None if weights.kl is weights.policy else r.pick(weights.kl),
        entropy_weight=r.pick(weights.entropy) if r.plan.entropy_grad else None,
        **(_reward_inputs(inputs, r.rows, T, r.acc) if in_kernel else {}),
    )


def _one_sweep(r: RealRows) -> LossResult:
    """A token-scope objective: statistics, epilogue and gradient per chunk, in one sweep."""
    ent = _stats_sweep(r)[2] if r.plan.entropy_sweep else None
    inputs, weights = _aggregation(r, ent)
    token_inputs = _token_inputs(r, inputs, weights)
    kl, coef = _kl_rows(r, weights)
    n = r.hidden.shape[0]
    stats = RowStats.empty(n, r.hidden.dtype, r.hidden.device)
    loss_t = torch.empty(n, dtype=stats.lse.dtype, device=r.hidden.device)
    adv_rows = torch.empty_like(loss_t) if r.plan.rewards_in_kernel else None

    def chunk(s, e, z):
        st, epi = sweep.fused_(r.plan, z, r.targets[s:e], token_inputs.select(slice(s, e)))
        stats.put_(s, e, st)
        loss_t[s:e] = epi.loss
        if adv_rows is not None:
            adv_rows[s:e] = epi.adv

    grads = sweep.sweep(r.plan, r.hidden, r.call.weight, r.call.bias, _around(r, chunk, kl, coef), r.call.needs)
    advantages = r.advantages
    if adv_rows is not None:
        advantages = _sequence_advantages(adv_rows, token_inputs.seq, inputs, r.call.options, inputs.mask.shape[0])
    return _result(r, loss_t.sum(), r.full(stats.logp), r.full(stats.entropy), grads, weights, kl, advantages)


def _sequence_sweep(r: RealRows) -> LossResult:
    """A sequence-scope objective, chunks cut at sequence boundaries: each chunk's coefficients
    from its own statistics while its logits are in the buffer."""
    ent0 = _stats_sweep(r)[2] if r.plan.entropy_sweep else None
    inputs, weights = _aggregation(r, ent0)
    loss_of = _objective(r, inputs, weights)
    kl, coef = _kl_rows(r, weights)
    total = r.call.hidden.shape[0]
    logp = torch.zeros(total, dtype=r.acc, device=r.hidden.device)
    ent = torch.zeros(total, dtype=r.acc, device=r.hidden.device)
    rows = r.rows

    def chunk(s, e, z):
        st = sweep.stats(r.plan, z, r.targets[s:e])
        # rows of later sequences still hold 0: they do not reach these rows' coefficients
        logp.index_copy_(0, rows[s:e], st.logp)
        ent.index_copy_(0, rows[s:e], st.entropy)
        dlogp, dent, _ = autodiff.gradients(loss_of, logp, ent)
        sweep.grad_(r.plan, z, r.targets[s:e], st, dlogp.index_select(0, rows[s:e]),
                    dent.index_select(0, rows[s:e]) if r.plan.entropy_grad else None)

    grads = sweep.sweep(r.plan, r.hidden, r.call.weight, r.call.bias, _around(r, chunk, kl, coef), r.call.needs)
    return _result(r, loss_of(logp, ent).detach(), logp, ent, grads, weights, kl, r.advantages)


def _two_sweeps(r: RealRows) -> LossResult:
    """A sequence longer than a chunk, or a batch-scope objective: statistics for every row, the
    coefficients, then a gradient sweep that recomputes the logits. The exact KL (values and
    gradient) comes from the gradient sweep alone, which makes the reference's logits anyway: its
    coefficients depend on the mask only, so the statistics sweep need not compute it."""
    st, logp, ent, _ = _stats_sweep(r)
    inputs, weights = _aggregation(r, ent)
    loss_of = _objective(r, inputs, weights)
    dlogp, dent, loss = autodiff.gradients(loss_of, logp, ent)
    dent = dent.index_select(0, r.rows) if r.plan.entropy_grad else None
    around, kl = None, None
    if r.kl is not None:
        kl, coef = _kl_rows(r, weights)
        around = lambda work: r.kl.around(work, kl, coef)  # noqa: E731
    grads = sweep.backward_grads(r.plan, r.hidden, r.call.weight, r.call.bias, r.targets, st,
                                 dlogp.index_select(0, r.rows), dent, r.call.needs, around=around)
    return _result(r, loss, logp, ent, grads, weights, kl, r.advantages)


_PATHS = {"forward": _forward, "one_sweep": _one_sweep, "sequence_sweep": _sequence_sweep, "two_sweeps": _two_sweeps}
assert set(_PATHS) == set(planner.PATHS)


def _full_or_none(r: RealRows, grad_rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if grad_rows is None else r.full(grad_rows)


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


def token_logprobs_forward(call: LogprobsCall):
    """(RowStats [n], plan) of hidden [n, H]: log-probs of ``targets`` and entropies (0 without
    ``need_entropy``)."""
    plan = planner.plan_call(call.hidden, call.weight, call.options, call.execution, call.vocab_parallel,
                             need_entropy=call.need_entropy)
    return sweep.forward_stats(plan, call.hidden, call.weight, call.bias, _targets(plan, call.targets)), plan


def token_logprobs_backward(call: LogprobsGradCall):
    """(grad_hidden, grad_weight, grad_bias) of ``sum(grad_logp * logp + grad_entropy * entropy)``
    (None where not in ``call.needs``), the logits recomputed from the forward's statistics."""
    plan = planner.plan_call(call.hidden, call.weight, call.options, call.execution, call.vocab_parallel,
                             need_grads=call.needs)
    stats = RowStats(call.lse, call.entropy, call.target_logit)
    return sweep.backward_grads(plan, call.hidden, call.weight, call.bias, _targets(plan, call.targets), stats,
                                call.grad_logp, call.grad_entropy, call.needs)


def _targets(plan: Plan, targets):
    """The row backends' targets: global ids, or under vocab parallelism (checked against
    the whole vocabulary, known only once the ranks have exchanged their slices) local ones."""
    if plan.vocab is None:
        return targets
    validation.token_ids("targets", targets, plan.vocab.vocab_size)
    return plan.vocab.local_targets(targets)

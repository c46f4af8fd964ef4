"""The GRPO objective on per-token log-probs: O(B*T) work shared by every fast backend.

Every objective of TRL 1.16 (``GRPOTrainer._compute_loss``) and verl 0.9.1 (``ppo_loss``), composed
of a policy term, an aggregation, a KL estimator and the entropy bonus (the section "the composable
objective" below; docs/design.md, "Every objective"). Three forms of the same math, which check
each other in the tests:

- ``objective_loss``: the differentiable loss of [B, T] log-probs (and entropies), for every
  objective; the sequence- and batch-scope paths differentiate it with ``torch.func``.
- ``token_objective``: the per-token losses of a flat selection of tokens for a token-scope
  objective, the aggregation given as per-token weights; its sum over all tokens is
  ``objective_loss``. The one-sweep path differentiates it chunk by chunk.
- ``epilogue.token_epilogue``: the analytic per-token loss and coefficient ``dL/dlogp`` of TRL's
  token-level loss types: what the fused row kernels evaluate between statistics and gradient;
  ``token_epilogue_any`` picks it where it applies (``kernel_epilogue``), else autodiff.

verl's policy terms live in ``verl_objective``, the metrics in ``metrics``, the epilogue contract
(what the kernels share) in ``epilogue``, the ``torch.func`` plumbing in ``autodiff``.

The normalization of every loss type is folded into per-token weights (``token_weights``,
``aggregation_weights``), so that ``loss = sum_t weight_t * loss_t``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from grpo_kernels import epilogue
from grpo_kernels.autodiff import gradients
from grpo_kernels.epilogue import TokenEpilogue, TokenInputs, token_epilogue
from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions
from grpo_kernels.verl_objective import verl_count, verl_policy


def token_weights(mask: torch.Tensor, options: GRPOOptions, dtype: torch.dtype,
                  num_items: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T] weights that turn per-token losses into the loss type's normalized scalar.

    ``mask`` is [B, T]; B counts every row, fully masked ones included (TRL does too).
    ``num_items`` ([] tensor or number): dapo/cispo/vespo's ``num_items_in_batch``; None: mask.sum().
    """
    m = mask.to(dtype)
    rows = m.shape[0]
    lt = options.loss_type
    if lt in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * rows)
    if lt == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if lt == "dr_grpo":
        return m / (rows * options.max_completion_length)
    if lt in ("dapo", "cispo", "vespo"):
        n = m.sum() if num_items is None else torch.as_tensor(num_items).to(dtype)
        return m / n.clamp(min=1.0)
    if lt == "luspo":
        return m / rows
    raise ValueError(f"unknown loss_type {lt!r}")


def importance_weights(logp, old, mask, level: str) -> torch.Tensor:
    """exp(log_ratio) per token ([B, T]) or per sequence ([B, 1])."""
    log_ratio = logp - old
    if level == "sequence":
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return epilogue.exp_sat(log_ratio)


def policy_term(w: torch.Tensor, A: torch.Tensor, logp: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """Per-token (or per-sequence, broadcast) policy loss from importance weights ``w``."""
    lt = options.loss_type
    if lt == "cispo":
        return -torch.clamp(w, max=options.eps_high).detach() * A * logp
    if lt in CLIPPED_LOSS_TYPES:
        clipped = torch.clamp(w, 1.0 - options.epsilon_low, 1.0 + options.eps_high)
        unclipped = w if options.delta is None else torch.clamp(w, max=options.delta)
        return -torch.minimum(unclipped * A, clipped * A)
    if lt == "sapo":
        tau = torch.where(A > 0, options.sapo_temperature_pos, options.sapo_temperature_neg).to(w.dtype)
        return -torch.sigmoid(tau * (w - 1)) * 4 / tau * A
    raise ValueError(f"unknown loss_type {lt!r}")


def k3_kl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d = ref - logp
    return epilogue.exp_sat(d) - d - 1


# ================================================================ the composable objective
#
# loss = sum_t w_pol * policy_t * scale_t  +  beta * sum_t w_kl * kl_t  -  entropy_coef * sum_t w_ent * H_t
#
# - policy_t: the policy term (TRL's loss_type, or verl's policy_loss), per token or per sequence;
# - scale_t: the factors TRL and verl multiply into the policy term only (the vLLM / rollout
#   importance-sampling ratio, the high-entropy mask, the off-policy sequence mask);
# - w_pol, w_kl, w_ent: the aggregation (TRL's loss-type normalizers or verl's loss_agg_mode with its
#   global-batch normalizers) as per-token weights: every aggregation both frameworks use is linear;
# - kl_t: the KL estimator (TRL's k3, or verl's k1 / abs / k2 / low_var_kl and their "+" forms).
#
# ``scope`` says what a token's gradient coefficient depends on, hence the plan's path: "token" (its own
# log-prob: one fused sweep), "sequence" (its sequence's log-probs: the sequence-cut sweep) or "batch"
# (every log-prob of the call: a statistics sweep first).


#: LossInputs fields the loss derives itself (not call arguments)
DERIVED_INPUTS = ("entropy_mask",)


@dataclass
class LossInputs:
    """The per-call tensors of the objective, [B, T] (``adv`` and ``is_ratio`` may be [B, 1]).

    ``old=None``: on-policy (old = logp.detach()); ``sampling``: the sampler's log-probs for TRL's
    off-policy mask (None: old); ``num_items``: TRL's dapo/cispo/vespo normalizer, verl's
    ``batch_num_tokens``; ``num_sequences``: verl's ``global_batch_size``. Padding positions hold
    neutral values (0) already.
    """

    mask: torch.Tensor
    adv: Optional[torch.Tensor]  # None: computed from ``rewards`` (grpo_loss(rewards=...))
    old: Optional[torch.Tensor] = None
    ref: Optional[torch.Tensor] = None
    is_ratio: Optional[torch.Tensor] = None
    sampling: Optional[torch.Tensor] = None
    num_items: Optional[torch.Tensor] = None
    num_sequences: Optional[torch.Tensor] = None
    #: rewards [B] or [B, R] (NaN: unscored) and the reward functions' weights [R] (None: ones): the
    #: advantages then come from them (options.num_generations / scale_rewards / reward_eps)
    rewards: Optional[torch.Tensor] = None
    reward_weights: Optional[torch.Tensor] = None
    entropy_mask: Optional[torch.Tensor] = None  # bool [B, T]: TRL's top_entropy_quantile selection


def scope(options: GRPOOptions) -> str:
    """What a token's dL/dlogp depends on: "token", "sequence" or "batch" (module comment)."""
    pl = options.policy_loss
    if pl in ("clip_cov", "kl_cov"):
        return "batch"
    if pl == "bypass_mode":
        from grpo_kernels import rollout_correction

        return rollout_correction.scope(options)
    if pl in ("gspo", "geo_mean"):
        return "sequence"
    if pl is None and (options.loss_type == "vespo" or options.importance_sampling_level == "sequence"
                       or options.off_policy_mask_threshold is not None):
        return "sequence"
    return "token"


def kernel_epilogue(options: GRPOOptions) -> bool:
    """Whether the fused row kernels' epilogue (``token_epilogue``) computes this objective: TRL's
    token-level loss types with its k3 KL, no entropy bonus."""
    return (options.policy_loss is None and options.loss_agg_mode is None and options.kl_estimator == "k3"
            and options.entropy_coef == 0.0 and scope(options) == "token")


# ---------------------------------------------------------------- aggregation as token weights


def _count(x: Optional[torch.Tensor], default: torch.Tensor, dtype) -> torch.Tensor:
    return default if x is None else torch.as_tensor(x).to(dtype=dtype, device=default.device)


def aggregation_weights(mask: torch.Tensor, mode: str, options: GRPOOptions, dtype: torch.dtype,
                        num_items=None, num_sequences=None) -> torch.Tensor:
    """[B, T] weights of verl 0.9.1's ``agg_loss(loss_mat, mask, mode, dp_size, batch_num_tokens,
    global_batch_size, loss_scale_factor)``: ``agg = sum(loss_mat * weights)``. A count verl would
    divide by when it is 0 (an all-padding batch) is clamped at 1 here: 0, not NaN."""
    m = mask.to(dtype)
    dp = float(options.dp_size)
    if mode == "token-mean":
        n = _count(num_items, m.sum(), dtype).clamp(min=1e-30 if num_items is not None else 1.0)
        return m / n * dp
    if mode == "token-sum":
        return m * dp
    lengths = m.sum(-1, keepdim=True)
    seq_mask = (lengths > 0).to(dtype)
    gbs = _count(num_sequences, seq_mask.sum(), dtype).clamp(min=1e-30 if num_sequences is not None else 1.0)
    if mode == "seq-mean-token-mean":
        return m / verl_count(mask, -1, keepdim=True).to(dtype) * seq_mask / gbs * dp
    w = m * seq_mask / gbs * dp
    if mode == "seq-mean-token-sum-norm":
        w = w / (options.loss_scale_factor if options.loss_scale_factor is not None else mask.shape[-1])
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    return w


@dataclass
class ObjectiveWeights:
    """Per-token aggregation weights, [B, T]: policy, KL and entropy terms."""

    policy: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor


def objective_weights(mask: torch.Tensor, options: GRPOOptions, dtype: torch.dtype, num_items=None,
                      num_sequences=None, entropy_mask: Optional[torch.Tensor] = None) -> ObjectiveWeights:
    """The aggregation of every term. TRL: the loss type's normalizer for policy and KL alike
    (``token_weights``), and the entropy bonus a plain mean over the effective mask (mask times the
    high-entropy mask), outside any loss-type normalizer. verl: ``loss_agg_mode`` for all three,
    except that its sapo aggregates the policy term seq-mean-token-mean whatever the mode."""
    mode = options.agg_mode
    if mode is None:
        pol = token_weights(mask, options, dtype, num_items)
        eff = mask.to(dtype) if entropy_mask is None else mask.to(dtype) * entropy_mask.to(dtype)
        ent = eff / eff.sum().clamp(min=1.0)
        return ObjectiveWeights(pol, pol, ent)
    shared = aggregation_weights(mask, mode, options, dtype, num_items, num_sequences)
    pol = shared
    if options.policy_loss == "sapo" and mode != "seq-mean-token-mean":
        pol = aggregation_weights(mask, "seq-mean-token-mean", options, dtype, num_items, num_sequences)
    return ObjectiveWeights(pol, shared, shared)


# ---------------------------------------------------------------- KL estimators


def kl_estimate(logp: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the policy against the reference (``GRPOOptions.kl_estimator``).

    "k3": TRL's ``exp(ref - logp) - (ref - logp) - 1`` (saturating exp, no clamps); verl's
    ``kl_penalty``: k1 = logp - ref, abs = |logp - ref|, k2 = (logp - ref)^2 / 2, low_var_kl = k3 with
    ref - logp clamped to [-20, 20] and the result to [-10, 10]; a "+" suffix keeps the value and
    takes k2's gradient (straight-through), k2 being its own "+" form. "full" (the exact KL) is not an
    estimate of log-probs: the row pass computes it (``grpo_kernels.exact_kl``).
    """
    if estimator == "full":
        raise ValueError("kl_estimator='full' is the exact KL over the vocabulary: it needs both heads' logits "
                         "(the divergence row pass, grpo_kernels.exact_kl), not the log-probs of the targets")
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    if base in ("k1", "k3"):
        value = logp - ref if base == "k1" else k3_kl(logp, ref)
    elif base == "abs":
        value = (logp - ref).abs()
    elif base == "k2":
        return 0.5 * (logp - ref).square()
    elif base == "low_var_kl":
        d = torch.clamp(ref - logp, min=-20, max=20)
        value = torch.clamp(torch.exp(d) - d - 1, min=-10, max=10)
    else:
        raise ValueError(f"unknown kl_estimator {estimator!r}")
    if not straight_through:
        return value
    k2 = 0.5 * (logp - ref).square()
    return k2 - k2.detach() + value.detach()


# ---------------------------------------------------------------- policy terms


def vespo_gamma_weights(adv, log_ratio, mask, is_ratio, options: GRPOOptions) -> torch.Tensor:
    """TRL 1.16's ``get_gamma_weights``, detached [B, 1]: phi(w) = e^lambda w^k e^(-lambda w) for the
    sequence ratio w = exp(sum_t log_ratio) (times the token IS ratios' product when given)."""
    with torch.no_grad():
        lower = math.log(1e-8)
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask.to(log_ratio.dtype)).sum(-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.clamp(torch.log(is_ratio.to(log_ratio.dtype)), lower, 20.0).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, lower, 20.0)
        w = torch.exp(log_w)
        pos = adv >= 0
        k = torch.where(pos, options.vespo_k_pos, options.vespo_k_neg).to(log_w.dtype)
        lam = torch.where(pos, options.vespo_lambda_pos, options.vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * w)
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(adv, logp, sampling, mask, threshold: float) -> torch.Tensor:
    """TRL 1.16's ``get_off_policy_mask`` (DeepSeek-V3.2): keep a sequence when its advantage is
    >= 0 or its mean KL(sampler || policy) is at most ``threshold``; [B, 1] (or [B, T]) 0/1."""
    kl = torch.nan_to_num(sampling - logp.detach(), nan=0.0)
    m = mask.to(kl.dtype)
    avg = (kl * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (avg <= threshold)).to(kl.dtype)


def _trl_policy(logp, old, adv, inputs: LossInputs, options: GRPOOptions):
    """(per-token policy loss, importance weights w, whether the IS ratio was folded in) of a TRL loss type."""
    w = importance_weights(logp, old, inputs.mask, options.importance_sampling_level)
    if options.loss_type == "vespo":
        phi = vespo_gamma_weights(adv, logp - old, inputs.mask, inputs.is_ratio, options)
        return -phi * adv * logp, w, True
    return policy_term(w, adv, logp, options), w, False


# ---------------------------------------------------------------- the whole objective


def objective_loss(logp: torch.Tensor, entropy: Optional[torch.Tensor], inputs: LossInputs,
                   options: GRPOOptions, weights: Optional[ObjectiveWeights] = None) -> torch.Tensor:
    """The differentiable loss of [B, T] log-probs (and entropies, for the entropy bonus).

    TRL 1.16's ``GRPOTrainer._compute_loss`` for a TRL loss type; verl 0.9.1's ``ppo_loss`` with
    ``policy_loss`` / ``loss_agg_mode``. ``weights``: the aggregation, when already computed.
    """
    mask = inputs.mask
    dtype = logp.dtype
    old = logp.detach() if inputs.old is None else inputs.old.to(dtype)
    adv = inputs.adv.to(dtype)
    is_ratio = None if inputs.is_ratio is None else inputs.is_ratio.to(dtype)
    if weights is None:
        weights = objective_weights(mask, options, dtype, inputs.num_items, inputs.num_sequences, inputs.entropy_mask)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def weighted(x, w):
        # where() rather than a product: a masked position's value never reaches the sum
        return torch.where(w != 0, x.expand_as(w) * w, zero).sum()

    w = None
    if options.policy_loss is None:
        per_token, w, folded = _trl_policy(logp, old, adv, inputs, options)
        if options.off_policy_mask_threshold is not None:
            sampling = old if inputs.sampling is None else inputs.sampling.to(dtype)
            per_token = per_token * off_policy_mask(adv, logp, sampling, mask, options.off_policy_mask_threshold)
        if inputs.entropy_mask is not None:
            per_token = epilogue.scale(per_token.expand_as(logp), inputs.entropy_mask.to(dtype))
        if is_ratio is not None and not folded:
            per_token = epilogue.scale(per_token.expand_as(logp), is_ratio.expand_as(logp))
        loss = weighted(per_token, weights.policy)
    else:
        per_token, aggregated, policy_mask = verl_policy(logp, old, adv, mask, is_ratio, options)
        if aggregated:
            loss = per_token
        elif policy_mask is mask:
            loss = weighted(per_token, weights.policy)
        else:  # bypass_mode's rejection sampling changes the policy term's mask (only its)
            loss = weighted(per_token, objective_weights(policy_mask, options, dtype, inputs.num_items,
                                                         inputs.num_sequences).policy)
    return _with_penalties(loss, logp, entropy, inputs.ref, w, weights.kl, weights.entropy, options, weighted)


def _with_penalties(loss, logp, entropy, ref, is_weight, kl_weights, entropy_weights, options: GRPOOptions,
                    weighted: Callable) -> torch.Tensor:
    """``loss`` + beta * the KL term - entropy_coef * the entropy bonus, each aggregated by
    ``weighted(x, weights)`` (``is_weight``: the IS weight the KL is multiplied by under
    ``use_bias_correction_kl``): the part ``objective_loss`` and ``token_objective`` share."""
    if options.beta != 0.0:
        ref = epilogue.required_ref(ref, options.beta)
        kl = kl_estimate(logp, ref.to(logp.dtype), options.kl_estimator)
        if options.use_bias_correction_kl:
            kl = kl * is_weight
        loss = loss + options.beta * weighted(kl, kl_weights)
    if options.entropy_coef != 0.0:
        loss = loss - options.entropy_coef * weighted(entropy, entropy_weights)
    return loss


def token_objective(logp: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs,
                    options: GRPOOptions) -> torch.Tensor:
    """Per-token weighted losses [n] of a flat selection of tokens for a token-scope objective
    (``scope(options) == "token"``): ``objective_loss``'s terms with the aggregation given as per-token
    weights (``inputs.weight``, ``kl_weight``, ``entropy_weight``). Summed over every token it is
    ``objective_loss``."""
    dtype = logp.dtype
    old = logp.detach() if inputs.old is None else inputs.old.to(dtype)
    adv = inputs.adv.to(dtype)
    scale = None if inputs.policy_scale is None else inputs.policy_scale.to(dtype)
    mask = (inputs.weight != 0)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def weighted(x, w):
        w = w.to(dtype)
        return torch.where(w != 0, x * w, zero)

    if options.policy_loss is None:
        w = importance_weights(logp, old, mask, "token")
        per_token = policy_term(w, adv, logp, options)
        if scale is not None:
            per_token = epilogue.scale(per_token, scale)
    else:
        w = None
        per_token, _, _ = verl_policy(logp, old, adv, mask, scale, options)
    kl_w = inputs.weight if inputs.kl_weight is None else inputs.kl_weight
    return _with_penalties(weighted(per_token, inputs.weight), logp, entropy, inputs.ref, w, kl_w,
                           inputs.entropy_weight, options, weighted)


def token_epilogue_any(logp: torch.Tensor, entropy: torch.Tensor, inputs: TokenInputs,
                       options: GRPOOptions):
    """(TokenEpilogue, dL/dentropy or None) of any token-scope objective: the analytic
    ``token_epilogue`` where it applies (what the fused kernels compute), else autodiff of
    ``token_objective``."""
    if kernel_epilogue(options):
        return token_epilogue(logp, inputs, options), None
    def total(lp, ent):
        per_token = token_objective(lp, ent, inputs, options)
        return per_token.sum(), per_token

    dlogp, dent, (_, loss) = gradients(total, logp.detach(), entropy.detach(), has_aux=True)
    return TokenEpilogue(loss, dlogp), (dent if options.entropy_coef != 0.0 else None)

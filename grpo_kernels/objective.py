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
- ``token_epilogue``: the analytic per-token loss and coefficient ``dL/dlogp`` of TRL's token-level
  loss types: what the fused row kernels evaluate between statistics and gradient ("the epilogue").

The normalization of every loss type is folded into per-token weights (``token_weights``,
``aggregation_weights``), so that ``loss = sum_t weight_t * loss_t``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from grpo_kernels.backends.base import TokenEpilogue
from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions


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


@dataclass
class TokenInputs:
    """Per-token inputs of the objective, all [n] (a flat selection of tokens).

    ``weight`` is the normalizer from ``token_weights``; ``policy_scale`` multiplies the
    policy term only (vLLM importance-sampling ratio times the entropy mask), never KL.
    """

    old: Optional[torch.Tensor]  # None: on-policy, old = logp.detach()
    adv: Optional[torch.Tensor]  # None: each token's advantage from ``rewards`` (below)
    weight: torch.Tensor
    ref: Optional[torch.Tensor] = None
    policy_scale: Optional[torch.Tensor] = None
    #: the KL and entropy terms' aggregation weights where they differ from ``weight`` (verl's sapo
    #: aggregates its policy term on its own; TRL's entropy bonus is a plain mean): None = weight / unused
    kl_weight: Optional[torch.Tensor] = None
    entropy_weight: Optional[torch.Tensor] = None
    #: rewards -> advantages in the epilogue (``adv`` None): the whole batch's rewards [B, R] and the
    #: reward functions' weights [R] (not per token: every token reads its group, or the batch), and
    #: each token's sequence index ``seq`` [n] (int64) into them; ``reward_advantages`` is the formula
    rewards: Optional[torch.Tensor] = None
    reward_weights: Optional[torch.Tensor] = None
    seq: Optional[torch.Tensor] = None

    #: the fields that hold the whole batch's values, not one per token
    WHOLE_BATCH = ("rewards", "reward_weights")

    def select(self, rows) -> "TokenInputs":
        """The tokens ``rows`` of the selection (batch-level fields are shared)."""
        def pick(name):
            t = getattr(self, name)
            return t if (t is None or name in self.WHOLE_BATCH) else t[rows]

        return TokenInputs(**{f.name: pick(f.name) for f in fields(self)})

    def advantages(self, options: GRPOOptions, dtype: torch.dtype) -> torch.Tensor:
        """Each token's advantage [n]: ``adv``, or its sequence's ``reward_advantages``."""
        if self.adv is not None:
            return self.adv.to(dtype)
        if self.rewards is None or self.seq is None:
            raise ValueError("TokenInputs needs adv, or rewards with seq")
        per_sequence = reward_advantages(self.rewards, self.reward_weights, options)
        return per_sequence.to(dtype)[self.seq.to(device=per_sequence.device, dtype=torch.int64)]


def reward_advantages(rewards: torch.Tensor, reward_weights: Optional[torch.Tensor],
                      options: GRPOOptions) -> torch.Tensor:
    """Advantages [B] from rewards [B] or [B, R] (NaN: unscored) and weights [R] (None: ones), in
    the rewards' accumulation dtype: TRL 1.16's sum_then_normalize, i.e.
    ``advantages.group_advantages(rewards, options.num_generations, scale_rewards=, weights=, eps=)``
    on inputs ``validation.rewards`` has checked (no second check, no read-back). What the fused
    kernels' epilogue computes for a token's sequence (torch mirror)."""
    from grpo_kernels import advantages

    return advantages.sum_then_normalize(rewards, reward_weights, options.num_generations, options.scale_rewards,
                                         options.reward_eps)


def _exp_sat(x: torch.Tensor) -> torch.Tensor:
    """exp(x) saturated at the dtype's largest finite value instead of overflowing to inf.

    The clamp is straight-through (its gradient is 1), so d exp_sat(x)/dx = exp_sat(x):
    a zero upstream gradient then gives 0, never 0 * inf = NaN. Below the overflow
    threshold (log ratios < 88.7 in fp32, < 709.7 in fp64) it is exactly ``torch.exp``.
    """
    cap = math.floor(math.log(torch.finfo(x.dtype).max) * 1000) / 1000  # 88.722 (fp32), 709.782 (fp64)
    return torch.exp(x.detach().clamp(max=cap) + (x - x.detach()))


def _scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * s, exactly 0 where s == 0 (a zero scale or weight wins over an overflowed x)."""
    return torch.where(s == 0, torch.zeros((), dtype=x.dtype, device=x.device), x * s)


def _min_grad_split(a: torch.Tensor, b: torch.Tensor):
    """Weights torch.minimum's backward gives its two arguments (ties split evenly)."""
    tie = (a == b).to(a.dtype)
    wa = (a < b).to(a.dtype) + 0.5 * tie
    wb = (a > b).to(a.dtype) + 0.5 * tie
    return wa, wb


def token_epilogue(logp: torch.Tensor, inputs: TokenInputs, options: GRPOOptions) -> TokenEpilogue:
    """Analytic per-token loss and coefficient, token-level importance sampling only."""
    if options.importance_sampling_level != "token":
        raise ValueError("token_epilogue needs importance_sampling_level='token'")
    logp = logp.detach()
    A = inputs.advantages(options, logp.dtype)
    old = logp if inputs.old is None else inputs.old.to(logp.dtype)
    w = _exp_sat(logp - old)
    lt = options.loss_type
    eh = options.eps_high
    if lt == "cispo":
        clamped = torch.clamp(w, max=eh)
        loss = -clamped * A * logp
        dlogp = -clamped * A
    elif lt in CLIPPED_LOSS_TYPES:
        lo, hi = 1.0 - options.epsilon_low, 1.0 + eh
        w2 = torch.clamp(w, lo, hi)
        dw2 = ((w >= lo) & (w <= hi)).to(w.dtype)
        if options.delta is not None:
            w1 = torch.clamp(w, max=options.delta)
            dw1 = (w <= options.delta).to(w.dtype)
        else:
            w1, dw1 = w, torch.ones_like(w)
        a, b = w1 * A, w2 * A
        wa, wb = _min_grad_split(a, b)
        loss = -torch.minimum(a, b)
        dlogp = -(wa * dw1 + wb * dw2) * A * w
    elif lt == "sapo":
        tau = torch.where(A > 0, options.sapo_temperature_pos, options.sapo_temperature_neg).to(w.dtype)
        sig = torch.sigmoid(tau * (w - 1))
        loss = -sig * 4 / tau * A
        dlogp = -4 * sig * (1 - sig) * A * w
    else:
        raise ValueError(f"unknown loss_type {lt!r}")
    if inputs.policy_scale is not None:
        scale = inputs.policy_scale.to(logp.dtype)
        loss, dlogp = _scale(loss, scale), _scale(dlogp, scale)
    if options.beta != 0.0:
        ref = inputs.ref.to(logp.dtype)
        e = _exp_sat(ref - logp)
        kl = e - (ref - logp) - 1
        dkl = 1 - e
        if options.use_bias_correction_kl:
            # d(kl * w)/dlogp = (dkl + kl) * w, and dkl + kl = -(ref - logp) exactly: summing the
            # two saturated halves would cancel e (inf - inf = NaN, or with FMA, +inf)
            kl, dkl = kl * w, -(ref - logp) * w
        loss = loss + options.beta * kl
        dlogp = dlogp + options.beta * dkl
    weight = inputs.weight.to(logp.dtype)
    return TokenEpilogue(_scale(loss, weight), _scale(dlogp, weight), A if inputs.adv is None else None)


def importance_weights(logp, old, mask, level: str) -> torch.Tensor:
    """exp(log_ratio) per token ([B, T]) or per sequence ([B, 1])."""
    log_ratio = logp - old
    if level == "sequence":
        m = mask.to(logp.dtype)
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return _exp_sat(log_ratio)


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
    return _exp_sat(d) - d - 1


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
        return m / _verl_count(mask, -1, keepdim=True).to(dtype) * seq_mask / gbs * dp
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
    takes k2's gradient (straight-through), k2 being its own "+" form.
    """
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


def _verl_count(mask: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """verl's ``mask.sum(dim) + 1e-8`` for its bool masks: an integer count plus a Python float is
    float32 there, so the 1e-8 vanishes for any count >= 1 (exactly the count, below 2**24 tokens)
    and stays only for an empty row. Hence the count clamped at 1e-8, in the mask's float dtype:
    the same for a bool and a 0/1 float mask."""
    m = mask if mask.is_floating_point() else mask.to(torch.float64)
    count = m.sum() if dim is None else m.sum(dim, keepdim=keepdim)
    return count.clamp(min=1e-8)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """verl's ``masked_mean``: sum(x * mask) / (sum(mask) + 1e-8)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / _verl_count(mask).to(x.dtype) if dim is None else \
        (x * m).sum(dim) / _verl_count(mask, dim).to(x.dtype)


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


def _ratio20(logp, old):
    lr = torch.clamp(logp - old, min=-20.0, max=20.0)
    return torch.exp(lr)


def verl_policy(logp, old, adv, mask, is_ratio, options: GRPOOptions):
    """verl 0.9.1's ``get_policy_loss_fn(policy_loss)`` per-token loss matrix (rollout IS weights
    applied), or for geo_mean the aggregated scalar. Returns (loss, aggregated, effective mask)."""
    pl = options.policy_loss
    lo, hi = options.epsilon_low, options.eps_high
    A = adv
    scale = is_ratio

    def scaled(x):
        return x if scale is None else x * scale

    if pl == "vanilla":
        return scaled(_dual_clip(logp, old, A, lo, hi, options.clip_ratio_c)), False, mask
    if pl in ("dppo_tv", "dppo_kl"):
        ratio = _ratio20(logp, old)
        truncated = torch.clamp(ratio, max=options.clip_ratio_c).detach()
        prob, old_prob = torch.exp(logp), torch.exp(old)
        if pl == "dppo_tv":
            valid_pos = (prob - old_prob) <= hi
            valid_neg = (prob - old_prob) >= -lo
        else:
            bkl = old_prob * (old - logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            valid_pos = (bkl <= hi) | (prob <= old_prob)
            valid_neg = (bkl <= lo) | (prob >= old_prob)
        valid = torch.where(A > 0, valid_pos, valid_neg).detach().to(logp.dtype)
        return scaled(-A * truncated * logp * valid), False, mask
    if pl == "gspo":
        m = mask.to(logp.dtype)
        seq = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        log_sir = torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
        sir = torch.exp(log_sir)
        pg = torch.maximum(-A * sir, -A * torch.clamp(sir, 1 - lo, 1 + hi))
        return scaled(pg), False, mask
    if pl == "sapo":
        ratio = _ratio20(logp, old)
        # verl makes its taus tensors of the advantages' dtype (TRL leaves Python floats to torch.where,
        # i.e. float32): 1.05 differs by 4e-8 between the two
        tau = torch.where(A > 0, torch.as_tensor(options.sapo_temperature_pos, dtype=A.dtype, device=A.device),
                          torch.as_tensor(options.sapo_temperature_neg, dtype=A.dtype, device=A.device))
        return scaled(-(torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)) * A), False, mask
    if pl == "gpg":
        return scaled(-logp * A), False, mask
    if pl == "dro":
        lr = logp - old
        return scaled(-(logp * A - 0.5 * options.dro_beta * lr.square())), False, mask
    if pl == "cispo":
        clipped = torch.clamp(_ratio20(logp, old), 1 - lo, 1 + hi).detach()
        return scaled(-clipped * A * logp), False, mask
    if pl == "clip_cov":
        return scaled(_clip_cov(logp, old, A, mask, options)), False, mask
    if pl == "kl_cov":
        return scaled(_kl_cov(logp, old, A, mask, options)), False, mask
    if pl == "geo_mean":
        return _geo_mean(logp, old, A, mask, is_ratio, lo, hi), True, mask
    if pl == "bypass_mode":
        return _bypass(logp, old, A, mask, options)
    raise ValueError(f"unknown policy_loss {pl!r}")


def _bypass(logp, old, A, mask, options):
    """verl's ``compute_policy_loss_bypass_mode``: (per-token loss [B, T], False, effective mask).

    ``old`` holds the rollout's log-probs; the IS weights and the rejection mask come from
    ``rollout_correction.correction`` on the detached log ratio. The loss is 0 at rejected tokens
    already (so a token-scope evaluation, aggregated with the original mask's weights, gets the same
    sum); on flat [n] inputs (a token-scope selection) only token-local work is done.
    """
    from grpo_kernels import rollout_correction

    if logp.dim() == 1 and rollout_correction.scope(options) != "token":
        raise RuntimeError(f"bypass_mode on a flat token selection needs a token-scope objective, "
                           f"got scope {rollout_correction.scope(options)!r}")
    w, rs_keep, effective = rollout_correction.correction(logp.detach() - old, mask, options,
                                                          with_weights=rollout_correction.uses_weights(options))
    if options.bypass_loss_type == "ppo_clip":  # the ratio to the rollout policy is its own IS correction
        per_token = _dual_clip(logp, old, A, options.epsilon_low, options.eps_high, options.clip_ratio_c)
    else:  # reinforce
        per_token = -A * logp if w is None else -A * logp * w
    if rs_keep is not None:
        per_token = torch.where(rs_keep, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return per_token, False, effective


def _dual_clip(logp, old, A, lo, hi, c):
    ratio = _ratio20(logp, old)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - lo, 1 + hi)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-A * c, clip1)
    return torch.where(A < 0, clip2, clip1)


def _clip_cov(logp, old, A, mask, options):
    """Clip-Cov: PPO-clip with a random ``clip_cov_ratio`` share of the tokens whose covariance of
    advantage and log-prob lies in (lb, ub) excluded. The share is drawn with ``torch.randperm`` on
    the default CPU generator, as verl draws it: seed it to reproduce a call."""
    lo, hi = options.epsilon_low, options.eps_high
    ratio = torch.exp(logp - old)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - lo, 1 + hi)
    valid = mask > 0
    clip_by_origin = (pg2 > pg1) & valid
    A_full = A.expand_as(logp)
    cov = (A_full - _masked_mean(A_full, mask)) * (logp.detach() - _masked_mean(logp.detach(), mask))
    cov = cov.masked_fill(~valid | clip_by_origin, -torch.inf)
    clip_num = max(int(options.clip_cov_ratio * float(mask.sum())), 1)
    idx = torch.nonzero((cov < options.clip_cov_ub) & (cov > options.clip_cov_lb) & valid)
    corr = torch.ones_like(logp)
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[: min(clip_num, len(idx))]]
        corr[idx[:, 0], idx[:, 1]] = 0
    return torch.maximum(pg1, pg2) * corr


def _kl_cov(logp, old, A, mask, options):
    """KL-Cov: policy gradient with a |log ratio| penalty on the ``kl_cov_ratio`` share of tokens of
    largest covariance of advantage and log-prob."""
    lr = logp - old
    ratio = torch.exp(lr)
    A_full = A.expand_as(logp)
    pg = -A_full * ratio
    pg_kl = -A_full * ratio + options.ppo_kl_coef * lr.abs()
    valid = mask > 0
    flat_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    adv_v = A_full[valid].detach().reshape(-1).cpu()
    lp_v = logp[valid].detach().reshape(-1).cpu()
    if min(options.kl_cov_ratio, len(adv_v)) != 0:
        cov = (adv_v - adv_v.mean()) * (lp_v - lp_v.mean())
        top = torch.topk(cov, max(1, int(len(cov) * options.kl_cov_ratio)), largest=True).indices
        if len(top) != 0:
            pick = torch.zeros(logp.numel(), dtype=torch.bool, device=logp.device)
            pick[flat_idx[top.to(flat_idx.device)]] = True
            pg = torch.where(pick.view_as(logp), pg_kl, pg)
    return pg


def _geo_mean(logp, old, A, mask, is_ratio, lo, hi):
    """GMPO: -mean over sequences of adv_seq * exp(mean_t sign(A) min(sign(A) r_t, sign(A) clip(r_t)))."""
    m = mask.to(logp.dtype)
    nk = logp - old
    sgn = torch.sign(A)
    nk_min = sgn * torch.min(sgn * nk, sgn * torch.clamp(nk, -lo, hi))
    length = _verl_count(mask, -1).to(logp.dtype)
    ratio = torch.exp((nk_min * m).sum(-1) / length)
    adv = (A.expand_as(logp) * m).sum(-1) / length
    pg = -adv * ratio
    if is_ratio is not None:
        pg = pg * torch.exp((torch.log(is_ratio.expand_as(logp) + 1e-10) * m).sum(-1) / length)
    return torch.mean(pg)


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
            per_token = _scale(per_token.expand_as(logp), inputs.entropy_mask.to(dtype))
        if is_ratio is not None and not folded:
            per_token = _scale(per_token.expand_as(logp), is_ratio.expand_as(logp))
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
        kl = kl_estimate(logp, ref.to(logp.dtype), options.kl_estimator)
        if options.use_bias_correction_kl:
            kl = kl * is_weight
        loss = loss + options.beta * weighted(kl, kl_weights)
    if options.entropy_coef != 0.0:
        loss = loss - options.entropy_coef * weighted(entropy, entropy_weights)
    return loss


def token_objective(logp: torch.Tensor, entropy: torch.Tensor, inputs: "TokenInputs",
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
            per_token = _scale(per_token, scale)
    else:
        w = None
        per_token, _, _ = verl_policy(logp, old, adv, mask, scale, options)
    kl_w = inputs.weight if inputs.kl_weight is None else inputs.kl_weight
    return _with_penalties(weighted(per_token, inputs.weight), logp, entropy, inputs.ref, w, kl_w,
                           inputs.entropy_weight, options, weighted)


def functorch_keys_enabled():
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


def gradients(fn, logp: torch.Tensor, entropy: torch.Tensor, has_aux: bool = False):
    """(dL/dlogp, dL/dentropy, L) of a scalar ``fn(logp, entropy)``, with ``torch.func`` (this runs
    inside a custom op, below the autograd dispatch key, where only functorch still differentiates).
    ``has_aux``: ``fn`` returns ``(L, aux)`` and the third result is ``(L, aux)``, aux detached."""
    with functorch_keys_enabled():
        (dlogp, dent), value = torch.func.grad_and_value(fn, argnums=(0, 1), has_aux=has_aux)(logp, entropy)
    return dlogp, dent, value


def token_epilogue_any(logp: torch.Tensor, entropy: torch.Tensor, inputs: "TokenInputs",
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


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` (one process): tokens whose entropy is at or above
    the ``1 - quantile`` quantile of the unmasked entropies. Returns bool [B, T]."""
    m = mask.bool()
    local = entropy[m].float()
    if local.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(local, 1.0 - quantile)
    # TRL compares entropies * mask.float(): a weighted mask scales the entropy it compares
    return ((entropy * mask.to(entropy.dtype)) >= threshold) & m


@dataclass
class GRPOMetrics:
    """Detached diagnostics, as TRL logs them (global masked means over tokens)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    kl_mean: Optional[torch.Tensor]
    clip_ratio_low: Optional[torch.Tensor]
    clip_ratio_high: Optional[torch.Tensor]
    clip_ratio_region: Optional[torch.Tensor]
    cispo_clip_ratio: Optional[torch.Tensor]
    entropy_mean: torch.Tensor
    #: [B]: the advantages computed from ``rewards=`` (None when the caller gave advantages)
    advantages: Optional[torch.Tensor] = None
    #: [B]: each sequence's share of low / high clipped tokens (TRL logs their min / max;
    #: NaN for a row without tokens); None where ``clip_ratio_low`` is None
    seq_clip_ratio_low: Optional[torch.Tensor] = None
    seq_clip_ratio_high: Optional[torch.Tensor] = None


def compute_metrics(logp, entropy, mask, adv, options: GRPOOptions, old=None, ref=None) -> GRPOMetrics:
    """Metrics from detached [B, T] logps/entropy; ``adv`` is [B, 1] or [B, T] as TRL holds it."""
    logp, entropy = logp.detach(), entropy.detach()
    m = mask.to(logp.dtype)
    count = m.sum().clamp(min=1.0)

    def masked_mean(x):
        if x.shape[-1] == 1:  # TRL: one value per sequence, and every row counts
            return x.sum() / max(x.shape[0], 1)
        return (x * m).sum() / count

    def seq_mean(x):  # TRL's masked_seq_mean: a [B, 1] value already is one per sequence
        return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

    old = logp if old is None else old.to(logp.dtype)
    w = importance_weights(logp, old, mask, options.importance_sampling_level)
    A_w = adv.to(logp.dtype)
    kl_mean = low = high = region = cispo = seq_low = seq_high = None
    if options.beta != 0.0:
        kl = kl_estimate(logp, ref.to(logp.dtype), options.kl_estimator)
        if options.use_bias_correction_kl:
            kl = kl * w
        kl_mean = masked_mean(kl)
    if options.verl_style:  # verl's own metrics: grpo_kernels.integrations.verl computes them
        pass
    elif options.loss_type in CLIPPED_LOSS_TYPES:
        wc = w if options.delta is None else torch.clamp(w, max=options.delta)
        is_low = (wc < 1 - options.epsilon_low) & (A_w < 0)
        is_high = (wc > 1 + options.eps_high) & (A_w > 0)
        low, high = masked_mean(is_low.to(logp.dtype)), masked_mean(is_high.to(logp.dtype))
        region = masked_mean((is_low | is_high).to(logp.dtype))
        seq_low, seq_high = seq_mean(is_low.to(logp.dtype)), seq_mean(is_high.to(logp.dtype))
    elif options.loss_type == "cispo":
        cispo = masked_mean(((w > options.eps_high) & (A_w > 0)).to(logp.dtype))
    entropy_mean = (entropy * m).sum() / count
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return GRPOMetrics(
        logps=torch.where(m != 0, logp, zero),
        entropy=torch.where(m != 0, entropy, zero),
        kl_mean=kl_mean,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_region=region,
        cispo_clip_ratio=cispo,
        entropy_mean=entropy_mean,
        seq_clip_ratio_low=seq_low,
        seq_clip_ratio_high=seq_high,
    )

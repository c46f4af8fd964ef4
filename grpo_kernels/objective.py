"""The GRPO objective on per-token log-probs: O(B*T) work shared by every fast backend.

Two forms of the same math (TRL 1.16's ``GRPOTrainer._compute_loss``; docs/design.md), which
check each other in the tests:

- ``token_epilogue``: the analytic per-token loss and gradient coefficient
  ``dL/dlogp`` for token-level importance sampling. It is what a fused row pass
  evaluates between its statistics sweep and its gradient sweep ("the epilogue").
- ``objective_loss``: the differentiable loss of [B, T] log-probs in torch ops, for
  the cases whose coefficient needs more than the token itself (sequence-level
  importance sampling) and for the gradient of ``token_logprobs`` users.

The normalization of every loss type is folded into one per-token weight
(``token_weights``), so that ``loss = sum_t weight_t * loss_t``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions


def token_weights(mask: torch.Tensor, options: GRPOOptions, dtype: torch.dtype,
                  num_items: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T] weights that turn per-token losses into the loss type's normalized scalar.

    ``mask`` is [B, T]; B counts every row, fully masked ones included (TRL does too).
    ``num_items`` ([] tensor or number): dapo/cispo's ``num_items_in_batch``; None: mask.sum().
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
    if lt in ("dapo", "cispo"):
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
    adv: torch.Tensor
    weight: torch.Tensor
    ref: Optional[torch.Tensor] = None
    policy_scale: Optional[torch.Tensor] = None

    def select(self, rows) -> "TokenInputs":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TokenInputs(pick(self.old), self.adv[rows], self.weight[rows], pick(self.ref), pick(self.policy_scale))


@dataclass
class TokenEpilogue:
    """Per-token weighted loss ``weight * loss_t`` and its derivative ``dL/dlogp``, [n]."""

    loss: torch.Tensor
    dlogp: torch.Tensor


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
    A = inputs.adv.to(logp.dtype)
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
    return TokenEpilogue(_scale(loss, weight), _scale(dlogp, weight))


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


def objective_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    options: GRPOOptions,
    old: Optional[torch.Tensor] = None,
    ref: Optional[torch.Tensor] = None,
    policy_scale: Optional[torch.Tensor] = None,
    num_items: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable GRPO loss of [B, T] log-probs; adv is [B, T] (broadcast already)."""
    old = logp.detach() if old is None else old.to(logp.dtype)
    w = importance_weights(logp, old, mask, options.importance_sampling_level)
    per_token = policy_term(w, adv.to(logp.dtype), logp, options).expand_as(logp)
    if policy_scale is not None:
        per_token = _scale(per_token, policy_scale.to(logp.dtype))
    if options.beta != 0.0:
        kl = k3_kl(logp, ref.to(logp.dtype))
        per_token = per_token + options.beta * (kl * w if options.use_bias_correction_kl else kl)
    weights = token_weights(mask, options, logp.dtype, num_items)
    # where() rather than a product: a masked position's value never reaches the sum,
    # so a non-finite junk logp there cannot produce NaN.
    return torch.where(weights != 0, per_token * weights, torch.zeros_like(per_token)).sum()


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


def compute_metrics(logp, entropy, mask, adv, options: GRPOOptions, old=None, ref=None) -> GRPOMetrics:
    """Metrics from detached [B, T] logps/entropy; ``adv`` is [B, 1] or [B, T] as TRL holds it."""
    logp, entropy = logp.detach(), entropy.detach()
    m = mask.to(logp.dtype)
    count = m.sum().clamp(min=1.0)

    def masked_mean(x):
        if x.shape[-1] == 1:  # TRL: one value per sequence, and every row counts
            return x.sum() / max(x.shape[0], 1)
        return (x * m).sum() / count

    old = logp if old is None else old.to(logp.dtype)
    w = importance_weights(logp, old, mask, options.importance_sampling_level)
    A_w = adv.to(logp.dtype)
    kl_mean = low = high = region = cispo = None
    if options.beta != 0.0:
        kl = k3_kl(logp, ref.to(logp.dtype))
        if options.use_bias_correction_kl:
            kl = kl * w
        kl_mean = masked_mean(kl)
    if options.loss_type in CLIPPED_LOSS_TYPES:
        wc = w if options.delta is None else torch.clamp(w, max=options.delta)
        is_low = (wc < 1 - options.epsilon_low) & (A_w < 0)
        is_high = (wc > 1 + options.eps_high) & (A_w > 0)
        low, high = masked_mean(is_low.to(logp.dtype)), masked_mean(is_high.to(logp.dtype))
        region = masked_mean((is_low | is_high).to(logp.dtype))
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
    )

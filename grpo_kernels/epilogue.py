"""The epilogue contract: every fact the row kernels (torch, Triton, C++/CUDA) share, written once.

A fused row pass evaluates, between the statistics of a row and its gradient, the objective's
per-token loss and coefficient ``dL/dlogp`` (the "epilogue"). This module is the one home of:

- the data across that boundary: ``TokenInputs`` in, ``TokenEpilogue`` out;
- the torch form of the epilogue (``token_epilogue``), which the Triton device function
  (``backends/triton/objective_kernel.py``) and the C++ one (``csrc/row_pass.h``) follow operation
  for operation, with its saturating ``exp_sat`` and zero-winning ``scale``;
- the codes the kernels take: ``LOSS_KIND_CODES`` and ``SCALE_MODE_CODES`` (the enums ``LossKind``
  and ``ScaleMode`` of ``csrc/row_pass.h``; ``tests/test_epilogue_contract.py`` parses the header);
- the accumulation dtype (``accumulation_dtype``);
- the per-token input preparation: rewards as [B, R] in the accumulation dtype with default weights
  (``reward_matrix``), and the rule that ``ref`` is needed when ``beta != 0`` (``required_ref``);
- the rewards -> advantages formula the epilogue evaluates for a token's sequence (TRL 1.16's
  sum-then-normalize: ``combine_rewards``, ``group_normalize``, ``sum_then_normalize``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch

from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions

# ---------------------------------------------------------------- the kernels' codes

#: the epilogue's loss families as the kernels number them (csrc/row_pass.h ``LossKind``: kClipped,
#: kCispo, kSapo); ``loss_kind_code`` maps a TRL loss type onto them
LOSS_KIND_CODES = {"clipped": 0, "cispo": 1, "sapo": 2}
#: ``scale_rewards`` as the kernels number it (csrc/row_pass.h ``ScaleMode``: kScaleGroup, kScaleBatch,
#: kScaleNone)
SCALE_MODE_CODES = {"group": 0, "batch": 1, "none": 2}


def loss_kind_code(loss_type: str) -> int:
    """The kernels' ``LossKind`` code of a token-level TRL loss type (ValueError for any other)."""
    if loss_type in ("cispo", "sapo"):
        return LOSS_KIND_CODES[loss_type]
    if loss_type in CLIPPED_LOSS_TYPES:
        return LOSS_KIND_CODES["clipped"]
    raise ValueError(f"unknown loss_type {loss_type!r}")


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of ``dtypes`` is float64, else float32: every reduction, every kernel
    output and every advantage is computed in it."""
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


# ---------------------------------------------------------------- per-token input preparation


def required_ref(ref: Optional[torch.Tensor], beta: float) -> Optional[torch.Tensor]:
    """The reference log-probs a kernel reads: ``ref`` when ``beta != 0`` (a ValueError when it is
    missing), None otherwise (never read). The user-facing check is ``validation.grpo_batch``'s;
    this is the kernels' guard for callers that bypass it."""
    if beta == 0.0:
        return None
    if ref is None:
        raise ValueError("ref logps are required when beta != 0")
    return ref


def reward_matrix(rewards: torch.Tensor, reward_weights: Optional[torch.Tensor],
                  dtype: Optional[torch.dtype] = None, device=None):
    """(rewards [B, R], weights [R]) detached and contiguous, in ``dtype`` (default: the rewards'
    accumulation dtype; a kernel passes its own) on ``device`` (default: the rewards'): [B] rewards
    become [B, 1], None weights all ones."""
    acc = accumulation_dtype(rewards.dtype) if dtype is None else dtype
    device = rewards.device if device is None else device
    r = rewards.detach()
    r = (r.unsqueeze(1) if r.dim() == 1 else r).to(device=device, dtype=acc).contiguous()
    if reward_weights is None:
        w = torch.ones(r.shape[1], dtype=acc, device=device)
    else:
        w = reward_weights.detach().reshape(-1).to(device=device, dtype=acc).contiguous()
    return r, w


# ---------------------------------------------------------------- rewards -> advantages


def nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """TRL's ``nanstd``: unbiased std over the non-NaN entries, NaN when fewer than 2 of them.

    Same operations as ``trl.trainer.utils.nanstd`` (so float32 results agree bit for bit), except
    that the Bessel factor ``n / (n - 1)`` is formed in ``x``'s dtype: TRL forms it from an int64
    count with true division, i.e. in torch's default dtype (float32), which only matters for
    float64 inputs (TRL itself always normalizes float32 rewards).
    """
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True) if keep else torch.nanmean(x)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) if keep else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if keep else (~torch.isnan(x)).sum()
    count = count.to(x.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze(dim) if keep else std


def group_normalize(rewards: torch.Tensor, num_generations: int, mode: str, eps: float) -> torch.Tensor:
    """``advantages.normalize_groups``' formula (its docstring states it) on checked arguments:
    rewards [B] float, G dividing B, ``mode`` "group" / "batch" / "none", eps >= 0. [B], acc dtype."""
    r = rewards.to(accumulation_dtype(rewards.dtype))
    B, G = r.shape[0], num_generations
    grouped = r.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G, dim=0)
    advantages = r - mean
    if mode != "none":
        if mode == "group":
            std = nanstd(grouped, dim=1).repeat_interleave(G, dim=0) if G > 1 else torch.zeros_like(r)
        else:
            std = nanstd(r).expand_as(r) if B > 1 else torch.zeros_like(r)
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def combine_rewards(rewards: torch.Tensor, weights: Optional[torch.Tensor]):
    """[B] or [B, K] rewards and checked [K] weights (None: all 1) -> (weighted nansum [B] in the
    accumulation dtype with NaN for all-NaN rows, the bool mask [B] of those unscorable rows)."""
    r, w = reward_matrix(rewards, weights)
    unscorable = torch.isnan(r).all(dim=1)
    combined = (r * w.unsqueeze(0)).nansum(dim=1)
    return torch.where(unscorable, torch.full_like(combined, float("nan")), combined), unscorable


def sum_then_normalize(rewards: torch.Tensor, weights: Optional[torch.Tensor], num_generations: int, mode: str,
                       eps: float, kernel: Optional[Callable] = None) -> torch.Tensor:
    """TRL 1.16's sum_then_normalize on checked inputs: advantages [B] in the rewards' accumulation
    dtype, 0 for an unscorable row; ``kernel``: a backend's ``group_normalize`` (default: torch)."""
    combined, unscorable = combine_rewards(rewards, weights)
    advantages = (kernel or group_normalize)(combined, num_generations, mode, eps)
    return torch.where(unscorable, torch.zeros_like(advantages), advantages)


def reward_advantages(rewards: torch.Tensor, reward_weights: Optional[torch.Tensor],
                      options: GRPOOptions) -> torch.Tensor:
    """Advantages [B] of ``grpo_loss(rewards=)`` (inputs ``validation.rewards`` has checked), with
    the call's ``num_generations``, ``scale_rewards`` and ``reward_eps``."""
    return sum_then_normalize(rewards, reward_weights, options.num_generations, options.scale_rewards,
                              options.reward_eps)


# ---------------------------------------------------------------- across the boundary


@dataclass
class TokenInputs:
    """Per-token inputs of the objective, all [n] (a flat selection of tokens).

    ``weight`` is the aggregation weight of each token (``objective.token_weights``); ``policy_scale``
    multiplies the policy term only (vLLM importance-sampling ratio times the entropy mask), never KL.
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


@dataclass
class TokenEpilogue:
    """Per-token weighted loss ``weight * loss_t`` and its derivative ``dL/dlogp``, [n]: what a
    fused row pass's epilogue returns (``token_epilogue`` is its torch form); ``adv``: the
    tokens' advantages [n] when the epilogue computed them from rewards (else None)."""

    loss: torch.Tensor
    dlogp: torch.Tensor
    adv: Optional[torch.Tensor] = None


# ---------------------------------------------------------------- the epilogue, torch form


def exp_cap(dtype: torch.dtype) -> float:
    """The largest x with a finite exp(x) in ``dtype``, to 3 decimals: 88.722 (fp32), 709.782 (fp64)."""
    return math.floor(math.log(torch.finfo(dtype).max) * 1000) / 1000


def exp_sat(x: torch.Tensor) -> torch.Tensor:
    """exp(x) saturated at the dtype's largest finite value instead of overflowing to inf.

    The clamp is straight-through (its gradient is 1), so d exp_sat(x)/dx = exp_sat(x):
    a zero upstream gradient then gives 0, never 0 * inf = NaN. Below the overflow
    threshold (log ratios < 88.7 in fp32, < 709.7 in fp64) it is exactly ``torch.exp``.
    """
    return torch.exp(x.detach().clamp(max=exp_cap(x.dtype)) + (x - x.detach()))


def scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * s, exactly 0 where s == 0 (a zero scale or weight wins over an overflowed x)."""
    return torch.where(s == 0, torch.zeros((), dtype=x.dtype, device=x.device), x * s)


def _min_grad_split(a: torch.Tensor, b: torch.Tensor):
    """Weights torch.minimum's backward gives its two arguments (ties split evenly)."""
    tie = (a == b).to(a.dtype)
    wa = (a < b).to(a.dtype) + 0.5 * tie
    wb = (a > b).to(a.dtype) + 0.5 * tie
    return wa, wb


def _policy_epilogue(w: torch.Tensor, A: torch.Tensor, logp: torch.Tensor, options: GRPOOptions):
    """(loss, dL/dlogp) of the policy term alone, per ``LossKind``."""
    kind = loss_kind_code(options.loss_type)
    eh = options.eps_high
    if kind == LOSS_KIND_CODES["cispo"]:
        clamped = torch.clamp(w, max=eh)
        return -clamped * A * logp, -clamped * A
    if kind == LOSS_KIND_CODES["sapo"]:
        tau = torch.where(A > 0, options.sapo_temperature_pos, options.sapo_temperature_neg).to(w.dtype)
        sig = torch.sigmoid(tau * (w - 1))
        return -sig * 4 / tau * A, -4 * sig * (1 - sig) * A * w
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
    return -torch.minimum(a, b), -(wa * dw1 + wb * dw2) * A * w


def token_epilogue(logp: torch.Tensor, inputs: TokenInputs, options: GRPOOptions) -> TokenEpilogue:
    """Analytic per-token loss and coefficient of TRL's token-level loss types with its k3 KL:
    ``logp`` [n] -> TokenEpilogue [n] in ``logp``'s dtype."""
    if options.importance_sampling_level != "token":
        raise ValueError("token_epilogue needs importance_sampling_level='token'")
    logp = logp.detach()
    A = inputs.advantages(options, logp.dtype)
    old = logp if inputs.old is None else inputs.old.to(logp.dtype)
    w = exp_sat(logp - old)
    loss, dlogp = _policy_epilogue(w, A, logp, options)
    if inputs.policy_scale is not None:
        s = inputs.policy_scale.to(logp.dtype)
        loss, dlogp = scale(loss, s), scale(dlogp, s)
    ref = required_ref(inputs.ref, options.beta)
    if ref is not None:
        ref = ref.to(logp.dtype)
        e = exp_sat(ref - logp)
        kl = e - (ref - logp) - 1
        dkl = 1 - e
        if options.use_bias_correction_kl:
            # d(kl * w)/dlogp = (dkl + kl) * w, and dkl + kl = -(ref - logp) exactly: summing the
            # two saturated halves would cancel e (inf - inf = NaN, or with FMA, +inf)
            kl, dkl = kl * w, -(ref - logp) * w
        loss = loss + options.beta * kl
        dlogp = dlogp + options.beta * dkl
    weight = inputs.weight.to(logp.dtype)
    return TokenEpilogue(scale(loss, weight), scale(dlogp, weight), A if inputs.adv is None else None)

"""Detached diagnostics of a loss call, as TRL logs them: ``GRPOMetrics`` and ``compute_metrics``,
and TRL's high-entropy token mask (``top_entropy_quantile``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from grpo_kernels.objective import importance_weights, kl_estimate
from grpo_kernels.options import CLIPPED_LOSS_TYPES, GRPOOptions


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
    #: [B, T]: the exact per-token KL(pi_theta || pi_ref) (``kl_estimator="full"``, beta != 0), 0 where
    #: masked; None otherwise (an estimator's per-token values follow from logps and ref_logps)
    kl: Optional[torch.Tensor] = None


def compute_metrics(logp, entropy, mask, adv, options: GRPOOptions, old=None, ref=None, kl=None) -> GRPOMetrics:
    """Metrics from detached [B, T] logps/entropy; ``adv`` is [B, 1] or [B, T] as TRL holds it;
    ``kl`` [B, T]: the exact per-token KL (``kl_estimator="full"``), in place of the estimate from ``ref``."""
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
    exact = kl
    if options.beta != 0.0:
        kl = kl_estimate(logp, ref.to(logp.dtype), options.kl_estimator) if kl is None else kl.to(logp.dtype)
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
        kl=None if exact is None else torch.where(m != 0, exact.detach().to(logp.dtype), zero),
    )

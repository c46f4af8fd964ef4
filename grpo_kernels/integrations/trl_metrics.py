"""``FusedGRPOTrainer``'s logging: the metric keys of TRL 1.16's ``GRPOTrainer._compute_loss`` from
the fused pass's ``GRPOMetrics``, the entropy bonus's ``policy_loss`` and TRL's adaptive entropy
controller.

The methods take the micro-batch's ``LossPlan`` and ``ForwardOutput`` (``grpo_kernels.integrations.trl``)
and run on the trainer (``self``: a ``trl.GRPOTrainer``, for ``_metrics``, ``accelerator`` and the
config). They reduce across processes as TRL does; nothing but vespo's gamma weights is recomputed.
"""
from __future__ import annotations

import torch

__all__ = ["TRLMetricsMixin"]

_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # the loss types TRL logs clip_ratio/* for


class TRLMetricsMixin:
    """TRL's metric logging and entropy controller for a trainer whose loss is ``grpo_loss``."""

    def _fused_entropy_bonus_bookkeeping(self, plan, out) -> None:
        """TRL's entropy-bonus logging and adaptive controller (``_compute_loss``, entropy bonus block),
        on the fused pass's detached entropies."""
        entropies = out.metrics.entropy
        entropy_mask = out.entropy_mask
        if entropy_mask is None and self.top_entropy_quantile < 1.0:  # the selection grpo_loss made
            from grpo_kernels.metrics import high_entropy_mask

            entropy_mask = high_entropy_mask(entropies, plan.mask, float(self.top_entropy_quantile))
        effective_mask = plan.mask if entropy_mask is None else plan.mask * entropy_mask
        # TRL's policy_loss: the loss before the bonus (normalized for dapo/cispo/vespo, before the
        # accumulation division for the others)
        policy = out.policy_loss
        if not plan.world_entropy_mask and plan.bonus_coef != 0.0:
            eff = effective_mask.to(entropies.dtype)
            policy = policy + plan.bonus_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)
        policy_loss = policy * plan.factor
        self._metrics[plan.mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and plan.mode == "train":
            self._fused_adaptive_entropy_update(entropies, effective_mask)
        if plan.mode == "train" and self.accelerator.sync_gradients:
            self._metrics[plan.mode]["entropy_coef"].append(self.entropy_coef)

    def _fused_adaptive_entropy_update(self, entropies, effective_mask) -> None:
        """TRL's adaptive entropy controller: window statistics, and the update at ``sync_gradients``."""
        stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
        if self._entropy_window_stats is None:
            self._entropy_window_stats = stats
        else:
            self._entropy_window_stats = self._entropy_window_stats + stats
        if self.accelerator.sync_gradients:
            window_stats = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
            world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
            if world_entropy <= self.args.entropy_target:
                self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
            else:
                self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
            self._last_world_entropy = world_entropy
            self._entropy_window_stats = None

    def _fused_log_metrics(self, plan, metrics) -> None:
        """TRL's metric keys, from ``grpo_loss``'s ``GRPOMetrics`` (nothing recomputed but vespo's
        ``vespo/phi_seq_mean``: the gamma weights of the fused pass's log-probs)."""
        from trl.trainer.utils import nanmax, nanmin

        log = self._metrics[plan.mode]
        B, T = plan.mask.shape
        rows = torch.tensor(float(B), device=plan.mask.device)
        tokens = plan.mask.sum().float()
        # what each mean is over (for the mean over every process): a [B, 1] value is a mean over rows
        # (T == 1, or a sequence-level ratio with [B, 1] advantages), a [B, T] one over the masked tokens
        kl_count = rows if T == 1 else tokens
        clip_count = rows if T == 1 or (self.importance_sampling_level == "sequence"
                                        and plan.advantages.shape[1] == 1) else tokens
        if self.beta != 0.0:
            log["kl"].append(self._fused_world_mean(metrics.kl_mean, kl_count))
        log["entropy"].append(self._fused_world_mean(metrics.entropy_mean, tokens))
        # TRL takes the clip flags in float32 (``.float()``) whatever the model's dtype: so do their means
        if self.loss_type in _CLIPPED:
            for key, value in (("low_mean", metrics.clip_ratio_low), ("high_mean", metrics.clip_ratio_high),
                               ("region_mean", metrics.clip_ratio_region)):
                log[f"clip_ratio/{key}"].append(self._fused_world_mean(value, clip_count, torch.float32))
            low = self.accelerator.gather(metrics.seq_clip_ratio_low.float())
            high = self.accelerator.gather(metrics.seq_clip_ratio_high.float())
            log["clip_ratio/low_min"].append(nanmin(low).item())
            log["clip_ratio/high_max"].append(nanmax(high).item())
        elif self.loss_type == "cispo":
            log["cispo_clip_ratio"].append(self._fused_world_mean(metrics.cispo_clip_ratio, clip_count, torch.float32))
        elif self.loss_type == "vespo":
            from grpo_kernels.objective import vespo_gamma_weights
            from grpo_kernels.options import split_options

            old = metrics.logps if plan.old is None else torch.where(plan.mask != 0, plan.old, 0.0)
            phi = vespo_gamma_weights(plan.advantages, metrics.logps - old, plan.mask, plan.is_ratio,
                                      split_options(self._fused_options())[0])  # [B, 1]
            log["vespo/phi_seq_mean"].append(self._fused_world_mean(phi.mean(), rows))

    def _fused_world_mean(self, mean: torch.Tensor, count: torch.Tensor, dtype=None) -> float:
        """The mean over every process of a local mean over ``count`` items (TRL's ``global_masked_mean``:
        the sums and the counts are reduced together), in ``dtype`` (default: ``mean``'s)."""
        dtype = mean.dtype if dtype is None else dtype
        totals = self.accelerator.reduce(torch.stack([(mean * count.to(mean.dtype)).to(dtype), count.to(dtype)]),
                                         reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` with the training loss computed by ``grpo_kernels``.

One-line switch::

    from grpo_kernels.integrations.trl import FusedGRPOTrainer as GRPOTrainer

TRL (>= 1.16) is imported on first use of ``FusedGRPOTrainer``: importing this module needs only
torch. The subclass overrides two methods of ``trl.GRPOTrainer``:

``_compute_loss``
    One pass of the policy's backbone inside the (wrapped) model's forward gives the completion
    hidden states; ``grpo_kernels.grpo_loss`` then computes TRL's loss from them and the lm_head
    weight with gradients in the same pass, never materializing logits. TRL's own fused-head patch
    (``add_fused_lm_head``) is bypassed for it, so there is no second head pass. Every option of the
    trainer's config is honoured: ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo), ``beta``,
    ``epsilon``/``epsilon_high``, ``delta``, ``importance_sampling_level``, ``temperature``,
    ``max_completion_length``, ``top_entropy_quantile`` (over all processes, as TRL), ``use_bias_correction_kl``,
    ``sapo_temperature_*``, ``off_policy_mask_threshold``, the vLLM ``importance_sampling_ratio``,
    ``tool_mask``, ``cast_lm_head_to_fp32``, and the normalizations: dapo/cispo divide by
    ``num_items_in_batch / num_processes`` (times ``current_gradient_accumulation_steps /
    steps_per_generation`` in training), the other loss types by ``current_gradient_accumulation_steps``
    in training. The same metric keys are logged into ``self._metrics`` (``kl``, ``entropy``,
    ``clip_ratio/*``, ``cispo_clip_ratio``), reduced across processes as TRL does.

``_get_per_token_logps_and_entropies``
    The old-policy and reference log-probs computed during generation use the same kernels (under
    ``no_grad``), so the importance ratio of an unchanged policy is 1 up to rounding, even under
    mixed precision where TRL's head and ours round differently. Multimodal inputs and the MoE
    auxiliary loss are handed to TRL's implementation.

Unsupported (the loss needs something ``grpo_loss`` does not compute): ``loss_type="vespo"``, the
entropy bonus (``entropy_coef != 0`` or ``use_adaptive_entropy``), the MoE router auxiliary loss,
multimodal inputs (``pixel_values`` & co.). Policy, chosen per trainer with
``fused_unsupported``: ``"raise"`` (default) raises ``NotImplementedError`` — at construction for
config-level features, at the first such batch for multimodal inputs — naming the feature;
``"fallback"`` warns once and uses TRL's stock ``_compute_loss`` for those (config: every step; batch:
those batches). TRL's loss code then gets its log-probs and entropies (with their gradients) from
this trainer's ``_get_per_token_logps_and_entropies``, i.e. still from ``grpo_kernels.token_logprobs``
without logits (text inputs, ``fused_logps=True``), but as a forward pass plus a backward pass over the
vocabulary instead of one fused pass.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from grpo_kernels.api import grpo_loss, token_logprobs
from grpo_kernels.integrations import transformers as _gkt

__all__ = ["FusedGRPOTrainer", "config_unsupported_features", "batch_unsupported_features"]

_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)
_POLICIES = ("raise", "fallback")


def config_unsupported_features(trainer) -> list:
    """The trainer's configured features that ``FusedGRPOTrainer`` cannot compute (empty if none)."""
    found = []
    if trainer.loss_type == "vespo":
        found.append("loss_type='vespo'")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        found.append("the entropy bonus (entropy_coef != 0 or use_adaptive_entropy=True)")
    if getattr(trainer, "aux_loss_enabled", False):
        found.append("the MoE router auxiliary loss (router_aux_loss_coef != 0 on a model with output_router_logits)")
    return found


def batch_unsupported_features(inputs) -> list:
    """The keys of a training batch that ``FusedGRPOTrainer`` cannot handle (multimodal inputs)."""
    present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
    return [f"multimodal inputs ({', '.join(present)})"] if present else []


def _import_trl():
    try:
        import trl
    except ImportError as exc:  # pragma: no cover - exercised only without TRL
        raise ImportError(
            "grpo_kernels.integrations.trl needs TRL >= 1.16: pip install 'trl>=1.16' (or grpo_kernels[trl])"
        ) from exc
    return trl


def _build_trainer_class():
    trl = _import_trl()

    class FusedGRPOTrainer(trl.GRPOTrainer):
        """``trl.GRPOTrainer`` whose training loss is ``grpo_kernels.grpo_loss`` on hidden states.

        Extra keyword arguments (all optional):

        - ``fused_unsupported``: ``"raise"`` (default) or ``"fallback"`` for the features listed in
          the module docstring.
        - ``fused_backend``, ``fused_chunk_size``: ``grpo_loss``'s ``backend`` / ``chunk_size``.
        - ``fused_batch_invariant``: ``batch_invariant=True`` for the loss and the old/reference
          log-probs: a token's log-prob from its hidden state is then bitwise the same in every
          pass whatever the micro-batch (the model body's own batch dependence is not covered).
        - ``fused_logps``: compute the generation-time old/reference log-probs with grpo_kernels too
          (default True); False leaves them to TRL's fused head.
        """

        def __init__(self, *args, fused_unsupported: str = "raise", fused_backend: str = "auto",
                     fused_chunk_size: Optional[int] = None, fused_logps: bool = True,
                     fused_batch_invariant: bool = False, **kwargs):
            if fused_unsupported not in _POLICIES:
                raise ValueError(f"fused_unsupported must be one of {_POLICIES}, got {fused_unsupported!r}")
            self._fused_unsupported = fused_unsupported
            self._fused_backend = fused_backend
            self._fused_chunk_size = fused_chunk_size
            self._fused_batch_invariant = bool(fused_batch_invariant)
            self._fused_logps = bool(fused_logps)
            self._fused_warned = set()
            super().__init__(*args, **kwargs)
            unsupported = config_unsupported_features(self)
            if unsupported:
                self._fused_refuse(unsupported)
            _gkt.enable_fused_forward(self.model)
            if getattr(self, "ref_model", None) is not None:
                _gkt.enable_fused_forward(self.ref_model)

        # -------------------------------------------------------------- policy for unsupported features

        def _fused_refuse(self, features) -> None:
            text = "; ".join(features)
            if self._fused_unsupported == "raise":
                raise NotImplementedError(
                    f"FusedGRPOTrainer does not support {text}. Use trl.GRPOTrainer, or pass "
                    "fused_unsupported='fallback' to use TRL's stock loss where these are needed."
                )
            if text not in self._fused_warned:
                self._fused_warned.add(text)
                warnings.warn(f"FusedGRPOTrainer: {text} not supported; falling back to TRL's stock _compute_loss",
                              stacklevel=3)

        def _fused_can_run(self, inputs) -> bool:
            features = config_unsupported_features(self) + batch_unsupported_features(inputs)
            if features:
                self._fused_refuse(features)
                return False
            return True

        # -------------------------------------------------------------- helpers

        def _fused_head_dtype(self):
            return torch.float32 if getattr(self.args, "cast_lm_head_to_fp32", False) else None

        def _fused_options(self) -> dict:
            return dict(
                loss_type=self.loss_type,
                beta=float(self.beta),
                epsilon_low=float(self.epsilon_low),
                epsilon_high=float(self.epsilon_high),
                delta=self.args.delta,
                importance_sampling_level=self.importance_sampling_level,
                temperature=float(self.temperature),
                max_completion_length=self.max_completion_length,
                sapo_temperature_pos=float(self.args.sapo_temperature_pos),
                sapo_temperature_neg=float(self.args.sapo_temperature_neg),
                use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
                backend=self._fused_backend,
                chunk_size=self._fused_chunk_size,
                batch_invariant=self._fused_batch_invariant,
            )

        # -------------------------------------------------------------- log-probs (old policy, reference)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            if (not self._fused_logps or compute_aux_loss or any(v is not None for v in multimodal.values())
                    or not _gkt.is_fused_forward_enabled(model)):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal,
                )
            batch_size = batch_size or input_ids.size(0)
            logps, entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                ids = input_ids[start:start + batch_size]
                am = attention_mask[start:start + batch_size]
                with self.accelerator.autocast():
                    out = _gkt.model_token_logprobs(
                        model, ids, am, logits_to_keep, temperature=self.temperature, return_entropy=compute_entropy,
                        backend=self._fused_backend, chunk_size=self._fused_chunk_size,
                        batch_invariant=self._fused_batch_invariant, head_dtype=self._fused_head_dtype(),
                    )
                if compute_entropy:
                    logps.append(out[0])
                    entropies.append(out[1])
                else:
                    logps.append(out)
            return torch.cat(logps, 0), (torch.cat(entropies, 0) if compute_entropy else None), None

        # -------------------------------------------------------------- the loss

        def _compute_loss(self, model, inputs):
            if not self._fused_can_run(inputs):
                return super()._compute_loss(model, inputs)
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            logits_to_keep = completion_ids.size(1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            mode = "train" if self.model.training else "eval"

            advantages = inputs["advantages"]
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1)
            old = inputs.get("old_per_token_logps")
            ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
            is_ratio = None
            if self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo":
                is_ratio = inputs["importance_sampling_ratio"]

            options = self._fused_options()
            factor, divisor = 1.0, 1.0
            if self.loss_type in ("dapo", "cispo"):
                # TRL: normalizer = num_items.clamp(min=1) / num_processes [* gas / steps_per_generation in train];
                # grpo_loss divides by the clamped count and the rest is a constant factor on loss and gradients
                num_items = inputs["num_items_in_batch"]
                num_items = num_items.clamp(min=1.0) if isinstance(num_items, torch.Tensor) else max(num_items, 1.0)
                options["num_items_in_batch"] = num_items
                factor = float(self.accelerator.num_processes)
                if mode == "train":
                    factor = factor * self.args.steps_per_generation / self.current_gradient_accumulation_steps
            elif mode == "train":  # TRL: the other loss types are divided by the accumulation steps in training
                divisor = self.current_gradient_accumulation_steps

            # the masks TRL multiplies into the policy term, when they need the current log-probs first
            need_entropy_mask = self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1
            need_prepass = self.off_policy_mask_threshold is not None or need_entropy_mask
            if not need_entropy_mask:
                options["top_entropy_quantile"] = float(self.top_entropy_quantile)
            head_dtype = self._fused_head_dtype()
            scored = completion_mask != 0
            captured = {}

            def loss_in_forward(lm, **model_inputs):
                hidden = _gkt.completion_hidden_states(lm, logits_to_keep=logits_to_keep, **model_inputs)
                weight, bias, _ = _gkt.lm_head_params(lm)
                with _gkt._zero3_gathered(weight, bias):
                    h, w, b, softcap = _gkt.head_operands(lm, hidden, head_dtype=head_dtype)
                    with _gkt._no_autocast(h.device.type):
                        policy_scale = is_ratio
                        if need_prepass:
                            policy_scale = self._fused_policy_masks(
                                h, w, b, softcap, completion_ids, scored, mask, advantages, old, inputs,
                                policy_scale, need_entropy_mask,
                            )
                        loss, metrics = grpo_loss(
                            h, w, completion_ids, advantages, mask, old, ref, bias=b,
                            importance_sampling_ratio=policy_scale, return_metrics=True, logit_softcap=softcap,
                            **options,
                        )
                captured["metrics"] = metrics
                return loss

            with self.accelerator.autocast():
                loss = _gkt.run_in_forward(model, loss_in_forward, input_ids=input_ids, attention_mask=attention_mask)
            if factor != 1.0:
                loss = loss * factor
            if divisor != 1.0:
                loss = loss / divisor
            self._fused_log_metrics(mode, captured["metrics"], mask, advantages, old, ref)
            return loss

        def _fused_policy_masks(self, h, w, b, softcap, completion_ids, scored, mask, advantages, old, inputs,
                                policy_scale, need_entropy_mask):
            """Off-policy sequence mask and/or the cross-process high-entropy mask, as TRL computes them,
            from a statistics-only pass (no gradient) over the current policy; folded into the factor
            that multiplies the policy term (never the KL term), like the vLLM importance ratio."""
            with torch.no_grad():
                lp, ent = token_logprobs(
                    h.detach()[scored], w.detach(), completion_ids[scored], bias=None if b is None else b.detach(),
                    temperature=self.temperature, logit_softcap=softcap, return_entropy=True,
                    backend=self._fused_backend, chunk_size=self._fused_chunk_size,
                    batch_invariant=self._fused_batch_invariant,
                )
                per_token_logps = lp.new_zeros(scored.shape).masked_scatter(scored, lp)
                entropies = ent.new_zeros(scored.shape).masked_scatter(scored, ent)
                factors = []
                if self.off_policy_mask_threshold is not None:
                    old_lp = per_token_logps if old is None else old
                    sampling = inputs.get("sampling_per_token_logps", old_lp)
                    factors.append(self.get_off_policy_mask(
                        advantages=advantages, per_token_logps=per_token_logps, sampling_per_token_logps=sampling,
                        mask=mask, off_policy_threshold=self.off_policy_mask_threshold,
                    ))
                if need_entropy_mask:
                    factors.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
                scale = policy_scale
                for f in factors:
                    f = f.to(per_token_logps.dtype)
                    scale = f if scale is None else scale * f
            return scale

        def _fused_log_metrics(self, mode, metrics, mask, advantages, old, ref):
            """TRL's metric code on the detached log-probs and entropies of the fused pass."""
            from trl.trainer.utils import nanmax, nanmin

            m = mask
            keep = m != 0
            logps = metrics.logps
            entropies = metrics.entropy
            old_lp = logps if old is None else torch.where(keep, old, torch.zeros_like(old))

            def masked_seq_mean(x):
                if x.shape[1] == 1:
                    return x.squeeze(1)
                return (x * m).sum(-1) / m.sum(-1)

            def global_masked_mean(x):
                if x.shape[1] == 1:
                    local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
                else:
                    x = torch.where(keep, x, torch.zeros_like(x))
                    local_sum, local_count = (x * m).sum(), m.sum().float()
                totals = self.accelerator.reduce(torch.stack([local_sum, local_count.to(local_sum.dtype)]),
                                                 reduction="sum")
                return (totals[0] / totals[1].clamp(min=1.0)).item()

            log_ratio = logps - old_lp
            if self.importance_sampling_level == "token":
                log_w = log_ratio
            else:
                log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            coef_1 = torch.exp(log_w)
            if self.beta != 0.0:
                r = torch.where(keep, ref, torch.zeros_like(ref))
                kl = torch.exp(r - logps) - (r - logps) - 1
                if self.args.use_bias_correction_kl:
                    kl = kl * coef_1
                self._metrics[mode]["kl"].append(global_masked_mean(kl))
            self._metrics[mode]["entropy"].append(global_masked_mean(entropies))
            if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
                if self.args.delta is not None:
                    coef_1 = torch.clamp(coef_1, max=self.args.delta)
                is_low = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)
                is_high = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)
                region = is_low | is_high
                self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(is_low.float()))
                self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(is_high.float()))
                self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(region.float()))
                low = self.accelerator.gather(masked_seq_mean(is_low.float()))
                self._metrics[mode]["clip_ratio/low_min"].append(nanmin(low).item())
                high = self.accelerator.gather(masked_seq_mean(is_high.float()))
                self._metrics[mode]["clip_ratio/high_max"].append(nanmax(high).item())
            elif self.loss_type == "cispo":
                clipped = (coef_1 > self.epsilon_high) & (advantages > 0)
                self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped.float()))

    FusedGRPOTrainer.__module__ = __name__
    FusedGRPOTrainer.__qualname__ = "FusedGRPOTrainer"
    return FusedGRPOTrainer


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        cls = _build_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

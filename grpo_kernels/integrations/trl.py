"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` with the training loss computed by ``grpo_kernels``.

One-line switch::

    from grpo_kernels.integrations.trl import FusedGRPOTrainer as GRPOTrainer

TRL (>= 1.16) is imported on first use of ``FusedGRPOTrainer``: importing this module needs only
torch. The subclass overrides two methods of ``trl.GRPOTrainer``:

``_compute_loss``
    One pass of the policy's backbone inside the (wrapped) model's forward gives the completion
    hidden states; ``grpo_kernels.grpo_loss`` then computes TRL's loss from them and the lm_head
    weight with gradients in the same pass, never materializing logits. TRL's own fused-head patch
    (``add_fused_lm_head``) is bypassed for it, so there is no second head pass. Every loss option of
    the trainer's config is honoured: ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo,
    vespo with ``vespo_k_*``/``vespo_lambda_*``), ``beta``, ``epsilon``/``epsilon_high``, ``delta``,
    ``importance_sampling_level``, ``temperature``, ``max_completion_length``, ``top_entropy_quantile``
    (over all processes, as TRL), ``use_bias_correction_kl``, ``sapo_temperature_*``,
    ``off_policy_mask_threshold`` (with the batch's ``sampling_per_token_logps``), the vLLM
    ``importance_sampling_ratio`` (folded into vespo's gamma weights, as TRL), ``tool_mask``,
    ``cast_lm_head_to_fp32``, the entropy bonus (``entropy_coef``, ``use_adaptive_entropy`` with TRL's
    controller: the coefficient of the previous optimizer step, gated on ``_last_world_entropy <=
    entropy_target``, the window statistics and the update at ``sync_gradients``), the MoE router
    auxiliary loss (``router_aux_loss_coef * aux_loss``, the aux loss from the router logits of the
    same backbone pass), and the normalizations: dapo/cispo/vespo divide by ``num_items_in_batch /
    num_processes`` (times ``current_gradient_accumulation_steps / steps_per_generation`` in training),
    the other loss types by ``current_gradient_accumulation_steps`` in training; the entropy bonus and
    the aux loss by ``current_gradient_accumulation_steps`` in training whatever the loss type. The
    same metric keys are logged into ``self._metrics`` (``kl``, ``entropy``, ``clip_ratio/*``,
    ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss``, ``entropy_coef``, ``aux_loss``),
    reduced across processes as TRL does.

``_get_per_token_logps_and_entropies``
    The old-policy and reference log-probs computed during generation use the same kernels (under
    ``no_grad``), so the importance ratio of an unchanged policy is 1 up to rounding, even under
    mixed precision where TRL's head and ours round differently; with ``compute_aux_loss`` the MoE
    aux loss comes from the same backbone pass. Multimodal inputs are handed to TRL's implementation.

Not fused (neither is a loss option): multimodal inputs (``pixel_values`` & co.: TRL slices the
image/tile tensors per model family for the forward, which this trainer does not reimplement), and
the MoE aux loss of a model whose forward does not compute it with the standard
``load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, attention_mask)``
(``grpo_kernels.integrations.transformers.router_aux_loss_unsupported`` says why). Policy, chosen per
trainer with ``fused_unsupported``: ``"raise"`` (default) raises ``NotImplementedError`` — at
construction for the aux loss, at the first such batch for multimodal inputs — naming the feature;
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
    """The trainer's configured features that ``FusedGRPOTrainer`` cannot compute (empty if none):
    only the MoE router auxiliary loss of a model whose aux loss ``router_aux_loss`` cannot reproduce."""
    found = []
    if getattr(trainer, "aux_loss_enabled", False):
        why = _gkt.router_aux_loss_unsupported(trainer.model)
        if why is not None:
            found.append(f"the MoE router auxiliary loss of this model ({why})")
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

        - ``fused_unsupported``: ``"raise"`` (default) or ``"fallback"`` for what is not fused (the
          module docstring: multimodal batches, an MoE aux loss of a non-standard form).
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
            self._fused_config_unsupported = config_unsupported_features(self)  # fixed for the run
            if self._fused_config_unsupported:
                self._fused_refuse(self._fused_config_unsupported)
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
            features = self._fused_config_unsupported + batch_unsupported_features(inputs)
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
                vespo_k_pos=float(self.args.vespo_k_pos),
                vespo_lambda_pos=float(self.args.vespo_lambda_pos),
                vespo_k_neg=float(self.args.vespo_k_neg),
                vespo_lambda_neg=float(self.args.vespo_lambda_neg),
                off_policy_mask_threshold=(None if self.off_policy_mask_threshold is None
                                           else float(self.off_policy_mask_threshold)),
                use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
                backend=self._fused_backend,
                chunk_size=self._fused_chunk_size,
                batch_invariant=self._fused_batch_invariant,
            )

        def _fused_apply_coef(self) -> float:
            """TRL's entropy-bonus coefficient for this micro-batch: the value at the end of the previous
            optimizer step, gated by the adaptive controller's last world entropy."""
            if self.use_adaptive_entropy:
                return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
            return self.entropy_coef

        # -------------------------------------------------------------- log-probs (old policy, reference)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):
            if (not self._fused_logps or any(v is not None for v in multimodal.values())
                    or not _gkt.is_fused_forward_enabled(model)
                    or (compute_aux_loss and _gkt.router_aux_loss_unsupported(model) is not None)):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal,
                )
            batch_size = batch_size or input_ids.size(0)
            logps, entropies, aux_losses = [], [], []
            head_dtype = self._fused_head_dtype()
            for start in range(0, input_ids.size(0), batch_size):
                ids = input_ids[start:start + batch_size]
                am = attention_mask[start:start + batch_size]
                with self.accelerator.autocast():
                    out = _gkt.model_token_logprobs(
                        model, ids, am, logits_to_keep, temperature=self.temperature,
                        return_entropy=compute_entropy, backend=self._fused_backend,
                        chunk_size=self._fused_chunk_size, batch_invariant=self._fused_batch_invariant,
                        head_dtype=head_dtype, return_aux_loss=compute_aux_loss,
                    )
                if compute_aux_loss:  # TRL's outputs.aux_loss, from the same backbone pass
                    aux_losses.append(out[-1])
                    out = out[:-1] if compute_entropy else out[0]
                if compute_entropy:
                    logps.append(out[0])
                    entropies.append(out[1])
                else:
                    logps.append(out)
            return (torch.cat(logps, 0), (torch.cat(entropies, 0) if compute_entropy else None),
                    (torch.stack(aux_losses).mean() if compute_aux_loss else None))

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
            vespo = self.loss_type == "vespo"
            is_ratio = None
            if vespo:  # TRL folds the ratio into the gamma weights (get_gamma_weights), grpo_loss too
                is_ratio = inputs.get("importance_sampling_ratio")
            elif self.use_vllm and self.vllm_importance_sampling_correction:
                is_ratio = inputs["importance_sampling_ratio"]
            sampling = inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None

            options = self._fused_options()
            factor, divisor = 1.0, 1.0
            if self.loss_type in ("dapo", "cispo", "vespo"):
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

            # the entropy bonus: TRL subtracts apply_coef * mean entropy / accumulation_factor from the
            # normalized policy loss; the trainer returns (factor / divisor) * grpo_loss, so grpo_loss gets
            # entropy_coef = apply_coef / (accumulation_factor * factor / divisor)
            bonus = bool(self._entropy_bonus_enabled)
            bonus_coef = 0.0
            if bonus:
                accumulation_factor = self.current_gradient_accumulation_steps if mode == "train" else 1.0
                bonus_coef = float(self._fused_apply_coef()) / (accumulation_factor * factor / divisor)

            # TRL's high-entropy mask over every process needs the current entropies first (a pre-pass)
            need_entropy_mask = self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1
            if not need_entropy_mask:
                options["top_entropy_quantile"] = float(self.top_entropy_quantile)
                options["entropy_coef"] = bonus_coef
            aux_on = bool(self.aux_loss_enabled)
            head_dtype = self._fused_head_dtype()
            scored = completion_mask != 0
            captured = {}

            def loss_in_forward(lm, **model_inputs):
                if aux_on:
                    model_inputs["output_router_logits"] = True
                hidden, backbone_out = _gkt.completion_hidden_states(
                    lm, logits_to_keep=logits_to_keep, return_backbone_output=True, **model_inputs)
                weight, bias, _ = _gkt.lm_head_params(lm)
                with _gkt._zero3_gathered(weight, bias):
                    h, w, b, softcap = _gkt.head_operands(lm, hidden, head_dtype=head_dtype)
                    with _gkt._no_autocast(h.device.type):
                        policy_scale, adv, extra = is_ratio, advantages, None
                        if need_entropy_mask:
                            ent, keep = self._fused_global_entropy_mask(h, w, b, softcap, completion_ids, scored, mask,
                                                                        with_grad=bonus and bonus_coef != 0.0)
                            captured["entropy_mask"] = keep
                            keep_f = keep.to(ent.dtype)  # fp32 / fp64 (never the bf16 of autocast)
                            if vespo:  # the ratio is folded into phi there: zero the masked tokens' advantages
                                adv = advantages.expand(keep.shape) * keep.to(advantages.dtype)
                            else:
                                policy_scale = keep_f if policy_scale is None else policy_scale * keep_f
                            if bonus and bonus_coef != 0.0:  # the bonus over the effective mask, by autograd
                                eff = mask.to(ent.dtype) * keep_f
                                extra = -bonus_coef * (ent * eff).sum() / eff.sum().clamp(min=1.0)
                        loss, metrics = grpo_loss(
                            h, w, completion_ids, adv, mask, old, ref, bias=b, importance_sampling_ratio=policy_scale,
                            sampling_logps=sampling, return_metrics=True, logit_softcap=softcap, **options,
                        )
                captured["metrics"] = metrics
                captured["grpo_loss"] = loss.detach()
                if extra is not None:
                    loss = loss + extra
                if factor != 1.0:
                    loss = loss * factor
                if divisor != 1.0:
                    loss = loss / divisor
                if aux_on:
                    aux = _gkt.router_aux_loss(lm, backbone_out.router_logits, model_inputs.get("attention_mask"))
                    captured["aux_loss"] = aux
                    normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
                    loss = loss + self.router_aux_loss_coef * aux / normalizer
                return loss

            with self.accelerator.autocast():
                loss = _gkt.run_in_forward(model, loss_in_forward, input_ids=input_ids, attention_mask=attention_mask)
            metrics = captured["metrics"]
            if bonus:
                self._fused_entropy_bonus_bookkeeping(mode, metrics, mask, captured, bonus_coef, need_entropy_mask,
                                                      factor)
            if aux_on:
                aux = captured["aux_loss"].detach()
                self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux).mean().item())
            self._fused_log_metrics(mode, metrics, mask, advantages, old, ref, is_ratio)
            return loss

        def _fused_global_entropy_mask(self, h, w, b, softcap, completion_ids, scored, mask, with_grad):
            """TRL's high-entropy mask over every process (``get_high_entropy_mask``), from a pre-pass
            over the current policy: (entropies [B, T], bool mask [B, T]). ``with_grad``: the entropies
            keep their gradient (the entropy bonus over this mask is then added by autograd)."""
            with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                src = (lambda t: t) if with_grad else (lambda t: None if t is None else t.detach())
                _, ent = token_logprobs(
                    src(h)[scored], src(w), completion_ids[scored], bias=src(b),
                    temperature=self.temperature, logit_softcap=softcap, return_entropy=True,
                    backend=self._fused_backend, chunk_size=self._fused_chunk_size,
                    batch_invariant=self._fused_batch_invariant,
                )
                entropies = ent.new_zeros(scored.shape).masked_scatter(scored, ent)
            with torch.no_grad():
                keep = self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
            return entropies, keep

        def _fused_entropy_bonus_bookkeeping(self, mode, metrics, mask, captured, bonus_coef, need_entropy_mask,
                                             factor):
            """TRL's entropy-bonus logging and adaptive controller (``_compute_loss``, entropy bonus block),
            on the fused pass's detached entropies."""
            entropies = metrics.entropy
            if need_entropy_mask:
                entropy_mask = captured["entropy_mask"]
            elif self.top_entropy_quantile < 1.0:  # the selection grpo_loss made (same entropies, same rule)
                from grpo_kernels.metrics import high_entropy_mask

                entropy_mask = high_entropy_mask(entropies, mask, float(self.top_entropy_quantile))
            else:
                entropy_mask = None
            effective_mask = mask if entropy_mask is None else mask * entropy_mask
            # TRL's policy_loss: the loss before the bonus (normalized for dapo/cispo/vespo, before the
            # accumulation division for the others)
            policy = captured["grpo_loss"]
            if not need_entropy_mask and bonus_coef != 0.0:
                eff = effective_mask.to(entropies.dtype)
                policy = policy + bonus_coef * (entropies * eff).sum() / eff.sum().clamp(min=1.0)
            policy_loss = policy * factor
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                stats = torch.stack([(entropies * effective_mask).sum(), effective_mask.sum()]).detach()
                if self._entropy_window_stats is None:
                    self._entropy_window_stats = stats
                else:
                    self._entropy_window_stats = self._entropy_window_stats + stats
                if self.accelerator.sync_gradients:
                    window_stats = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                    world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
                    if world_entropy <= self.args.entropy_target:
                        self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta,
                                                self.args.entropy_coef_max)
                    else:
                        self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta,
                                                self.args.entropy_coef_min)
                    self._last_world_entropy = world_entropy
                    self._entropy_window_stats = None
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

        def _fused_log_metrics(self, mode, metrics, mask, advantages, old, ref, is_ratio):
            """TRL's metric code on the detached log-probs and entropies of the fused pass (vespo's
            ``vespo/phi_seq_mean``: the gamma weights of those log-probs)."""
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
            elif self.loss_type == "vespo":
                from grpo_kernels.objective import vespo_gamma_weights
                from grpo_kernels.options import split_options

                phi = vespo_gamma_weights(advantages, log_ratio, mask, is_ratio,
                                          split_options(self._fused_options())[0])
                self._metrics[mode]["vespo/phi_seq_mean"].append(global_masked_mean(phi))  # phi: [B, 1]

    FusedGRPOTrainer.__module__ = __name__
    FusedGRPOTrainer.__qualname__ = "FusedGRPOTrainer"
    return FusedGRPOTrainer


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        cls = _build_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

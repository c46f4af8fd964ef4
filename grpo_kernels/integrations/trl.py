"""``FusedGRPOTrainer``: TRL's ``GRPOTrainer`` with the training loss computed by ``grpo_kernels``
(and ``FusedDistillationTrainer``, TRL's ``DistillationTrainer`` on ``distill_loss``: its own module,
``grpo_kernels.integrations.trl_distill``, exported from here).

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

import functools
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from grpo_kernels.api import grpo_loss, token_logprobs
from grpo_kernels.integrations import transformers as gkt
from grpo_kernels.integrations.common import enable_fused_forward, is_fused_forward_enabled, run_in_forward
from grpo_kernels.integrations.moe import router_aux_loss, router_aux_loss_unsupported
from grpo_kernels.integrations.trl_common import batch_unsupported_features, import_trl
from grpo_kernels.integrations.trl_distill import FusedDistillationMixin, build_distillation_trainer_class
from grpo_kernels.integrations.trl_metrics import TRLMetricsMixin

__all__ = ["FusedGRPOTrainer", "FusedGRPOMixin", "FusedDistillationTrainer", "FusedDistillationMixin",
           "config_unsupported_features", "batch_unsupported_features"]

_POLICIES = ("raise", "fallback")


def config_unsupported_features(trainer) -> list:
    """The trainer's configured features that ``FusedGRPOTrainer`` cannot compute (empty if none):
    only the MoE router auxiliary loss of a model whose aux loss ``router_aux_loss`` cannot reproduce."""
    found = []
    if getattr(trainer, "aux_loss_enabled", False):
        why = router_aux_loss_unsupported(trainer.model)
        if why is not None:
            found.append(f"the MoE router auxiliary loss of this model ({why})")
    return found


@dataclass(frozen=True)
class LossPlan:
    """One micro-batch's loss call, fixed before the forward: what TRL's ``_compute_loss`` derives
    from the batch and the trainer's state. Tensors are [B, T] unless said otherwise."""

    mode: str  # "train" | "eval"
    completion_ids: torch.Tensor
    scored: torch.Tensor  # bool: completion_mask != 0 (the tokens with a log-prob)
    mask: torch.Tensor  # the loss mask: completion_mask, times tool_mask when present
    advantages: torch.Tensor  # [B, 1] or [B, T]
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    is_ratio: Optional[torch.Tensor]  # [B, T] or [B, 1]
    sampling: Optional[torch.Tensor]
    options: dict  # grpo_loss's keywords
    factor: float  # TRL's loss = grpo_loss * factor / divisor (normalizers grpo_loss does not apply)
    divisor: float
    bonus: bool  # TRL's entropy bonus is on (logging and the adaptive controller run, even at coef 0)
    bonus_coef: float  # its coefficient in grpo_loss's units
    world_entropy_mask: bool  # top_entropy_quantile over every process: a pre-pass inside the forward
    aux_on: bool  # the MoE router aux loss is added
    head_dtype: Optional[torch.dtype]


class ForwardOutput(NamedTuple):
    """What the loss computed inside the model's forward returns through the (wrapped) model."""

    loss: torch.Tensor  # the trainer's loss, with gradients
    metrics: Any  # grpo_loss's GRPOMetrics
    policy_loss: torch.Tensor  # grpo_loss's value, detached (TRL's policy_loss before its scaling)
    entropy_mask: Optional[torch.Tensor]  # the world high-entropy mask, when the pre-pass ran
    aux_loss: Optional[torch.Tensor]  # the MoE router aux loss, when on


class FusedGRPOMixin(TRLMetricsMixin):
    """``trl.GRPOTrainer`` whose training loss is ``grpo_kernels.grpo_loss`` on hidden states
    (``FusedGRPOTrainer`` is this mixin over ``trl.GRPOTrainer``; the module docstring says what it fuses).

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
        enable_fused_forward(self.model)
        if getattr(self, "ref_model", None) is not None:
            enable_fused_forward(self.ref_model)

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

    # -------------------------------------------------------------- the trainer's options

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
                or not is_fused_forward_enabled(model)
                or (compute_aux_loss and router_aux_loss_unsupported(model) is not None)):
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
                out = gkt.model_token_logprobs(
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
        plan = self._fused_plan(inputs)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            out = run_in_forward(model, functools.partial(self._fused_forward, plan), input_ids=input_ids,
                                 attention_mask=attention_mask)
        if plan.bonus:
            self._fused_entropy_bonus_bookkeeping(plan, out)
        if plan.aux_on:
            aux = out.aux_loss.detach()
            self._metrics[plan.mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux).mean().item())
        self._fused_log_metrics(plan, out.metrics)
        return out.loss

    def _fused_plan(self, inputs) -> LossPlan:
        """The batch's loss call as TRL's ``_compute_loss`` would make it (see ``LossPlan``)."""
        completion_mask = inputs["completion_mask"]
        mode = "train" if self.model.training else "eval"
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        is_ratio = None
        if self.loss_type == "vespo":  # TRL folds the ratio into the gamma weights (get_gamma_weights), grpo_loss too
            is_ratio = inputs.get("importance_sampling_ratio")
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        options = self._fused_options()
        factor, divisor, num_items = self._fused_normalizers(inputs, mode)
        if num_items is not None:
            options["num_items_in_batch"] = num_items
        # the entropy bonus: TRL subtracts apply_coef * mean entropy / accumulation_factor from the
        # normalized policy loss; the trainer returns (factor / divisor) * grpo_loss, so grpo_loss gets
        # entropy_coef = apply_coef / (accumulation_factor * factor / divisor)
        bonus, bonus_coef = bool(self._entropy_bonus_enabled), 0.0
        if bonus:
            accumulation_factor = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            bonus_coef = float(self._fused_apply_coef()) / (accumulation_factor * factor / divisor)
        # TRL's high-entropy mask over every process needs the current entropies first (a pre-pass)
        world_entropy_mask = self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1
        if not world_entropy_mask:
            options["top_entropy_quantile"] = float(self.top_entropy_quantile)
            options["entropy_coef"] = bonus_coef
        return LossPlan(
            mode=mode, completion_ids=inputs["completion_ids"], scored=completion_mask != 0,
            mask=completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"],
            advantages=advantages, old=inputs.get("old_per_token_logps"),
            ref=inputs["ref_per_token_logps"] if self.beta != 0.0 else None, is_ratio=is_ratio,
            sampling=inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None,
            options=options, factor=factor, divisor=divisor, bonus=bonus, bonus_coef=bonus_coef,
            world_entropy_mask=world_entropy_mask, aux_on=bool(self.aux_loss_enabled),
            head_dtype=self._fused_head_dtype(),
        )

    def _fused_normalizers(self, inputs, mode):
        """(factor, divisor, num_items_in_batch or None): TRL's loss is ``grpo_loss * factor / divisor``."""
        if self.loss_type in ("dapo", "cispo", "vespo"):
            # TRL: normalizer = num_items.clamp(min=1) / num_processes [* gas / steps_per_generation in train];
            # grpo_loss divides by the clamped count and the rest is a constant factor on loss and gradients
            num_items = inputs["num_items_in_batch"]
            num_items = num_items.clamp(min=1.0) if isinstance(num_items, torch.Tensor) else max(num_items, 1.0)
            factor = float(self.accelerator.num_processes)
            if mode == "train":
                factor = factor * self.args.steps_per_generation / self.current_gradient_accumulation_steps
            return factor, 1.0, num_items
        # TRL: the other loss types are divided by the accumulation steps in training
        return 1.0, (self.current_gradient_accumulation_steps if mode == "train" else 1.0), None

    def _fused_forward(self, plan: LossPlan, lm, **model_inputs) -> ForwardOutput:
        """The loss, run as the causal LM's forward (``run_in_forward``): one backbone pass, then
        ``grpo_loss`` on the completion states and the head, TRL's normalizers and the MoE aux loss."""
        if plan.aux_on:
            model_inputs["output_router_logits"] = True
        hidden, backbone_out = gkt.completion_hidden_states(
            lm, logits_to_keep=plan.completion_ids.size(1), return_backbone_output=True, **model_inputs)
        with gkt.kernel_head(lm, hidden, head_dtype=plan.head_dtype) as (h, w, b, softcap):
            adv, policy_scale, extra, keep = plan.advantages, plan.is_ratio, None, None
            if plan.world_entropy_mask:
                adv, policy_scale, extra, keep = self._fused_world_entropy_terms(plan, h, w, b, softcap)
            loss, metrics = grpo_loss(
                h, w, plan.completion_ids, adv, plan.mask, plan.old, plan.ref, bias=b,
                importance_sampling_ratio=policy_scale, sampling_logps=plan.sampling, return_metrics=True,
                logit_softcap=softcap, **plan.options,
            )
        policy_loss = loss.detach()
        if extra is not None:
            loss = loss + extra
        if plan.factor != 1.0:
            loss = loss * plan.factor
        if plan.divisor != 1.0:
            loss = loss / plan.divisor
        aux = None
        if plan.aux_on:
            aux = router_aux_loss(lm, backbone_out.router_logits, model_inputs.get("attention_mask"))
            normalizer = self.current_gradient_accumulation_steps if plan.mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux / normalizer
        return ForwardOutput(loss, metrics, policy_loss, keep, aux)

    def _fused_world_entropy_terms(self, plan: LossPlan, h, w, b, softcap):
        """TRL's ``top_entropy_quantile`` over every process, applied around ``grpo_loss``:
        (advantages, importance_sampling_ratio, the entropy bonus term or None, bool mask [B, T])."""
        with_grad = plan.bonus and plan.bonus_coef != 0.0
        ent, keep = self._fused_global_entropy_mask(h, w, b, softcap, plan.completion_ids, plan.scored, plan.mask,
                                                    with_grad=with_grad)
        keep_f = keep.to(ent.dtype)  # fp32 / fp64 (never the bf16 of autocast)
        adv, policy_scale, extra = plan.advantages, plan.is_ratio, None
        if self.loss_type == "vespo":  # the ratio is folded into phi there: zero the masked tokens' advantages
            adv = plan.advantages.expand(keep.shape) * keep.to(plan.advantages.dtype)
        else:
            policy_scale = keep_f if policy_scale is None else policy_scale * keep_f
        if with_grad:  # the bonus over the effective mask, by autograd
            eff = plan.mask.to(ent.dtype) * keep_f
            extra = -plan.bonus_coef * (ent * eff).sum() / eff.sum().clamp(min=1.0)
        return adv, policy_scale, extra, keep

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


def _build_trainer_class():
    """``FusedGRPOTrainer``: the mixin over ``trl.GRPOTrainer`` (TRL is imported here, on first use)."""
    trl = import_trl()
    return type("FusedGRPOTrainer", (FusedGRPOMixin, trl.GRPOTrainer),
                {"__module__": __name__, "__qualname__": "FusedGRPOTrainer", "__doc__": FusedGRPOMixin.__doc__})


def __getattr__(name):
    if name in ("FusedGRPOTrainer", "FusedDistillationTrainer"):  # TRL is imported here, on first use
        cls = _build_trainer_class() if name == "FusedGRPOTrainer" else build_distillation_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

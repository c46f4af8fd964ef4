"""``FusedDistillationTrainer``: TRL's ``DistillationTrainer`` with its loss computed by ``distill_loss``.

One-line switch::

    from grpo_kernels.integrations.trl import FusedDistillationTrainer as DistillationTrainer

TRL (>= 1.16) is imported on first use of the trainer class: importing this module needs only torch.
The subclass overrides one method of ``trl.DistillationTrainer``, ``_compute_loss(unwrapped_student,
inputs, num_items_in_batch)``, which TRL's ``compute_loss`` already runs inside the student's
(wrapped) forward and whose ``(loss, entropy_sum, n_valid)`` it reduces and logs. In it:

- the student's completion hidden states come from one backbone pass
  (``integrations.transformers.completion_hidden_states``), the teacher's from its own backbone
  under ``no_grad``, routed through the teacher's wrapper as TRL routes it;
- both heads are read by ``integrations.transformers.kernel_head`` (bias, logit scale,
  ``final_logit_softcapping`` from each model's own config, ZeRO-3 gathered, autocast dtype);
- ``grpo_kernels.distill_loss`` computes TRL's generalized JSD (``beta``, ``temperature``, the
  ``num_items_in_batch`` normalizer TRL hands down, the loss mask times ``tool_mask``) with the
  student's gradients in the same sweep, where TRL's ``_chunked_divergence_loss`` recomputes both
  heads' logits in its backward.

Everything else (generation, the normalizer, the ``entropy`` metric's reduction across processes,
eval) is TRL's code, unchanged. Not supported, each a clear error: multimodal batches
(``NotImplementedError`` naming the keys, at the first such batch; TRL's ``DistillationTrainer`` is the
trainer for them) and a trainer without a local ``teacher_model`` (``ValueError`` at construction:
the loss needs the teacher's hidden states and head).
"""
from __future__ import annotations

from typing import Optional

import torch

from grpo_kernels.distill import distill_loss
from grpo_kernels.integrations import transformers as gkt
from grpo_kernels.integrations.trl_common import batch_unsupported_features, import_trl

__all__ = ["FusedDistillationMixin", "build_distillation_trainer_class"]


class FusedDistillationMixin:
    """``trl.DistillationTrainer`` whose loss is ``grpo_kernels.distill_loss`` on both models' hidden
    states (``FusedDistillationTrainer`` is this mixin over ``trl.DistillationTrainer``; the module
    docstring says what it replaces).

    Extra keyword arguments (all optional): ``fused_backend``, ``fused_chunk_size`` and
    ``fused_batch_invariant``, passed to ``distill_loss`` as ``backend``, ``chunk_size`` and
    ``batch_invariant``.
    """

    def __init__(self, *args, fused_backend: str = "auto", fused_chunk_size: Optional[int] = None,
                 fused_batch_invariant: bool = False, **kwargs):
        self._fused_backend = fused_backend
        self._fused_chunk_size = fused_chunk_size
        self._fused_batch_invariant = bool(fused_batch_invariant)
        super().__init__(*args, **kwargs)
        if getattr(self, "teacher_model", None) is None:
            raise ValueError(
                "teacher_model must be a model (or a path to one): FusedDistillationTrainer computes the loss from "
                "the teacher's hidden states and lm_head, so it needs a local teacher; got None"
            )

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's ``_compute_loss`` through ``distill_loss``: ``(loss, entropy_sum, n_valid)``, the loss
        [] with gradients for the student, ``entropy_sum`` [] (detached) and ``n_valid`` [] int64
        over this micro-batch's unmasked completion tokens."""
        features = batch_unsupported_features(inputs)
        if features:
            raise NotImplementedError(
                f"FusedDistillationTrainer does not support {'; '.join(features)}: use trl.DistillationTrainer "
                "for multimodal distillation"
            )
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # multi-turn: tool outputs are not trained on
            loss_mask = loss_mask * inputs["tool_mask"]
        keep = inputs["completion_ids"].size(1)
        hidden = gkt.completion_hidden_states(unwrapped_student, input_ids, attention_mask, keep)
        teacher, teacher_hidden = self._fused_teacher_hidden(input_ids, attention_mask, keep)
        # a model split across devices (device_map) may end its backbone on another device than its head
        hidden = hidden.to(gkt.lm_head_params(unwrapped_student).weight.device)
        teacher_hidden = teacher_hidden.to(gkt.lm_head_params(teacher).weight.device)
        with gkt.kernel_head(unwrapped_student, hidden) as (h, w, b, softcap), \
                gkt.kernel_head(teacher, teacher_hidden) as (t_h, t_w, t_b, t_softcap):
            loss, metrics = distill_loss(
                h, w, t_h, t_w, loss_mask.to(h.device), beta=float(self.beta), temperature=float(self.temperature),
                bias=b, teacher_bias=t_b, logit_softcap=softcap, teacher_logit_softcap=t_softcap,
                num_items_in_batch=num_items_in_batch, return_metrics=True, backend=self._fused_backend,
                chunk_size=self._fused_chunk_size, batch_invariant=self._fused_batch_invariant,
            )
        return loss, metrics.entropy_sum, metrics.n_valid

    def _fused_teacher_hidden(self, input_ids, attention_mask, keep):
        """(the unwrapped teacher, its completion hidden states [B, keep, H_t], no graph). The backbone
        runs inside the teacher wrapper's forward, so FSDP / DeepSpeed gather its parameters, as in TRL."""
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            hidden = self._forward_redirection(self.teacher_model, teacher, gkt.completion_hidden_states, teacher,
                                               input_ids, attention_mask, keep)
        return teacher, hidden


def build_distillation_trainer_class():
    """``FusedDistillationTrainer``: the mixin over ``trl.DistillationTrainer`` (TRL is imported here)."""
    trl = import_trl()
    return type("FusedDistillationTrainer", (FusedDistillationMixin, trl.DistillationTrainer),
                {"__module__": "grpo_kernels.integrations.trl", "__qualname__": "FusedDistillationTrainer",
                 "__doc__": FusedDistillationMixin.__doc__})

"""Adapters for Hugging Face transformers models, TRL's ``GRPOTrainer`` and verl.

Nothing here is imported eagerly: ``grpo_kernels.integrations.transformers`` needs only torch
at import time (it reads transformers models it is handed), and
``grpo_kernels.integrations.trl`` imports TRL on first use of ``FusedGRPOTrainer``
(TRL is an optional dependency: ``pip install grpo_kernels[trl]``); the verl modules import verl
where they call it.

- ``grpo_kernels.integrations.transformers``: ``completion_hidden_states``, ``lm_head_params``,
  ``logit_scale``, ``head_operands``, ``kernel_head``, ``model_token_logprobs``, ``model_grpo_loss``,
  ``enable_fused_forward``, ``run_in_forward``, ``check_lm_head``, ``router_aux_loss``.
- ``grpo_kernels.integrations.common``: what every adapter shares (``unwrap_causal_lm``, the fused
  forward switch, ``zero3_gathered``, ``no_autocast``); ``grpo_kernels.integrations.moe``: the MoE
  router aux loss. Both are re-exported by ``transformers``.
- ``grpo_kernels.integrations.trl``: ``FusedGRPOTrainer``, a drop-in ``trl.GRPOTrainer``
  (``FusedGRPOMixin``; its logging in ``trl_metrics``), and ``FusedDistillationTrainer``, a drop-in
  ``trl.DistillationTrainer`` (``FusedDistillationMixin``, in ``trl_distill``); what both share
  (TRL's lazy import, the multimodal check) in ``trl_common``.
- ``grpo_kernels.integrations.verl``: the verl switch (``enable``); its parts in ``verl_config``,
  ``verl_forward``, ``verl_loss``, ``verl_step``, ``verl_engine`` and ``verl_distill``.
"""

__all__ = ["transformers", "trl"]

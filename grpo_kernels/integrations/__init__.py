"""Adapters for Hugging Face transformers models and TRL's ``GRPOTrainer``.

Nothing here is imported eagerly: ``grpo_kernels.integrations.transformers`` needs only torch
at import time (it reads transformers models it is handed), and
``grpo_kernels.integrations.trl`` imports TRL on first use of ``FusedGRPOTrainer``
(TRL is an optional dependency: ``pip install grpo_kernels[trl]``).

- ``grpo_kernels.integrations.transformers``: ``completion_hidden_states``, ``lm_head_params``,
  ``logit_scale``, ``model_token_logprobs``, ``model_grpo_loss``, ``enable_fused_forward``,
  ``run_in_forward``, ``check_lm_head``.
- ``grpo_kernels.integrations.trl``: ``FusedGRPOTrainer``, a drop-in ``trl.GRPOTrainer``.
"""

__all__ = ["transformers", "trl"]

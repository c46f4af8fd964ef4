"""verl 0.9.1 -> ``grpo_kernels``: log-probs, entropy and the whole actor loss without [N, V] logits.

Three pieces, all installed by one call, ``enable()``, in every process that builds a verl engine
(for Ray workers: ``ray.init(runtime_env={"worker_process_setup_hook":
"grpo_kernels.integrations.verl.enable"})``, or import-and-call it in your worker entry point):

1. **A fused-kernels backend for verl's forward.** ``linear_cross_entropy(hidden, weight, labels,
   temperature, reduction, dist_process_group)`` has the signature and semantics of
   ``verl.utils.kernel.linear_cross_entropy`` (per-token log-probs and entropies, fp32, differentiable,
   vocab-parallel over ``dist_process_group`` with a rank-local ``grad_hidden`` as verl's kernel
   gives it) and runs ``grpo_kernels.token_logprobs`` on any device (the CPU included). After
   ``enable()`` the value ``"grpo_kernels"`` is accepted by verl's
   ``actor_rollout_ref.model.fused_kernel_options.impl_backend`` (with ``use_fused_kernels=True``):
   verl's own per-family fused forward (``dense_common`` / ``qwen2_vl`` / ``qwen3_vl`` / ``glm4v`` /
   ``qwen3_5``: its "triton" forward) is installed and its ``linear_cross_entropy`` call is answered by
   this module's function. That covers ``compute_log_prob`` / ``compute_ref_log_prob`` and the stock loss,
   and ``calculate_sum_pi_squared=True`` in a forward-only pass (verl refuses it with fused kernels): the
   same sweep computes it (``token_statistics``) and ``verl_engine`` lays it out as verl does.

2. **A fused actor loss.** ``fused_ppo_loss(config, model_output, data, dp_group)`` is verl's
   ``verl.workers.utils.losses.ppo_loss`` computed from hidden states by ``grpo_loss`` in ONE vocabulary
   sweep with the gradients produced in the forward: every ``policy_loss.loss_mode``, every
   ``loss_agg_mode``, every ``kl_loss_type``, the entropy term, ``rollout_is_weights`` and the
   global-batch normalizers (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
   ``loss_scale_factor``). ``config_to_options(actor_config)`` is the mapping. After ``enable()``,
   ``FSDPEngineWithLMHead.forward_step`` runs it *inside* the FSDP module's forward (the lm_head weight
   is whole only there) whenever the engine's loss function is verl's ``ppo_loss`` (what
   ``TrainingWorker`` installs for the actor); forward-only passes, the critic and other losses keep
   verl's code. verl's metrics (``actor/pg_loss``, ``actor/pg_clipfrac``, ``actor/ppo_kl``,
   ``actor/pg_clipfrac_lower``, ``actor/entropy_loss``, ``kl_loss``, ``kl_coef``, the rollout-correction
   metrics of bypass_mode, ...) are verl's own ``ppo_loss`` evaluated on the fused pass's detached
   log-probs and entropies (O(B*T), no vocabulary work).

3. **Distillation.** When the engine's loss function is verl's ``distillation_ppo_loss`` (what the worker
   installs when distillation is enabled), the same switched ``forward_step`` runs ``verl_distill``'s
   step inside the FSDP module's forward: verl's top-k rows from ``topk_forward_kl`` (no [N, V]),
   ``token_logprobs`` where the distillation loss needs differentiable log-probs, ``fused_ppo_loss``
   for a policy loss added to supervised top-k, and verl's own ``distillation_ppo_loss`` combining them.

What the fused training steps refuse (``NotImplementedError``, naming it): Ulysses sequence parallelism
(``ulysses_sequence_parallel_size > 1``), ``calculate_sum_pi_squared`` in the
training step (the forward-only log-prob pass answers it through the forward backend),
multimodal inputs, a per-sample temperature tensor with different values, and ``config_to_options``'s
list (``kl_loss_type="full"``, an unknown ``loss_mode``). Pass ``enable(loss=False)`` to keep verl's loss.

Modules, by concern (this one is the switch and re-exports the public names):
``verl_config`` (``config_to_options``, ``KL_LOSS_TYPES``, the settings ``enable()`` installs),
``verl_forward`` (the forward backend, ``linear_cross_entropy``), ``verl_loss`` (``fused_ppo_loss``),
``verl_step`` (one training micro-batch of the FSDP engine, run inside its module's forward),
``verl_engine`` (the switched ``forward_step``, the ``ppo_loss`` step) and ``verl_distill`` (the
``distillation_ppo_loss`` step).
"""
from __future__ import annotations

import contextlib
from typing import Optional

from grpo_kernels.integrations.verl_config import KL_LOSS_TYPES, SETTINGS, config_to_options
from grpo_kernels.integrations.verl_engine import wrap_forward_step
from grpo_kernels.integrations.verl_forward import (
    BACKEND_NAME,
    linear_cross_entropy,
    wrap_linear_cross_entropy,
    wrap_patch_forward_with_backends,
)
from grpo_kernels.integrations.verl_loss import fused_ppo_loss

__all__ = [
    "VERL_VERSION",
    "BACKEND_NAME",
    "KL_LOSS_TYPES",
    "linear_cross_entropy",
    "config_to_options",
    "fused_ppo_loss",
    "enable",
    "disable",
    "is_enabled",
    "enabled",
]

VERL_VERSION = "0.9.1"


def enable(*, forward: bool = True, loss: bool = True, backend: str = "auto", chunk_size: Optional[int] = None):
    """Install the verl integration in this process (idempotent; ``disable()`` undoes it).

    ``forward``: register ``fused_kernel_options.impl_backend="grpo_kernels"`` (with verl's
    ``use_fused_kernels=True``). ``loss``: the FSDP engine's training step runs ``fused_ppo_loss``
    inside the model's forward whenever its loss is verl's ``ppo_loss``, and the distillation step
    (``verl_distill``) whenever it is verl's ``distillation_ppo_loss``. ``backend`` / ``chunk_size``:
    ``grpo_kernels``'s (``auto``: triton on CUDA, the C++ row pass on the CPU)."""
    import verl
    import verl.utils.kernel.linear_cross_entropy as lce_mod
    from verl.models.transformers import monkey_patch
    from verl.workers.engine.fsdp import transformer_impl

    if verl.__version__ != VERL_VERSION:
        import warnings

        warnings.warn(f"grpo_kernels.integrations.verl is written against verl {VERL_VERSION}, found "
                      f"{verl.__version__}", stacklevel=2)
    from grpo_kernels.options import ExecutionOptions

    ExecutionOptions(backend=backend, chunk_size=chunk_size).validate()
    SETTINGS.backend, SETTINGS.chunk_size = backend, chunk_size
    if forward and not SETTINGS.forward:
        if not hasattr(lce_mod.linear_cross_entropy, "_grpo_kernels_original"):
            lce_mod.linear_cross_entropy = wrap_linear_cross_entropy(lce_mod.linear_cross_entropy)
        if not hasattr(monkey_patch.patch_forward_with_backends, "_grpo_kernels_original"):
            monkey_patch.patch_forward_with_backends = wrap_patch_forward_with_backends(
                monkey_patch.patch_forward_with_backends)
        SETTINGS.forward = True
    cls = transformer_impl.FSDPEngineWithLMHead
    # the forward switch needs it too: a forward-only pass with calculate_sum_pi_squared
    if (loss or forward) and not hasattr(cls.forward_step, "_grpo_kernels_original"):
        cls.forward_step = wrap_forward_step(cls.forward_step)
    SETTINGS.loss = bool(loss)


def disable():
    """Undo ``enable()`` (models already patched keep their fused forward class)."""
    import verl.utils.kernel.linear_cross_entropy as lce_mod
    from verl.models.transformers import monkey_patch
    from verl.workers.engine.fsdp import transformer_impl

    for owner, name in ((lce_mod, "linear_cross_entropy"), (monkey_patch, "patch_forward_with_backends"),
                        (transformer_impl.FSDPEngineWithLMHead, "forward_step")):
        current = getattr(owner, name)
        original = getattr(current, "_grpo_kernels_original", None)
        if original is not None:
            setattr(owner, name, original)
    SETTINGS.forward = SETTINGS.loss = False


def is_enabled() -> dict:
    """Which switches ``enable()`` turned on in this process: ``{"forward": bool, "loss": bool}``."""
    return {"forward": SETTINGS.forward, "loss": SETTINGS.loss}


@contextlib.contextmanager
def enabled(**kwargs):
    """``enable(**kwargs)`` for a ``with`` block, then ``disable()``."""
    enable(**kwargs)
    try:
        yield
    finally:
        disable()

"""verl 0.9.1's distillation training step without [N, V] logits: ``forward_step(micro_batch,
partial(distillation_ppo_loss, config=, distillation_config=), forward_only=False)`` with the
vocabulary work done from the packed hidden states, *inside* the FSDP module's forward.

What verl's step does there: its logits processor (``compute_forward_kl_topk`` on the materialized
student logits) puts five per-token rows in ``model_output`` (``distillation_losses``,
``student_mass``, ``teacher_mass``, ``overlap_count``, ``overlap_token_advantage``) when the micro-batch
says ``distillation_use_topk``, ``log_probs`` unless it says ``distillation_only``, ``entropy`` when it
says ``calculate_entropy``; then ``distillation_ppo_loss`` combines its registered distillation loss
with verl's ``ppo_loss``. Here:

- the rows come from ``topk_forward_kl`` (one sweep, the gradient by a recomputing sweep), laid out as
  verl lays the processor's outputs out (nested over the packed sequences);
- the combination is verl's own ``distillation_ppo_loss``, called with that ``model_output``;
- the policy loss, when the configuration adds it to a supervised top-k loss (``use_task_rewards``
  without ``use_policy_gradient``), is ``fused_ppo_loss`` (one sweep, gradients in the forward): it
  stands in for the ``ppo_loss`` name inside verl's distillation module for that call only;
- otherwise (policy-gradient distillation, the single-sample estimator losses such as ``k3``, or only
  the entropy to report) ``log_probs`` / ``entropy`` are ``token_logprobs``' differentiable values and
  verl's ``ppo_loss`` runs on them unchanged.

Only the FSDP engine is switched (``verl_engine.wrap_forward_step``); ``refuse_unsupported`` names
what it does not run (Ulysses sequence parallelism, multimodal inputs, ``calculate_sum_pi_squared``
in the training step).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from grpo_kernels.api import token_logprobs
from grpo_kernels.integrations import transformers as gkt
from grpo_kernels.integrations.verl_config import SETTINGS
from grpo_kernels.integrations.verl_loss import fused_ppo_loss
from grpo_kernels.integrations.verl_step import EngineStep, head_output, packed_hidden, prepare_step, run_step
from grpo_kernels.topk_distill import topk_forward_kl

__all__ = ["TOPK_KEYS", "distillation_configs", "run_distillation_step"]

#: the per-token rows verl's top-k logits processor puts in ``model_output`` (``TopKRows``' order)
TOPK_KEYS = ("distillation_losses", "student_mass", "teacher_mass", "overlap_count", "overlap_token_advantage")


def distillation_configs(loss_function) -> Optional[tuple]:
    """``(actor config, distillation config)`` of ``partial(distillation_ppo_loss, config=...,
    distillation_config=...)`` (what verl's ``ActorRolloutRefWorker`` installs when distillation is
    enabled), else None."""
    from verl.trainer.distillation import losses as dl

    if isinstance(loss_function, functools.partial) and not loss_function.args \
            and loss_function.func is dl.distillation_ppo_loss:
        config = loss_function.keywords.get("config")
        distillation = loss_function.keywords.get("distillation_config")
        if config is not None and distillation is not None:
            return config, distillation
    return None


@contextlib.contextmanager
def _fused_policy_loss():
    """verl's distillation module with ``fused_ppo_loss`` as its ``ppo_loss`` for the block (the name
    ``distillation_ppo_loss`` calls; same signature), then verl's again."""
    from verl.trainer.distillation import losses as dl

    original = dl.ppo_loss
    dl.ppo_loss = fused_ppo_loss
    try:
        yield
    finally:
        dl.ppo_loss = original


def run_distillation_step(engine, micro_batch, config, distillation_config):
    """``forward_step(micro_batch, distillation_ppo_loss, forward_only=False)`` from hidden states:
    ``(loss, {"model_output", "loss", "metrics"})`` as verl's step returns them."""
    step, model_inputs = prepare_step(engine, micro_batch, config)
    return run_step(engine, model_inputs, functools.partial(_distill_in_forward, step, distillation_config))


def _flags(step: EngineStep) -> tuple:
    from verl.utils import tensordict_utils as tu

    get = functools.partial(tu.get_non_tensor_data, data=step.micro_batch, default=False)
    return bool(get(key="distillation_use_topk")), bool(get(key="distillation_only"))


def _nested(values: torch.Tensor, step: EngineStep) -> torch.Tensor:
    """[nnz] packed values as verl's engine stores them: jagged-nested over ``input_ids``' offsets."""
    offsets = step.micro_batch["input_ids"].offsets()
    return torch.nested.nested_tensor_from_jagged(values, offsets.to(values.device))


def _topk_rows(step: EngineStep, distillation_config, h, w, b, softcap) -> dict:
    """verl's logits-processor outputs (``TOPK_KEYS``) from the packed head operands."""
    data = step.micro_batch
    ids, logps = data["teacher_ids"], data["teacher_logprobs"]
    ids = ids.values() if ids.is_nested else ids.reshape(-1, ids.shape[-1])
    logps = logps.values() if logps.is_nested else logps.reshape(-1, logps.shape[-1])
    rows = topk_forward_kl(h, w, ids, logps, bias=b, temperature=step.temperature, logit_softcap=softcap,
                           log_prob_min_clamp=distillation_config.distillation_loss.log_prob_min_clamp,
                           chunk_size=SETTINGS.chunk_size)
    return {k: _nested(v, step) for k, v in zip(TOPK_KEYS, rows)}


def _distill_in_forward(step: EngineStep, distillation_config, lm, **inputs):
    """The causal LM's forward under the distillation step -> (loss, metrics, detached model_output)."""
    from verl.trainer.distillation import losses as dl

    use_topk, only = _flags(step)
    loss_cfg = distillation_config.distillation_loss
    # the supervised top-k loss leaves the log-probs' gradient to the policy loss alone: fuse that one
    fuse_policy = use_topk and loss_cfg.use_task_rewards and not loss_cfg.use_policy_gradient and not only
    packed = packed_hidden(step, lm, **inputs)
    with gkt.kernel_head(lm, packed) as (h, w, b, softcap):
        mo = _topk_rows(step, distillation_config, h, w, b, softcap) if use_topk else {}
        if fuse_policy:
            mo.update(head_output(step, h, w, b, softcap))
        elif not only or step.calc_entropy:
            out = token_logprobs(h, w, step.labels, bias=b, temperature=step.temperature, logit_softcap=softcap,
                                 return_entropy=step.calc_entropy, backend=SETTINGS.backend,
                                 chunk_size=SETTINGS.chunk_size)
            logp, ent = out if step.calc_entropy else (out, None)
            mo.update({} if only else {"log_probs": _nested(logp, step)})
            mo.update({} if ent is None else {"entropy": _nested(ent, step)})
        with _fused_policy_loss() if fuse_policy else contextlib.nullcontext():
            loss, metrics = dl.distillation_ppo_loss(step.config, distillation_config, model_output=mo,
                                                     data=step.micro_batch, dp_group=step.dp_group)
    keep = (*TOPK_KEYS, "log_probs", "entropy")
    return loss, metrics, {k: v.detach() for k, v in mo.items() if k in keep}

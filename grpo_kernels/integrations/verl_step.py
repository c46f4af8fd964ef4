"""One training micro-batch of verl 0.9.1's ``FSDPEngineWithLMHead``, prepared as verl's engine prepares
it and run *inside* the FSDP module's forward (the lm_head weight is whole only there): what the fused
``ppo_loss`` step (``verl_engine``) and the fused distillation step (``verl_distill``) share.

``prepare_step`` is verl's ``prepare_model_inputs`` plus the facts the fused losses need (packed
length, labels, the float32-rounded temperature, flags); ``run_step`` runs a function of the causal LM
inside the module's forward under the engine's autocast; ``packed_hidden`` is the backbone's final-normed
states in verl's packed (no-padding) token order.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, NamedTuple, Optional

import torch

from grpo_kernels.integrations import transformers as gkt
from grpo_kernels.integrations.common import enable_fused_forward, run_in_forward
from grpo_kernels.integrations.verl_config import scalar_temperature

__all__ = ["EngineStep", "prepare_step", "run_step", "head_output", "packed_hidden", "refuse_unsupported"]


class EngineStep(NamedTuple):
    """One micro-batch's fused step, as the engine prepared it."""

    config: object  # verl's ActorConfig
    micro_batch: object  # the TensorDict, on the engine's device
    dp_group: object
    nnz: int  # packed tokens (the engine pads the packed sequence at its tail)
    labels: torch.Tensor  # [nnz] verl's input_ids_rmpad_rolled
    temperature: float
    calc_entropy: bool
    use_remove_padding: bool
    attention_mask: Optional[torch.Tensor]  # [B, L] in the padded layout


def refuse_unsupported(engine, micro_batch) -> None:
    """``NotImplementedError`` for what neither fused step handles (each names the option)."""
    from verl.utils import tensordict_utils as tu

    if getattr(engine, "use_ulysses_sp", False):
        raise NotImplementedError("the fused verl loss does not support Ulysses sequence parallelism "
                                  "(ulysses_sequence_parallel_size > 1): enable(loss=False)")
    if tu.get_non_tensor_data(data=micro_batch, key="calculate_sum_pi_squared", default=False):
        # verl's trainer asks for it in the forward-only old-log-prob pass only (answered by the fused
        # forward's sweep); the training step's sweeps do not compute it
        raise NotImplementedError("the fused verl loss (training step) does not compute calculate_sum_pi_squared=True "
                                  "(the forward-only log-prob pass does): enable(loss=False)")
    if micro_batch.get("multi_modal_inputs", None) is not None:
        raise NotImplementedError("the fused verl loss does not support multimodal inputs: enable(loss=False)")


def prepare_step(engine, micro_batch, config):
    """-> ``(EngineStep, model_inputs)``: the micro-batch moved to the engine's device, checked
    (``refuse_unsupported``), and verl's ``prepare_model_inputs`` of it."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp import transformer_impl as impl  # the engine's own device helpers

    micro_batch = micro_batch.to(impl.get_device_id())
    get = functools.partial(tu.get_non_tensor_data, data=micro_batch)
    refuse_unsupported(engine, micro_batch)
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=micro_batch)
    nnz = int(micro_batch["input_ids"].offsets()[-1])
    step = EngineStep(
        config=config, micro_batch=micro_batch, dp_group=engine.get_data_parallel_group(), nnz=nnz,
        labels=output_args["input_ids_rmpad_rolled"].reshape(-1)[:nnz],
        # verl's (non-fused) forward divides the logits by the temperature as a float32 tensor
        temperature=float(torch.tensor(scalar_temperature(micro_batch["temperature"]), dtype=torch.float32)),
        calc_entropy=bool(get(key="calculate_entropy", default=False)),
        use_remove_padding=get(key="use_remove_padding", default=True),
        attention_mask=model_inputs.get("attention_mask"),
    )
    return step, model_inputs


def run_step(engine, model_inputs: dict, fn: Callable):
    """``fn(causal_lm, **model_inputs)`` -> ``(loss, metrics, model_output)`` inside the engine's FSDP
    module's forward, under the engine's autocast (none for float32 parameters, as verl's step);
    returns ``(loss, {"model_output", "loss", "metrics"})`` as verl's ``forward_step`` does."""
    from verl.workers.engine.fsdp import transformer_impl as impl

    enable_fused_forward(engine.module)
    autocast_dtype = getattr(engine, "_autocast_dtype", torch.bfloat16)
    autocast_ctx = (contextlib.nullcontext() if autocast_dtype == torch.float32
                    else torch.autocast(device_type=impl.get_device_name(), dtype=autocast_dtype))
    with autocast_ctx:
        loss, metrics, model_output = run_in_forward(engine.module, fn, **model_inputs, use_cache=False)
    return loss, {"model_output": model_output, "loss": loss.detach().item(), "metrics": metrics}


def head_output(step: EngineStep, h, w, b, softcap) -> dict:
    """The model_output ``fused_ppo_loss`` reads: the packed head operands (``kernel_head``'s), the
    labels, the temperature and whether to compute entropies."""
    return {"hidden_states": h, "lm_head_weight": w, "lm_head_bias": b, "logit_softcap": softcap,
            "labels": step.labels, "temperature": step.temperature, "calculate_entropy": step.calc_entropy}


def packed_hidden(step: EngineStep, lm, **inputs) -> torch.Tensor:
    """The backbone's final-normed hidden states [nnz, H] in verl's packed token order (the order of
    ``input_ids.values()``, of ``step.labels`` and of the teacher's nested tensors)."""
    hidden, _ = gkt.backbone_hidden_states(lm, **inputs)
    if step.use_remove_padding:
        return hidden.reshape(-1, hidden.shape[-1])[:step.nnz]  # the static pad sits at the tail
    return hidden[step.attention_mask.bool()]

"""verl 0.9.1's FSDP engine with the fused actor loss: ``FSDPEngineWithLMHead.forward_step`` runs
``fused_ppo_loss`` *inside* the FSDP module's forward (the lm_head weight is whole only there)
whenever the engine's loss function is verl's ``ppo_loss`` (what ``TrainingWorker`` installs for the
actor), and the fused distillation step (``verl_distill``) whenever it is verl's
``distillation_ppo_loss`` (what it installs when distillation is enabled). Forward-only passes, the
critic and other losses keep verl's code. ``enable(loss=True)`` (``grpo_kernels.integrations.verl``)
installs ``wrap_forward_step``.
"""
from __future__ import annotations

import contextlib
import functools

from grpo_kernels.integrations import transformers as gkt
from grpo_kernels.integrations.verl_config import SETTINGS
from grpo_kernels.integrations.verl_distill import distillation_configs, run_distillation_step
from grpo_kernels.integrations.verl_forward import BACKEND_NAME, capture_sum_pi_squared
from grpo_kernels.integrations.verl_loss import fused_ppo_loss
from grpo_kernels.integrations.verl_step import EngineStep, head_output, packed_hidden, prepare_step, run_step

__all__ = ["ppo_config", "wrap_forward_step", "run_fused_step", "wants_fused_sum_pi_squared",
           "forward_with_sum_pi_squared"]


def ppo_config(loss_function):
    """The ActorConfig of ``partial(ppo_loss, config=...)`` (what verl's TrainingWorker installs), else None."""
    from verl.workers.utils import losses

    if isinstance(loss_function, functools.partial) and not loss_function.args:
        func = loss_function.func
        if func is getattr(losses.ppo_loss, "_grpo_kernels_original", losses.ppo_loss) or func is fused_ppo_loss:
            return loss_function.keywords.get("config")
    return None


def wrap_forward_step(original):
    """What ``FSDPEngineWithLMHead.forward_step`` becomes under ``enable(loss=True)``."""

    @functools.wraps(original)
    def forward_step(self, micro_batch, loss_function, forward_only):
        if forward_only and wants_fused_sum_pi_squared(self, micro_batch):
            return forward_with_sum_pi_squared(original, self, micro_batch, loss_function)
        if forward_only or not SETTINGS.loss:
            return original(self, micro_batch, loss_function, forward_only)
        configs = distillation_configs(loss_function)
        if configs is not None:
            return run_distillation_step(self, micro_batch, *configs)
        config = ppo_config(loss_function)
        if config is None or _distillation_flags(micro_batch):
            # verl's own step: another loss, or ppo_loss with distillation's flags (which verl's step
            # does not run either: its logits processor is then ppo_loss)
            return original(self, micro_batch, loss_function, forward_only)
        return run_fused_step(self, micro_batch, config)

    forward_step._grpo_kernels_original = original
    return forward_step


def _distillation_flags(micro_batch) -> bool:
    from verl.utils import tensordict_utils as tu

    return any(tu.get_non_tensor_data(data=micro_batch, key=k, default=False)
               for k in ("distillation_use_topk", "distillation_only"))


def wants_fused_sum_pi_squared(engine, micro_batch) -> bool:
    """A forward-only pass that asks for ``calculate_sum_pi_squared`` with ``use_fused_kernels`` on a
    model whose fused forward is grpo_kernels' (verl itself refuses the pair: its fused kernels never
    see the whole row)."""
    from verl.utils import tensordict_utils as tu

    get = functools.partial(tu.get_non_tensor_data, data=micro_batch)
    return (SETTINGS.forward and bool(get(key="calculate_sum_pi_squared", default=False))
            and bool(get(key="use_fused_kernels", default=False))
            and getattr(engine.module, "_verl_fused_kernels_backend", None) == BACKEND_NAME)


@contextlib.contextmanager
def _flags(micro_batch, **values):
    """verl's non-tensor flags of ``micro_batch`` set to ``values`` for the block, then restored."""
    from verl.utils import tensordict_utils as tu

    before = {k: tu.get_non_tensor_data(data=micro_batch, key=k, default=False) for k in values}
    tu.assign_non_tensor(micro_batch, **values)
    try:
        yield
    finally:
        tu.assign_non_tensor(micro_batch, **before)


def forward_with_sum_pi_squared(original, engine, micro_batch, loss_function):
    """verl's forward-only ``forward_step`` with ``model_output["sum_pi_squared"]`` from the fused
    forward's own sweep (``capture_sum_pi_squared``). verl's ``prepare_model_outputs`` runs as usual
    without the flag; the captured values then go through it once more in the place of the log-probs
    (no entropy, no distillation), so they come out in exactly the layout verl gives ``log_probs``:
    gathered, unpadded and nested over the packed sequences."""
    from types import SimpleNamespace

    prepare = engine.prepare_model_outputs  # the bound method

    def prepare_model_outputs(output, output_args, micro_batch, logits_processor_func):
        with _flags(micro_batch, calculate_sum_pi_squared=False):
            model_output = prepare(output, output_args, micro_batch, logits_processor_func)
        if len(captured) != 1:
            raise RuntimeError(f"expected one fused head call in the forward, saw {len(captured)}")
        values = SimpleNamespace(log_probs=captured.pop())
        with _flags(micro_batch, calculate_sum_pi_squared=False, calculate_entropy=False,
                    distillation_use_topk=False, distillation_only=False):
            model_output["sum_pi_squared"] = prepare(values, output_args, micro_batch, None)["log_probs"]
        return model_output

    engine.prepare_model_outputs = prepare_model_outputs  # this call only: the instance attribute
    try:
        with capture_sum_pi_squared() as captured:
            return original(engine, micro_batch, loss_function, True)
    finally:
        del engine.prepare_model_outputs


def run_fused_step(engine, micro_batch, config):
    """``forward_step(micro_batch, ppo_loss, forward_only=False)`` with ``fused_ppo_loss`` in the forward:
    ``(loss, {"model_output", "loss", "metrics"})`` as verl's step returns them."""
    step, model_inputs = prepare_step(engine, micro_batch, config)
    return run_step(engine, model_inputs, functools.partial(_loss_in_forward, step))


def _loss_in_forward(step: EngineStep, lm, **inputs):
    """The causal LM's forward under the fused step: the backbone's packed states, then ``fused_ppo_loss``
    -> (loss, metrics, the detached packed log-probs / entropies)."""
    packed = packed_hidden(step, lm, **inputs)
    with gkt.kernel_head(lm, packed) as (h, w, b, softcap):
        mo = head_output(step, h, w, b, softcap)
        loss, metrics = fused_ppo_loss(step.config, mo, step.micro_batch, step.dp_group)
    return loss, metrics, {k: mo[k] for k in ("log_probs", "entropy") if k in mo}

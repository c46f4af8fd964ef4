"""verl 0.9.1 -> ``grpo_kernels``: log-probs, entropy and the whole actor loss without [N, V] logits.

Two pieces, both installed by one call, ``enable()``, in every process that builds a verl engine
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
   this module's function. That covers ``compute_log_prob`` / ``compute_ref_log_prob`` and the stock loss.

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

What the fused loss step refuses (``NotImplementedError``, naming it): Ulysses sequence parallelism
(``ulysses_sequence_parallel_size > 1``), top-K distillation, ``calculate_sum_pi_squared``,
multimodal inputs, a per-sample temperature tensor with different values, and ``config_to_options``'s
list (``kl_loss_type="full"``, an unknown ``loss_mode``). Pass ``enable(loss=False)`` to keep verl's loss.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import torch

from grpo_kernels.api import grpo_loss, token_logprobs
from grpo_kernels.options import LOSS_AGG_MODES, POLICY_LOSSES
from grpo_kernels.rollout_correction import is_threshold_options

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
]

VERL_VERSION = "0.9.1"
#: the ``fused_kernel_options.impl_backend`` value ``enable()`` registers
BACKEND_NAME = "grpo_kernels"
#: verl's ``kl_loss_type`` -> ``grpo_loss``'s ``kl_estimator`` (verl's k3 is the clamped low_var_kl;
#: its k2 is its own "+" form)
KL_LOSS_TYPES = {
    "kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl",
    "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "low_var_kl+",
    "k3+": "low_var_kl+",
}


class _State:
    backend: str = "auto"
    chunk_size: Optional[int] = None
    forward: bool = False
    loss: bool = False


_STATE = _State()
_IN_OUR_FORWARD = contextvars.ContextVar("grpo_kernels_verl_forward", default=False)


def _get(cfg, key, default=None):
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - a config whose get() takes no default
            pass
    return getattr(cfg, key, default)


# ------------------------------------------------------------------ 1. the forward backend


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none", dist_process_group=None, *,
                         backend: Optional[str] = None, chunk_size: Optional[int] = None,
                         keep_shape: bool = False):
    """verl's ``linear_cross_entropy``: ``(logprobs, entropy)`` of ``softmax(hidden @ weight.T / temperature)``.

    hidden [..., H], weight [V, H] (this rank's rows ``[rank * V_local, (rank + 1) * V_local)`` with
    ``dist_process_group``, labels global ids), labels [...]. ``reduction="none"``: logprobs [N]
    (flattened, as verl's kernel returns them; ``keep_shape=True``: hidden's leading shape); "sum" /
    "mean": their sum / mean, a 0-d tensor. entropy is per token either way. fp32 (fp64 for fp64
    inputs), differentiable in hidden and weight; under a process group ``grad_hidden`` is this rank's
    partial gradient, as verl's kernel leaves it (the caller's tensor-parallel layer reduces it).
    ``backend`` / ``chunk_size``: ``token_logprobs``'s (default: ``enable()``'s).
    """
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise NotImplementedError("linear_cross_entropy takes one temperature (verl's kernel does too)")
        temperature = float(temperature)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    t = labels.reshape(-1).to(torch.int64)
    kwargs = {}
    if dist_process_group is not None:
        kwargs = dict(process_group=dist_process_group, reduce_grad_hidden=False)
    logp, ent = token_logprobs(h, weight, t, temperature=float(temperature), return_entropy=True,
                               backend=backend or _STATE.backend,
                               chunk_size=chunk_size if chunk_size is not None else _STATE.chunk_size, **kwargs)
    r = reduction.lower()
    if r == "sum":
        return logp.sum(), ent.reshape(lead) if keep_shape else ent
    if r == "mean":
        return logp.mean(), ent.reshape(lead) if keep_shape else ent
    if keep_shape:
        return logp.reshape(lead), ent.reshape(lead)
    return logp, ent


def _dispatching_linear_cross_entropy(original):
    """What ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` becomes under ``enable()``:
    ours inside a model whose backend is ``"grpo_kernels"``, verl's own elsewhere."""

    @functools.wraps(original)
    def dispatch(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        if _IN_OUR_FORWARD.get():
            # the engine squeezes [1, nnz] (packed) or masks [B, L] (padded): keep the leading shape
            return linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group,
                                        keep_shape=True)
        return original(hidden, weight, labels, temperature, reduction, dist_process_group)

    dispatch._grpo_kernels_original = original
    return dispatch


def _patch_forward_with_backends(original):
    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str = None):
        if not (use_fused_kernels and fused_kernels_backend == BACKEND_NAME):
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        cls = model.__class__
        if getattr(cls, "_grpo_kernels_verl_forward", False):
            model._verl_fused_kernels_backend = BACKEND_NAME
            return None
        original(model, use_fused_kernels=True, fused_kernels_backend="triton")  # verl's per-family forward
        family_forward = cls.forward

        @functools.wraps(family_forward)
        def forward(self, *args, **kwargs):
            token = _IN_OUR_FORWARD.set(True)
            try:
                return family_forward(self, *args, **kwargs)
            finally:
                _IN_OUR_FORWARD.reset(token)

        cls.forward = forward
        cls._grpo_kernels_verl_forward = True
        model._verl_fused_kernels_backend = BACKEND_NAME
        print(f"Using grpo_kernels backend for fused kernels in {cls.__name__}")
        return None

    patch_forward_with_backends._grpo_kernels_original = original
    return patch_forward_with_backends


# ------------------------------------------------------------------ 2. the loss: config mapping


def config_to_options(actor_config) -> dict:
    """verl's ``ActorConfig`` (dataclass, OmegaConf or dict) -> ``grpo_loss`` keywords for ``ppo_loss``'s
    objective. The per-batch values (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``rollout_is_weights``, temperature) are not config: ``fused_ppo_loss`` takes them from ``data``.
    ``entropy_coef`` is ``entropy_coeff``; verl only adds the entropy term when the engine computed
    entropies (``calculate_entropy``), which ``fused_ppo_loss`` applies. Raises ``NotImplementedError``
    for an option ``grpo_loss`` cannot express."""
    c = actor_config
    pl = _get(c, "policy_loss")
    mode = _get(pl, "loss_mode", "vanilla") or "vanilla"
    if mode not in POLICY_LOSSES:
        raise NotImplementedError(f"verl policy_loss.loss_mode={mode!r} is not supported by grpo_kernels "
                                  f"(supported: {', '.join(POLICY_LOSSES)})")
    agg = _get(c, "loss_agg_mode", "token-mean")
    if agg not in LOSS_AGG_MODES:
        raise NotImplementedError(f"verl loss_agg_mode={agg!r} is not supported (supported: {', '.join(LOSS_AGG_MODES)})")
    clip = _get(c, "clip_ratio", 0.2)
    lo, hi = _get(c, "clip_ratio_low"), _get(c, "clip_ratio_high")
    opts = dict(
        policy_loss=mode,
        loss_agg_mode=agg,
        epsilon_low=float(clip if lo is None else lo),
        epsilon_high=float(clip if hi is None else hi),
        clip_ratio_c=float(_get(c, "clip_ratio_c", 3.0)),
        entropy_coef=float(_get(c, "entropy_coeff", 0.0) or 0.0),
        sapo_temperature_pos=float(_get(c, "tau_pos", 1.0)),
        sapo_temperature_neg=float(_get(c, "tau_neg", 1.05)),
    )
    lsf = _get(c, "loss_scale_factor")
    if lsf is not None:
        opts["loss_scale_factor"] = float(lsf)
    if _get(c, "use_kl_loss", False):
        kl_type = _get(c, "kl_loss_type", "low_var_kl")
        if kl_type not in KL_LOSS_TYPES:
            raise NotImplementedError(
                f"verl kl_loss_type={kl_type!r} is not supported (verl itself raises NotImplementedError for "
                f"'full'); supported: {', '.join(KL_LOSS_TYPES)}")
        opts["beta"] = float(_get(c, "kl_loss_coef", 0.001))
        opts["kl_estimator"] = KL_LOSS_TYPES[kl_type]
    if mode == "clip_cov":
        opts["clip_cov_ratio"] = float(_default(_get(pl, "clip_cov_ratio"), 0.0002))
        opts["clip_cov_lb"] = float(_default(_get(pl, "clip_cov_lb"), 1.0))
        opts["clip_cov_ub"] = float(_default(_get(pl, "clip_cov_ub"), 5.0))
    elif mode == "kl_cov":
        opts["kl_cov_ratio"] = float(_default(_get(pl, "kl_cov_ratio"), 0.0002))
        opts["ppo_kl_coef"] = float(_default(_get(pl, "ppo_kl_coef"), 1.0))  # verl's fallback when None is 1.0
    elif mode == "dro":
        beta = _get(pl, "dro_beta")
        if beta is None:
            raise NotImplementedError("policy_loss.loss_mode='dro' needs policy_loss.dro_beta (verl fails without it)")
        opts["dro_beta"] = float(beta)
    elif mode == "bypass_mode":
        opts.update(_rollout_correction_options(_get(pl, "rollout_correction")))
    return opts


def _default(value, default):
    return default if value is None else value


def _rollout_correction_options(rc) -> dict:
    if rc is None:
        raise NotImplementedError("policy_loss.loss_mode='bypass_mode' needs policy_loss.rollout_correction")
    out = dict(
        bypass_loss_type=_get(rc, "loss_type", "ppo_clip"),
        rollout_is=_get(rc, "rollout_is", None),
        **is_threshold_options(_get(rc, "rollout_is_threshold", 2.0)),
        rollout_is_batch_normalize=bool(_get(rc, "rollout_is_batch_normalize", False)),
    )
    rs = _get(rc, "rollout_rs", None)
    if rs is not None:
        out["rollout_rs"] = str(rs)
    rs_threshold = _get(rc, "rollout_rs_threshold", None)
    if rs_threshold is not None:
        out["rollout_rs_threshold"] = str(rs_threshold)
    return out


# ------------------------------------------------------------------ 2. the loss from hidden states


def _response_index(data, nnz: int, device) -> torch.Tensor:
    """[B, T] packed position of each response token's *prediction* (verl's ``no_padding_2_padding``
    applied to positions), -1 past a row's response."""
    from verl.workers.utils.padding import no_padding_2_padding

    pos = torch.arange(1, nnz + 1, device=device)
    return no_padding_2_padding(pos, data) - 1


def _scalar_temperature(value) -> float:
    if value is None:
        return 1.0
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if flat.numel() == 0:
            return 1.0
        if not bool((flat == flat[0]).all()):
            raise NotImplementedError("the fused verl loss takes one temperature per micro-batch, got per-sample values")
        return float(flat[0])
    return float(value)


def fused_ppo_loss(config, model_output: dict, data, dp_group=None, *, backend: Optional[str] = None,
                   chunk_size: Optional[int] = None):
    """verl's ``ppo_loss(config, model_output, data, dp_group)`` from hidden states, one vocabulary sweep.

    ``model_output`` holds, in verl's no-padding (packed) layout of ``data["input_ids"]``:

    - ``"hidden_states"``: [nnz, H] final-normed hidden states (or a jagged nested [bsz, j1, H]);
    - ``"lm_head_weight"`` [V, H], optional ``"lm_head_bias"`` [V] and ``"logit_softcap"``;
    - ``"labels"``: [nnz] the next token at each packed position (verl's ``input_ids_rmpad_rolled``;
      default: ``data["input_ids"]``'s values rolled by -1, as verl computes it);
    - optional ``"temperature"`` (default ``data["temperature"]``) and ``"calculate_entropy"``
      (default ``data``'s ``calculate_entropy``: verl adds the entropy term only then).

    Returns ``(loss, metrics)`` as ``ppo_loss`` does (the loss's gradients reach ``hidden_states`` and the
    head, produced in the forward), and stores detached ``"log_probs"`` / ``"entropy"`` nested tensors
    over the packed sequence in ``model_output`` (values at the response positions, 0 elsewhere).
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils import losses

    hidden = model_output["hidden_states"]
    if hidden.is_nested:
        hidden = hidden.values()
    weight = model_output["lm_head_weight"]
    bias = model_output.get("lm_head_bias")
    softcap = model_output.get("logit_softcap")
    nnz = hidden.shape[0]
    input_ids = data["input_ids"]
    labels = model_output.get("labels")
    if labels is None:
        ids = input_ids.values() if input_ids.is_nested else input_ids.reshape(-1)
        labels = torch.roll(ids, shifts=-1, dims=0)
    labels = labels.reshape(-1)[:nnz]
    temperature = model_output.get("temperature")
    if temperature is None:
        temperature = data["temperature"] if "temperature" in data.keys() else tu.get_non_tensor_data(
            data=data, key="temperature", default=1.0)
    temperature = _scalar_temperature(temperature)
    calc_entropy = model_output.get("calculate_entropy")
    if calc_entropy is None:
        calc_entropy = bool(tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False))

    options = config_to_options(config)
    if not calc_entropy:
        options["entropy_coef"] = 0.0
    fields = ["response_mask", "old_log_probs", "advantages"]
    if "rollout_is_weights" in data:
        fields.append("rollout_is_weights")
    if "ref_log_prob" in data:
        fields.append("ref_log_prob")
    padded = data.select(*fields).to_padded_tensor()
    idx = _response_index(data, nnz, hidden.device)
    mask = padded["response_mask"].to(torch.bool) & (idx >= 0)
    safe = idx.clamp(min=0)
    h = hidden[safe]  # [B, T, H]: O(B T H), the vocabulary pass skips the masked rows
    targets = labels[safe]
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    ref = padded["ref_log_prob"].to(dtype) if options.get("beta", 0.0) != 0.0 else None
    isw = padded["rollout_is_weights"].to(dtype) if "rollout_is_weights" in fields else None
    dp_size = data["dp_size"]
    rng = torch.get_rng_state()  # clip_cov draws once; verl's metric pass below draws the same
    loss, m = grpo_loss(
        h, weight, targets, padded["advantages"].to(dtype), mask, padded["old_log_probs"].to(dtype), ref,
        bias=bias, importance_sampling_ratio=isw, num_items_in_batch=data["batch_num_tokens"],
        num_sequences_in_batch=data["global_batch_size"], dp_size=int(dp_size), temperature=temperature,
        logit_softcap=softcap, return_metrics=True, backend=backend or _STATE.backend,
        chunk_size=chunk_size if chunk_size is not None else _STATE.chunk_size, **options,
    )
    # verl's metrics, by verl's own ppo_loss on the fused pass's detached log-probs (O(B*T))
    offsets = input_ids.offsets() if input_ids.is_nested else None
    packed_logp = torch.zeros(nnz, dtype=m.logps.dtype, device=hidden.device)
    packed_logp[idx[mask]] = m.logps[mask]
    out = {"log_probs": _nested(packed_logp, offsets)}
    if calc_entropy:
        packed_ent = torch.zeros(nnz, dtype=m.entropy.dtype, device=hidden.device)
        packed_ent[idx[mask]] = m.entropy[mask]
        out["entropy"] = _nested(packed_ent, offsets)
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        with torch.no_grad():
            _, metrics = losses.ppo_loss(config, dict(out), data, dp_group)
    except Exception:
        torch.set_rng_state(after)
        raise
    model_output.update(out)
    return loss, metrics


def _nested(values: torch.Tensor, offsets):
    if offsets is None:
        return values
    return torch.nested.nested_tensor_from_jagged(values, offsets.to(values.device))


# ------------------------------------------------------------------ 2. the engine switch


def _ppo_config(loss_function):
    """The ActorConfig of ``partial(ppo_loss, config=...)`` (what verl's TrainingWorker installs), else None."""
    from verl.workers.utils import losses

    if isinstance(loss_function, functools.partial) and not loss_function.args:
        func = loss_function.func
        if func is getattr(losses.ppo_loss, "_grpo_kernels_original", losses.ppo_loss) or func is fused_ppo_loss:
            return loss_function.keywords.get("config")
    return None


def _fused_forward_step(original):
    @functools.wraps(original)
    def forward_step(self, micro_batch, loss_function, forward_only):
        config = None if forward_only or not _STATE.loss else _ppo_config(loss_function)
        if config is None:
            return original(self, micro_batch, loss_function, forward_only)
        return _run_fused_step(self, micro_batch, config)

    forward_step._grpo_kernels_original = original
    return forward_step


def _run_fused_step(engine, micro_batch, config):
    from contextlib import nullcontext

    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.fsdp import transformer_impl as impl  # the engine's own device helpers

    from grpo_kernels.integrations import transformers as gkt

    get_device_id, get_device_name = impl.get_device_id, impl.get_device_name

    micro_batch = micro_batch.to(get_device_id())
    get = functools.partial(tu.get_non_tensor_data, data=micro_batch)
    if getattr(engine, "use_ulysses_sp", False):
        raise NotImplementedError("the fused verl loss does not support Ulysses sequence parallelism "
                                  "(ulysses_sequence_parallel_size > 1): enable(loss=False)")
    for key in ("distillation_use_topk", "distillation_only", "calculate_sum_pi_squared"):
        if get(key=key, default=False):
            raise NotImplementedError(f"the fused verl loss does not support {key}=True: enable(loss=False)")
    if micro_batch.get("multi_modal_inputs", None) is not None:
        raise NotImplementedError("the fused verl loss does not support multimodal inputs: enable(loss=False)")
    use_remove_padding = get(key="use_remove_padding", default=True)
    calc_entropy = bool(get(key="calculate_entropy", default=False))
    # verl's (non-fused) forward divides the logits by the temperature as a float32 tensor
    temperature = float(torch.tensor(_scalar_temperature(micro_batch["temperature"]), dtype=torch.float32))
    model_inputs, output_args = engine.prepare_model_inputs(micro_batch=micro_batch)
    nnz = int(micro_batch["input_ids"].offsets()[-1])
    labels = output_args["input_ids_rmpad_rolled"].reshape(-1)[:nnz]
    attention_mask = model_inputs.get("attention_mask")
    dp_group = engine.get_data_parallel_group()

    def fn(lm, **inputs):
        hidden, _ = gkt.backbone_hidden_states(lm, **inputs)
        if use_remove_padding:
            packed = hidden.reshape(-1, hidden.shape[-1])[:nnz]  # the static pad sits at the tail
        else:
            packed = hidden[attention_mask.bool()]
        weight, bias, _ = gkt.lm_head_params(lm)
        with gkt._zero3_gathered(weight, bias):
            h, w, b, softcap = gkt.head_operands(lm, packed)
            with gkt._no_autocast(h.device.type):
                mo = {"hidden_states": h, "lm_head_weight": w, "lm_head_bias": b, "logit_softcap": softcap,
                      "labels": labels, "temperature": temperature, "calculate_entropy": calc_entropy}
                loss, metrics = fused_ppo_loss(config, mo, micro_batch, dp_group)
        return loss, metrics, {k: mo[k] for k in ("log_probs", "entropy") if k in mo}

    gkt.enable_fused_forward(engine.module)
    autocast_dtype = getattr(engine, "_autocast_dtype", torch.bfloat16)
    autocast_ctx = (nullcontext() if autocast_dtype == torch.float32
                    else torch.autocast(device_type=get_device_name(), dtype=autocast_dtype))
    with autocast_ctx:
        loss, metrics, model_output = gkt.run_in_forward(engine.module, fn, **model_inputs, use_cache=False)
    output = {"model_output": model_output, "loss": loss.detach().item(), "metrics": metrics}
    return loss, output


# ------------------------------------------------------------------ the switch


def enable(*, forward: bool = True, loss: bool = True, backend: str = "auto", chunk_size: Optional[int] = None):
    """Install the verl integration in this process (idempotent; ``disable()`` undoes it).

    ``forward``: register ``fused_kernel_options.impl_backend="grpo_kernels"`` (with verl's
    ``use_fused_kernels=True``). ``loss``: the FSDP engine's training step runs ``fused_ppo_loss``
    inside the model's forward whenever its loss is verl's ``ppo_loss``. ``backend`` / ``chunk_size``:
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
    _STATE.backend, _STATE.chunk_size = backend, chunk_size
    if forward and not _STATE.forward:
        if not hasattr(lce_mod.linear_cross_entropy, "_grpo_kernels_original"):
            lce_mod.linear_cross_entropy = _dispatching_linear_cross_entropy(lce_mod.linear_cross_entropy)
        if not hasattr(monkey_patch.patch_forward_with_backends, "_grpo_kernels_original"):
            monkey_patch.patch_forward_with_backends = _patch_forward_with_backends(
                monkey_patch.patch_forward_with_backends)
        _STATE.forward = True
    cls = transformer_impl.FSDPEngineWithLMHead
    if loss and not hasattr(cls.forward_step, "_grpo_kernels_original"):
        cls.forward_step = _fused_forward_step(cls.forward_step)
    _STATE.loss = bool(loss)


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
    _STATE.forward = _STATE.loss = False


def is_enabled() -> dict:
    return {"forward": _STATE.forward, "loss": _STATE.loss}


@contextlib.contextmanager
def enabled(**kwargs):
    """``enable(**kwargs)`` for a ``with`` block, then ``disable()``."""
    enable(**kwargs)
    try:
        yield
    finally:
        disable()

"""transformers causal LMs -> ``grpo_loss`` / ``token_logprobs``, without the model's logits.

A causal LM of transformers computes ``logits = head(norm(backbone(ids)))``. Everything up to
the final norm is the base model (``model.base_model``), whose ``last_hidden_state`` already
includes the final norm; the head is ``model.get_output_embeddings()`` (the embedding matrix
itself when the embeddings are tied), plus what some families do to the head's output:

- a bias (``lm_head.bias``: Phi, GPT-J, or any model whose head you replaced by a biased Linear);
- a constant logit scale, applied first: ``config.logit_scale`` (Cohere), ``config.logits_scaling``
  (Granite: logits are *divided* by it), ``config.output_multiplier``, ``config.lm_head_multiplier``
  (Falcon-H1). It is folded into the hidden states and the bias: ``s * (h W^T + b) = (s h) W^T + s b``;
- Gemma-2 style softcapping ``c * tanh(z / c)``: ``config.final_logit_softcapping``.

Positions ("``logits_to_keep`` semantics"): with ``input_ids`` [B, L] whose last K tokens are the
completion, the hidden state at position p predicts token p + 1, so the completion tokens
``input_ids[:, L-K:]`` are predicted by ``last_hidden_state[:, L-K-1 : L-1]`` (K < L). This is what
TRL's ``logits_to_keep`` / fused head scores, and ``model(ids, logits_to_keep=K + 1).logits[:, :-1]``.

Wrapped models (DDP, FSDP, DeepSpeed, ``accelerate``): the loss should run *inside* the wrapped
model's forward, so that the wrapper's hooks (gradient synchronisation, parameter gathering,
autocast) apply. ``enable_fused_forward(model)`` adds a keyword to the model's forward,
``model(..., grpo_kernels_fn=fn)``, that runs ``fn(causal_lm, **inputs)`` in place of the
forward; ``model_token_logprobs`` / ``model_grpo_loss`` go through it whenever it is enabled.
Without it they call the unwrapped model's pieces directly (right for a plain, single-process model).
Those wrapper helpers live in ``grpo_kernels.integrations.common`` (shared with the TRL and verl
adapters) and are re-exported here; the MoE router aux loss lives in ``grpo_kernels.integrations.moe``.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch

from grpo_kernels.api import grpo_loss, token_logprobs
from grpo_kernels.integrations.common import (  # noqa: F401 - re-exported: public names of this module too
    FORWARD_KEYWORD,
    enable_fused_forward,
    is_fused_forward_enabled,
    no_autocast,
    run_in_forward,
    unwrap_causal_lm,
    zero3_gathered,
)
from grpo_kernels.integrations.moe import router_aux_loss, router_aux_loss_unsupported  # noqa: F401 - re-exported

__all__ = [
    "LMHeadParams",
    "unwrap_causal_lm",
    "lm_head_params",
    "logit_scale",
    "backbone_hidden_states",
    "completion_hidden_states",
    "head_operands",
    "kernel_head",
    "model_token_logprobs",
    "model_grpo_loss",
    "enable_fused_forward",
    "is_fused_forward_enabled",
    "run_in_forward",
    "check_lm_head",
    "router_aux_loss",
    "router_aux_loss_unsupported",
]

# keywords a CausalLM forward takes for its head or loss, which the base model does not accept
_HEAD_KWARGS = ("labels", "shift_labels", "num_items_in_batch", "logits_to_keep", "fused_lm_head", "return_dict",
                "temperature")


class LMHeadParams(NamedTuple):
    """The lm_head as ``grpo_loss`` takes it: ``z = c * tanh((h @ weight.T + bias) / c)``."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]


# ------------------------------------------------------------------ model structure


def _text_config(lm):
    config = lm.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def lm_head_params(model) -> LMHeadParams:
    """``(weight, bias, softcap)`` of the model's output layer.

    ``weight`` is ``model.get_output_embeddings().weight``: with tied embeddings it *is* the input
    embedding parameter, so its gradient accumulates into the embedding. ``bias`` is the head's
    bias or None; ``softcap`` is ``config.final_logit_softcapping`` (None when absent or unset).
    A constant logit scale is not part of this triple: see ``logit_scale``.
    """
    lm = unwrap_causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(lm).__name__} has no output embeddings (get_output_embeddings() is None)")
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
        raise NotImplementedError(
            "the lm_head carries a PEFT adapter: grpo_kernels reads lm_head.weight directly, so the adapter would "
            "be ignored. Remove 'lm_head' from the adapter's target_modules."
        )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"the output layer {type(head).__name__} has no [V, H] weight")
    bias = getattr(head, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        bias = None
    cfg = _text_config(lm)
    if getattr(cfg, "unpadded_vocab_size", None) not in (None, weight.shape[0]):
        raise NotImplementedError(
            f"{type(lm).__name__} slices its logits to config.unpadded_vocab_size; not supported"
        )
    softcap = getattr(cfg, "final_logit_softcapping", None)
    softcap = None if softcap in (None, 0, 0.0) else float(softcap)
    return LMHeadParams(weight, bias, softcap)


def logit_scale(model) -> float:
    """The constant the model multiplies its head's output by (1.0 for most models).

    Read from the (text) config: ``logit_scale`` (Cohere), ``output_multiplier``,
    ``lm_head_multiplier`` (Falcon-H1), ``1 / logits_scaling`` (Granite; HyperCLOVA X multiplies
    by ``logits_scaling``). Applied before softcapping and temperature, bias included.
    """
    cfg = _text_config(unwrap_causal_lm(model))
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(cfg, name, None)
        if value is not None:
            return float(value)
    value = getattr(cfg, "logits_scaling", None)
    if value is not None:
        return float(value) if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / float(value)
    return 1.0


def _check_keep(logits_to_keep, length: int) -> int:
    if isinstance(logits_to_keep, torch.Tensor) or isinstance(logits_to_keep, bool) or not isinstance(
        logits_to_keep, int
    ):
        raise TypeError(f"logits_to_keep must be an int (the completion length), got {type(logits_to_keep).__name__}")
    if not 0 < logits_to_keep < length:
        raise ValueError(
            f"logits_to_keep must be in [1, {length - 1}] for sequences of length {length}: the hidden state at "
            f"position p predicts token p + 1, so the first token has no prediction; got {logits_to_keep}"
        )
    return logits_to_keep


def backbone_hidden_states(model, **model_kwargs):
    """(the base model's final-normed last hidden states [B, L, H] at every position, its whole output).

    Keyword arguments go to the base model; head-only ones (``labels``, ``logits_to_keep``,
    ``temperature``, ...) and None values are dropped, and ``use_cache`` is False unless given."""
    lm = unwrap_causal_lm(model)
    backbone = lm.base_model
    if backbone is lm:
        raise TypeError(f"{type(lm).__name__} has no base model (config.base_model_prefix names no submodule)")
    kwargs = {k: v for k, v in model_kwargs.items() if v is not None and k not in _HEAD_KWARGS}
    kwargs.setdefault("use_cache", False)
    out = backbone(**kwargs)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]), out


def completion_hidden_states(model, input_ids=None, attention_mask=None, logits_to_keep: Optional[int] = None,
                             *, return_backbone_output: bool = False, **model_kwargs):
    """Final-normed last hidden states that predict the last ``logits_to_keep`` tokens, [B, K, H].

    ``input_ids`` / ``attention_mask`` [B, L] are the whole sequences (prompt then completion);
    row ``i``, column ``j`` of the result is ``last_hidden_state[i, L - K - 1 + j]``, which predicts
    ``input_ids[i, L - K + j]``. ``logits_to_keep=None`` keeps every position but the last
    (K = L - 1). Extra keyword arguments go to the base model (``position_ids``,
    ``inputs_embeds``, ...); head-only ones (``labels``, ``logits_to_keep``, ...) and None
    values are dropped, and ``use_cache`` is False unless given. The model's logits are
    never computed. ``return_backbone_output=True`` returns ``(hidden, output)`` with the base
    model's whole output (e.g. its ``router_logits`` under ``output_router_logits=True``).
    """
    hidden, out = backbone_hidden_states(model, input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    length = hidden.shape[1]
    keep = length - 1 if logits_to_keep is None else _check_keep(logits_to_keep, length)
    hidden = hidden[:, length - keep - 1 : length - 1]
    return (hidden, out) if return_backbone_output else hidden


# ------------------------------------------------------------------ head operands


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    from grpo_kernels.distributed import lm_head_weight  # a sharded FSDP2 / DTensor parameter -> full tensor

    return lm_head_weight(t)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, head_dtype: Optional[torch.dtype]) -> torch.dtype:
    if head_dtype is not None:
        return head_dtype
    device_type = hidden.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        pass
    return weight.dtype


def head_operands(model, hidden: torch.Tensor, *, head_dtype: Optional[torch.dtype] = None):
    """``(hidden, weight, bias, softcap)`` ready for ``grpo_loss`` / ``token_logprobs``.

    The logit scale is folded into ``hidden`` and ``bias``; everything is cast (differentiably)
    to one compute dtype: ``head_dtype`` if given, else the autocast dtype when autocast is on
    (what ``lm_head(hidden)`` would compute in), else the weight's dtype. Call it, and the loss,
    under ``zero3_gathered(weight, bias)`` when the model may be ZeRO-3 partitioned: ``kernel_head``
    does both.
    """
    weight, bias, softcap = lm_head_params(model)
    weight, bias = _full(weight), _full(bias)
    dtype = _compute_dtype(hidden, weight, head_dtype)
    hidden = hidden.to(dtype)
    weight = weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    scale = logit_scale(model)
    if scale != 1.0:
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    return hidden, weight, bias, softcap


@contextlib.contextmanager
def kernel_head(model, hidden: torch.Tensor, *, head_dtype: Optional[torch.dtype] = None):
    """``with kernel_head(lm, hidden) as (h, w, b, softcap):`` the ``head_operands`` for a kernel call
    made inside the block, where the head's ZeRO-3 parameters are gathered and autocast is off.

    ``hidden`` [..., H] are the base model's final-normed states; the operands are cast under the
    caller's autocast (their dtype follows it), the kernel then runs without it (fp32 accumulation)."""
    weight, bias, _ = lm_head_params(model)
    with zero3_gathered(weight, bias):
        operands = head_operands(model, hidden, head_dtype=head_dtype)
        with no_autocast(hidden.device.type):
            yield operands


# ------------------------------------------------------------------ log-probs and the loss


def _scatter_rows(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # masked_scatter keeps the result connected to the graph even when nothing is kept
    return values.new_zeros(keep.shape).masked_scatter(keep, values)


def model_token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    logits_to_keep: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    batch_invariant: bool = False,
    head_dtype: Optional[torch.dtype] = None,
    return_aux_loss: bool = False,
    **model_kwargs,
):
    """Log-probs (and entropies) of the last ``logits_to_keep`` tokens of ``input_ids``, [B, K].

    The distribution is ``softmax(softcap(scale * (h W^T + b)) / temperature)``, computed by
    ``token_logprobs`` from the hidden states, never as [B, K, V] logits. Positions whose
    ``attention_mask`` is 0 are not scored and hold 0 (as TRL's fused head returns them).
    Differentiable (through the model) unless called under ``torch.no_grad()``.
    ``return_aux_loss``: also the MoE router's auxiliary loss of the same backbone pass
    (``output_router_logits=True``; ``router_aux_loss``), as the last element of a tuple.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, L] tensor")
    keep_n = _check_keep(logits_to_keep, input_ids.shape[1])
    targets = input_ids[:, -keep_n:]
    if attention_mask is None:
        scored = torch.ones_like(targets, dtype=torch.bool)
    else:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
        scored = attention_mask[:, -keep_n:] != 0

    def fn(lm, **inputs):
        if return_aux_loss:
            hidden, backbone_out = completion_hidden_states(lm, logits_to_keep=keep_n, return_backbone_output=True,
                                                            output_router_logits=True, **inputs)
        else:
            hidden = completion_hidden_states(lm, logits_to_keep=keep_n, **inputs)
        with kernel_head(lm, hidden, head_dtype=head_dtype) as (h, w, b, softcap):
            out = token_logprobs(
                h[scored], w, targets[scored], bias=b, temperature=temperature, logit_softcap=softcap,
                return_entropy=return_entropy, backend=backend, chunk_size=chunk_size,
                batch_invariant=batch_invariant,
            )
        res = (_scatter_rows(out[0], scored), _scatter_rows(out[1], scored)) if return_entropy else \
            _scatter_rows(out, scored)
        if not return_aux_loss:
            return res
        aux = router_aux_loss(lm, backbone_out.router_logits, inputs.get("attention_mask"))
        return (res if return_entropy else (res,)) + (aux,)

    return run_in_forward(model, fn, input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)


def model_grpo_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    *,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    return_metrics: bool = False,
    head_dtype: Optional[torch.dtype] = None,
    model_kwargs: Optional[dict] = None,
    **options,
):
    """``grpo_loss`` of a transformers causal LM on its completions, without the model's logits.

    ``input_ids`` / ``attention_mask`` [B, L]: the whole sequences the model reads (prompt, then
    completion), as TRL builds them with ``torch.cat([prompt_ids, completion_ids], 1)``;
    ``completion_ids`` [B, K] must be their last K columns (checked), ``completion_mask`` [B, K]
    the loss mask (it may differ from ``attention_mask[:, -K:]``, e.g. TRL's ``tool_mask``).
    The other arguments and the keyword ``options`` are ``grpo_loss``'s; the head's bias, logit
    scale and ``final_logit_softcapping`` come from the model (passing ``bias`` or a different
    ``logit_softcap`` is an error). Gradients reach every model parameter, the lm_head (or the
    tied embedding) included.
    """
    if "bias" in options:
        raise TypeError("model_grpo_loss takes the lm_head bias from the model; do not pass bias")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, L] tensor (prompt and completion)")
    if not isinstance(completion_ids, torch.Tensor) or completion_ids.dim() != 2:
        raise ValueError("completion_ids must be a [B, K] tensor")
    keep_n = _check_keep(completion_ids.shape[1], input_ids.shape[1])
    if completion_ids.shape[0] != input_ids.shape[0] or not torch.equal(input_ids[:, -keep_n:], completion_ids):
        raise ValueError(
            "completion_ids must be the last K columns of input_ids (input_ids = torch.cat([prompt_ids, "
            "completion_ids], dim=1))"
        )
    requested_cap = options.pop("logit_softcap", None)

    def fn(lm, **inputs):
        hidden = completion_hidden_states(lm, logits_to_keep=keep_n, **inputs)
        with kernel_head(lm, hidden, head_dtype=head_dtype) as (h, w, b, softcap):
            if requested_cap is not None and (softcap is None or not math.isclose(requested_cap, softcap)):
                raise ValueError(
                    f"logit_softcap={requested_cap} conflicts with the model's final_logit_softcapping={softcap}"
                )
            return grpo_loss(
                h, w, completion_ids, advantages, completion_mask, old_logps, ref_logps, bias=b,
                importance_sampling_ratio=importance_sampling_ratio, return_metrics=return_metrics,
                logit_softcap=softcap, **options,
            )

    return run_in_forward(model, fn, input_ids=input_ids, attention_mask=attention_mask, **(model_kwargs or {}))


# ------------------------------------------------------------------ a safety check for unfamiliar models


@torch.no_grad()
def check_lm_head(model, *, seq_len: int = 8, batch: int = 2, rtol: float = 1e-4, atol: float = 1e-4,
                  seed: int = 0) -> float:
    """Compare this module's head (hidden states, bias, scale, softcap) against the model's own logits.

    Runs the model (in eval mode, restored afterwards) on random tokens and checks
    ``log_softmax`` of both; returns the largest absolute difference, raises ``AssertionError``
    beyond the tolerances. Use it once for an architecture whose head might do something this
    module does not know about (a family not listed in the module docstring).
    """
    lm = unwrap_causal_lm(model)
    weight = lm_head_params(lm).weight
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, weight.shape[0], (batch, seq_len), generator=g).to(weight.device)
    mask = torch.ones_like(ids)
    was_training = lm.training
    lm.eval()
    try:
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].double()
        expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        got = model_token_logprobs(lm, ids, mask, seq_len - 1, backend="reference").double()
    finally:
        lm.train(was_training)
    diff = (got - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bool(bad.any()):
        raise AssertionError(
            f"{type(lm).__name__}: log-probs from the hidden states differ from the model's logits by up to "
            f"{diff.max().item():.3g}; its head does something grpo_kernels.integrations.transformers does not model"
        )
    return diff.max().item()

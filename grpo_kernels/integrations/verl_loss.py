"""verl 0.9.1's actor loss from hidden states: ``fused_ppo_loss``, in ONE vocabulary sweep.

``fused_ppo_loss(config, model_output, data, dp_group)`` is ``verl.workers.utils.losses.ppo_loss``
computed by ``grpo_loss`` from the packed hidden states and the head, with the gradients produced in
the forward; verl's metrics are verl's own ``ppo_loss`` evaluated on the fused pass's detached
log-probs and entropies (O(B*T), no vocabulary work). ``grpo_kernels.integrations.verl_engine`` runs
it inside verl's FSDP engine.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from grpo_kernels.api import grpo_loss
from grpo_kernels.integrations.verl_config import SETTINGS, config_get, config_to_options, scalar_temperature

__all__ = ["REF_HEAD_KEYS", "fused_ppo_loss", "response_index"]

#: where ``kl_loss_type="full"`` (the exact KL) finds the reference, in ``model_output`` or else in
#: ``data`` (what verl's FSDP engine step passes through): its final-normed hidden states in the packed
#: layout of ``data["input_ids"]`` ([nnz, H_r], or jagged nested like it), its lm_head [V, H_r] and
#: optional bias [V] (in ``data`` as non-tensor entries: ``tensordict_utils.assign_non_tensor``)
REF_HEAD_KEYS = ("ref_hidden_states", "ref_lm_head_weight", "ref_lm_head_bias")


def response_index(data, nnz: int, device) -> torch.Tensor:
    """[B, T] packed position of each response token's *prediction* (verl's ``no_padding_2_padding``
    applied to positions), -1 past a row's response."""
    from verl.workers.utils.padding import no_padding_2_padding

    pos = torch.arange(1, nnz + 1, device=device)
    return no_padding_2_padding(pos, data) - 1


class _PackedHead(NamedTuple):
    """``fused_ppo_loss``'s ``model_output`` read with verl's defaults (see its docstring)."""

    hidden: torch.Tensor  # [nnz, H]
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    labels: torch.Tensor  # [nnz]
    temperature: float
    calc_entropy: bool


def _packed_head(model_output: dict, data) -> _PackedHead:
    from verl.utils import tensordict_utils as tu

    hidden = model_output["hidden_states"]
    if hidden.is_nested:
        hidden = hidden.values()
    nnz = hidden.shape[0]
    labels = model_output.get("labels")
    if labels is None:  # verl's input_ids_rmpad_rolled
        input_ids = data["input_ids"]
        ids = input_ids.values() if input_ids.is_nested else input_ids.reshape(-1)
        labels = torch.roll(ids, shifts=-1, dims=0)
    temperature = model_output.get("temperature")
    if temperature is None:
        temperature = data["temperature"] if "temperature" in data.keys() else tu.get_non_tensor_data(
            data=data, key="temperature", default=1.0)
    calc_entropy = model_output.get("calculate_entropy")
    if calc_entropy is None:
        calc_entropy = bool(tu.get_non_tensor_data(data=data, key="calculate_entropy", default=False))
    return _PackedHead(hidden, model_output["lm_head_weight"], model_output.get("lm_head_bias"),
                       model_output.get("logit_softcap"), labels.reshape(-1)[:nnz],
                       scalar_temperature(temperature), bool(calc_entropy))


def _reference_head(model_output: dict, data, safe: torch.Tensor) -> dict:
    """``grpo_loss``'s ``ref_hidden`` [B, T, H_r] (the packed rows ``safe`` [B, T]), ``ref_weight`` and
    ``ref_bias`` for ``kl_loss_type="full"``, from ``REF_HEAD_KEYS``; NotImplementedError naming what
    is missing (verl itself has no exact KL)."""
    from verl.utils import tensordict_utils as tu

    def lookup(key):
        if model_output.get(key) is not None:
            return model_output[key]
        if key in data.keys() and isinstance(data[key], torch.Tensor) and data[key].is_nested:
            return data[key]
        return tu.get_non_tensor_data(data=data, key=key, default=None)

    hidden_key, weight_key, bias_key = REF_HEAD_KEYS
    ref_hidden, weight = lookup(hidden_key), lookup(weight_key)
    if ref_hidden is None or weight is None:
        raise NotImplementedError(
            "verl kl_loss_type='full' (the exact KL over the vocabulary; verl itself raises NotImplementedError) "
            f"needs the reference's hidden states and head: model_output (or data) {hidden_key!r} [nnz, H_r] in the "
            f"packed layout of input_ids and model_output {weight_key!r} [V, H_r] (optional {bias_key!r} [V]); "
            "or use another kl_loss_type with data['ref_log_prob']")
    if ref_hidden.is_nested:
        ref_hidden = ref_hidden.values()
    return dict(ref_hidden=ref_hidden[safe], ref_weight=weight, ref_bias=lookup(bias_key))


def fused_ppo_loss(config, model_output: dict, data, dp_group=None, *, backend: Optional[str] = None,
                   chunk_size: Optional[int] = None):
    """verl's ``ppo_loss(config, model_output, data, dp_group)`` from hidden states, one vocabulary sweep.

    ``model_output`` holds, in verl's no-padding (packed) layout of ``data["input_ids"]``:

    - ``"hidden_states"``: [nnz, H] final-normed hidden states (or a jagged nested [bsz, j1, H]);
    - ``"lm_head_weight"`` [V, H], optional ``"lm_head_bias"`` [V] and ``"logit_softcap"``;
    - ``"labels"``: [nnz] the next token at each packed position (verl's ``input_ids_rmpad_rolled``;
      default: ``data["input_ids"]``'s values rolled by -1, as verl computes it);
    - optional ``"temperature"`` (default ``data["temperature"]``) and ``"calculate_entropy"``
      (default ``data``'s ``calculate_entropy``: verl adds the entropy term only then);
    - with ``kl_loss_type="full"`` (the exact KL, which verl itself refuses): the reference's
      ``REF_HEAD_KEYS`` in place of ``data["ref_log_prob"]``; its logits take the policy's temperature
      and softcap, and the ``kl_loss`` metric is ``loss_agg_mode``'s aggregation of the exact KL.

    Returns ``(loss, metrics)`` as ``ppo_loss`` does (the loss's gradients reach ``hidden_states`` and the
    head, produced in the forward), and stores detached ``"log_probs"`` / ``"entropy"`` nested tensors
    over the packed sequence in ``model_output`` (values at the response positions, 0 elsewhere).
    """
    head = _packed_head(model_output, data)
    options = config_to_options(config)
    if not head.calc_entropy:
        options["entropy_coef"] = 0.0
    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data]
    padded = data.select(*fields).to_padded_tensor()
    nnz = head.hidden.shape[0]
    idx = response_index(data, nnz, head.hidden.device)
    mask = padded["response_mask"].to(torch.bool) & (idx >= 0)
    safe = idx.clamp(min=0)
    h = head.hidden[safe]  # [B, T, H]: O(B T H), the vocabulary pass skips the masked rows
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    exact = options.get("kl_estimator") == "full" and options.get("beta", 0.0) != 0.0
    ref_head = _reference_head(model_output, data, safe) if exact else {}
    ref = padded["ref_log_prob"].to(dtype) if options.get("beta", 0.0) != 0.0 and not exact else None
    isw = padded["rollout_is_weights"].to(dtype) if "rollout_is_weights" in fields else None
    rng = torch.get_rng_state()  # clip_cov draws once; verl's metric pass below draws the same
    loss, m = grpo_loss(
        h, head.weight, head.labels[safe], padded["advantages"].to(dtype), mask, padded["old_log_probs"].to(dtype),
        ref, bias=head.bias, importance_sampling_ratio=isw, num_items_in_batch=data["batch_num_tokens"],
        num_sequences_in_batch=data["global_batch_size"], dp_size=int(data["dp_size"]),
        temperature=head.temperature, logit_softcap=head.softcap, return_metrics=True,
        backend=backend or SETTINGS.backend, chunk_size=chunk_size if chunk_size is not None else SETTINGS.chunk_size,
        **ref_head, **options,
    )
    out = _packed_outputs(m, idx, mask, nnz, data["input_ids"], head.calc_entropy)
    metrics = _verl_metrics(config, out, data, dp_group, rng, m.kl, padded["response_mask"].to(torch.bool))
    model_output.update(out)
    return loss, metrics


def _packed_outputs(m, idx, mask, nnz: int, input_ids, calc_entropy: bool) -> dict:
    """The fused pass's detached log-probs (and entropies) [B, T] back in verl's packed layout: nested
    over ``input_ids``' offsets when it is nested, flat [nnz] otherwise; 0 off the responses."""
    offsets = input_ids.offsets() if input_ids.is_nested else None
    out = {}
    for key, values, wanted in (("log_probs", m.logps, True), ("entropy", m.entropy, calc_entropy)):
        if wanted:
            packed = torch.zeros(nnz, dtype=values.dtype, device=values.device)
            packed[idx[mask]] = values[mask]
            out[key] = packed if offsets is None else torch.nested.nested_tensor_from_jagged(
                packed, offsets.to(packed.device))
    return out


def _verl_metrics(config, out: dict, data, dp_group, rng: torch.Tensor, exact_kl=None, response_mask=None) -> dict:
    """verl's metrics: its own ``ppo_loss`` on the fused pass's detached log-probs, from the RNG state
    the fused pass started with (so clip_cov's draw is the same); the RNG then continues as after
    the fused pass. ``kl_loss_type="full"``: ``ppo_loss`` without its KL term (it refuses "full"), then
    ``kl_loss`` as verl aggregates a KL, of the exact per-token KL ``exact_kl`` [B, T] (absent with
    ``kl_loss_coef=0``: nothing computed the KL), and ``kl_coef``."""
    from verl.workers.utils import losses

    full = bool(config_get(config, "use_kl_loss", False)) and config_get(config, "kl_loss_type") == "full"
    run_config = _without_kl_loss(config) if full else config
    after = torch.get_rng_state()
    torch.set_rng_state(rng)
    try:
        with torch.no_grad():
            _, metrics = losses.ppo_loss(run_config, dict(out), data, dp_group)
    except Exception:
        torch.set_rng_state(after)
        raise
    if full:
        from verl.trainer.ppo.core_algos import agg_loss

        if exact_kl is not None:
            kl_loss = agg_loss(loss_mat=exact_kl, loss_mask=response_mask, loss_agg_mode=run_config.loss_agg_mode,
                               **run_config.global_batch_info)
            metrics["kl_loss"] = losses.Metric(value=kl_loss, aggregation=metrics["actor/pg_loss"].aggregation)
        metrics["kl_coef"] = config_get(config, "kl_loss_coef")
    return metrics


def _without_kl_loss(config):
    """A copy of verl's actor config with ``use_kl_loss=False`` (a dataclass, or an OmegaConf node)."""
    import copy
    import dataclasses

    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, use_kl_loss=False)
    clone = copy.deepcopy(config)
    clone.use_kl_loss = False
    return clone

"""Public entry points: argument checks, then dispatch to the fused ops or the oracle."""
from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch
from torch import nn

from grpo_kernels import objective, validation as check
from grpo_kernels.objective import GRPOMetrics
from grpo_kernels.options import OPTION_NAMES, GRPOOptions


def _options_from(kwargs) -> GRPOOptions:
    unknown = set(kwargs) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s): {sorted(unknown)}")
    return GRPOOptions(**kwargs).validate()


def _num_items(value) -> Optional[float]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(value.shape)}")
        return float(value.item())
    return value


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
):
    """Per-token log-probs (and entropy) of ``targets`` under ``hidden @ weight.T + bias``.

    hidden [..., H] (fp16/bf16/fp32/fp64), weight [V, H], targets [...] int. Returns
    logp [...] (and entropy [...]) in fp32 (fp64 for fp64 inputs), never materializing
    [N, V]; differentiable with respect to hidden, weight and bias.
    """
    opts = _options_from(dict(temperature=temperature, logit_softcap=logit_softcap, backend=backend,
                              chunk_size=chunk_size))
    check.tensor("hidden", hidden, floating=True)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size)")
    _check_head(hidden, weight, bias)
    check.tensor("targets", targets)
    check.same_device("targets", targets, hidden.device)
    check.shape("targets", targets, hidden.shape[:-1], " (hidden's leading dimensions)")
    check.token_ids("targets", targets, weight.shape[0])
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).to(torch.int64)
    if backend == "reference":
        from grpo_kernels.reference import reference_token_logprobs

        logp, ent = reference_token_logprobs(h2, weight, t1, bias, temperature, logit_softcap)
    else:
        from grpo_kernels.ops import token_logprobs_op

        logp, ent, _ = token_logprobs_op(
            h2, weight, bias, t1, float(opts.temperature), opts.logit_softcap, opts.backend, opts.chunk_size
        )
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


def _check_head(hidden, weight, bias):
    check.tensor("weight", weight, ndim=(2,), floating=True)
    check.same_device("weight", weight, hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if bias is not None:
        check.tensor("bias", bias, ndim=(1,), floating=True)
        check.same_device("bias", bias, hidden.device)
        check.shape("bias", bias, (weight.shape[0],), " ([V])")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    check.finite("weight", weight)
    if bias is not None:
        check.finite("bias", bias)


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    return_metrics: bool = False,
    **options,
):
    """The GRPO loss (TRL 1.16 ``GRPOTrainer._compute_loss`` semantics) from hidden states.

    hidden [B, T, H], weight [V, H], targets [B, T] int, advantages [B] or [B, T],
    mask [B, T]; old_logps / ref_logps / importance_sampling_ratio [B, T] (the ratio
    may be [B, 1]). Options as in ``GRPOOptions``. Returns the scalar loss (fp32, fp64
    for fp64 inputs), or ``(loss, GRPOMetrics)`` with ``return_metrics=True``.
    """
    if "num_items_in_batch" in options:
        options["num_items_in_batch"] = _num_items(options["num_items_in_batch"])
    opts = _options_from(options)
    check.tensor("hidden", hidden, ndim=(3,), floating=True)
    B, T, _ = hidden.shape
    if B * T == 0:
        raise ValueError(f"hidden must have at least one token, got shape {tuple(hidden.shape)}")
    dev = hidden.device
    _check_head(hidden, weight, bias)
    check.tensor("mask", mask, ndim=(2,))
    check.same_device("mask", mask, dev)
    check.shape("mask", mask, (B, T), " ([B, T])")
    if mask.is_complex():
        raise TypeError("mask must be bool or real numeric")
    keep = mask != 0
    if mask.dtype != torch.bool and torch.is_floating_point(mask):
        check.finite("mask", mask)
    if mask.dtype != torch.bool and check._value_checks_enabled() and bool((mask < 0).any()):
        raise ValueError("mask must be >= 0 (a 0/1 completion mask)")
    check.tensor("targets", targets, ndim=(2,))
    check.same_device("targets", targets, dev)
    check.shape("targets", targets, (B, T), " ([B, T])")
    check.token_ids("targets", targets, weight.shape[0], where=keep)
    check.tensor("advantages", advantages, ndim=(1, 2), floating=True)
    check.same_device("advantages", advantages, dev)
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}")
    check.finite("advantages", advantages)
    check.finite("hidden", hidden)
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is None:
            continue
        check.tensor(name, x, ndim=(2,), floating=True)
        check.same_device(name, x, dev)
        check.shape(name, x, (B, T), " ([B, T])")
        check.finite(name, x, where=keep)
    if opts.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={opts.beta})")
    if importance_sampling_ratio is not None:
        check.tensor("importance_sampling_ratio", importance_sampling_ratio, ndim=(1, 2), floating=True)
        check.same_device("importance_sampling_ratio", importance_sampling_ratio, dev)
        if tuple(importance_sampling_ratio.shape) not in ((B, T), (B, 1), (B,)):
            raise ValueError(
                f"importance_sampling_ratio must have shape ({B}, {T}) or ({B}, 1), "
                f"got {tuple(importance_sampling_ratio.shape)}"
            )
        check.finite("importance_sampling_ratio", importance_sampling_ratio)
        if importance_sampling_ratio.dim() == 1:
            importance_sampling_ratio = importance_sampling_ratio.unsqueeze(1)

    if opts.backend == "reference":
        from grpo_kernels.reference import reference_grpo_loss

        out = reference_grpo_loss(
            hidden, weight, targets.to(torch.int64), advantages, mask, old_logps, ref_logps, bias=bias,
            importance_sampling_ratio=importance_sampling_ratio, options=opts, return_metrics=return_metrics,
        )
        if not return_metrics:
            return out
        loss, m = out
        return loss, GRPOMetrics(
            logps=m["logps"] * mask, entropy=m["entropy"] * mask, kl_mean=m["kl_mean"],
            clip_ratio_low=m.get("clip_ratio_low"), clip_ratio_high=m.get("clip_ratio_high"),
            clip_ratio_region=m.get("clip_ratio_region"), cispo_clip_ratio=m.get("cispo_clip_ratio"),
            entropy_mean=m["entropy_mean"],
        )

    from grpo_kernels.ops import grpo_loss_op

    adv2 = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    grad_on = torch.is_grad_enabled()
    needs = [
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    ]
    loss, logp, ent, _, _, _ = grpo_loss_op(
        hidden.reshape(B * T, -1), weight, bias, targets.reshape(-1).to(torch.int64), mask,
        adv2.expand(B, T), old_logps, ref_logps,
        None if importance_sampling_ratio is None else importance_sampling_ratio.expand(B, T),
        opts.loss_type, opts.importance_sampling_level, float(opts.beta), float(opts.epsilon_low),
        float(opts.eps_high), opts.delta, float(opts.temperature), opts.logit_softcap,
        opts.max_completion_length, opts.num_items_in_batch, float(opts.sapo_temperature_pos),
        float(opts.sapo_temperature_neg), opts.use_bias_correction_kl, float(opts.top_entropy_quantile),
        opts.backend, opts.chunk_size, needs,
    )
    if not return_metrics:
        return loss
    metrics = objective.compute_metrics(
        logp.view(B, T), ent.view(B, T), mask, adv2, opts, old=old_logps, ref=ref_logps
    )
    return loss, metrics


class GRPOLoss(nn.Module):
    """Drop-in module: holds the options; ``forward`` takes the tensors (and per-call overrides)."""

    def __init__(self, **options):
        super().__init__()
        self.options = _options_from(options)

    def forward(self, hidden, weight, targets, advantages, mask, old_logps=None, ref_logps=None, **overrides):
        kwargs = {f.name: getattr(self.options, f.name) for f in fields(GRPOOptions)}
        extra = {k: overrides.pop(k) for k in ("bias", "importance_sampling_ratio", "return_metrics")
                 if k in overrides}
        kwargs.update(overrides)
        return grpo_loss(hidden, weight, targets, advantages, mask, old_logps, ref_logps, **extra, **kwargs)

    def extra_repr(self) -> str:
        o = self.options
        return f"loss_type={o.loss_type!r}, beta={o.beta}, epsilon=({o.epsilon_low}, {o.eps_high}), backend={o.backend!r}"

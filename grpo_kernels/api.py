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


def _divide(loss: torch.Tensor, num_items: torch.Tensor) -> torch.Tensor:
    return loss / num_items.to(loss.dtype).clamp(min=1.0)


def _deterministic_chunk(opts: GRPOOptions, rows: int, hidden: torch.Tensor, weight: torch.Tensor):
    """``chunk_size`` to run with: under ``deterministic`` (or torch's deterministic mode),
    a fixed row count resolved here in Python from (rows, V, dtype, backend) alone, so the
    chunking (hence the order of grad_weight's accumulation) never depends on run-time state;
    the backend must declare a fixed reduction order. Otherwise ``opts.chunk_size`` as given."""
    if not (opts.deterministic or torch.are_deterministic_algorithms_enabled()):
        return opts.chunk_size
    if opts.backend == "reference":
        return opts.chunk_size
    from grpo_kernels import vocab_pass
    from grpo_kernels.backends import get_backend

    backend = get_backend(opts.backend, hidden.device, hidden.dtype)
    if not getattr(backend, "deterministic", True):
        raise ValueError(
            f"backend {backend.name!r} does not guarantee bitwise-reproducible results; "
            "use backend='torch' (or 'cpp'/'triton') with deterministic=True"
        )
    return int(vocab_pass.chunk_rows(max(rows, 1), weight.shape[0], hidden.dtype, backend, opts.chunk_size,
                                        hidden.device))


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
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    _check_head(hidden, weight, bias)
    check.tensor("targets", targets)
    check.same_device("targets", targets, hidden.device)
    check.shape("targets", targets, hidden.shape[:-1], " (hidden's leading dimensions)")
    check.token_ids("targets", targets, weight.shape[0])
    check.finite("hidden", hidden)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).to(torch.int64)
    if backend == "reference":
        from grpo_kernels.reference import reference_token_logprobs

        logp, ent = reference_token_logprobs(h2, weight, t1, bias, temperature, logit_softcap)
    else:
        from grpo_kernels.ops import token_logprobs_op

        chunk = _deterministic_chunk(opts, h2.shape[0], hidden, weight)
        logp, ent, _ = token_logprobs_op(
            h2, weight, bias, t1, float(opts.temperature), opts.logit_softcap, opts.backend, chunk
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
    if weight.shape[1] == 0:
        raise ValueError("hidden and weight have an empty hidden size (H = 0)")
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
    items_divisor = None  # a tensor num_items_in_batch under torch.compile: .item() would break the graph
    if "num_items_in_batch" in options:
        value = options["num_items_in_batch"]
        if torch.compiler.is_compiling() and value is not None and not isinstance(value, (torch.Tensor, bool)):
            value = torch.ones((), dtype=torch.float64) * value  # a per-step count stays symbolic: no recompiles
        if isinstance(value, torch.Tensor) and value.numel() == 1 and torch.compiler.is_compiling():
            items_divisor, value = value.reshape(()), 1.0  # the loss is linear in 1 / num_items: divide after
        options["num_items_in_batch"] = _num_items(value)
    opts = _options_from(options)
    if items_divisor is not None and opts.loss_type not in ("dapo", "cispo"):
        items_divisor = None
    if not isinstance(return_metrics, bool):
        raise TypeError(f"return_metrics must be a bool, got {type(return_metrics).__name__}")
    check.tensor("hidden", hidden, ndim=(3,), floating=True)
    B, T, _ = hidden.shape
    if B * T == 0:
        raise ValueError(f"hidden must have at least one token, got shape {tuple(hidden.shape)}")
    _check_head(hidden, weight, bias)
    batch = check.grpo_batch(hidden, mask, targets, advantages, old_logps, ref_logps, importance_sampling_ratio,
                             opts.beta, vocab=weight.shape[0])
    keep, targets, advantages, old_logps, ref_logps, importance_sampling_ratio = batch

    if opts.backend == "reference":
        from grpo_kernels.reference import reference_grpo_loss

        out = reference_grpo_loss(
            hidden, weight, targets, advantages, mask, old_logps, ref_logps, bias=bias,
            importance_sampling_ratio=importance_sampling_ratio, options=opts, return_metrics=return_metrics,
        )
        if items_divisor is not None:
            out = (_divide(out[0], items_divisor), out[1]) if return_metrics else _divide(out, items_divisor)
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
    chunk = _deterministic_chunk(opts, B * T, hidden, weight)
    loss, logp, ent, _, _, _ = grpo_loss_op(
        hidden.reshape(B * T, -1), weight, bias, targets.reshape(-1), mask,
        adv2.expand(B, T), old_logps, ref_logps,
        None if importance_sampling_ratio is None else importance_sampling_ratio.expand(B, T),
        opts.loss_type, opts.importance_sampling_level, float(opts.beta), float(opts.epsilon_low),
        float(opts.eps_high), opts.delta, float(opts.temperature), opts.logit_softcap,
        opts.max_completion_length, opts.num_items_in_batch, float(opts.sapo_temperature_pos),
        float(opts.sapo_temperature_neg), opts.use_bias_correction_kl, float(opts.top_entropy_quantile),
        opts.backend, chunk, needs,
    )
    if items_divisor is not None:
        loss = _divide(loss, items_divisor)
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

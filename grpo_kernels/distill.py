"""``distill_loss``: on-policy distillation's loss from both models' hidden states and heads,
TRL 1.16's ``_chunked_divergence_loss`` semantics, without materializing either [N, V] logits.

The argument checks (each error names its argument; docs/errors.md lists them), then one call
of the ``grpo_kernels::distill_loss`` custom op (``ops.distill_loss_op``: one sweep, gradients in
the forward; opaque to ``torch.compile``, so ``fullgraph=True`` holds) or, for ``backend="reference"``, the
float64-capable oracle ``reference.reference_distill_loss``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from grpo_kernels import checks, collective, ops, validation as check
from grpo_kernels.calls import DistillCall
from grpo_kernels.divergence import DivergenceSpec, HeadTransform
from grpo_kernels.options import ExecutionOptions, VocabParallel


@dataclass
class DistillMetrics:
    """Detached diagnostics of a ``distill_loss`` call, as TRL's ``_chunked_divergence_loss``
    returns them: ``divergence`` and ``entropy`` (the student's) [B, T] in the accumulation
    dtype, 0 at masked positions; ``entropy_sum`` [] (over the unmasked positions) and
    ``n_valid`` [] int64 (the unmasked positions of this call)."""

    divergence: torch.Tensor
    entropy: torch.Tensor
    entropy_sum: torch.Tensor
    n_valid: torch.Tensor


def _spec(beta, temperature, logit_scale, teacher_logit_scale, logit_softcap, teacher_logit_softcap) -> DivergenceSpec:
    beta = checks.finite_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL of the teacher to the student, 1: reverse KL), "
                         f"got {beta}")
    number = checks.finite_number
    temperature = number("temperature", temperature, positive=True)
    student = HeadTransform(number("logit_scale", logit_scale),
                            number("logit_softcap", logit_softcap, positive=True, allow_none=True), temperature)
    teacher = HeadTransform(number("teacher_logit_scale", teacher_logit_scale),
                            number("teacher_logit_softcap", teacher_logit_softcap, positive=True, allow_none=True),
                            temperature)
    return DivergenceSpec(beta, student, teacher)


def _execution(backend, chunk_size, deterministic, batch_invariant) -> ExecutionOptions:
    # a backend without a divergence row pass raises BackendUnavailable when the plan is made
    return ExecutionOptions(backend=backend, chunk_size=chunk_size, deterministic=deterministic,
                            batch_invariant=batch_invariant).validate()


def _vocab_parallel(process_group, vocab_start, execution: ExecutionOptions) -> VocabParallel:
    """Vocab parallelism from ``process_group`` / ``vocab_start`` (``vocab_start`` alone: an error;
    its value is checked collectively, every rank raising alike, when the plan is made)."""
    if process_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is given without a process_group (vocab parallelism)")
        return VocabParallel()
    if execution.backend == "reference":
        raise ValueError("backend='reference' has no vocab-parallel form (it materializes the whole vocabulary)")
    return VocabParallel(group_name=collective.group_name(process_group), vocab_start=vocab_start).validate()


def _teacher_head(hidden, teacher_hidden, teacher_weight, teacher_bias, weight) -> None:
    """teacher_hidden [B, T, H_t], teacher_weight [V, H_t] (V the student's), teacher_bias [V]."""
    check.second_head(hidden, weight, teacher_hidden, teacher_weight, teacher_bias, prefix="teacher",
                      roles="the student and the teacher")


def _mask(mask, shape, device) -> torch.Tensor:
    """[B, T] bool of the positions that count (TRL: ``mask != 0``; the values do not weight)."""
    check.tensor("mask", mask, ndim=(2,))
    check.same_device("mask", mask, device)
    check.shape("mask", mask, shape, " ([B, T])")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real numeric, got {mask.dtype}")
    if mask.dtype != torch.bool:
        if torch.is_floating_point(mask):
            check.finite("mask", mask)
        check.nonnegative("mask", mask, " (a 0/1 completion mask)")
    return mask != 0


def distill_loss(hidden, weight, teacher_hidden, teacher_weight, mask, *, beta=1.0, temperature=1.0, bias=None,
                 teacher_bias=None, logit_scale=1.0, teacher_logit_scale=1.0, logit_softcap=None,
                 teacher_logit_softcap=None, num_items_in_batch=None, return_metrics=False, backend="auto",
                 chunk_size=None, deterministic=False, batch_invariant=False, process_group=None, vocab_start=None):
    """On-policy distillation loss (TRL 1.16 ``DistillationTrainer``'s ``_chunked_divergence_loss``).

    hidden [B, T, H] and weight [V, H] (bias [V]): the student; teacher_hidden [B, T, H_t] and
    teacher_weight [V, H_t] (teacher_bias [V]): the teacher, any hidden width, its own float dtype;
    mask [B, T] (``!= 0`` counts). Per position, each head's logits are scaled (``logit_scale``),
    softcapped (``logit_softcap``: ``c * tanh(z / c)``) and divided by ``temperature``; the
    divergence is the generalized JSD with mixture ``(1 - beta) p_student + beta p_teacher``
    (``beta=0``: KL(teacher || student), ``1``: KL(student || teacher)). The loss is the sum over
    the unmasked positions divided by ``num_items_in_batch`` (None: their count, at least 1), in
    fp32 (fp64 for fp64 hidden); gradients reach the student's hidden, weight and bias only.
    ``return_metrics=True``: ``(loss, DistillMetrics)``. Execution settings as in ``grpo_loss``;
    ``process_group`` / ``vocab_start``: vocab parallelism, as in ``grpo_loss`` (both heads' weights are
    this rank's rows ``[vocab_start, vocab_start + V_local)`` of the vocabulary, the same rows for
    both; hidden states, mask and teacher_hidden the same on every rank; docs/distributed.md).
    """
    spec = _spec(beta, temperature, logit_scale, teacher_logit_scale, logit_softcap, teacher_logit_softcap)
    execution = _execution(backend, chunk_size, deterministic, batch_invariant)
    vocab_parallel = _vocab_parallel(process_group, vocab_start, execution)
    if not isinstance(return_metrics, bool):
        raise TypeError(f"return_metrics must be a bool, got {type(return_metrics).__name__}")
    num_items = check.count("num_items_in_batch", num_items_in_batch, positive=True)
    collective.refuse_dtensors("distill_loss", dict(hidden=hidden, weight=weight, bias=bias, teacher_hidden=teacher_hidden,
                          teacher_weight=teacher_weight, teacher_bias=teacher_bias))
    check.tensor("hidden", hidden, ndim=(3,), floating=True)
    B, T, H = hidden.shape
    if B * T == 0:
        raise ValueError(f"hidden must have at least one token, got shape {tuple(hidden.shape)}")
    check.lm_head(hidden, weight, bias)
    _teacher_head(hidden, teacher_hidden, teacher_weight, teacher_bias, weight)
    keep = _mask(mask, (B, T), hidden.device)
    check.finite("hidden", hidden)
    if execution.backend == "reference":
        from grpo_kernels.reference import reference_distill_loss

        out = reference_distill_loss(hidden, weight, teacher_hidden, teacher_weight, mask, bias=bias,
                                     teacher_bias=teacher_bias, num_items_in_batch=num_items,
                                     return_metrics=return_metrics, **_spec_kwargs(spec))
        if not return_metrics:
            return out
        loss, m = out
        return loss, DistillMetrics(m["divergence"], m["entropy"], m["entropy_sum"], m["n_valid"])
    return _fused(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, keep, spec, execution,
                  vocab_parallel, num_items, return_metrics)


def _spec_kwargs(spec: DivergenceSpec) -> dict:
    s, t = spec.student, spec.teacher
    return dict(beta=spec.beta, temperature=s.temperature, logit_scale=s.scale, teacher_logit_scale=t.scale,
                logit_softcap=s.softcap, teacher_logit_softcap=t.softcap)


def _fused(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, keep, spec, execution, vocab_parallel,
           num_items, return_metrics):
    B, T, _ = hidden.shape
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    teacher = [None if t is None else t.detach() for t in (teacher_hidden, teacher_weight, teacher_bias)]
    flat = keep.reshape(-1)
    call = DistillCall(hidden.reshape(B * T, -1), weight, bias, teacher[0].reshape(B * T, -1), teacher[1], teacher[2],
                       flat, num_items, spec, execution, vocab_parallel, needs)
    # each head runs in its own dtype: inside torch.autocast the sweep's matmuls would otherwise
    # change the chunk's dtype under the row pass
    device = hidden.device.type
    autocast_off = torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else contextlib.nullcontext()
    with autocast_off:
        loss, div, ent = ops.distill_loss_op(call)[:3]
    if not return_metrics:
        return loss
    ent = ent.view(B, T)
    return loss, DistillMetrics(div.view(B, T), ent, ent.sum(), flat.sum())

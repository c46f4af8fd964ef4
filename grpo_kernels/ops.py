"""The fused operations as ``torch.library`` custom ops with registered autograd.

Being custom ops (opaque to the compiler, with fake implementations for shape propagation)
lets a ``torch.compile(fullgraph=True)`` training step call ``grpo_loss``, ``token_logprobs``,
``token_statistics``, ``distill_loss`` and ``topk_forward_kl`` without a graph break: whatever reads
tensor values back to the host (chunk bounds, ``nonzero`` of the kept rows, ...) happens inside an op.
The backward passes that recompute are custom ops too.

An op takes flat arguments; each op has one call class in ``grpo_kernels.calls``
(``LossCall``, ``LogprobsCall``, ``LogprobsGradCall``, ``DistillCall``, ``TopKCall``,
``TopKGradCall``) whose ``PARAMS`` are its schema and whose ``to_op_args`` / ``from_op_args`` are the
only flattening, by name. The implementations here receive the rebuilt call. Call the ops through
the ``*_op`` functions at the end of each section.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Optional, Tuple

import torch
from torch import Tensor

from grpo_kernels import autodiff, distill_op, loss as loss_impl, token_stats, topk_distill_op
from grpo_kernels.calls import DistillCall, LogprobsCall, LogprobsGradCall, LossCall, TopKCall, TopKGradCall
from grpo_kernels.epilogue import accumulation_dtype

_EMPTY = (0,)


def _define(name: str, call_class, returns, impl, fake):
    """A custom op ``grpo_kernels::name`` whose arguments are ``call_class.PARAMS``; ``impl`` and
    ``fake`` take the call rebuilt from them (``call_class.from_op_args``)."""
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in call_class.PARAMS]

    def run(*args):
        return impl(call_class.from_op_args(args))

    def run_fake(*args):
        return fake(call_class.from_op_args(args))

    run.__signature__ = inspect.Signature(params, return_annotation=returns)
    run.__name__ = name
    op = torch.library.custom_op(f"grpo_kernels::{name}", mutates_args=())(run)
    op.register_fake(run_fake)
    return op


def _grad_or_empty(g: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(_EMPTY) if g is None else g  # one per output: outputs may not alias


def _fake_grads(hidden, weight, bias, needs):
    gh = torch.empty_like(hidden) if needs[0] else hidden.new_empty(_EMPTY)
    gw = torch.empty_like(weight) if needs[1] else hidden.new_empty(_EMPTY)
    gb = torch.empty_like(bias) if (bias is not None and needs[2]) else hidden.new_empty(_EMPTY)
    return gh, gw, gb


# ---------------------------------------------------------------- token_logprobs


def _tl_impl(call: LogprobsCall):
    stats, _ = loss_impl.token_logprobs_forward(call)
    return stats.logp, stats.entropy, stats.lse


def _tl_fake(call: LogprobsCall):
    n = call.hidden.shape[0]
    return tuple(call.hidden.new_empty((n,), dtype=accumulation_dtype(call.hidden.dtype)) for _ in range(3))


_tl_op = _define("token_logprobs", LogprobsCall, Tuple[Tensor, Tensor, Tensor], _tl_impl, _tl_fake)


def _tl_backward_impl(call: LogprobsGradCall):
    gh, gw, gb = loss_impl.token_logprobs_backward(call)
    return _grad_or_empty(gh, call.hidden), _grad_or_empty(gw, call.hidden), _grad_or_empty(gb, call.hidden)


def _tl_backward_fake(call: LogprobsGradCall):
    return _fake_grads(call.hidden, call.weight, call.bias, call.needs)


_tl_backward_op = _define("token_logprobs_backward", LogprobsGradCall, Tuple[Tensor, Tensor, Tensor],
                          _tl_backward_impl, _tl_backward_fake)


def _tl_setup(ctx, inputs, output):
    call = LogprobsCall.from_op_args(inputs)
    logp, entropy, lse = output
    ctx.save_for_backward(call.hidden, call.weight, call.bias, call.targets, lse, entropy, logp)
    # the tensors go through save_for_backward only (saved-tensor hooks, no reference cycle): the
    # call kept for the backward holds its options and flags
    ctx.call = dataclasses.replace(call, hidden=None, weight=None, bias=None, targets=None)
    ctx.has_bias = call.bias is not None


def _head_needs(ctx) -> Tuple[bool, bool, bool]:
    """The gradients a recomputing backward must make: (hidden, weight, bias), the op's first three
    arguments (``ctx.has_bias``: a bias was given)."""
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]


def _head_grads(needs, grads, call_class) -> tuple:
    """The backward's return: (hidden, weight, bias) gradients where ``needs`` asks, None for every
    other argument of ``call_class``'s op."""
    picked = tuple(g if need else None for g, need in zip(grads, needs))
    return picked + (None,) * (len(call_class.PARAMS) - len(picked))


def _no_double_backward(what: str) -> None:
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{what} has no double backward: backward(create_graph=True) cannot differentiate its "
            "gradients again. Compute a second-order quantity with backend='reference' (materialized "
            "logits) instead."
        )


def _tl_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    _no_double_backward("token_logprobs")
    hidden, weight, bias, targets, lse, entropy, logp = ctx.saved_tensors
    fwd: LogprobsCall = ctx.call
    needs = _head_needs(ctx)
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not fwd.need_entropy:  # the entropy was not computed: nobody can depend on it
        grad_entropy = None
    call = LogprobsGradCall(
        hidden=hidden, weight=weight, bias=bias, targets=targets, lse=lse, entropy=entropy, target_logit=logp + lse,
        grad_logp=grad_logp.to(lse.dtype), grad_entropy=None if grad_entropy is None else grad_entropy.to(lse.dtype),
        options=fwd.options, execution=fwd.execution, vocab_parallel=fwd.vocab_parallel, needs=needs)
    # a backward run inside torch.autocast must not autocast the recomputed logits
    with torch.autocast(hidden.device.type, enabled=False) if hidden.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext():
        gh, gw, gb = _tl_backward_op(*call.to_op_args())
    return _head_grads(needs, (gh, gw, gb), LogprobsCall)


_tl_op.register_autograd(_tl_backward, setup_context=_tl_setup)


def token_logprobs_op(call: LogprobsCall) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden [n, H] -> (logp [n], entropy [n], lse [n]) in the accumulation dtype; without
    ``call.need_entropy`` the entropy is not computed (zeros)."""
    return _tl_op(*call.to_op_args())


# ---------------------------------------------------------------- grpo loss


def _loss_impl(call: LossCall):
    out = loss_impl.grpo_loss_forward(call)
    hidden = call.hidden
    adv = hidden.new_empty(_EMPTY, dtype=out.logp.dtype) if out.advantages is None else out.advantages
    kl = hidden.new_empty(_EMPTY, dtype=out.logp.dtype) if out.kl is None else out.kl
    return (out.loss, out.logp, out.entropy, _grad_or_empty(out.grad_hidden, hidden),
            _grad_or_empty(out.grad_weight, hidden), _grad_or_empty(out.grad_bias, hidden), adv, kl)


def _loss_fake(call: LossCall):
    hidden, rewards = call.hidden, call.inputs.rewards
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    if rewards is None:
        adv = hidden.new_empty(_EMPTY, dtype=acc)
    else:  # the advantages computed from the rewards, in their accumulation dtype
        adv = rewards.new_empty((rewards.shape[0],), dtype=accumulation_dtype(rewards.dtype))
    kl = hidden.new_empty((n,) if call.options.exact_kl else _EMPTY, dtype=acc)  # the exact KL per token
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc),
            *_fake_grads(hidden, call.weight, call.bias, call.needs), adv, kl)


_loss_op = _define("grpo_loss", LossCall, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
                   _loss_impl, _loss_fake)


def _no_grads(inputs) -> tuple:
    """None for every op argument past (hidden, weight, bias), in the structure autograd flattened the
    arguments to: a list of tensors only (the exact KL's reference head, all three given) is expanded,
    one None each; a list holding a None or a non-tensor is one leaf."""
    def none_for(x):
        return [None] * len(x) if isinstance(x, list) and all(isinstance(t, Tensor) for t in x) else None

    return tuple(none_for(x) for x in inputs[3:])


def _saved_grads_setup(call_class):
    """setup_context of an op whose outputs are (loss, per-row results..., gh, gw, gb[, more]) with
    the gradients computed in its forward (positions given by ``call_class``)."""

    def setup(ctx, inputs, output):
        # the gradients are results, not functions of the inputs: without this autograd would
        # allocate a zero [V, H] "gradient" for the unused gw output before every backward
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output[3:6])
        ctx.has_bias = inputs[call_class.NAMES.index("bias")] is not None
        ctx.no_grads = _no_grads(inputs)

    return setup


def _saved_grads_backward(call_class, what: str):
    """The backward of such an op: the saved gradients times ``grad_loss``, for (hidden, weight, bias)."""

    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:
            return (None,) * 3 + ctx.no_grads
        _no_double_backward(what)  # its gradients come from the forward: nothing to differentiate
        gh, gw, gb = ctx.saved_tensors
        # the saved gradients are handed out as they are (no second [V, H] buffer: 1.2 GB at
        # V=151936, H=4096 bf16) only when this backward frees them, i.e. .grad then owns the
        # only reference; a kept graph gets a fresh product each time, so that zeroing .grad
        # (even through .data) cannot change what the next backward hands out
        hand_out = autodiff.grad_is_one(grad_loss) and not autodiff.graph_is_kept()

        def scale(g, i):
            if not (ctx.needs_input_grad[i] and g.numel()):
                return None
            return g if hand_out else g * grad_loss.to(g.dtype)

        grads = (scale(gh, 0), scale(gw, 1), scale(gb, 2) if ctx.has_bias else None)
        return grads + ctx.no_grads

    return backward


_loss_op.register_autograd(_saved_grads_backward(LossCall, "grpo_loss"), setup_context=_saved_grads_setup(LossCall))


def loss_op(call: LossCall) -> Tuple[Tensor, ...]:
    """(loss [], logp [B*T], entropy [B*T], grad_hidden, grad_weight, grad_bias, advantages, kl) of a
    ``LossCall``; a gradient not asked for in ``call.needs`` comes back as an empty tensor, and so do
    the advantages [B] unless ``call.inputs.rewards`` gave them and the exact KL [B*T] unless
    ``call.options.exact_kl``."""
    return _loss_op(*call.to_op_args())


# ---------------------------------------------------------------- distillation


def _distill_impl(call: DistillCall):
    loss, div, ent, gh, gw, gb = distill_op.distill_forward(call)
    hidden = call.hidden
    return loss, div, ent, _grad_or_empty(gh, hidden), _grad_or_empty(gw, hidden), _grad_or_empty(gb, hidden)


def _distill_fake(call: DistillCall):
    hidden = call.hidden
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc),
            *_fake_grads(hidden, call.weight, call.bias, call.needs))


_distill_op = _define("distill_loss", DistillCall, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
                      _distill_impl, _distill_fake)
_distill_op.register_autograd(_saved_grads_backward(DistillCall, "distill_loss"),
                              setup_context=_saved_grads_setup(DistillCall))


def distill_loss_op(call: DistillCall) -> Tuple[Tensor, ...]:
    """(loss [], divergence [N], entropy [N], grad_hidden, grad_weight, grad_bias) of a
    ``DistillCall``; a gradient not asked for in ``call.needs`` comes back as an empty tensor."""
    return _distill_op(*call.to_op_args())


# ---------------------------------------------------------------- token statistics (forward only)


def _ts_impl(call: LogprobsCall):
    return tuple(token_stats.forward_statistics(call))


_ts_op = _define("token_statistics", LogprobsCall, Tuple[Tensor, Tensor, Tensor], _ts_impl, _tl_fake)


def token_statistics_op(call: LogprobsCall) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden [n, H] -> (logp [n], entropy [n], sum_pi_squared [n]) in the accumulation dtype, no
    autograd (the caller passes detached tensors); without ``call.need_entropy`` the entropy is 0."""
    return _ts_op(*call.to_op_args())


# ---------------------------------------------------------------- top-k distillation rows


def _topk_fake(call: TopKCall):
    hidden = call.hidden
    n, acc = hidden.shape[0], accumulation_dtype(hidden.dtype)
    rows = [hidden.new_empty((n,), dtype=acc) for _ in range(4)]
    return (*rows[:3], hidden.new_empty((n,), dtype=torch.int64), rows[3])


_topk_op = _define("topk_forward_kl", TopKCall, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
                   topk_distill_op.topk_forward, _topk_fake)


def _topk_backward_impl(grad: TopKGradCall):
    gh, gw, gb = topk_distill_op.topk_backward(grad)
    hidden = grad.forward.hidden
    return _grad_or_empty(gh, hidden), _grad_or_empty(gw, hidden), _grad_or_empty(gb, hidden)


def _topk_backward_fake(grad: TopKGradCall):
    return _fake_grads(grad.forward.hidden, grad.forward.weight, grad.forward.bias, grad.needs)


_topk_backward_op = _define("topk_forward_kl_backward", TopKGradCall, Tuple[Tensor, Tensor, Tensor],
                            _topk_backward_impl, _topk_backward_fake)


def _topk_setup(ctx, inputs, output):
    call = TopKCall.from_op_args(inputs)
    ctx.mark_non_differentiable(*output[1:])  # only the losses have a gradient
    ctx.save_for_backward(call.hidden, call.weight, call.bias, call.teacher_topk_ids, call.teacher_topk_logps)
    # as for token_logprobs: tensors through save_for_backward only, the rest of the call kept
    ctx.call = dataclasses.replace(call, hidden=None, weight=None, bias=None, teacher_topk_ids=None,
                                   teacher_topk_logps=None)
    ctx.has_bias = call.bias is not None


def _topk_backward(ctx, grad_losses, *_unused):
    _no_double_backward("topk_forward_kl")
    hidden, weight, bias, ids, lt = ctx.saved_tensors
    needs = _head_needs(ctx)
    call = dataclasses.replace(ctx.call, hidden=hidden, weight=weight, bias=bias, teacher_topk_ids=ids,
                               teacher_topk_logps=lt)
    gh, gw, gb = _topk_backward_op(*TopKGradCall(call, grad_losses.to(lt.dtype), needs).to_op_args())
    return _head_grads(needs, (gh, gw, gb), TopKCall)


_topk_op.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk_forward_kl_op(call: TopKCall) -> Tuple[Tensor, ...]:
    """(losses, student_mass, teacher_mass, overlap_count, overlap_token_advantage), [n] each, of a
    ``TopKCall``: accumulation dtype (``overlap_count`` int64); only ``losses`` is differentiable, in
    (hidden, weight, bias), by a backward op that recomputes each chunk's logits."""
    return _topk_op(*call.to_op_args())

"""The fused operations as ``torch.library`` custom ops with registered autograd.

Being custom ops (opaque to the compiler, with fake implementations for shape propagation)
lets a ``torch.compile(fullgraph=True)`` training step call ``grpo_loss`` and
``token_logprobs`` without a graph break. Their backward passes are custom ops too.

An op's arguments are its tensors, then every field of the option classes
(``options.OPTION_CLASSES``: the loss semantics, the execution settings, the vocab-parallel
layout), then the gradients wanted. The schemas are derived from the dataclass fields here,
in ``_define``: an option added to a dataclass reaches every op and kernel with no other
change. Call them through ``loss_op`` / ``token_logprobs_op``, which take the objects.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from grpo_kernels import loss as loss_impl, objective
from grpo_kernels.backends.base import RowStats
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import OP_FIELDS, from_op_args, to_op_args

_EMPTY = (0,)
_N_OPTIONS = len(OP_FIELDS)


def _define(name: str, tensors, returns, impl, fake, extra=(("needs", List[bool]),)):
    """A custom op ``grpo_kernels::name`` taking ``tensors`` (name, type) pairs, every option
    field, then ``extra``; ``impl(*tensors, option_objects, *extra)`` and ``fake`` alike."""
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in tensors]
    params += [P(f"{cls.__name__}_{n}", P.POSITIONAL_OR_KEYWORD, annotation=t) for cls, n, t in OP_FIELDS]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in extra]
    k = len(tensors)

    def split(args):
        return args[:k], from_op_args(args[k:k + _N_OPTIONS]), args[k + _N_OPTIONS:]

    def run(*args):
        t, opts, rest = split(args)
        return impl(*t, opts, *rest)

    def run_fake(*args):
        t, opts, rest = split(args)
        return fake(*t, opts, *rest)

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

_TL_TENSORS = (("hidden", Tensor), ("weight", Tensor), ("bias", Optional[Tensor]), ("targets", Tensor))


def _tl_impl(hidden, weight, bias, targets, opts, need_entropy):
    stats, _ = loss_impl.token_logprobs_forward(hidden, weight, bias, targets, *opts, need_entropy=need_entropy)
    return stats.logp, stats.entropy, stats.lse


def _tl_fake(hidden, weight, bias, targets, opts, need_entropy):
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=accumulation_dtype(hidden.dtype)) for _ in range(3))


_tl_op = _define("token_logprobs", _TL_TENSORS, Tuple[Tensor, Tensor, Tensor], _tl_impl, _tl_fake,
                 extra=(("need_entropy", bool),))


def _tl_backward_impl(hidden, weight, bias, targets, lse, entropy, target_logit, grad_logp, grad_entropy, opts,
                      needs):
    stats = RowStats(lse, entropy, target_logit)
    gh, gw, gb = loss_impl.token_logprobs_backward(
        hidden, weight, bias, targets, stats, grad_logp.to(lse.dtype),
        None if grad_entropy is None else grad_entropy.to(lse.dtype), *opts, tuple(needs),
    )
    return _grad_or_empty(gh, hidden), _grad_or_empty(gw, hidden), _grad_or_empty(gb, hidden)


def _tl_backward_fake(hidden, weight, bias, targets, lse, entropy, target_logit, grad_logp, grad_entropy, opts,
                      needs):
    return _fake_grads(hidden, weight, bias, needs)


_tl_backward_op = _define(
    "token_logprobs_backward",
    _TL_TENSORS + (("lse", Tensor), ("entropy", Tensor), ("target_logit", Tensor), ("grad_logp", Tensor),
                   ("grad_entropy", Optional[Tensor])),
    Tuple[Tensor, Tensor, Tensor], _tl_backward_impl, _tl_backward_fake,
)


def _tl_setup(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    logp, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, logp)
    ctx.option_args = inputs[4:4 + _N_OPTIONS]
    ctx.need_entropy = inputs[-1]
    ctx.has_bias = bias is not None


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
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.need_entropy:  # the entropy was not computed: nobody can depend on it
        grad_entropy = None
    # a backward run inside torch.autocast must not autocast the recomputed logits
    with torch.autocast(hidden.device.type, enabled=False) if hidden.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext():
        gh, gw, gb = _tl_backward_op(hidden, weight, bias, targets, lse, entropy, logp + lse, grad_logp,
                                     grad_entropy, *ctx.option_args, needs)
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None, None) + \
        (None,) * (_N_OPTIONS + 1)


_tl_op.register_autograd(_tl_backward, setup_context=_tl_setup)


def token_logprobs_op(hidden, weight, bias, targets, *option_objects, need_entropy: bool = True
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden [n, H] -> (logp [n], entropy [n], lse [n]) in the accumulation dtype; without
    ``need_entropy`` the entropy is not computed (zeros)."""
    return _tl_op(hidden, weight, bias, targets, *to_op_args(*option_objects), need_entropy)


# ---------------------------------------------------------------- grpo loss

_HEAD_TENSORS = (("hidden", Tensor), ("weight", Tensor), ("bias", Optional[Tensor]), ("targets", Tensor))
#: the per-call tensors of the objective (``objective.LossInputs``), in field order: a field added
#: there reaches the op with no other change
_INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(objective.LossInputs) if f.name not in objective.DERIVED_INPUTS)
_LOSS_TENSORS = _HEAD_TENSORS + tuple((n, Tensor if n == "mask" else Optional[Tensor]) for n in _INPUT_FIELDS)


def _loss_impl(hidden, weight, bias, targets, *rest):
    tensors, opts, needs = rest[:len(_INPUT_FIELDS)], rest[len(_INPUT_FIELDS)], rest[len(_INPUT_FIELDS) + 1]
    inputs = objective.LossInputs(**dict(zip(_INPUT_FIELDS, tensors)))
    needs_t = (needs[0], needs[1], needs[2] and bias is not None)
    loss, logp, ent, gh, gw, gb, adv = loss_impl.grpo_loss_forward(hidden, weight, bias, targets, inputs, *opts,
                                                                   needs_t)
    adv = hidden.new_empty(_EMPTY, dtype=logp.dtype) if adv is None else adv
    return (loss, logp, ent, _grad_or_empty(gh, hidden), _grad_or_empty(gw, hidden), _grad_or_empty(gb, hidden),
            adv)


def _loss_fake(hidden, weight, bias, targets, *rest):
    needs = rest[len(_INPUT_FIELDS) + 1]
    acc = accumulation_dtype(hidden.dtype)
    n = hidden.shape[0]
    fields = dict(zip(_INPUT_FIELDS, rest[:len(_INPUT_FIELDS)]))
    rewards = fields["rewards"]
    if rewards is None:
        adv = hidden.new_empty(_EMPTY, dtype=acc)
    else:  # the advantages computed from the rewards, in their accumulation dtype
        adv = rewards.new_empty((rewards.shape[0],), dtype=accumulation_dtype(rewards.dtype))
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc),
            *_fake_grads(hidden, weight, bias, needs), adv)


_loss_op = _define("grpo_loss", _LOSS_TENSORS, Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
                   _loss_impl, _loss_fake)


def _loss_setup(ctx, inputs, output):
    _, logp, ent, gh, gw, gb, adv = output
    # the gradients are results, not functions of the inputs: without this autograd would
    # allocate a zero [V, H] "gradient" for the unused gw output before every backward
    ctx.mark_non_differentiable(logp, ent, gh, gw, gb, adv)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gh, gw, gb)
    ctx.has_bias = inputs[2] is not None


def _is_one(grad_loss: Tensor) -> bool:
    """True when grad_loss is a concrete 1 (loss.backward()). Costs one device sync, saves a
    [V, H] multiply; under torch.compile the product is always taken."""
    if torch.compiler.is_compiling() or grad_loss.numel() != 1:
        return False
    try:
        return bool(grad_loss == 1)
    except RuntimeError:  # fake or meta tensors
        return False


def _graph_is_kept() -> bool:
    """Whether this backward keeps the graph (retain_graph=True, autograd.grad(...,
    retain_graph=True)): the saved gradients then outlive it. Unknown -> True (safe)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None or torch.compiler.is_compiling():
        return True
    try:
        return bool(probe())
    except RuntimeError:  # not inside an engine-driven backward
        return True


def _loss_backward(ctx, grad_loss, *_unused):
    n_inputs = len(_LOSS_TENSORS) + _N_OPTIONS + 1
    if grad_loss is None:
        return (None,) * n_inputs
    _no_double_backward("grpo_loss")  # its gradients come from the forward: nothing to differentiate
    gh, gw, gb = ctx.saved_tensors
    # the saved gradients are handed out as they are (no second [V, H] buffer: 1.2 GB at
    # V=151936, H=4096 bf16) only when this backward frees them, i.e. .grad then owns the
    # only reference; a kept graph gets a fresh product each time, so that zeroing .grad
    # (even through .data) cannot change what the next backward hands out
    hand_out = _is_one(grad_loss) and not _graph_is_kept()

    def scale(g, i):
        if not (ctx.needs_input_grad[i] and g.numel()):
            return None
        return g if hand_out else g * grad_loss.to(g.dtype)

    grads = (scale(gh, 0), scale(gw, 1), scale(gb, 2) if ctx.has_bias else None)
    return grads + (None,) * (n_inputs - 3)


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def loss_op(hidden, weight, bias, targets, inputs: "objective.LossInputs", option_objects, needs
            ) -> Tuple[Tensor, ...]:
    """hidden [B*T, H], targets [B*T], ``inputs`` the per-call tensors ([B, T]; see
    ``objective.LossInputs``); ``option_objects`` = (GRPOOptions, ExecutionOptions, VocabParallel).

    Returns (loss [], logp [B*T], entropy [B*T], grad_hidden, grad_weight, grad_bias, advantages); a
    gradient not asked for in ``needs`` comes back as an empty tensor, and so do the advantages [B]
    unless ``inputs.rewards`` gave them.
    """
    tensors = tuple(getattr(inputs, n) for n in _INPUT_FIELDS)
    return _loss_op(hidden, weight, bias, targets, *tensors, *to_op_args(*option_objects), list(needs))

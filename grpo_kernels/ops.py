"""The fused operations as ``torch.library`` custom ops with registered autograd.

Being custom ops (opaque to the compiler, with fake implementations for shape
propagation) lets a ``torch.compile(fullgraph=True)`` training step call
``grpo_loss`` and ``token_logprobs`` without a graph break. Their backward passes
are custom ops too.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from grpo_kernels import vocab_pass
from grpo_kernels.backends import get_backend
from grpo_kernels.backends.base import accumulation_dtype
from grpo_kernels.fused_loss import fused_grpo_loss
from grpo_kernels.options import GRPOOptions

_EMPTY = (0,)


def _acc(t: Tensor) -> torch.dtype:
    return accumulation_dtype(t.dtype)


# ---------------------------------------------------------------- token_logprobs


@torch.library.custom_op("grpo_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    temperature: float, softcap: Optional[float], backend: str, chunk_size: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """hidden [n, H] -> (logp [n], entropy [n], lse [n]) in the accumulation dtype."""
    be = get_backend(backend, hidden.device, hidden.dtype)
    st = vocab_pass.forward_stats(be, hidden, weight, bias, targets, temperature, softcap, chunk_size)
    return st.logp, st.entropy, st.lse


@token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, softcap, backend, chunk_size):
    n = hidden.shape[0]
    return tuple(hidden.new_empty((n,), dtype=_acc(hidden)) for _ in range(3))


@torch.library.custom_op("grpo_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    lse: Tensor, entropy: Tensor, grad_logp: Tensor, grad_entropy: Optional[Tensor],
    temperature: float, softcap: Optional[float], backend: str, chunk_size: Optional[int],
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    be = get_backend(backend, hidden.device, hidden.dtype)
    gh, gw, gb = vocab_pass.backward_grads(
        be, hidden, weight, bias, targets, temperature, softcap, lse, entropy,
        grad_logp.to(lse.dtype), None if grad_entropy is None else grad_entropy.to(lse.dtype),
        chunk_size, tuple(needs),
    )
    empty = lambda: hidden.new_empty(_EMPTY)  # noqa: E731 - one per output: outputs may not alias
    return (empty() if gh is None else gh, empty() if gw is None else gw, empty() if gb is None else gb)


@token_logprobs_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, temperature, softcap,
      backend, chunk_size, needs):
    gh = torch.empty_like(hidden) if needs[0] else hidden.new_empty(_EMPTY)
    gw = torch.empty_like(weight) if needs[1] else hidden.new_empty(_EMPTY)
    gb = torch.empty_like(bias) if (bias is not None and needs[2]) else hidden.new_empty(_EMPTY)
    return gh, gw, gb


def _tl_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, softcap, backend, chunk_size = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.args = (temperature, softcap, backend, chunk_size)
    ctx.has_bias = bias is not None


def _tl_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    temperature, softcap, backend, chunk_size = ctx.args
    gh, gw, gb = token_logprobs_backward_op(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
        temperature, softcap, backend, chunk_size, needs,
    )
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None,
            None, None, None, None, None)


token_logprobs_op.register_autograd(_tl_backward, setup_context=_tl_setup)


# ---------------------------------------------------------------- grpo loss


@torch.library.custom_op("grpo_kernels::grpo_loss", mutates_args=())
def grpo_loss_op(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, mask: Tensor,
    advantages: Tensor, old_logps: Optional[Tensor], ref_logps: Optional[Tensor],
    importance_sampling_ratio: Optional[Tensor],
    loss_type: str, importance_sampling_level: str, beta: float, epsilon_low: float, epsilon_high: float,
    delta: Optional[float], temperature: float, logit_softcap: Optional[float],
    max_completion_length: Optional[int], num_items_in_batch: Optional[float],
    sapo_temperature_pos: float, sapo_temperature_neg: float, use_bias_correction_kl: bool,
    top_entropy_quantile: float, backend: str, chunk_size: Optional[int], needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """hidden [B*T, H], targets [B*T], mask/advantages/old/ref/ratio [B, T].

    Returns (loss [], logp [B*T], entropy [B*T], grad_hidden, grad_weight, grad_bias);
    a gradient not asked for in ``needs`` comes back as an empty tensor.
    """
    options = GRPOOptions(
        beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, temperature=temperature,
        logit_softcap=logit_softcap, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, use_bias_correction_kl=use_bias_correction_kl,
        top_entropy_quantile=top_entropy_quantile, backend=backend, chunk_size=chunk_size,
    )
    needs_t = (needs[0], needs[1], needs[2] and bias is not None)
    loss, logp, ent, gh, gw, gb = fused_grpo_loss(
        hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
        options, needs_t,
    )
    empty = lambda: hidden.new_empty(_EMPTY)  # noqa: E731 - one per output: outputs may not alias
    return (loss, logp, ent, empty() if gh is None else gh, empty() if gw is None else gw,
            empty() if gb is None else gb)


@grpo_loss_op.register_fake
def _(hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, importance_sampling_ratio,
      *args):
    needs = args[-1]
    acc = _acc(hidden)
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((n,), dtype=acc),
        hidden.new_empty((n,), dtype=acc),
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(_EMPTY),
        torch.empty_like(weight) if needs[1] else hidden.new_empty(_EMPTY),
        torch.empty_like(bias) if (bias is not None and needs[2]) else hidden.new_empty(_EMPTY),
    )


def _loss_setup(ctx, inputs, output):
    _, logp, ent, gh, gw, gb = output
    # the gradients are results, not functions of the inputs: without this autograd would
    # allocate a zero [V, H] "gradient" for the unused gw output before every backward
    ctx.mark_non_differentiable(logp, ent, gh, gw, gb)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gh, gw, gb)
    ctx.has_bias = inputs[2] is not None


def _is_one(grad_loss: Tensor) -> bool:
    """True when grad_loss is a concrete 1 (loss.backward()): the saved gradients are then the
    answer as they are. Costs one device sync, saves a second [V, H] gradient (1.2 GB at
    V=151936, H=4096, bf16) and its multiply; under torch.compile the product is always taken."""
    if torch.compiler.is_compiling() or grad_loss.numel() != 1:
        return False
    try:
        return bool(grad_loss == 1)
    except RuntimeError:  # fake or meta tensors
        return False


def _loss_backward(ctx, grad_loss, *_unused):
    n_other = 23  # the non-tensor and non-differentiable inputs after bias
    if grad_loss is None:
        return (None,) * (3 + n_other)
    gh, gw, gb = ctx.saved_tensors
    unit = _is_one(grad_loss)

    def scale(g, i):
        if not (ctx.needs_input_grad[i] and g.numel()):
            return None
        return g if unit else g * grad_loss.to(g.dtype)

    return (scale(gh, 0), scale(gw, 1), scale(gb, 2) if ctx.has_bias else None) + (None,) * n_other


grpo_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)

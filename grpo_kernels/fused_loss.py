"""Eager implementation of the whole GRPO loss over the vocabulary (no autograd here).

Given flattened hidden states and per-token inputs, returns the loss together with
its gradients (computed in the forward pass) and the per-token logps/entropy.
Padding rows (mask == 0) are dropped before the vocabulary pass and get zeros.

Paths, by what the per-token gradient coefficient depends on:
- token-level importance sampling: the coefficient follows from the token's own
  logp, so one fused sweep computes statistics, epilogue and gradients (6NHV flops);
  ``top_entropy_quantile < 1`` first needs every entropy: one stats-only sweep more.
- sequence-level importance sampling: the coefficient needs the whole row's logps.
  When every sequence fits in one chunk, chunks are cut at sequence boundaries and
  each chunk's coefficient comes from its own statistics before its gradient is
  written (6NHV flops). A sequence longer than a chunk forces a stats sweep, the
  coefficient for all rows, then a gradient sweep that recomputes the logits (8NHV).
  The coefficient is autograd through ``objective_loss`` on [B, T] (the loss is a sum
  of per-sequence terms, so a sequence's coefficient needs only its own logps).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from grpo_kernels import objective, vocab_pass
from grpo_kernels.backends import get_backend
from grpo_kernels.backends.base import RowBackend, accumulation_dtype
from grpo_kernels.options import GRPOOptions


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, total: int) -> torch.Tensor:
    out = values.new_zeros((total,) + tuple(values.shape[1:]))
    return out.index_copy_(0, rows, values)


def _functorch_keys_enabled():
    """Re-enable functorch's dispatch keys for an inner ``torch.func`` transform.

    Under a ``TorchDispatchMode`` (torch.compile's first-call custom-op aliasing check,
    FlopCounterMode, ...) an op runs with every key above Python excluded, functorch's
    included, and ``torch.func.grad`` fails with "Cannot access storage of TensorWrapper".
    """
    K = torch._C.DispatchKey
    keys = [K.FuncTorchDynamicLayerFrontMode, K.FuncTorchDynamicLayerBackMode, K.FuncTorchGradWrapper,
            K.FuncTorchBatched, K.FuncTorchVmapMode]
    excluded = torch._C._dispatch_tls_local_exclude_set()
    if not hasattr(torch._C, "_ForceDispatchKeyGuard") or not any(excluded.has(k) for k in keys):
        return contextlib.nullcontext()
    for k in keys:
        excluded = excluded.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


def fused_grpo_loss(
    hidden: torch.Tensor,  # [B*T, H]
    weight: torch.Tensor,  # [V, H]
    bias: Optional[torch.Tensor],  # [V]
    targets: torch.Tensor,  # [B*T] int64
    mask: torch.Tensor,  # [B, T]
    adv: torch.Tensor,  # [B, T] (broadcast)
    old: Optional[torch.Tensor],  # [B, T]
    ref: Optional[torch.Tensor],  # [B, T]
    is_ratio: Optional[torch.Tensor],  # [B, T] (broadcast)
    options: GRPOOptions,
    needs: Tuple[bool, bool, bool],  # grads wanted for (hidden, weight, bias)
    row_backend: Optional[RowBackend] = None,  # overrides options.backend (vocab-parallel wraps one)
):
    """Returns (loss, logp [B*T], entropy [B*T], grad_hidden, grad_weight, grad_bias);
    grads are None when not needed."""
    B, T = mask.shape
    total = B * T
    acc = accumulation_dtype(hidden.dtype)
    backend = row_backend if row_backend is not None else get_backend(options.backend, hidden.device, hidden.dtype)
    rows = torch.nonzero(mask.reshape(-1) != 0).squeeze(1)
    h = hidden.index_select(0, rows)
    tgt = targets.index_select(0, rows)
    pick = lambda t: None if t is None else t.reshape(-1).index_select(0, rows).to(acc)  # noqa: E731
    softcap, temp, chunk = options.logit_softcap, options.temperature, options.chunk_size
    # padding positions may hold junk (even inf) old/ref logps: they must not reach a sum
    keep = mask != 0
    old = None if old is None else torch.where(keep, old.to(acc), torch.zeros((), dtype=acc, device=old.device))
    ref = None if ref is None else torch.where(keep, ref.to(acc), torch.zeros((), dtype=acc, device=ref.device))
    want_grads = any(needs)
    sequence_grads = want_grads and options.importance_sampling_level == "sequence"
    sequence_bounds = None  # chunks of whole sequences, when each fits in one (see sequence_chunks)
    if sequence_grads:
        max_rows = vocab_pass.chunk_rows(h.shape[0], weight.shape[0], h.dtype, backend, chunk, h.device)
        # a meta mask (shape checks) has no values: every position counts, as in nonzero()
        lengths = [T] * B if mask.is_meta else (mask != 0).sum(-1).tolist()
        sequence_bounds = vocab_pass.sequence_chunks(lengths, max_rows)

    entropy_mask = None
    recompute = sequence_grads and sequence_bounds is None
    if options.top_entropy_quantile < 1.0 or not want_grads or recompute:
        sel_stats = vocab_pass.forward_stats(backend, h, weight, bias, tgt, temp, softcap, chunk)
        logp_full = _scatter_rows(sel_stats.logp, rows, total)
        ent_full = _scatter_rows(sel_stats.entropy, rows, total)
        if options.top_entropy_quantile < 1.0:
            entropy_mask = objective.high_entropy_mask(ent_full.view(B, T), mask, options.top_entropy_quantile)

    policy_scale = is_ratio
    if entropy_mask is not None:
        policy_scale = entropy_mask.to(acc) if policy_scale is None else policy_scale.to(acc) * entropy_mask

    def loss_of(logp_full):
        return objective.objective_loss(
            logp_full.view(B, T), mask, adv, options, old=old, ref=ref, policy_scale=policy_scale
        )

    def grad_and_loss(logp_full):
        # torch.func rather than torch.autograd: this runs inside a custom op, below the
        # autograd dispatch key, where only functorch's own transform still differentiates
        with _functorch_keys_enabled():
            return torch.func.grad_and_value(loss_of)(logp_full)

    if not want_grads:
        return loss_of(logp_full).detach(), logp_full, ent_full, None, None, None

    if options.importance_sampling_level == "token":
        token_inputs = objective.TokenInputs(
            old=pick(old), adv=pick(adv), weight=pick(objective.token_weights(mask, options, acc)),
            ref=pick(ref), policy_scale=pick(policy_scale),
        )
        stats, loss_t, _, gh, gw, gb = vocab_pass.fused_forward_backward(
            backend, h, weight, bias, tgt, temp, softcap,
            lambda s, e: (token_inputs.select(slice(s, e)), options), chunk, needs,
        )
        loss = loss_t.sum()
        logp_full = _scatter_rows(stats.logp, rows, total)
        ent_full = _scatter_rows(stats.entropy, rows, total)
    elif sequence_bounds is not None:
        logp_full = torch.zeros(total, dtype=acc, device=h.device)

        def coefficient(s, e, chunk_stats):
            # rows of later sequences still hold 0: they do not reach these rows' gradient
            logp_full.index_copy_(0, rows[s:e], chunk_stats.logp)
            return grad_and_loss(logp_full)[0].index_select(0, rows[s:e])

        stats, gh, gw, gb = vocab_pass.sequence_forward_backward(
            backend, h, weight, bias, tgt, temp, softcap, sequence_bounds, coefficient, needs,
        )
        loss = loss_of(logp_full).detach()
        ent_full = _scatter_rows(stats.entropy, rows, total)
    else:
        dlogp_full, loss = grad_and_loss(logp_full)
        gh, gw, gb = vocab_pass.backward_grads(
            backend, h, weight, bias, tgt, temp, softcap, sel_stats.lse, sel_stats.entropy,
            dlogp_full.index_select(0, rows), None, chunk, needs,
        )
    gh_full = _scatter_rows(gh, rows, total) if gh is not None else None
    return loss, logp_full, ent_full, gh_full, gw, gb

"""Public entry points: argument checks, the option objects, then one call into the fused op
(``grpo_kernels.ops``) or, for ``backend="reference"``, the oracle."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Optional

import torch
from torch import nn

from grpo_kernels import collective, epilogue, objective, token_stats, validation as check
from grpo_kernels.calls import LogprobsCall, LossCall
from grpo_kernels.metrics import GRPOMetrics, compute_metrics
from grpo_kernels.ops import loss_op, token_logprobs_op, token_statistics_op
from grpo_kernels.options import (OPTION_NAMES, ExecutionOptions, GRPOOptions, VocabParallel, split_options,
                                  with_overrides)


def backend_for(device="cpu", dtype: torch.dtype = torch.float32, backend: str = "auto"):
    """(name, reason) of the row backend a call on (device, dtype) runs with ``backend``:
    what ``auto`` picks and why. On the CPU this may build the C++ extension (once)."""
    from grpo_kernels.backends import choose_backend

    execution = ExecutionOptions(backend=backend).validate()
    if backend == "reference":
        return "reference", "requested: the float64 oracle on materialized logits"
    chosen, reason = choose_backend(execution, torch.device(device), dtype)
    return chosen.name, reason


def _autocast_head(hidden, weight, bias):
    """Inside ``torch.autocast`` the head runs in the autocast dtype, as ``lm_head(hidden)``
    would (fp32 / fp16 / bf16 operands are cast; fp64 is not, as autocast leaves it); the op
    itself then runs with autocast off, accumulating in fp32. Returns the operands and the
    context to call the op in."""
    device = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return t.to(dtype) if eligible else t

    return cast(hidden), cast(weight), cast(bias), torch.autocast(device, enabled=False)


def _vocab_parallel(hidden, weight, bias, process_group, vocab_start, reduce_grad_hidden):
    """DTensor operands to local ones, and the ``VocabParallel`` of the call (disabled without
    a process group or a vocab-sharded DTensor lm_head)."""
    if not isinstance(reduce_grad_hidden, bool):
        raise TypeError(f"reduce_grad_hidden must be a bool, got {type(reduce_grad_hidden).__name__}")
    hidden, weight, bias, process_group, reduce_grad_hidden, sharded = collective.local_operands(
        hidden, weight, bias, process_group, reduce_grad_hidden
    )
    if process_group is None and not sharded:
        if vocab_start is not None:
            raise ValueError("vocab_start is given without a process_group (vocab parallelism)")
        return hidden, weight, bias, VocabParallel()
    vp = VocabParallel(group_name=collective.group_name(process_group), vocab_start=vocab_start,
                       reduce_grad_hidden=reduce_grad_hidden).validate()
    return hidden, weight, bias, vp


def _reject_reference(execution: ExecutionOptions, vp: VocabParallel) -> None:
    if execution.backend == "reference" and vp.enabled:
        raise ValueError("backend='reference' has no vocab-parallel form; use 'auto', 'torch', 'triton' or 'cpp'")


def _checked_head(hidden, weight, bias, targets, vp: VocabParallel, return_entropy):
    """``token_logprobs`` / ``token_statistics``' checks of the head and targets; returns the
    operands under autocast and the context to run the op in (``_autocast_head``)."""
    check.tensor("hidden", hidden, floating=True)
    hidden, weight, bias, no_autocast = _autocast_head(hidden, weight, bias)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size)")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    check.lm_head(hidden, weight, bias)
    check.tensor("targets", targets)
    check.same_device("targets", targets, hidden.device)
    check.shape("targets", targets, hidden.shape[:-1], " (hidden's leading dimensions)")
    if vp.enabled:
        check.token_id_dtype("targets", targets)  # the range needs the global vocabulary: in the op
    else:
        check.token_ids("targets", targets, weight.shape[0])
    check.finite("hidden", hidden)
    return hidden, weight, bias, no_autocast


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
    deterministic: bool = False,
    batch_invariant: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    reduce_grad_hidden: bool = True,
):
    """Per-token log-probs (and entropy) of ``targets`` under ``hidden @ weight.T + bias``.

    hidden [..., H] (fp16/bf16/fp32/fp64), weight [V, H], targets [...] int. Returns
    logp [...] (and entropy [...]) in fp32 (fp64 for fp64 inputs), never materializing
    [N, V]; differentiable with respect to hidden, weight and bias. ``batch_invariant``: each
    token's results bitwise independent of the other tokens of the call (and equal to
    ``grpo_loss(..., batch_invariant=True, return_metrics=True)``'s ``metrics.logps``).

    Vocab parallel (docs/distributed.md): with ``process_group``, ``weight`` [V_local, H] (and
    ``bias``) are this rank's rows ``[vocab_start, vocab_start + V_local)`` of the lm_head
    (``vocab_start=None`` on every rank: rank order), every other input is the same on every
    rank, targets hold global ids, and the results are the global ones on every rank.
    """
    options, execution = split_options(dict(temperature=temperature, logit_softcap=logit_softcap, backend=backend,
                                             chunk_size=chunk_size, deterministic=deterministic,
                                             batch_invariant=batch_invariant))
    hidden, weight, bias, vp = _vocab_parallel(hidden, weight, bias, process_group, vocab_start, reduce_grad_hidden)
    _reject_reference(execution, vp)
    hidden, weight, bias, no_autocast = _checked_head(hidden, weight, bias, targets, vp, return_entropy)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).to(torch.int64)
    with no_autocast:
        if execution.backend == "reference":
            from grpo_kernels.reference import reference_token_logprobs

            logp, ent = reference_token_logprobs(h2, weight, t1, bias, temperature, logit_softcap)
        else:
            logp, ent, _ = token_logprobs_op(LogprobsCall(
                hidden=h2, weight=weight, bias=bias, targets=t1, options=options, execution=execution,
                vocab_parallel=vp, need_entropy=return_entropy))
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


def token_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = True,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    deterministic: bool = False,
    batch_invariant: bool = False,
) -> token_stats.TokenStatistics:
    """``TokenStatistics(logp, entropy, sum_pi_squared)`` of ``targets`` under ``hidden @ weight.T +
    bias``, forward only, in ONE vocabulary sweep without materializing [N, V].

    hidden [..., H], weight [V, H], targets [...] int; each result [...] (targets' shape), fp32 (fp64
    for fp64 inputs), detached: ``sum_pi_squared = sum_v softmax(u)_v ** 2`` with ``u`` the softcapped,
    temperature-scaled logits (verl's ``calculate_sum_pi_squared``, data for its Optimal Token
    Baseline); ``entropy`` is 0 with ``return_entropy=False``. No vocab-parallel form. For gradients of
    the log-probs use ``token_logprobs``.
    """
    options, execution = split_options(dict(temperature=temperature, logit_softcap=logit_softcap, backend=backend,
                                             chunk_size=chunk_size, deterministic=deterministic,
                                             batch_invariant=batch_invariant))
    vp = VocabParallel()
    hidden, weight, bias, no_autocast = _checked_head(hidden, weight, bias, targets, vp, return_entropy)
    lead = hidden.shape[:-1]
    h2 = hidden.detach().reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).to(torch.int64)
    w, b = weight.detach(), None if bias is None else bias.detach()
    with no_autocast, torch.no_grad():
        if execution.backend == "reference":
            from grpo_kernels.reference import reference_token_statistics

            out = reference_token_statistics(h2, w, t1, b, temperature, logit_softcap)
            if not return_entropy:
                out = (out[0], torch.zeros_like(out[1]), out[2])
        else:
            out = token_statistics_op(LogprobsCall(
                hidden=h2, weight=w, bias=b, targets=t1, options=options, execution=execution, vocab_parallel=vp,
                need_entropy=return_entropy))
    return token_stats.TokenStatistics(*(t.reshape(lead) for t in out))


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: Optional[torch.Tensor],
    mask: torch.Tensor,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    *,
    rewards: Optional[torch.Tensor] = None,
    reward_weights=None,
    bias: Optional[torch.Tensor] = None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    num_sequences_in_batch=None,
    return_metrics: bool = False,
    process_group=None,
    vocab_start: Optional[int] = None,
    reduce_grad_hidden: bool = True,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    **options,
):
    """The GRPO loss (TRL 1.16 ``GRPOTrainer._compute_loss`` semantics) from hidden states.

    hidden [B, T, H], weight [V, H], targets [B, T] int, advantages [B] or [B, T],
    mask [B, T]; old_logps / ref_logps / importance_sampling_ratio [B, T] (the ratio
    may be [B, 1]); sampling_logps [B, T]: the sampler's log-probs for
    ``off_policy_mask_threshold`` (None: old_logps; NaN = unscored); num_items_in_batch:
    dapo/cispo/vespo's normalizer, verl's ``batch_num_tokens`` (number or 1-element tensor;
    None: mask.sum()); num_sequences_in_batch: verl's ``global_batch_size`` (None: the rows
    with a token). Options: the fields of ``GRPOOptions`` and of ``ExecutionOptions``. Returns the scalar loss (fp32, fp64 for fp64 inputs), or
    ``(loss, GRPOMetrics)`` with ``return_metrics=True``.

    Rewards instead of advantages: ``advantages=None, rewards=r`` ([B] or [B, R] float, NaN =
    unscored) with the options ``num_generations=G`` and ``scale_rewards="group" | "batch" |
    "none"`` (True / False as GRPOConfig; ``reward_eps``, default 1e-4) and ``reward_weights`` (R
    numbers, None: all 1): the advantages are ``group_advantages(r, G, scale_rewards=,
    weights=reward_weights, eps=reward_eps)``, computed by the fused row kernels' epilogue in the
    same launch where they run, and returned as ``metrics.advantages``.

    The exact KL (``kl_estimator="full"``): the per-token KL(pi_theta || pi_ref) over the whole
    vocabulary replaces k3, from the reference's hidden states ``ref_hidden`` [B, T, H_r] and head
    ``ref_weight`` [V, H_r] (``ref_bias`` [V]; any hidden width, its own float dtype; the policy's
    temperature and softcap), in the same sweep; ``ref_logps`` is then not read, no gradient reaches
    the reference, and ``metrics.kl_mean`` is the exact mean. With ``beta=0`` the reference is not
    needed (given, it is not read). Under vocab parallelism ``ref_weight`` / ``ref_bias`` hold the
    same vocabulary rows as ``weight`` on each rank and ``ref_hidden`` is replicated.

    Vocab parallel: ``process_group`` / ``vocab_start`` / ``reduce_grad_hidden`` as in
    ``token_logprobs``; the loss and metrics are the global ones on every rank,
    ``weight.grad`` is this rank's slice and ``hidden.grad`` the full gradient (partial with
    ``reduce_grad_hidden=False``). Collective: every rank calls it with the same options.
    """
    opts, execution = split_options(options)
    return _grpo_loss(hidden, weight, targets, advantages, mask, old_logps, ref_logps, opts, execution,
                      rewards=rewards, reward_weights=reward_weights, bias=bias,
                      importance_sampling_ratio=importance_sampling_ratio, sampling_logps=sampling_logps,
                      num_items_in_batch=num_items_in_batch, num_sequences_in_batch=num_sequences_in_batch,
                      return_metrics=return_metrics, process_group=process_group, vocab_start=vocab_start,
                      reduce_grad_hidden=reduce_grad_hidden, ref_hidden=ref_hidden, ref_weight=ref_weight,
                      ref_bias=ref_bias)


def _reference_head(opts: GRPOOptions, hidden, weight, ref_hidden, ref_weight, ref_bias):
    """(ref_hidden, ref_weight, ref_bias) of the exact KL, checked and detached (autocast as the
    policy's head); all None when the call's KL is not the exact one (beta 0: not read)."""
    given = [n for n, x in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias))
             if x is not None]
    if opts.kl_estimator != "full":
        if given:
            raise ValueError(f"{given[0]} is read only with kl_estimator='full' (the exact KL to the reference), "
                             f"got kl_estimator={opts.kl_estimator!r}")
        return None, None, None
    if not opts.exact_kl:  # beta 0: no KL term, no reference
        return None, None, None
    missing = [n for n, x in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)) if x is None]
    if missing:
        raise ValueError(f"{missing[0]} is required with kl_estimator='full' and beta != 0 (the reference's hidden "
                         "states [B, T, H_r] and head [V, H_r]; ref_logps is not read)")
    # the reference's head is local tensors: this rank's rows of it beside a vocab-sharded policy head
    collective.refuse_dtensors("grpo_loss's reference head", dict(ref_hidden=ref_hidden, ref_weight=ref_weight,
                                                                 ref_bias=ref_bias))
    check.second_head(hidden, weight, ref_hidden, ref_weight, ref_bias, prefix="ref",
                      roles="the policy and the reference")
    ref_hidden, ref_weight, ref_bias, _ = _autocast_head(ref_hidden, ref_weight, ref_bias)
    return tuple(None if x is None else x.detach() for x in (ref_hidden, ref_weight, ref_bias))


def _grpo_loss(hidden, weight, targets, advantages, mask, old_logps, ref_logps, opts: GRPOOptions,
               execution: ExecutionOptions, *, rewards=None, reward_weights=None, bias=None,
               importance_sampling_ratio=None, sampling_logps=None, num_items_in_batch=None,
               num_sequences_in_batch=None, return_metrics=False, process_group=None, vocab_start=None,
               reduce_grad_hidden=True, ref_hidden=None, ref_weight=None, ref_bias=None):
    """``grpo_loss`` with its options already validated (``GRPOLoss`` holds them): the argument
    checks, then the op."""
    if not isinstance(return_metrics, bool):
        raise TypeError(f"return_metrics must be a bool, got {type(return_metrics).__name__}")
    num_items = check.count("num_items_in_batch", num_items_in_batch)
    num_sequences = check.count("num_sequences_in_batch", num_sequences_in_batch)
    hidden, weight, bias, vp = _vocab_parallel(hidden, weight, bias, process_group, vocab_start, reduce_grad_hidden)
    _reject_reference(execution, vp)
    check.tensor("hidden", hidden, ndim=(3,), floating=True)
    hidden, weight, bias, no_autocast = _autocast_head(hidden, weight, bias)
    B, T, _ = hidden.shape
    if B * T == 0:
        raise ValueError(f"hidden must have at least one token, got shape {tuple(hidden.shape)}")
    check.lm_head(hidden, weight, bias)
    if (advantages is None) == (rewards is None):
        raise ValueError("grpo_loss takes exactly one of advantages and rewards (with num_generations), got "
                         + ("both" if rewards is not None else "neither"))
    if rewards is None and reward_weights is not None:
        raise ValueError("reward_weights is given without rewards (it weights the reward functions' columns)")
    ref_head = _reference_head(opts, hidden, weight, ref_hidden, ref_weight, ref_bias)
    # the exact KL reads the reference's head, not ref_logps: given anyway, they are checked, then not read
    needs_ref_logps = opts.beta if opts.kl_estimator != "full" else 0.0
    batch = check.grpo_batch(hidden, mask, targets, advantages, old_logps, ref_logps, importance_sampling_ratio,
                             needs_ref_logps, vocab=None if vp.enabled else weight.shape[0])
    keep, targets, advantages, old_logps, ref_logps, importance_sampling_ratio = batch
    if opts.kl_estimator == "full":
        ref_logps = None
    if rewards is not None:
        rewards, reward_weights = check.rewards(rewards, reward_weights, hidden, opts.num_generations)
    sampling_logps = check.sampling_logps(sampling_logps, keep, opts.off_policy_mask_threshold)
    inputs = objective.LossInputs(mask=mask, adv=advantages, old=old_logps, ref=ref_logps,
                                  is_ratio=importance_sampling_ratio, sampling=sampling_logps, num_items=num_items,
                                  num_sequences=num_sequences,
                                  rewards=rewards, reward_weights=reward_weights)

    with no_autocast:
        return _grpo_loss_checked(hidden, weight, bias, targets, inputs, opts, execution, vp, return_metrics,
                                  ref_head)


def _grpo_loss_checked(hidden, weight, bias, targets, inputs: objective.LossInputs, opts, execution, vp,
                       return_metrics, ref_head=(None, None, None)):
    B, T, _ = hidden.shape
    mask = inputs.mask
    if execution.backend == "reference":
        from grpo_kernels.reference import reference_grpo_loss

        computed = None
        if inputs.rewards is not None:  # the oracle takes advantages: computed once, in torch
            computed = epilogue.reward_advantages(inputs.rewards, inputs.reward_weights, opts)
            inputs = dataclasses.replace(inputs, adv=computed.unsqueeze(1))
        out = reference_grpo_loss(
            hidden, weight, targets, inputs.adv, mask, inputs.old, inputs.ref, bias=bias,
            importance_sampling_ratio=inputs.is_ratio, sampling_logps=inputs.sampling,
            num_items_in_batch=inputs.num_items, num_sequences_in_batch=inputs.num_sequences, options=opts,
            return_metrics=return_metrics, ref_hidden=ref_head[0], ref_weight=ref_head[1], ref_bias=ref_head[2],
        )
        if not return_metrics:
            return out
        loss, m = out
        return loss, GRPOMetrics(
            logps=m["logps"] * mask, entropy=m["entropy"] * mask, kl_mean=m["kl_mean"],
            kl=None if m.get("kl") is None else m["kl"] * mask,
            clip_ratio_low=m.get("clip_ratio_low"), clip_ratio_high=m.get("clip_ratio_high"),
            clip_ratio_region=m.get("clip_ratio_region"), cispo_clip_ratio=m.get("cispo_clip_ratio"),
            entropy_mean=m["entropy_mean"], advantages=computed,
            seq_clip_ratio_low=m.get("seq_clip_ratio_low"), seq_clip_ratio_high=m.get("seq_clip_ratio_high"),
        )

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    ref_hidden = None if ref_head[0] is None else ref_head[0].reshape(B * T, -1)
    loss, logp, ent, _, _, _, computed, kl = loss_op(LossCall(
        hidden=hidden.reshape(B * T, -1), weight=weight, bias=bias, targets=targets.reshape(-1), inputs=inputs,
        options=opts, execution=execution, vocab_parallel=vp, needs=needs, ref_hidden=ref_hidden,
        ref_weight=ref_head[1], ref_bias=ref_head[2]))
    if not return_metrics:
        return loss
    computed = None if inputs.rewards is None else computed
    adv = inputs.adv if computed is None else computed.unsqueeze(1)
    metrics = compute_metrics(logp.view(B, T), ent.view(B, T), mask, adv, opts, old=inputs.old, ref=inputs.ref,
                              kl=kl.view(B, T) if opts.exact_kl else None)
    if computed is not None:
        metrics = dataclasses.replace(metrics, advantages=computed)
    return loss, metrics


class GRPOLoss(nn.Module):
    """Drop-in module: holds the options; ``forward`` takes the tensors (and per-call overrides:
    options, ``bias``, ``importance_sampling_ratio``, ``sampling_logps``, ``num_items_in_batch``,
    ``num_sequences_in_batch``, ``return_metrics``)."""

    def __init__(self, **options):
        super().__init__()
        self.options, self.execution = split_options(options)

    def forward(self, hidden, weight, targets, advantages, mask, old_logps=None, ref_logps=None, **overrides):
        """``advantages=None`` with ``rewards=`` (and ``reward_weights=``) among the overrides: the
        advantages from the rewards (``grpo_loss``), ``num_generations`` / ``scale_rewards`` from the
        module's options or the overrides."""
        unknown = [k for k in overrides if k not in OPTION_NAMES and k not in _CALL_ARGUMENTS]
        if unknown:
            raise TypeError(f"unknown option(s): {sorted(unknown)}")
        # only the overridden options are validated again (``replace``); the rest were at __init__
        opts, execution = with_overrides(self.options, self.execution, overrides)
        call_args = {k: v for k, v in overrides.items() if k in _CALL_ARGUMENTS}
        return _grpo_loss(hidden, weight, targets, advantages, mask, old_logps, ref_logps, opts, execution,
                          **call_args)

    def extra_repr(self) -> str:
        o = self.options
        return (f"loss_type={o.loss_type!r}, beta={o.beta}, epsilon=({o.epsilon_low}, {o.eps_high}), "
                f"backend={self.execution.backend!r}")


#: grpo_loss's per-call keyword arguments (not options): what GRPOLoss.forward passes through
_CALL_ARGUMENTS = frozenset(name for name, p in inspect.signature(grpo_loss).parameters.items()
                            if p.kind == inspect.Parameter.KEYWORD_ONLY)

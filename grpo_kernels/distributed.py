"""Distributed training helpers on ``torch.distributed``: data parallelism and vocab-parallel TP.

Data parallelism (DDP, FSDP2 ``fully_shard``)
    Every rank calls ``grpo_kernels.grpo_loss`` on its share of the batch. The loss types that
    normalize per row or per rank (grpo, sapo, luspo, bnpo, dr_grpo) need nothing more: the
    wrapper averages gradients over ranks, exactly as TRL's per-process losses are averaged.
    dapo and cispo divide by a token count that must be global: pass
    ``num_items_in_batch=global_num_items(mask, divide_by_world_size=True)``. TRL takes the
    ``top_entropy_quantile`` threshold over every rank's tokens: ``global_high_entropy_mask``.
    Under FSDP2 the lm_head weight read outside its FSDP unit's forward may be the sharded
    ``DTensor``: wrap it in ``lm_head_weight`` (README, "Distributed training").

Vocab-parallel tensor parallelism
    ``vocab_parallel_grpo_loss`` and ``vocab_parallel_token_logprobs``: each rank of ``group``
    holds the rows ``[vocab_start, vocab_start + V_local)`` of the lm_head (the slices tile
    ``[0, V)``, uneven sizes allowed) and the same hidden states. Per chunk of tokens every rank
    computes its local row statistics, then two all-reduces of O(chunk) vectors give the global
    ones (no [N, V] tensor is ever gathered):

    - ``lse = log(sum_r exp(lse_r))`` (all-reduce MAX for the shift, then SUM),
    - ``sum(p * u) = sum_r exp(lse_r - lse) * (lse_r - entropy_r)``, ``entropy = lse - sum(p * u)``,
    - the target logit from the rank that owns the target (all-reduce SUM; the others add 0).

    Gradients: ``grad_weight_shard`` (and ``grad_bias_shard``) stay local; each rank's
    ``grad_hidden`` is a partial sum over its slice, all-reduced (SUM) over ``group`` so that
    ``hidden.grad`` is complete on every rank (``reduce_grad_hidden=False`` leaves it partial,
    for callers that reduce it themselves, e.g. a reduce-scatter under sequence parallelism).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from grpo_kernels import objective, validation as check, vocab_pass
from grpo_kernels.api import _check_head, _options_from
from grpo_kernels.backends import get_backend
from grpo_kernels.backends.base import RowBackend, RowStats
from grpo_kernels.fused_loss import fused_grpo_loss

__all__ = [
    "global_num_items",
    "global_high_entropy_mask",
    "lm_head_weight",
    "vocab_parallel_grpo_loss",
    "vocab_parallel_token_logprobs",
    "combine_row_stats",
]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------ data parallelism


def global_num_items(mask: torch.Tensor, group=None, *, divide_by_world_size: bool = False) -> torch.Tensor:
    """The number of completion tokens over every rank of ``group``: ``mask.sum()`` all-reduced.

    Returns a float64 scalar tensor on ``mask``'s device (exact up to 2**53 tokens), meant for
    ``grpo_loss(..., num_items_in_batch=...)`` with loss_type dapo or cispo.

    With a wrapper that averages gradients over ranks (DDP, FSDP2: both divide the summed
    gradients by the world size) pass ``divide_by_world_size=True``: each rank's loss is then
    ``sum_local / (N_global / world)``, TRL's ``normalizer = num_items_in_batch / num_processes``,
    and the averaged gradient equals the single-process one on the whole batch. Without a
    process group this is the local count.
    """
    check.tensor("mask", mask)
    count = mask.sum(dtype=torch.float64).reshape(())
    if not _initialized():
        return count
    count = count.clone()
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    if divide_by_world_size:
        count = count / dist.get_world_size(group)
    return count


def global_high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_entropy_quantile: float,
                             group=None) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` over every rank: the entropy threshold is the
    ``1 - top_entropy_quantile`` quantile of the unmasked entropies of *all* ranks' tokens.

    ``grpo_loss(top_entropy_quantile=q)`` takes the quantile over the local batch only, which is
    what one process does; under data parallelism compute the mask here and pass it as a factor
    of the policy term (the entropy mask multiplies exactly what ``importance_sampling_ratio``
    multiplies), with ``top_entropy_quantile=1.0``::

        with torch.no_grad():
            _, ent = token_logprobs(hidden, weight, targets, return_entropy=True)
        keep = global_high_entropy_mask(ent, mask, 0.2)
        loss = grpo_loss(hidden, weight, targets, adv, mask, old, importance_sampling_ratio=keep.to(dtype))

    entropy and mask are [B, T]; returns a bool [B, T]. One all-gather of the token counts and
    one of the (padded) unmasked entropies.
    """
    if not 0.0 < top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {top_entropy_quantile}")
    m = mask != 0
    local = entropy.detach()[m].float()
    if _initialized():
        world = dist.get_world_size(group)
        count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        sizes = [int(c) for c in torch.cat(counts).tolist()]
        padded = torch.zeros(max(max(sizes), 1), dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        local = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    if local.numel() == 0:
        return torch.zeros_like(m)
    threshold = torch.quantile(local, 1.0 - top_entropy_quantile)
    return ((entropy.detach() * m.to(entropy.dtype)) >= threshold) & m


def lm_head_weight(weight: torch.Tensor, *, grad_reduction: str = "avg") -> torch.Tensor:
    """The full lm_head weight for ``grpo_loss`` when it is a sharded ``DTensor`` parameter.

    Under FSDP2 a parameter is a plain (unsharded) tensor only while its module's forward
    runs; called outside it (the usual "model returns hidden states, the loss takes
    ``model.lm_head.weight``" pattern) the weight is the sharded DTensor. This all-gathers it
    (``DTensor.full_tensor``) and declares the incoming gradient a per-rank *partial* one,
    so its backward is a reduce-scatter: ``grad_reduction="avg"`` averages over the mesh like
    FSDP2 does for every other parameter, ``"sum"`` sums. A plain tensor is returned as is.

    Prefer computing the loss inside the module's forward (README, "Distributed training"): FSDP2 then
    hands ``grpo_loss`` the already all-gathered weight and reduces its gradient itself.
    """
    try:
        from torch.distributed.tensor import DTensor, Partial
    except ImportError:  # torch without the public DTensor module
        return weight
    if not isinstance(weight, DTensor):
        return weight
    if grad_reduction not in ("avg", "sum"):
        raise ValueError(f"grad_reduction must be 'avg' or 'sum', got {grad_reduction!r}")
    placements = [Partial(grad_reduction) for _ in weight.placements]
    return weight.full_tensor(grad_placements=placements)


# ------------------------------------------------------------------ vocab parallelism


def combine_row_stats(local: RowStats, group=None) -> RowStats:
    """Global row statistics from each rank's statistics over its vocabulary slice.

    ``local.target_logit`` must be 0 on the ranks that do not own the row's target (the
    row backends' convention for ``target < 0``). Two all-reduces of [n]-sized tensors.
    """
    lse_r = local.lse
    shift = lse_r.clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(lse_r - shift)
    mean_u = torch.where(e > 0, e * (lse_r - local.entropy), torch.zeros_like(e))  # exp(lse_r - s) * sum(p_r u)
    packed = torch.stack([e, mean_u, local.target_logit.to(e.dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total, total_u, target_logit = packed.unbind(0)
    lse = shift + torch.log(total)
    return RowStats(lse=lse, entropy=lse - total_u / total, target_logit=target_logit)


class VocabParallelRows(RowBackend):
    """A row backend over one vocabulary slice whose statistics are the global ones.

    ``row_stats`` combines the wrapped backend's slice statistics over ``group``; ``row_grad_``
    needs nothing more (given global lse/entropy, the gradient of a slice's logits is local);
    ``row_fused_`` is the base composition (stats, ``objective.token_epilogue``, gradient), so
    ``vocab_pass`` and ``fused_loss`` run unchanged on top of it. Every rank must make the same
    sequence of calls (same rows, same chunking): the statistics are collective.
    """

    def __init__(self, inner: RowBackend, group=None):
        self.inner = inner
        self.group = group
        self.name = f"vocab_parallel[{inner.name}]"
        self.temp_bytes_per_elem = inner.temp_bytes_per_elem

    def supports(self, device, dtype):
        return self.inner.supports(device, dtype)

    def row_stats(self, logits, targets, temperature, softcap):
        return combine_row_stats(self.inner.row_stats(logits, targets, temperature, softcap), self.group)

    def row_grad_(self, logits, targets, lse, entropy, dlogp, dentropy, temperature, softcap):
        self.inner.row_grad_(logits, targets, lse, entropy, dlogp, dentropy, temperature, softcap)


class _Plan:
    """What every rank agrees on before a vocab-parallel pass (one small all-gather)."""

    def __init__(self, vocab_start, vocab_size, chunk_size, inner: RowBackend, rows: VocabParallelRows):
        self.vocab_start, self.vocab_size, self.chunk_size = vocab_start, vocab_size, chunk_size
        self.inner, self.rows = inner, rows


def _plan(hidden2d, weight_shard, vocab_start, n_valid, backend_name, chunk_size, group) -> _Plan:
    """Exchange (vocab_start, V_local, n, H, unmasked tokens, chunk rows) between the ranks.

    Checks that the slices tile [0, V) and that the ranks agree on the tokens, and picks one
    chunk size for all (the statistics are collective per chunk, so every rank must make the
    same calls). Every rank sees the same table, so a mismatch raises on every rank alike.
    ``vocab_start=None`` on every rank means "slices in rank order".
    """
    if not _initialized():
        raise RuntimeError("vocab-parallel losses need an initialized torch.distributed process group")
    if backend_name == "reference":
        raise ValueError("backend='reference' has no vocab-parallel form; use 'auto', 'torch', 'triton' or 'cpp'")
    inner = get_backend(backend_name, hidden2d.device, hidden2d.dtype)
    n, H = hidden2d.shape
    v_local = weight_shard.shape[0]
    if vocab_start is None:
        start_code = -1
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        start_code = -2  # raised below, on every rank
    else:
        start_code = vocab_start
    rows = vocab_pass.chunk_rows(n, v_local, hidden2d.dtype, inner, chunk_size, hidden2d.device)
    mine = torch.tensor([start_code, v_local, n, H, n_valid, rows], dtype=torch.int64, device=hidden2d.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    meta = torch.stack(every).cpu().tolist()
    starts = [m[0] for m in meta]
    if -2 in starts:
        raise ValueError(f"vocab_start must be an int >= 0 (or None on every rank), got {starts} over the ranks")
    for j, what in ((2, "token count"), (3, "hidden size"), (4, "number of unmasked tokens")):
        if len({m[j] for m in meta}) != 1:
            raise ValueError(
                f"vocab-parallel ranks disagree on the {what}: {[m[j] for m in meta]} "
                "(every rank of the group must pass the same hidden states, targets and mask)"
            )
    if all(st == -1 for st in starts):  # rank order
        starts = [sum(m[1] for m in meta[:r]) for r in range(len(meta))]
    elif -1 in starts:
        raise ValueError("vocab_start must be given on every rank or on none")
    edges = sorted((st, st + m[1]) for st, m in zip(starts, meta))
    end = 0
    for lo, hi in edges:
        if lo != end:
            raise ValueError(f"the ranks' vocabulary slices {edges} do not tile [0, V) contiguously")
        end = hi
    rank = dist.get_rank(group)
    return _Plan(starts[rank], end, min(m[5] for m in meta), inner, VocabParallelRows(inner, group))


def _local_operands(hidden, weight_shard, bias, group, reduce_grad_hidden):
    """DTensor operands to local tensors: a vocab-sharded lm_head (``Shard(0)`` on a 1-D mesh,
    as ``ColwiseParallel`` leaves it) gives its local rows and its mesh's group; a replicated
    hidden gives its local copy whose gradient DTensor reduces (so we do not)."""
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:
        return hidden, weight_shard, bias, group, reduce_grad_hidden
    if isinstance(weight_shard, DTensor):
        mesh = weight_shard.device_mesh
        if mesh.ndim != 1 or tuple(weight_shard.placements) != (Shard(0),):
            raise ValueError(
                f"a DTensor lm_head must be Shard(0) on a 1-D mesh, got {weight_shard.placements} on {mesh}"
            )
        group = mesh.get_group() if group is None else group
        weight_shard = weight_shard.to_local()
        if isinstance(bias, DTensor):
            bias = bias.to_local()
    if isinstance(hidden, DTensor):
        if any(not isinstance(pl, Replicate) for pl in hidden.placements):
            raise ValueError(f"a DTensor hidden must be replicated, got {hidden.placements}")
        hidden = hidden.to_local(grad_placements=[Partial() for _ in hidden.placements])
        reduce_grad_hidden = False
    return hidden, weight_shard, bias, group, reduce_grad_hidden


def _local_targets(targets: torch.Tensor, vocab_start: int, v_local: int) -> torch.Tensor:
    local = targets.to(torch.int64) - vocab_start
    return torch.where((local >= 0) & (local < v_local), local, torch.full_like(local, -1))


def _scale(g: Optional[torch.Tensor], grad_output: torch.Tensor, need: bool):
    if g is None or not need:
        return None
    return g * grad_output.to(g.dtype)


class _VocabParallelLoss(torch.autograd.Function):
    """The loss with its gradients computed in the forward; backward scales by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, adv, old, ref, ratio, options, rows, needs, group,
                reduce_grad_hidden):
        loss, logp, ent, gh, gw, gb = fused_grpo_loss(
            hidden, weight, bias, targets, mask, adv, old, ref, ratio, options, needs, row_backend=rows
        )
        if gh is not None and reduce_grad_hidden:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(gh, gw, gb)
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        gh, gw, gb = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (_scale(gh, grad_loss, need[0]), _scale(gw, grad_loss, need[1]), _scale(gb, grad_loss, need[2])) + (
            None,
        ) * 11


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, plan, group, reduce_grad_hidden):
        st = vocab_pass.forward_stats(plan.rows, hidden, weight, bias, targets, temperature, softcap,
                                      plan.chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, st.lse, st.entropy)
        ctx.args = (temperature, softcap, plan, group, reduce_grad_hidden)
        return st.logp, st.entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, softcap, plan, group, reduce_grad_hidden = ctx.args
        need = ctx.needs_input_grad
        needs = (need[0], need[1], bias is not None and need[2])
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        gh, gw, gb = vocab_pass.backward_grads(
            plan.inner, hidden, weight, bias, targets, temperature, softcap, lse, entropy,
            grad_logp.to(lse.dtype), None if grad_entropy is None else grad_entropy.to(lse.dtype),
            plan.chunk_size, needs,
        )
        if gh is not None and reduce_grad_hidden:
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
        return gh, gw, gb, None, None, None, None, None, None


def _check_vocab_targets(targets, vocab_size, where=None):
    check.token_ids("targets", targets, vocab_size, where=where)


def vocab_parallel_token_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    vocab_start: Optional[int],
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_entropy: bool = False,
    group=None,
    reduce_grad_hidden: bool = True,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
):
    """``grpo_kernels.token_logprobs`` with the lm_head split over the vocabulary across ``group``.

    hidden [..., H] and targets [...] (global token ids) are the same on every rank;
    weight_shard [V_local, H] (and bias [V_local]) are this rank's rows
    ``[vocab_start, vocab_start + V_local)`` of the lm_head (``vocab_start=None`` on every rank:
    the slices follow the rank order of ``group``). A ``DTensor`` lm_head sharded ``Shard(0)`` on
    a 1-D mesh (``ColwiseParallel``) may be passed as is, with ``vocab_start=None``. Returns the
    global logp [...] (and entropy [...]), identical on every rank; differentiable with respect
    to hidden, weight_shard and bias. Collective: every rank of ``group`` calls it.
    """
    hidden, weight_shard, bias, group, reduce_grad_hidden = _local_operands(
        hidden, weight_shard, bias, group, reduce_grad_hidden
    )
    opts = _options_from(dict(temperature=temperature, logit_softcap=logit_softcap, backend=backend,
                              chunk_size=chunk_size))
    check.tensor("hidden", hidden, floating=True)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size)")
    _check_head(hidden, weight_shard, bias)
    check.tensor("targets", targets)
    check.same_device("targets", targets, hidden.device)
    check.shape("targets", targets, hidden.shape[:-1], " (hidden's leading dimensions)")
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    plan = _plan(h2, weight_shard, vocab_start, t1.numel(), opts.backend, opts.chunk_size, group)
    _check_vocab_targets(t1, plan.vocab_size)
    local_t = _local_targets(t1, plan.vocab_start, weight_shard.shape[0])
    logp, ent = _VocabParallelLogprobs.apply(
        h2, weight_shard, bias, local_t, float(opts.temperature), opts.logit_softcap, plan, group,
        reduce_grad_hidden,
    )
    logp = logp.reshape(lead)
    return (logp, ent.reshape(lead)) if return_entropy else logp


def vocab_parallel_grpo_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    vocab_start: Optional[int],
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    *,
    bias: Optional[torch.Tensor] = None,
    importance_sampling_ratio: Optional[torch.Tensor] = None,
    return_metrics: bool = False,
    group=None,
    reduce_grad_hidden: bool = True,
    **options,
):
    """``grpo_kernels.grpo_loss`` with the lm_head split over the vocabulary across ``group``.

    Same arguments and options as ``grpo_loss`` except: ``weight_shard`` [V_local, H] (and
    ``bias`` [V_local]) hold this rank's lm_head rows ``[vocab_start, vocab_start + V_local)``
    (``vocab_start=None`` on every rank: rank order; a ``Shard(0)`` DTensor lm_head may be passed
    as is); every other tensor (hidden [B, T, H], targets with global ids, mask, advantages, ...)
    is the same on every rank of ``group``. The returned loss (and metrics) are the global
    ones, identical on every rank; ``weight_shard.grad`` is this rank's slice of the full
    gradient and ``hidden.grad`` the full gradient (see ``reduce_grad_hidden``).
    Collective: every rank of ``group`` calls it with the same options.
    """
    hidden, weight_shard, bias, group, reduce_grad_hidden = _local_operands(
        hidden, weight_shard, bias, group, reduce_grad_hidden
    )
    if "num_items_in_batch" in options and isinstance(options["num_items_in_batch"], torch.Tensor):
        value = options["num_items_in_batch"]
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(value.shape)}")
        options["num_items_in_batch"] = float(value.item())
    opts = _options_from(options)
    check.tensor("hidden", hidden, ndim=(3,), floating=True)
    B, T, _ = hidden.shape
    if B * T == 0:
        raise ValueError(f"hidden must have at least one token, got shape {tuple(hidden.shape)}")
    _check_head(hidden, weight_shard, bias)
    batch = check.grpo_batch(hidden, mask, targets, advantages, old_logps, ref_logps, importance_sampling_ratio,
                             opts.beta, vocab=None)  # ids are checked against the global vocab below
    keep, targets, advantages, old_logps, ref_logps, ratio = batch
    ratio = None if ratio is None else ratio.expand(B, T)

    h2 = hidden.reshape(B * T, -1)
    n_valid = int(keep.sum())
    plan = _plan(h2, weight_shard, vocab_start, n_valid, opts.backend, opts.chunk_size, group)
    _check_vocab_targets(targets, plan.vocab_size, where=keep)
    local_t = _local_targets(targets.reshape(-1), plan.vocab_start, weight_shard.shape[0])
    opts = opts.replace(chunk_size=plan.chunk_size)
    adv2 = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight_shard.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    loss, logp, ent = _VocabParallelLoss.apply(
        h2, weight_shard, bias, local_t, mask, adv2.expand(B, T), old_logps, ref_logps, ratio, opts,
        plan.rows, needs, group, reduce_grad_hidden,
    )
    if not return_metrics:
        return loss
    return loss, objective.compute_metrics(logp.view(B, T), ent.view(B, T), mask, adv2, opts,
                                           old=old_logps, ref=ref_logps)

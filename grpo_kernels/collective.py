"""Vocabulary parallelism: the collectives of a call whose lm_head is split over the vocabulary.

Each rank of a process group holds the rows ``[vocab_start, vocab_start + V_local)`` of the
lm_head (the slices tile ``[0, V)``, uneven sizes allowed) and the same hidden states. Per
chunk of tokens every rank computes its local row statistics; two all-reduces of O(chunk)
vectors give the global ones (no [N, V] tensor is ever gathered):

- ``lse = log(sum_r exp(lse_r))`` (all-reduce MAX for the shift, then SUM),
- ``sum(p * u) = sum_r exp(lse_r - lse) * (lse_r - entropy_r)``, ``entropy = lse - sum(p * u)``,
- the target logit from the rank that owns the target (all-reduce SUM; the others add 0).

Given the global statistics a slice's logits gradient is local: ``grad_weight`` (and
``grad_bias``) stay per rank, ``grad_hidden`` is a partial sum over the slice, all-reduced
unless ``VocabParallel.reduce_grad_hidden`` is False. ``grpo_kernels.plan`` makes every rank
agree on the chunking first (the statistics are collective per chunk).

Process groups cannot be custom-op arguments: they are registered here by their
``group_name`` and the ops carry the name (``options.VocabParallel.group_name``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from grpo_kernels.backends.base import RowStats

_GROUPS: Dict[str, object] = {}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_name(group) -> str:
    """Registers ``group`` (None: the default group) and returns the name the ops carry."""
    if not initialized():
        raise RuntimeError("vocab-parallel losses need an initialized torch.distributed process group")
    group = dist.group.WORLD if group is None else group
    name = group.group_name
    _GROUPS[name] = group
    return name


def resolve(name: str):
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(f"process group {name!r} was not registered with grpo_kernels.collective") from None


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


@dataclass(frozen=True)
class VocabGroup:
    """The agreed layout of one vocab-parallel call (see ``exchange``)."""

    group: object
    vocab_start: int  # this rank's first row of the lm_head
    vocab_local: int  # this rank's rows
    vocab_size: int  # V, over every rank
    chunk_rows: int  # the same on every rank
    reduce_grad_hidden: bool

    def combine(self, local: RowStats) -> RowStats:
        return combine_row_stats(local, self.group)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Global ids -> ids in this rank's slice, -1 where another rank owns the target."""
        local = targets.to(torch.int64) - self.vocab_start
        return torch.where((local >= 0) & (local < self.vocab_local), local, torch.full_like(local, -1))

    def logsumexp(self, lse_local: torch.Tensor) -> torch.Tensor:
        """The logsumexp over every rank's slice from each rank's own (any shape; two all-reduces:
        MAX for the shift, then SUM)."""
        shift = lse_local.clone()
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=self.group)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        total = torch.exp(lse_local - shift)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return shift + torch.log(total)

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, in place (every rank's partial sums over its slice)."""
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def finish_grad_hidden(self, grad_hidden: Optional[torch.Tensor]) -> None:
        if grad_hidden is not None and self.reduce_grad_hidden:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=self.group)


def exchange(name: str, vocab_start: Optional[int], vocab_local: int, n: int, hidden_size: int, n_valid: int,
             chunk_rows: int, reduce_grad_hidden: bool, device) -> VocabGroup:
    """One small all-gather of (vocab_start, V_local, n, H, unmasked tokens, chunk rows).

    Checks that the slices tile [0, V) and that the ranks agree on the tokens, and picks one
    chunk size for all. Every rank sees the same table, so a mismatch raises on every rank
    alike. ``vocab_start=None`` on every rank means "slices in rank order".
    """
    group = resolve(name)
    if vocab_start is None:
        start_code = -1
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        start_code = -2  # raised below, on every rank
    else:
        start_code = vocab_start
    mine = torch.tensor([start_code, vocab_local, n, hidden_size, n_valid, chunk_rows], dtype=torch.int64,
                        device=device)
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
    return VocabGroup(group, starts[rank], vocab_local, end, min(m[5] for m in meta), reduce_grad_hidden)


def refuse_dtensors(taker: str, tensors: dict) -> None:
    """Raises a TypeError naming the first DTensor among ``tensors`` (name -> tensor or None), which
    ``taker`` (the function, in the message) takes as local tensors only: a DTensor (e.g. a
    ColwiseParallel head) would reach the sweep's matmuls as a distributed operand."""
    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor

    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise TypeError(f"{name} is a DTensor: {taker} takes local tensors; pass {name}.to_local() "
                            "with process_group= and vocab_start= (docs/distributed.md)")


def local_operands(hidden, weight, bias, group, reduce_grad_hidden):
    """DTensor operands to local tensors: a vocab-sharded lm_head (``Shard(0)`` on a 1-D mesh,
    as ``ColwiseParallel`` leaves it) gives its local rows and its mesh's group; a replicated
    hidden gives its local copy whose gradient DTensor reduces (so we do not). Returns
    ``(hidden, weight, bias, group, reduce_grad_hidden, sharded)``."""
    try:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    except ImportError:
        return hidden, weight, bias, group, reduce_grad_hidden, False
    sharded = False
    if isinstance(weight, DTensor):
        mesh = weight.device_mesh
        if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"a DTensor lm_head must be Shard(0) on a 1-D mesh, got {weight.placements} on {mesh}")
        group = mesh.get_group() if group is None else group
        weight = weight.to_local()
        sharded = True
        if isinstance(bias, DTensor):
            bias = bias.to_local()
    if isinstance(hidden, DTensor):
        if any(not isinstance(pl, Replicate) for pl in hidden.placements):
            raise ValueError(f"a DTensor hidden must be replicated, got {hidden.placements}")
        hidden = hidden.to_local(grad_placements=[Partial() for _ in hidden.placements])
        reduce_grad_hidden = False
    return hidden, weight, bias, group, reduce_grad_hidden, sharded

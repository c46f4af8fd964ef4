"""Distributed training helpers on ``torch.distributed``: data parallelism and vocab-parallel TP.

Data parallelism (DDP, FSDP2 ``fully_shard``)
    Every rank calls ``grpo_kernels.grpo_loss`` on its share of the batch. The loss types that
    normalize per row or per rank (grpo, sapo, luspo, bnpo, dr_grpo) need nothing more: the
    wrapper averages gradients over ranks, exactly as TRL's per-process losses are averaged.
    dapo and cispo divide by a token count that must be global: pass
    ``num_items_in_batch=global_num_items(mask, divide_by_world_size=True)``. TRL takes the
    ``top_entropy_quantile`` threshold over every rank's tokens: ``global_high_entropy_mask``.
    Under FSDP2 the lm_head weight read outside its FSDP unit's forward may be the sharded
    ``DTensor``: wrap it in ``lm_head_weight`` (docs/distributed.md).

Vocab-parallel tensor parallelism
    ``grpo_loss`` and ``token_logprobs`` take ``process_group=`` and ``vocab_start=``
    (docs/distributed.md; the collectives are in ``grpo_kernels.collective``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from grpo_kernels import validation as check
from grpo_kernels.collective import combine_row_stats, initialized

__all__ = [
    "global_num_items",
    "global_high_entropy_mask",
    "lm_head_weight",
    "combine_row_stats",
]


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
    if not initialized():
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
    if initialized():
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
    return ((entropy.detach() * mask.to(entropy.dtype)) >= threshold) & m  # TRL: entropies * mask.float()


def lm_head_weight(weight: torch.Tensor, *, grad_reduction: str = "avg") -> torch.Tensor:
    """The full lm_head weight for ``grpo_loss`` when it is a sharded ``DTensor`` parameter.

    Under FSDP2 a parameter is a plain (unsharded) tensor only while its module's forward
    runs; called outside it (the usual "model returns hidden states, the loss takes
    ``model.lm_head.weight``" pattern) the weight is the sharded DTensor. This all-gathers it
    (``DTensor.full_tensor``) and declares the incoming gradient a per-rank *partial* one,
    so its backward is a reduce-scatter: ``grad_reduction="avg"`` averages over the mesh like
    FSDP2 does for every other parameter, ``"sum"`` sums. A plain tensor is returned as is.

    Prefer computing the loss inside the module's forward (docs/distributed.md): FSDP2 then
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

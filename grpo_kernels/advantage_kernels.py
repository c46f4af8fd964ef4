"""The public ``group_advantages``: ``advantages``' checks and TRL's formula, with the group
normalization run by a backend's kernel on request (``backend=``).

It sits above both ``advantages`` (checks, torch formulas; imports no backend) and ``backends``
(the ``group_normalize`` kernels), so that the advantage layer never imports upward.
"""
from __future__ import annotations

from typing import Union

import torch

from grpo_kernels.advantages import group_advantages_inputs
from grpo_kernels.backends import get_backend
from grpo_kernels.epilogue import accumulation_dtype, sum_then_normalize

__all__ = ["group_advantages"]


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale_rewards: Union[str, bool] = "group",
    weights=None,
    eps: float = 1e-4,
    backend: str = "torch",
) -> torch.Tensor:
    """GRPO advantages [B] from outcome rewards, as TRL 1.16.0 (``sum_then_normalize``).

    Args:
        rewards: [B] or [B, K] float: the reward of each of B completions under each of K reward
            functions; NaN means "this function did not score this completion" (TRL's None).
            Rows ``g*G .. g*G+G-1`` are the G completions of prompt g. Must not contain inf.
        num_generations: G, an int >= 1 dividing B.
        scale_rewards: "group" (divide by the group's std), "batch" (by the whole batch's std),
            "none" (no division); True -> "group", False -> "none", as ``GRPOConfig``.
        weights: K weights (list/tuple/1-D tensor); None -> all 1.
        eps: added to the std before dividing (TRL uses 1e-4); >= 0.
        backend: "torch" (or "reference"): ``advantages.normalize_groups``; any other name ("auto",
            "triton", "cpp", "cuda"): that backend's ``group_normalize`` kernel (the torch
            formula where it has none).

    Semantics:
        1. ``combined_i = nansum_k(w_k * r_ik)``: NaN entries are skipped (count as 0).
        2. A row whose K rewards are *all* NaN is unscorable: ``combined_i = NaN`` (as TRL 1.16,
           which sets it NaN after the nansum rather than keeping the nansum's 0), so it is
           excluded from its group's mean and std (and from the batch std) -- it does not pull
           the baseline towards 0.
        3. ``advantages.normalize_groups`` on ``combined`` (see its docstring for the exact formula).
        4. An unscorable row's advantage is 0 (``normalize_groups`` already maps NaN -> 0; it is
           forced again here whatever the backend returns).

    Returns:
        advantages [B], float32 (float64 for float64 rewards), on rewards' device.
    """
    rewards, num_generations, mode, eps, weights = group_advantages_inputs(rewards, num_generations, scale_rewards,
                                                                           weights, eps)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    kernel = None
    if backend not in ("torch", "reference"):
        kernel = get_backend(backend, rewards.device, accumulation_dtype(rewards.dtype)).group_normalize
    return sum_then_normalize(rewards, weights, num_generations, mode, eps, kernel)

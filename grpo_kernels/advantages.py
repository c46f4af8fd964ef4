"""Advantages for GRPO: TRL 1.16.0's group normalization, process supervision, KL-in-reward.

The public functions and the normalization primitive that the Triton and C++/CUDA
backends implement as kernels (``RowBackend.group_normalize``, :func:`normalize_groups` elsewhere):

- ``group_advantages`` (``grpo_kernels.group_advantages``, defined in ``advantage_kernels`` with its
  ``backend=`` choice; its checks are :func:`group_advantages_inputs`): outcome rewards [B] or
  [B, K] -> advantages [B], exactly as ``GRPOTrainer._generate_and_score_completions`` with
  ``multi_objective_aggregation="sum_then_normalize"`` (the default).
- :func:`process_advantages`: DeepSeekMath process supervision, step rewards -> token advantages.
- :func:`kl_penalized_rewards`: reward minus ``kl_coef * sum_t k3``.

The formulas the kernels mirror are the epilogue contract's (``epilogue.group_normalize``,
``epilogue.sum_then_normalize``); this module checks the arguments. Every computation runs in the
*accumulation dtype* (``epilogue.accumulation_dtype``): float64 for float64 inputs, float32 for every
other float dtype (float16 / bfloat16 / float32); the results are returned in that dtype.

Standard deviation convention (used everywhere in this module, as TRL's ``trl.trainer.utils.nanstd``):
the unbiased sample standard deviation (Bessel's correction, divisor ``n - 1``) over the non-NaN
entries only, and NaN when fewer than two entries are non-NaN.
"""
from __future__ import annotations

from typing import Union

import torch

from grpo_kernels import epilogue
from grpo_kernels.checks import (FLOAT_DTYPES, INT_DTYPES, check_float_tensor, check_int, check_num_generations,
                                 check_real, no_inf, same_device_as, scale_mode, weights_tensor)
from grpo_kernels.epilogue import accumulation_dtype, nanstd

__all__ = ["normalize_groups", "group_advantages_inputs", "process_advantages", "kl_penalized_rewards"]


# ----------------------------------------------------------------------------- group normalization


def normalize_groups(rewards: torch.Tensor, num_generations: int, scale_rewards: str, eps: float) -> torch.Tensor:
    """Group-normalized advantages from combined rewards: TRL 1.16.0's formula, exactly.

    This is the semantics every backend's ``group_normalize`` kernel must reproduce.

    Inputs: ``rewards`` [B] float, where NaN marks an *unscorable* completion (every reward
    function returned None); ``num_generations`` G >= 1 dividing B; ``scale_rewards`` in
    {"group", "batch", "none"} (True -> "group", False -> "none"); ``eps`` >= 0.

    Let ``acc`` be float64 for float64 rewards and float32 otherwise; every step below runs in
    ``acc`` and the result [B] has dtype ``acc``. Rows ``g*G .. g*G+G-1`` form group ``g``.
    For a set S of rows let ``V(S)`` be its non-NaN rewards and ``n = |V(S)|``:

    - ``mean(S) = sum(V(S)) / n``                       (NaN when n == 0)
    - ``std(S)  = sqrt(sum((v - mean(S))**2 for v in V(S)) / (n - 1))``   (NaN when n <= 1)

      i.e. the unbiased (Bessel-corrected) sample std over the non-NaN entries, as
      ``trl.trainer.utils.nanstd`` computes it (``nanmean((x - mean)**2) * n / (n - 1)``).

    Per row i in group g:

    - ``mu_i = mean(group g)``  (always the *group* mean, in every mode)
    - ``"group"``: ``sigma_i = std(group g)``, except ``sigma_i = 0`` when G == 1.
    - ``"batch"``: ``sigma_i = std(all B rows)`` (deviations from the *batch* mean), except
      ``sigma_i = 0`` when B == 1.
    - ``"none"``: no division.
    - ``a_i = r_i - mu_i`` for "none", else ``a_i = (r_i - mu_i) / (sigma_i + eps)``.
    - finally ``a_i = nan_to_num(a_i)``: NaN -> 0, +inf -> finfo(acc).max, -inf -> -finfo(acc).max
      (TRL's ``torch.nan_to_num(advantages, nan=0.0)``).

    Consequences: an unscorable row (NaN reward) is excluded from its group's mean and std and gets
    advantage 0; a group with fewer than two scorable rows gets advantage 0 on every row under
    "group" (its std is NaN), but ``r_i - mu_i`` (= 0 for its one scorable row) under "none"; a group
    whose rewards are all equal gets ``0 / eps = 0``.
    """
    rewards = check_float_tensor("rewards", rewards, (1,))
    num_generations = check_num_generations(num_generations, rewards.shape[0], "rewards")
    return epilogue.group_normalize(rewards, num_generations, scale_mode(scale_rewards), check_real("eps", eps, 0.0))


def group_advantages_inputs(rewards: torch.Tensor, num_generations: int, scale_rewards: Union[str, bool],
                            weights, eps: float):
    """``group_advantages``' arguments checked (the public function, with its ``backend=``, is
    ``grpo_kernels.advantage_kernels.group_advantages``; its docstring states the semantics):
    (rewards, G, mode "group" / "batch" / "none", eps, weights [K] in the accumulation dtype or None),
    ready for ``epilogue.sum_then_normalize``."""
    rewards = check_float_tensor("rewards", rewards, (1, 2))
    num_generations = check_num_generations(num_generations, rewards.shape[0], "rewards")
    mode = scale_mode(scale_rewards)
    eps = check_real("eps", eps, 0.0)
    no_inf("rewards", rewards)
    K = 1 if rewards.dim() == 1 else rewards.shape[1]
    weights = weights_tensor(weights, K, accumulation_dtype(rewards.dtype), rewards.device)
    return rewards, num_generations, mode, eps, weights


# ----------------------------------------------------------------------------- process supervision


def process_advantages(
    step_rewards: torch.Tensor,
    step_ends: torch.Tensor,
    num_generations: int,
    completion_length: int,
    *,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Token advantages [B, T] from per-step rewards: DeepSeekMath process supervision.

    Args:
        step_rewards: [B, S] float; ``step_rewards[i, j]`` is the reward of step j of completion i,
            NaN where completion i has no step j (padding). Must not contain inf.
        step_ends: [B, S] integer; the index (in [0, completion_length)) of the last token of each
            step. Ignored (any value allowed, e.g. -1) where the step reward is NaN.
        num_generations: G, an int >= 1 dividing B; rows ``g*G .. g*G+G-1`` form group g.
        completion_length: T, an int >= 1, the number of completion tokens (columns of the result).
        eps: >= 0, added to the std.

    Semantics (accumulation dtype: float64 for float64 step rewards, else float32):
        For group g, let R_g be the rewards of every valid (non-NaN) step of every completion of
        the group, ``mean_g`` their mean and ``std_g`` their *unbiased* sample std (divisor
        ``|R_g| - 1``: the same convention as TRL's group normalization, ``nanstd``). Each valid
        step gets ``n_ij = (r_ij - mean_g) / (std_g + eps)``; then every NaN is mapped to 0 (as TRL
        does for its advantages), so a group with fewer than two valid steps gets 0 everywhere.
        The advantage of token t of completion i is ``A_it = sum_j n_ij * [step_ends_ij >= t]``:
        the sum over the steps ending at or after t. Tokens after the last step's end get 0.
        Steps need not be sorted; several steps may end at the same token.

    Returns:
        advantages [B, completion_length].
    """
    step_rewards = check_float_tensor("step_rewards", step_rewards, (2,))
    if not isinstance(step_ends, torch.Tensor):
        raise TypeError(f"step_ends must be a torch.Tensor, got {type(step_ends).__name__}")
    if step_ends.dtype not in INT_DTYPES:
        raise TypeError(f"step_ends must be an integer tensor of token indices, got {step_ends.dtype}")
    if tuple(step_ends.shape) != tuple(step_rewards.shape):
        raise ValueError(
            f"step_ends must have the shape of step_rewards {tuple(step_rewards.shape)}, got {tuple(step_ends.shape)}"
        )
    same_device_as("step_ends", step_ends, "step_rewards", step_rewards)
    num_generations = check_num_generations(num_generations, step_rewards.shape[0], "step_rewards")
    T = check_int("completion_length", completion_length, 1)
    eps = check_real("eps", eps, 0.0)
    no_inf("step_rewards", step_rewards)

    valid = ~torch.isnan(step_rewards)
    ends = step_ends.to(torch.int64)
    if valid.any():
        used = ends[valid]
        lo, hi = int(used.min()), int(used.max())
        if lo < 0 or hi >= T:
            raise ValueError(
                f"step_ends must lie in [0, completion_length={T}) wherever the step reward is not NaN, "
                f"got values in [{lo}, {hi}]"
            )

    B, S = step_rewards.shape
    G = num_generations
    r = step_rewards.to(accumulation_dtype(step_rewards.dtype))
    grouped = r.reshape(B // G, G * S)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1).unsqueeze(1)
    normalized = torch.nan_to_num((grouped - mean) / (std + eps), nan=0.0).reshape(B, S)
    normalized = torch.where(valid, normalized, torch.zeros_like(normalized))

    # scatter each step's normalized reward onto its end token, then a reverse cumulative sum
    per_end = torch.zeros(B, T, dtype=r.dtype, device=r.device)
    per_end.scatter_add_(1, torch.where(valid, ends, torch.zeros_like(ends)), normalized)
    return per_end.flip(1).cumsum(1).flip(1)


# ----------------------------------------------------------------------------- KL in the reward


def kl_penalized_rewards(
    rewards: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """``rewards_i - kl_coef * sum_t mask_it * k3_it`` with ``k3 = exp(ref - logp) - (ref - logp) - 1``.

    Args:
        rewards: [B] float; NaN (unscored) passes through as NaN, inf is rejected.
        logps, ref_logps: [B, T] float per-token log-probs of the policy and the reference model;
            must be finite where ``mask`` is 1 (masked-out positions are ignored, even if NaN/inf).
        mask: [B, T] bool, or integer/float holding only 0 and 1.
        kl_coef: a finite float >= 0.

    Computed in float64 if any float input is float64, else float32; returns [B] in that dtype.
    Differentiable in its inputs (no in-place ops).
    """
    rewards = check_float_tensor("rewards", rewards, (1,))
    logps = check_float_tensor("logps", logps, (2,))
    ref_logps = check_float_tensor("ref_logps", ref_logps, (2,))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype in INT_DTYPES or mask.dtype in FLOAT_DTYPES):
        raise TypeError(f"mask must be a bool, integer or float tensor of 0/1, got {mask.dtype}")
    B = rewards.shape[0]
    if logps.shape[0] != B:
        raise ValueError(f"logps must have shape ({B}, T) to match rewards [{B}], got {tuple(logps.shape)}")
    for name, x in (("ref_logps", ref_logps), ("mask", mask)):
        if tuple(x.shape) != tuple(logps.shape):
            raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, got {tuple(x.shape)}")
    for name, x in (("logps", logps), ("ref_logps", ref_logps), ("mask", mask)):
        same_device_as(name, x, "rewards", rewards)
    kl_coef = check_real("kl_coef", kl_coef, 0.0)
    no_inf("rewards", rewards)
    if mask.dtype == torch.bool:
        on = mask
    else:
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1")
        on = mask != 0
    for name, x in (("logps", logps), ("ref_logps", ref_logps)):
        if on.any() and not bool(torch.isfinite(x[on]).all()):
            raise ValueError(f"{name} contains NaN or inf at unmasked positions")

    acc = accumulation_dtype(rewards.dtype, logps.dtype, ref_logps.dtype)
    lp, ref = logps.to(acc), ref_logps.to(acc)
    zero = torch.zeros((), dtype=acc, device=lp.device)
    diff = torch.where(on, ref - lp, zero)  # masked positions: diff 0 -> k3 exactly 0, no NaN leaks
    k3 = torch.exp(diff) - diff - 1
    kl = torch.where(on, k3, zero).sum(dim=1)
    return rewards.to(acc) - kl_coef * kl

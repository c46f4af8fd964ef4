"""Advantages for GRPO: TRL 1.16.0's group normalization, process supervision, KL-in-reward.

Three public functions and the normalization primitive that the Triton and C++/CUDA
backends implement as kernels (``RowBackend.group_normalize``, :func:`normalize_groups` elsewhere):

- :func:`group_advantages`: outcome rewards [B] or [B, K] -> advantages [B], exactly as
  ``GRPOTrainer._generate_and_score_completions`` with ``multi_objective_aggregation=
  "sum_then_normalize"`` (the default).
- :func:`process_advantages`: DeepSeekMath process supervision, step rewards -> token advantages.
- :func:`kl_penalized_rewards`: reward minus ``kl_coef * sum_t k3``.

Every computation runs in the *accumulation dtype*: float64 for float64 inputs, float32 for every
other float dtype (float16 / bfloat16 / float32); the results are returned in that dtype.

Standard deviation convention (used everywhere in this module, as TRL's ``trl.trainer.utils.nanstd``):
the unbiased sample standard deviation (Bessel's correction, divisor ``n - 1``) over the non-NaN
entries only, and NaN when fewer than two entries are non-NaN.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["normalize_groups", "group_advantages", "process_advantages", "kl_penalized_rewards"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SCALE_MODES = ("group", "batch", "none")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ----------------------------------------------------------------------------- argument checks


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def _check_float_tensor(name: str, x, ndims: Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_real(name: str, value, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_num_generations(num_generations, batch: int, rewards_name: str) -> int:
    num_generations = _check_int("num_generations", num_generations, 1)
    if batch % num_generations != 0:
        raise ValueError(
            f"num_generations ({num_generations}) must divide the batch size of {rewards_name} ({batch}): "
            "rows come in consecutive groups of num_generations completions of one prompt"
        )
    return num_generations


def _scale_mode(scale_rewards) -> str:
    """TRL's ``scale_rewards``: "group" | "batch" | "none", with True -> "group", False -> "none"."""
    if isinstance(scale_rewards, bool):
        return "group" if scale_rewards else "none"
    if not isinstance(scale_rewards, str):
        raise TypeError(
            f"scale_rewards must be one of {_SCALE_MODES} (or True/False), got {type(scale_rewards).__name__}"
        )
    if scale_rewards not in _SCALE_MODES:
        raise ValueError(f"scale_rewards must be one of {_SCALE_MODES} (or True/False), got {scale_rewards!r}")
    return scale_rewards


def _no_inf(name: str, x: torch.Tensor) -> None:
    if x.numel() and bool(torch.isinf(x).any()):
        raise ValueError(f"{name} contains inf; only finite values (and NaN for 'unscored') are allowed")


def _same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}: use one device")


# ----------------------------------------------------------------------------- statistics


def _nanstd(x: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """TRL's ``nanstd``: unbiased std over the non-NaN entries, NaN when fewer than 2 of them.

    Same operations as ``trl.trainer.utils.nanstd`` (so float32 results agree bit for bit), except
    that the Bessel factor ``n / (n - 1)`` is formed in ``x``'s dtype: TRL forms it from an int64
    count with true division, i.e. in torch's default dtype (float32), which only matters for
    float64 inputs (TRL itself always normalizes float32 rewards).
    """
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True) if keep else torch.nanmean(x)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) if keep else torch.nanmean((x - mean) ** 2)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if keep else (~torch.isnan(x)).sum()
    count = count.to(x.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze(dim) if keep else std


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
    rewards = _check_float_tensor("rewards", rewards, (1,))
    num_generations = _check_num_generations(num_generations, rewards.shape[0], "rewards")
    mode = _scale_mode(scale_rewards)
    eps = _check_real("eps", eps, 0.0)

    r = rewards.to(_acc_dtype(rewards.dtype))
    B, G = r.shape[0], num_generations
    grouped = r.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G, dim=0)
    advantages = r - mean
    if mode != "none":
        if mode == "group":
            std = _nanstd(grouped, dim=1).repeat_interleave(G, dim=0) if G > 1 else torch.zeros_like(r)
        else:
            std = _nanstd(r).expand_as(r) if B > 1 else torch.zeros_like(r)
        advantages = advantages / (std + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def _combine_rewards(rewards: torch.Tensor, weights: Optional[torch.Tensor]):
    """[B] or [B, K] rewards and checked [K] weights (None: all 1) -> (weighted nansum [B] in the
    accumulation dtype with NaN for all-NaN rows, the bool mask [B] of those unscorable rows)."""
    r = rewards if rewards.dim() == 2 else rewards.unsqueeze(1)
    K = r.shape[1]
    acc = _acc_dtype(rewards.dtype)
    r = r.to(acc)
    w = torch.ones(K, dtype=acc, device=r.device) if weights is None else weights.to(device=r.device, dtype=acc)
    unscorable = torch.isnan(r).all(dim=1)
    combined = (r * w.unsqueeze(0)).nansum(dim=1)
    return torch.where(unscorable, torch.full_like(combined, float("nan")), combined), unscorable


def _weights_tensor(weights, K: int, dtype: torch.dtype, device, name: str = "weights",
                    check_values: bool = True) -> Optional[torch.Tensor]:
    """The K reward-function weights (list/tuple/1-D tensor) as a [K] ``dtype`` tensor on ``device``,
    checked; None stays None (all 1). ``check_values``: the finiteness check, which reads them."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one weight per reward function), got shape {tuple(weights.shape)}")
        if weights.dtype == torch.bool or not (weights.is_floating_point() or weights.dtype in _INT_DTYPES):
            raise TypeError(f"{name} must hold real numbers, got {weights.dtype}")
        w = weights.detach().to(device=device, dtype=dtype)
    elif isinstance(weights, (list, tuple)):
        if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in weights):
            raise TypeError(f"{name} must be a sequence of real numbers (one weight per reward function)")
        w = torch.tensor([float(x) for x in weights], dtype=dtype, device=device)
    else:
        raise TypeError(f"{name} must be a list/tuple of floats or a 1-D tensor, got {type(weights).__name__}")
    if w.numel() != K:
        raise ValueError(
            f"{name} must have one entry per reward function: rewards has K={K} "
            f"(columns of a [B, K] tensor; 1 for [B]), {name} has {w.numel()}"
        )
    if check_values and w.numel() and w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite")
    return w


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
        backend: "torch" (or "reference"): :func:`normalize_groups`; any other name ("auto",
            "triton", "cpp", "cuda"): that backend's ``group_normalize`` kernel (the torch
            formula where it has none).

    Semantics:
        1. ``combined_i = nansum_k(w_k * r_ik)``: NaN entries are skipped (count as 0).
        2. A row whose K rewards are *all* NaN is unscorable: ``combined_i = NaN`` (as TRL 1.16,
           which sets it NaN after the nansum rather than keeping the nansum's 0), so it is
           excluded from its group's mean and std (and from the batch std) -- it does not pull
           the baseline towards 0.
        3. :func:`normalize_groups` on ``combined`` (see its docstring for the exact formula).
        4. An unscorable row's advantage is 0 (``normalize_groups`` already maps NaN -> 0; it is
           forced again here whatever the backend returns).

    Returns:
        advantages [B], float32 (float64 for float64 rewards), on rewards' device.
    """
    rewards = _check_float_tensor("rewards", rewards, (1, 2))
    num_generations = _check_num_generations(num_generations, rewards.shape[0], "rewards")
    mode = _scale_mode(scale_rewards)
    eps = _check_real("eps", eps, 0.0)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    _no_inf("rewards", rewards)
    acc = _acc_dtype(rewards.dtype)
    weights = _weights_tensor(weights, 1 if rewards.dim() == 1 else rewards.shape[1], acc, rewards.device)
    kernel = None
    if backend not in ("torch", "reference"):
        from grpo_kernels.backends import get_backend

        kernel = get_backend(backend, rewards.device, acc).group_normalize
    return sum_then_normalize(rewards, weights, num_generations, mode, eps, kernel)


def sum_then_normalize(rewards: torch.Tensor, weights: Optional[torch.Tensor], num_generations: int, mode: str,
                       eps: float, group_normalize: Optional[Callable] = None) -> torch.Tensor:
    """:func:`group_advantages`' formula on inputs already checked as it checks them (``weights``: a
    [K] tensor or None; ``mode``: "group" / "batch" / "none"), without the checks and their reads of
    the values; ``group_normalize``: a backend's kernel (default :func:`normalize_groups`)."""
    combined, unscorable = _combine_rewards(rewards, weights)
    advantages = (group_normalize or normalize_groups)(combined, num_generations, mode, eps)
    return torch.where(unscorable, torch.zeros_like(advantages), advantages)


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
    step_rewards = _check_float_tensor("step_rewards", step_rewards, (2,))
    if not isinstance(step_ends, torch.Tensor):
        raise TypeError(f"step_ends must be a torch.Tensor, got {type(step_ends).__name__}")
    if step_ends.dtype not in _INT_DTYPES:
        raise TypeError(f"step_ends must be an integer tensor of token indices, got {step_ends.dtype}")
    if tuple(step_ends.shape) != tuple(step_rewards.shape):
        raise ValueError(
            f"step_ends must have the shape of step_rewards {tuple(step_rewards.shape)}, got {tuple(step_ends.shape)}"
        )
    _same_device("step_ends", step_ends, "step_rewards", step_rewards)
    num_generations = _check_num_generations(num_generations, step_rewards.shape[0], "step_rewards")
    T = _check_int("completion_length", completion_length, 1)
    eps = _check_real("eps", eps, 0.0)
    _no_inf("step_rewards", step_rewards)

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
    r = step_rewards.to(_acc_dtype(step_rewards.dtype))
    grouped = r.reshape(B // G, G * S)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = _nanstd(grouped, dim=1).unsqueeze(1)
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
    rewards = _check_float_tensor("rewards", rewards, (1,))
    logps = _check_float_tensor("logps", logps, (2,))
    ref_logps = _check_float_tensor("ref_logps", ref_logps, (2,))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype == torch.bool or mask.dtype in _INT_DTYPES or mask.dtype in _FLOAT_DTYPES):
        raise TypeError(f"mask must be a bool, integer or float tensor of 0/1, got {mask.dtype}")
    B = rewards.shape[0]
    if logps.shape[0] != B:
        raise ValueError(f"logps must have shape ({B}, T) to match rewards [{B}], got {tuple(logps.shape)}")
    for name, x in (("ref_logps", ref_logps), ("mask", mask)):
        if tuple(x.shape) != tuple(logps.shape):
            raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, got {tuple(x.shape)}")
    for name, x in (("logps", logps), ("ref_logps", ref_logps), ("mask", mask)):
        _same_device(name, x, "rewards", rewards)
    kl_coef = _check_real("kl_coef", kl_coef, 0.0)
    _no_inf("rewards", rewards)
    if mask.dtype == torch.bool:
        on = mask
    else:
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1")
        on = mask != 0
    for name, x in (("logps", logps), ("ref_logps", ref_logps)):
        if on.any() and not bool(torch.isfinite(x[on]).all()):
            raise ValueError(f"{name} contains NaN or inf at unmasked positions")

    acc = _acc_dtype(rewards.dtype, logps.dtype, ref_logps.dtype)
    lp, ref = logps.to(acc), ref_logps.to(acc)
    zero = torch.zeros((), dtype=acc, device=lp.device)
    diff = torch.where(on, ref - lp, zero)  # masked positions: diff 0 -> k3 exactly 0, no NaN leaks
    k3 = torch.exp(diff) - diff - 1
    kl = torch.where(on, k3, zero).sum(dim=1)
    return rewards.to(acc) - kl_coef * kl

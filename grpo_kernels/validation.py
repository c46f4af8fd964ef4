"""Argument checks for the public API: clear TypeError/ValueError naming the argument.

Two kinds of checks:

- structural (type, layout, rank, shape, dtype, device): always, they cost nothing;
- value checks (NaN/inf, token ids in range, signs): they read tensors back to the host,
  so they are skipped while ``torch.compile`` traces and for tensors without data
  (the ``meta`` device, used for shape-only runs).

docs/errors.md lists every check with its error type and message (tests/test_docs.py holds the two together).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from grpo_kernels import checks
from grpo_kernels.epilogue import accumulation_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def value_checks_enabled(x: Optional[torch.Tensor] = None) -> bool:
    """Whether a value check may read ``x`` back: not while torch.compile traces, and
    never for tensors that hold no data (meta)."""
    if torch.compiler.is_compiling():
        return False
    return x is None or x.device.type != "meta"


def tensor(name: str, x, *, ndim: Optional[Sequence[int]] = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or getattr(x, "is_nested", False):
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if ndim is not None and x.dim() not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    return x


def same_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but hidden is on {device}: move every tensor to one device")


def shape(name: str, x: torch.Tensor, expected, what: str = "") -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{what}, got {tuple(x.shape)}")


def _select(x: torch.Tensor, where: Optional[torch.Tensor]) -> torch.Tensor:
    if where is None:
        return x
    return x[where] if where.shape == x.shape else x[where.expand_as(x)]


def finite(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    if not value_checks_enabled(x) or x.numel() == 0:
        return
    if where is None and x.is_floating_point():
        # one reduction and no temporary: a NaN or inf anywhere makes the sum non-finite, so a
        # finite sum proves the tensor finite. isfinite() on a bf16 [V, H] weight allocates ~5
        # bytes per element (3 GB at V=151936, H=4096); only a non-finite sum (which could
        # also be an overflow of huge finite values) pays for the exact check below.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(x.sum(dtype=acc))):
            return
    if not bool(torch.isfinite(_select(x, where)).all()):
        scope = "" if where is None else " at unmasked positions"
        raise ValueError(f"{name} contains NaN or inf{scope}")


def nonnegative(name: str, x: torch.Tensor, what: str = "") -> None:
    if not value_checks_enabled(x) or x.numel() == 0:
        return
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0{what}, got min {float(x.min())}")


def count(name: str, value, *, positive: bool = False) -> Optional[torch.Tensor]:
    """A per-step count (num_items_in_batch, num_sequences_in_batch) as a float64 [] tensor (it
    stays a tensor under torch.compile: no recompiles, no graph break), checked when values can
    be read: finite and >= 0, or with ``positive`` (TRL's distillation divides by it unclamped) a
    finite number > 0."""
    if value is None:
        return None
    shown = value  # the messages show the value as given
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got {value.dtype}")
        value = value.detach().reshape(()).to(torch.float64)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        value = torch.ones((), dtype=torch.float64) * value
    if value_checks_enabled(value):
        v = float(value)
        finite = v == v and v not in (float("inf"), float("-inf"))
        if positive:
            if not (finite and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
            return value
        shown = shown if not isinstance(shown, torch.Tensor) else v
        if not finite:
            raise ValueError(f"{name} must be finite, got {shown}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {shown}")
    return value


def token_id_dtype(name: str, targets: torch.Tensor) -> None:
    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of token ids (int64/int32/int16/int8/uint8), "
                        f"got {targets.dtype}")


def token_ids(name: str, targets: torch.Tensor, vocab: int, where: Optional[torch.Tensor] = None) -> None:
    """Integer dtype always; ids in [0, vocab) where ``where`` is true (everywhere without it)."""
    token_id_dtype(name, targets)
    if not value_checks_enabled(targets) or targets.numel() == 0:
        return
    vals = _select(targets, where)
    if vals.numel() and (bool((vals < 0).any()) or bool((vals >= vocab).any())):
        scope = "" if where is None else " at unmasked positions"
        raise ValueError(
            f"{name} holds token ids outside [0, {vocab}){scope} (min {int(vals.min())}, max {int(vals.max())})"
        )


def lm_head(hidden: torch.Tensor, weight, bias) -> None:
    """weight [V, H] (and bias [V]) against hidden [..., H]: dtype, device, shape, finiteness."""
    tensor("weight", weight, ndim=(2,), floating=True)
    same_device("weight", weight, hidden.device)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if weight.shape[1] == 0:
        raise ValueError("hidden and weight have an empty hidden size (H = 0)")
    if bias is not None:
        tensor("bias", bias, ndim=(1,), floating=True)
        same_device("bias", bias, hidden.device)
        shape("bias", bias, (weight.shape[0],), " ([V])")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
    finite("weight", weight)
    if bias is not None:
        finite("bias", bias)


def second_head(hidden: torch.Tensor, weight: torch.Tensor, other_hidden, other_weight, other_bias, *,
                prefix: str, roles: str) -> None:
    """A second model's head on the same tokens and vocabulary (distillation's teacher, GRPO's exact-KL
    reference), named ``{prefix}_hidden`` [B, T, H_o], ``{prefix}_weight`` [V, H_o] (V: ``weight``'s) and
    ``{prefix}_bias`` [V] (or None): any hidden width, its own float dtype shared by the three, same
    device as ``hidden`` [B, T, H], finite. ``roles`` ("the student and the teacher") names the two
    models in the vocabulary mismatch's message."""
    nh, nw, nb = f"{prefix}_hidden", f"{prefix}_weight", f"{prefix}_bias"
    tensor(nh, other_hidden, ndim=(3,), floating=True)
    same_device(nh, other_hidden, hidden.device)
    if other_hidden.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"{nh} must be [B, T, H_{prefix[0]}] with [B, T] = {tuple(hidden.shape[:2])} "
                         f"(hidden's), got {tuple(other_hidden.shape)}")
    tensor(nw, other_weight, ndim=(2,), floating=True)
    same_device(nw, other_weight, hidden.device)
    if other_weight.dtype != other_hidden.dtype:
        raise TypeError(f"{nw} dtype {other_weight.dtype} must match {nh} dtype {other_hidden.dtype}")
    if other_weight.shape[1] != other_hidden.shape[-1] or other_weight.shape[1] == 0:
        raise ValueError(f"{nw} must be [V, H_{prefix[0]}] with H_{prefix[0]} = {nh}.shape[-1] = "
                         f"{other_hidden.shape[-1]} > 0, got {tuple(other_weight.shape)}")
    if other_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"{nw} has V = {other_weight.shape[0]} rows but weight has V = {weight.shape[0]}: "
                         f"{roles} must share one vocabulary")
    if other_bias is not None:
        tensor(nb, other_bias, ndim=(1,), floating=True)
        same_device(nb, other_bias, hidden.device)
        shape(nb, other_bias, (weight.shape[0],), " ([V])")
        if other_bias.dtype != other_hidden.dtype:
            raise TypeError(f"{nb} dtype {other_bias.dtype} must match {nh} dtype {other_hidden.dtype}")
    for name, x in ((nw, other_weight), (nb, other_bias), (nh, other_hidden)):
        if x is not None:
            finite(name, x)


class GRPOBatch(NamedTuple):
    """The per-token inputs of a GRPO loss after checking, padding junk replaced by 0."""

    keep: torch.Tensor  # [B, T] bool
    targets: torch.Tensor  # [B, T] int64
    advantages: Optional[torch.Tensor]  # [B, 1] or [B, T] (None: from rewards)
    old_logps: Optional[torch.Tensor]
    ref_logps: Optional[torch.Tensor]
    importance_sampling_ratio: Optional[torch.Tensor]  # [B, 1] or [B, T]


def grpo_batch(hidden, mask, targets, advantages, old_logps, ref_logps, importance_sampling_ratio,
               beta: float, vocab: Optional[int]) -> GRPOBatch:
    """Checks everything but hidden's own structure and the lm_head (already checked), in the
    order docs/errors.md lists. ``vocab=None`` leaves the token-id range to the caller
    (vocab-parallel callers know the global vocabulary only later)."""
    B, T, _ = hidden.shape
    dev = hidden.device
    tensor("mask", mask, ndim=(2,))
    same_device("mask", mask, dev)
    shape("mask", mask, (B, T), " ([B, T])")
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real numeric, got {mask.dtype}")
    if mask.dtype != torch.bool:
        if torch.is_floating_point(mask):
            finite("mask", mask)
        nonnegative("mask", mask, " (a 0/1 completion mask, or non-negative token weights)")
    keep = mask != 0
    tensor("targets", targets, ndim=(2,))
    same_device("targets", targets, dev)
    shape("targets", targets, (B, T), " ([B, T])")
    if vocab is not None:
        # ids are checked at unmasked positions only: padding may hold anything (-100, pad ids)
        token_ids("targets", targets, vocab, where=keep)
    if advantages is not None:  # None: computed from rewards (checked by ``rewards`` below)
        tensor("advantages", advantages, ndim=(1, 2), floating=True)
        same_device("advantages", advantages, dev)
        if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
            raise ValueError(f"advantages must have shape ({B},), ({B}, 1) or ({B}, {T}), "
                             f"got {tuple(advantages.shape)}")
        finite("advantages", advantages)
        if advantages.dim() == 1:  # per sequence: [B, 1], the objective's broadcastable form
            advantages = advantages.unsqueeze(1)
    finite("hidden", hidden)
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if x is None:
            continue
        tensor(name, x, ndim=(2,), floating=True)
        same_device(name, x, dev)
        shape(name, x, (B, T), " ([B, T])")
        finite(name, x, where=keep)
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={beta})")
    ratio = importance_sampling_ratio
    if ratio is not None:
        tensor("importance_sampling_ratio", ratio, ndim=(1, 2), floating=True)
        same_device("importance_sampling_ratio", ratio, dev)
        if tuple(ratio.shape) not in ((B, T), (B, 1), (B,)):
            raise ValueError(
                f"importance_sampling_ratio must have shape ({B}, {T}), ({B}, 1) or ({B},), got {tuple(ratio.shape)}"
            )
        finite("importance_sampling_ratio", ratio)
        nonnegative("importance_sampling_ratio", ratio)
        if ratio.dim() == 1:
            ratio = ratio.unsqueeze(1)
    # padding positions may hold junk (out-of-range ids, inf logps): neutral values from here on,
    # so no path (the oracle, sequence-level sums, the metrics) can pick them up
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    targets = torch.where(keep, targets.to(torch.int64), zero)
    old_logps = None if old_logps is None else torch.where(keep, old_logps, zero.to(old_logps.dtype))
    ref_logps = None if ref_logps is None else torch.where(keep, ref_logps, zero.to(ref_logps.dtype))
    return GRPOBatch(keep, targets, advantages, old_logps, ref_logps, ratio)


def rewards(x, weights, hidden, num_generations):
    """grpo_loss's ``rewards`` [B] or [B, R] (NaN: unscored; no inf) and ``reward_weights`` (R
    numbers: list, tuple or 1-D tensor; None: all 1) with ``num_generations`` dividing B, checked as
    ``advantages.group_advantages`` checks them. Returns (rewards, weights as a [R] tensor or None)."""
    B = hidden.shape[0]
    x = checks.check_float_tensor("rewards", x, (1, 2))
    tensor("rewards", x)
    same_device("rewards", x, hidden.device)
    if x.shape[0] != B:
        raise ValueError(f"rewards must have one row per sequence of hidden ([{B}] or [{B}, R]), "
                         f"got shape {tuple(x.shape)}")
    if num_generations is None:
        raise ValueError("num_generations is required with rewards (rows come in consecutive groups of "
                         "num_generations completions of one prompt)")
    checks.check_num_generations(num_generations, B, "rewards")
    if value_checks_enabled(x):
        checks.no_inf("rewards", x)
    R = 1 if x.dim() == 1 else x.shape[1]
    w = checks.weights_tensor(weights, R, accumulation_dtype(x.dtype), x.device, name="reward_weights",
                            check_values=value_checks_enabled(x))
    return x, w


def sampling_logps(x, keep: torch.Tensor, threshold) -> Optional[torch.Tensor]:
    """TRL's ``sampling_per_token_logps`` [B, T]: NaN allowed (a token the sampler could not
    score), +-inf not, at unmasked positions; padding set to 0. Only read with
    ``off_policy_mask_threshold``: given without it is an error, not silently ignored."""
    if x is None:
        return None
    if threshold is None:
        raise ValueError("sampling_logps is given but off_policy_mask_threshold is None (it is read only by "
                         "the off-policy mask)")
    tensor("sampling_logps", x, ndim=(2,), floating=True)
    same_device("sampling_logps", x, keep.device)
    shape("sampling_logps", x, keep.shape, " ([B, T])")
    if value_checks_enabled(x) and bool(torch.isinf(_select(x, keep)).any()):
        raise ValueError("sampling_logps contains inf at an unmasked position (NaN marks an unscored token)")
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))

"""Argument checks for the public API: clear TypeError/ValueError naming the argument.

Two kinds of checks:

- structural (type, layout, rank, shape, dtype, device): always, they cost nothing;
- value checks (NaN/inf, token ids in range, signs): they read tensors back to the host,
  so they are skipped while ``torch.compile`` traces and for tensors without data
  (the ``meta`` device, used for shape-only runs).

The README ("Inputs, errors and guarantees") lists every check with its error type and message.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _value_checks_enabled(x: Optional[torch.Tensor] = None) -> bool:
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
    if not _value_checks_enabled(x) or x.numel() == 0:
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
    if not _value_checks_enabled(x) or x.numel() == 0:
        return
    if bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0{what}, got min {float(x.min())}")


def token_ids(name: str, targets: torch.Tensor, vocab: int, where: Optional[torch.Tensor] = None) -> None:
    """Integer dtype always; ids in [0, vocab) where ``where`` is true (everywhere without it)."""
    if targets.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of token ids (int64/int32/int16/int8/uint8), "
                        f"got {targets.dtype}")
    if not _value_checks_enabled(targets) or targets.numel() == 0:
        return
    vals = _select(targets, where)
    if vals.numel() and (bool((vals < 0).any()) or bool((vals >= vocab).any())):
        scope = "" if where is None else " at unmasked positions"
        raise ValueError(
            f"{name} holds token ids outside [0, {vocab}){scope} (min {int(vals.min())}, max {int(vals.max())})"
        )

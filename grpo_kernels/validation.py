"""Argument checks for the public API: clear TypeError/ValueError naming the argument."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _value_checks_enabled() -> bool:
    # value checks read tensors back to the host: skipped while torch.compile traces
    return not torch.compiler.is_compiling()


def tensor(name: str, x, *, ndim: Optional[Sequence[int]] = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
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


def finite(name: str, x: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
    if not _value_checks_enabled() or x.numel() == 0:
        return
    vals = x if where is None else x[where.expand_as(x)] if where.shape != x.shape else x[where]
    if not bool(torch.isfinite(vals).all()):
        scope = "" if where is None else " at unmasked positions"
        raise ValueError(f"{name} contains NaN or inf{scope}")


def token_ids(name: str, targets: torch.Tensor, vocab: int, where: Optional[torch.Tensor] = None) -> None:
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {targets.dtype}")
    if not _value_checks_enabled() or targets.numel() == 0:
        return
    vals = targets if where is None else targets[where]
    if vals.numel() and (bool((vals < 0).any()) or bool((vals >= vocab).any())):
        raise ValueError(
            f"{name} holds token ids outside [0, {vocab}) (min {int(vals.min())}, max {int(vals.max())})"
        )

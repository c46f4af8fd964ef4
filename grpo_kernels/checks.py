"""Argument checks shared by the option, advantage and input validation layers.

A leaf module (torch only), so that ``options``, ``advantages`` and ``validation`` can all use the
same checks without importing each other. Each check raises a ``TypeError`` or ``ValueError``
naming the argument, and returns the value in its normalized form.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
#: TRL's ``scale_rewards`` modes (``epilogue.SCALE_MODE_CODES`` numbers them for the kernels)
SCALE_MODES = ("group", "batch", "none")


def check_float_tensor(name: str, x, ndims: Sequence[int]) -> torch.Tensor:
    """``x`` as a float16/bfloat16/float32/float64 tensor of one of the dimensions ``ndims``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    return x


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name: str, value, minimum: Optional[float] = None) -> float:
    """``value`` as a finite float (>= ``minimum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def finite_number(name: str, value, *, positive: bool = False, allow_none: bool = False) -> Optional[float]:
    """``value`` (an int or float, not a bool) as a finite float, > 0 when ``positive``; None passes
    when ``allow_none``. The messages show the value as given."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def check_num_generations(num_generations, batch: int, rewards_name: str) -> int:
    """G >= 1 dividing the ``batch`` rows of ``rewards_name``."""
    num_generations = check_int("num_generations", num_generations, 1)
    if batch % num_generations != 0:
        raise ValueError(
            f"num_generations ({num_generations}) must divide the batch size of {rewards_name} ({batch}): "
            "rows come in consecutive groups of num_generations completions of one prompt"
        )
    return num_generations


def scale_mode(scale_rewards) -> str:
    """TRL's ``scale_rewards``: "group" | "batch" | "none", with True -> "group", False -> "none"."""
    if isinstance(scale_rewards, bool):
        return "group" if scale_rewards else "none"
    if not isinstance(scale_rewards, str):
        raise TypeError(
            f"scale_rewards must be one of {SCALE_MODES} (or True/False), got {type(scale_rewards).__name__}"
        )
    if scale_rewards not in SCALE_MODES:
        raise ValueError(f"scale_rewards must be one of {SCALE_MODES} (or True/False), got {scale_rewards!r}")
    return scale_rewards


def no_inf(name: str, x: torch.Tensor) -> None:
    """Rewards may hold NaN (unscored) but never inf."""
    if x.numel() and bool(torch.isinf(x).any()):
        raise ValueError(f"{name} contains inf; only finite values (and NaN for 'unscored') are allowed")


def same_device_as(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}: use one device")


def weights_tensor(weights, K: int, dtype: torch.dtype, device, name: str = "weights",
                   check_values: bool = True) -> Optional[torch.Tensor]:
    """The K reward-function weights (list/tuple/1-D tensor) as a [K] ``dtype`` tensor on ``device``,
    checked; None stays None (all 1). ``check_values``: the finiteness check, which reads them."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one weight per reward function), got shape {tuple(weights.shape)}")
        if weights.dtype == torch.bool or not (weights.is_floating_point() or weights.dtype in INT_DTYPES):
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

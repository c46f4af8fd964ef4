"""Helpers shared by the Triton kernels: interpreter detection, launch configs, jit utilities.

Kernels compute in the *accumulation dtype* ``ACC`` (a ``tl.constexpr``; ``epilogue.accumulation_dtype``):
float64 for float64 inputs, float32 otherwise. Runtime float parameters are declared ``tl.float64``
and rounded to ``ACC`` inside the kernel (``to_acc``), exactly as torch rounds a Python
scalar to a tensor's dtype, so the float64 kernels see the options at full precision.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from grpo_kernels import env

try:  # triton >= 3.2
    from triton import knobs as _knobs

    INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # pragma: no cover - older triton
    INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: the vocabulary tile of every row kernel under the interpreter (also the default
#: tile of the elementwise kernels there); tests lower it to exercise several tiles
INTERPRET_BLOCK_V = 128


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (the tests swap in a NaN-filled allocation to
    check that the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device, on its current stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def tl_acc(dtype: torch.dtype):
    """The Triton accumulation dtype of a torch input dtype."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def tiles_for(configs, vocab: int, cap: Optional[int] = None):
    """The autotune configs worth trying at ``vocab`` columns: tiles at most the next power of two
    of V (at least 1024; a tiny V needs no 8K tile) and at most ``cap``; the smallest one when none
    is left."""
    limit = max(1024, next_pow2(int(vocab)))
    if cap is not None:
        limit = min(limit, cap)
    return [cfg for cfg in configs if cfg.kwargs["BLOCK_V"] <= limit] or configs[:1]


def env_block_v() -> Optional[int]:
    """``GRPO_KERNELS_TRITON_BLOCK_V``: a fixed vocabulary tile (power of 2), no autotuning."""
    return env.triton_block_v()


def use_autotune(deterministic: bool) -> bool:
    """Autotune on the GPU unless disabled: interpreter, ``GRPO_KERNELS_TRITON_AUTOTUNE=0``,
    a fixed ``GRPO_KERNELS_TRITON_BLOCK_V``, or a deterministic run (the tile decides the
    reduction order, and a benchmark-picked tile may differ from one process to the next)."""
    if INTERPRET or deterministic:
        return False
    if not env.triton_autotune():
        return False
    return env_block_v() is None


def fixed_row_config(V: int):
    """(BLOCK_V, launch kwargs) when not autotuning: a fixed, reproducible choice."""
    forced = env_block_v()
    if INTERPRET:
        block = forced or INTERPRET_BLOCK_V
        return min(block, max(16, next_pow2(V))), {}
    block = forced or 4096
    # the smallest tile is 64 columns, not 128: ptxas spilled 8 bytes for the fp64 fused kernel
    # at V = 1 with a 128 tile on 4 warps, none with 64 (and none at 1 warp there, but at 1 warp
    # the same kernel spilled 28-40 bytes for other small V); tests/test_triton_compile.py checks
    # every tile this returns, with a GRPO_KERNELS_TRITON_BLOCK_V up to 4096 too
    block = min(block, max(64, next_pow2(V)))
    return block, {"num_warps": fixed_num_warps(block)}


def fixed_num_warps(block: int) -> int:
    """The warps of a fixed tile of ``block`` columns: 8 from 2048 columns on, 4 below, and 2 for
    the tiles of 16 and 32 that only GRPO_KERNELS_TRITON_BLOCK_V asks for (on 4 warps the fp64
    fused kernel spilled 4 bytes with them at V = 1; on 2, nothing spills)."""
    if block <= 32:
        return 2
    return 8 if block >= 2048 else 4


# ----------------------------------------------------------------------------- jit utilities


@triton.jit
def to_acc(x, ACC: tl.constexpr):
    """A runtime scalar (fp64 argument, or a Python float under the interpreter) in ACC."""
    return tl.full((), x, ACC)


@triton.jit
def _tanh_portable(x):
    # tanh(|x|) = -expm1(-2|x|) / (2 + expm1(-2|x|)), with Kahan's accurate expm1:
    # expm1(y) = (e^y - 1) * y / log(e^y). No libdevice under the interpreter.
    ax = tl.abs(x)
    y = -2.0 * ax
    u = tl.exp(y)
    small = u == 1.0
    zero = u < 1.1754943508222875e-38  # subnormal or 0: log() of it is inexact under numpy
    safe_u = tl.where(small | zero, 0.5, u)
    em1 = tl.where(small, y, tl.where(zero, -1.0, (safe_u - 1.0) * y / tl.log(safe_u)))
    th = -em1 / (2.0 + em1)
    return tl.where(x < 0, -th, th)


if INTERPRET:
    tanh = _tanh_portable
else:
    from triton.language.extra import libdevice

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)

"""Every ``GRPO_KERNELS_*`` environment variable, parsed in one place (docs/design.md lists them).

Each is read when it is used (so a process may change it between calls) and a bad value
raises a ``ValueError`` that names the variable and what it accepts. ``setup.py`` reads
``GRPO_KERNELS_BUILD_EXT`` (and ``GRPO_KERNELS_NO_CUDA``) itself: it runs before the
package is importable.
"""
from __future__ import annotations

import os
import re
from typing import Optional

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
          "kb": 10**3, "mb": 10**6, "gb": 10**9}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_size(name: str, raw: str) -> int:
    """Bytes from ``268435456``, ``256MiB``, ``256M``, ``1.5GiB`` or ``500MB`` (K/M/G and
    KiB/MiB/GiB are powers of 2, KB/MB/GB powers of 10)."""
    match = _SIZE.match(raw.lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"{name} must be a size in bytes such as 268435456, 256MiB or 1GiB, got {raw!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ValueError(f"{name} must be > 0 bytes, got {raw!r}")
    return size


def _choice(name: str, default: str, choices) -> str:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw


def _flag(name: str, default: bool) -> bool:
    return _choice(name, "1" if default else "0", ("0", "1")) == "1"


def chunk_bytes() -> Optional[int]:
    """GRPO_KERNELS_CHUNK_BYTES: the byte budget of one chunk on every device (None: unset)."""
    raw = os.environ.get("GRPO_KERNELS_CHUNK_BYTES")
    return None if raw is None or raw == "" else parse_size("GRPO_KERNELS_CHUNK_BYTES", raw)


def grad_weight_accum() -> str:
    """GRPO_KERNELS_GRAD_WEIGHT_ACCUM: auto | fp32 | native (plan.grad_weight_dtype)."""
    return _choice("GRPO_KERNELS_GRAD_WEIGHT_ACCUM", "auto", ("auto", "fp32", "native"))


def auto_build() -> bool:
    """GRPO_KERNELS_AUTO_BUILD: 0 keeps ``auto`` on the CPU from building the C++ extension."""
    return _flag("GRPO_KERNELS_AUTO_BUILD", True)


def no_cuda() -> bool:
    """GRPO_KERNELS_NO_CUDA: 1 builds the CPU-only extension even where CUDA is available."""
    return _flag("GRPO_KERNELS_NO_CUDA", False)


def verbose_build() -> bool:
    """GRPO_KERNELS_VERBOSE_BUILD: 1 shows the JIT build's compiler output."""
    return _flag("GRPO_KERNELS_VERBOSE_BUILD", False)


def build_dir() -> Optional[str]:
    """GRPO_KERNELS_BUILD_DIR: the cache root of the JIT-built extension (None: the default)."""
    return os.environ.get("GRPO_KERNELS_BUILD_DIR") or None


def triton_autotune() -> bool:
    """GRPO_KERNELS_TRITON_AUTOTUNE: 0 turns Triton's autotuning off on the GPU (a fixed tile)."""
    return _flag("GRPO_KERNELS_TRITON_AUTOTUNE", True)


def triton_block_v() -> Optional[int]:
    """GRPO_KERNELS_TRITON_BLOCK_V: a fixed vocabulary tile, a power of 2 >= 16 (no autotuning)."""
    raw = os.environ.get("GRPO_KERNELS_TRITON_BLOCK_V")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 16 or value & (value - 1):
        raise ValueError(f"GRPO_KERNELS_TRITON_BLOCK_V must be a power of 2 >= 16, got {raw!r}")
    return value

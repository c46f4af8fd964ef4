"""Backend dispatch: the public API asks here for a row backend by name.

Names: ``torch`` (portable torch ops), ``triton`` (fused Triton kernels; CUDA, or CPU
under ``TRITON_INTERPRET=1``), ``cpp`` (the compiled csrc extension: CUDA kernels for
CUDA tensors, the C++/OpenMP row pass for CPU tensors), ``cuda`` (the same extension,
CUDA tensors only). ``auto`` picks the best one available for the device without ever
compiling anything: triton, then a prebuilt cpp extension, then torch on CUDA; a
prebuilt cpp extension, then torch, on the CPU.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict

import torch

from grpo_kernels.backends.base import RowBackend

_MODULES: Dict[str, str] = {
    "torch": "grpo_kernels.backends.torch_chunked",
    "triton": "grpo_kernels.backends.triton",
    "cpp": "grpo_kernels.backends.cuda",
    "cuda": "grpo_kernels.backends.cuda",
}


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (missing package, compiler or device)."""


def _load(name: str) -> RowBackend:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} is not available: {exc}") from exc
    return module.BACKEND


def triton_usable(device: torch.device) -> bool:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type in ("cuda", "cpu")


def _auto(device: torch.device, dtype: torch.dtype) -> RowBackend:
    if device.type == "cuda" and triton_usable(device):
        backend = _load("triton")
        if backend.supports(device, dtype) is None:
            return backend
    try:
        cpp = importlib.import_module(_MODULES["cpp"])
        if cpp.prebuilt_available() and cpp.BACKEND.supports(device, dtype) is None:
            return cpp.BACKEND
    except ImportError:
        pass
    return _load("torch")


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> RowBackend:
    """The row backend for ``name`` on (device, dtype); raises if it cannot run there."""
    if name == "auto":
        return _auto(device, dtype)
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto',) + tuple(_MODULES)} or 'reference', got {name!r}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailable("backend 'cuda' needs CUDA tensors; use backend='cpp' for the C++ CPU build")
    if name == "triton" and not triton_usable(device):
        raise BackendUnavailable(
            "backend 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
        )
    backend = _load(name)
    reason = backend.supports(device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device} / {dtype}: {reason}")
    return backend

"""The backend registry: name -> row backend, each saying why when it cannot run.

Names: ``torch`` (portable torch ops), ``triton`` (fused Triton kernels; CUDA, or CPU under
``TRITON_INTERPRET=1``), ``cpp`` (the compiled csrc extension: CUDA kernels for CUDA tensors,
the C++/OpenMP row pass for CPU tensors), ``cuda`` (the same extension, CUDA tensors only).
``reference`` (the float64 oracle on materialized logits) is no row backend: the public
functions route it to ``grpo_kernels.reference``.

``auto`` picks, and says why (``choose_backend``):
- CUDA: triton, then a prebuilt cpp extension, then torch;
- CPU: the cpp extension, built on first use when it is not (a one-time JIT build of about
  30 s on 2 cores, announced on stderr and cached on disk; ``GRPO_KERNELS_AUTO_BUILD=0``
  turns the build off), then torch.
"""
from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Dict, Optional, Tuple

import torch

from grpo_kernels import env
from grpo_kernels.backends.base import RowBackend

#: name -> module defining BACKEND
REGISTRY: Dict[str, str] = {
    "torch": "grpo_kernels.backends.torch_chunked",
    "triton": "grpo_kernels.backends.triton",
    "cpp": "grpo_kernels.backends.cpp",
    "cuda": "grpo_kernels.backends.cpp",
}


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (missing package, compiler or device)."""


def _triton_reason(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on the CPU only under TRITON_INTERPRET=1 (set before importing grpo_kernels)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


def _load(name: str) -> Tuple[Optional[RowBackend], Optional[str]]:
    try:
        module = importlib.import_module(REGISTRY[name])
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return module.BACKEND, None


def unavailable_reason(name: str, device, dtype: torch.dtype) -> Optional[str]:
    """None when backend ``name`` runs on (device, dtype), else why not (never compiles)."""
    device = torch.device(device)
    if name not in REGISTRY:
        return f"unknown backend {name!r} (one of {('auto',) + tuple(REGISTRY)})"
    if name == "cuda" and device.type != "cuda":
        return "backend 'cuda' needs CUDA tensors; use backend='cpp' for the C++ CPU build"
    if name == "triton":
        reason = _triton_reason(device)
        if reason is not None:
            return reason
    backend, reason = _load(name)
    if backend is None:
        return reason
    return backend.supports(device, dtype)


def get_backend(name: str, device, dtype: torch.dtype) -> RowBackend:
    """The row backend ``name`` (not ``auto``) on (device, dtype); BackendUnavailable with the
    reason when it cannot run there."""
    if name == "auto":
        return choose_backend_by_name("auto", device, dtype)[0]
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {('auto',) + tuple(REGISTRY)} or 'reference', got {name!r}")
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {torch.device(device)} / {dtype}: {reason}")
    return _load(name)[0]


_AUTO_BUILD_FAILED: Dict[str, str] = {}


def _auto_build_cpp(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Build the C++ extension for ``auto`` on the CPU (once per process); None on success,
    else why it is not used."""
    from grpo_kernels.backends import cpp

    if "cpu" in _AUTO_BUILD_FAILED:
        return _AUTO_BUILD_FAILED["cpu"]
    if not env.auto_build():
        return "the C++ extension is not built and GRPO_KERNELS_AUTO_BUILD=0"
    reason = cpp.BACKEND.supports(device, dtype)
    if reason is not None:
        return reason
    print(f"grpo_kernels: building the C++ CPU kernels for backend='auto' (once: about 30 s on 2 cores; "
          f"cached in {cpp.build_root()}; GRPO_KERNELS_AUTO_BUILD=0 skips this and runs backend='torch')",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        cpp.load_extension(allow_build=True)
    except Exception as exc:  # noqa: BLE001 - a failed build means torch, with the reason
        _AUTO_BUILD_FAILED["cpu"] = f"the C++ extension failed to build ({type(exc).__name__}: {exc})"
        print(f"grpo_kernels: {_AUTO_BUILD_FAILED['cpu']}; using backend='torch'", file=sys.stderr, flush=True)
        return _AUTO_BUILD_FAILED["cpu"]
    print(f"grpo_kernels: C++ CPU kernels built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return None


def choose_backend_by_name(name: str, device, dtype: torch.dtype) -> Tuple[RowBackend, str]:
    """(backend, why) for ``name``, ``auto`` included."""
    device = torch.device(device)
    if name != "auto":
        return get_backend(name, device, dtype), "requested"
    if device.type == "cuda" and unavailable_reason("triton", device, dtype) is None:
        return _load("triton")[0], "auto: Triton kernels on CUDA"
    from grpo_kernels.backends import cpp

    if cpp.prebuilt_available() and cpp.BACKEND.supports(device, dtype) is None:
        return cpp.BACKEND, f"auto: the compiled C++ {'CUDA' if device.type == 'cuda' else 'CPU'} kernels"
    if device.type == "cpu":
        why_not = _auto_build_cpp(device, dtype)
        if why_not is None:
            return cpp.BACKEND, "auto: the compiled C++ CPU kernels (built on first use)"
    else:
        why_not = "no prebuilt C++ CUDA extension and triton cannot run"
    return _load("torch")[0], f"auto: portable torch ops ({why_not})"


def choose_backend(execution, device, dtype: torch.dtype) -> Tuple[RowBackend, str]:
    """(backend, why) for an ``ExecutionOptions``; under ``deterministic`` only backends with a
    fixed reduction order."""
    backend, reason = choose_backend_by_name(execution.backend, device, dtype)
    if execution.is_deterministic and not backend.deterministic:
        raise ValueError(
            f"backend {backend.name!r} does not guarantee bitwise-reproducible results; "
            "use backend='torch' (or 'cpp'/'triton') with deterministic=True"
        )
    return backend, reason


def divergence_backend(execution, device, dtype: torch.dtype, vocab_parallel: bool = False) -> Tuple[RowBackend, str]:
    """(backend, why) of a divergence row pass (distillation, GRPO's exact KL): ``choose_backend``'s
    pick when it has ``divergence_rows_`` (taking ``vocab=`` when ``vocab_parallel``); under
    ``auto`` else the torch row pass, and a named backend without one raises BackendUnavailable."""
    backend, why = choose_backend(execution, device, dtype)
    able = backend.divergence_rows_ is not None and (backend.divergence_vocab_parallel or not vocab_parallel)
    preferred = backend.divergence_auto_devices is None or torch.device(device).type in backend.divergence_auto_devices
    if able and (preferred or execution.backend != "auto"):
        return backend, why
    if able:  # auto, on a device where this backend's divergence pass is not the faster one
        return _load("torch")[0], f"auto: portable torch ops (faster than {backend.name}'s divergence pass here)"
    what = "vocab-parallel divergence row pass" if backend.divergence_rows_ is not None else "divergence row pass"
    if execution.backend != "auto":
        raise BackendUnavailable(f"backend {backend.name!r} has no {what} (use backend='torch', or 'auto')")
    return _load("torch")[0], f"auto: portable torch ops ({backend.name} has no {what})"

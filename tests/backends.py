"""The row backends every parity test runs over, each skipped with its reason when it
cannot run here. A new backend joins the whole suite by adding its name to BACKENDS."""
from __future__ import annotations

import functools

import pytest
import torch

BACKENDS = ["torch", "triton", "cpp"]


@functools.lru_cache(maxsize=None)
def unavailable_reason(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """None when backend ``name`` runs on (device, dtype) here, else why not."""
    from grpo_kernels.backends import get_backend

    try:
        get_backend(name, torch.device(device), dtype)
        if name in ("cpp", "cuda"):  # the extension is JIT-built on first use: build it now
            from grpo_kernels.backends import cuda

            cuda.load_extension()
    except Exception as exc:  # noqa: BLE001 - any failure to load is a reason to skip
        return f"{name}: {type(exc).__name__}: {exc}"
    return None


def backend_params(names=BACKENDS):
    return [pytest.param(n, id=n) for n in names]


def require(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        pytest.skip(reason)


def device_for_tests() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"

"""Peak memory of one call, for the demo and benchmarks.

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) above the
memory in use before the call. CPU (Linux): the process's resident-set high-water mark,
reset just before the call through ``/proc/self/clear_refs``; elsewhere ``None``.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Run ``fn()`` and return the peak bytes it allocated beyond what existed before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        fn()
        return None
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, (_status_kb("VmHWM") - base) * 1024)

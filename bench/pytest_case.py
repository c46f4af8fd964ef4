"""The body of every pytest-benchmark test: one case on one shape (see bench/conftest.py)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from bench.cases import BY_KEY
from bench.measure import CpuPeak, check_value, cpu_hwm_supported
from bench.peers import Unavailable


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(benchmark, kind: str, case_id: str, shape, device, inputs, rounds=None, cases=BY_KEY,
                  group=None):
    """Benchmark one case: untimed first call, peak memory of one call, then timed rounds."""
    case = cases[f"{kind}/{case_id}"]
    benchmark.group = f"{group or ('loss' if kind == 'floor' else kind)} {shape.name}"
    info = benchmark.extra_info
    info.update(case=case.id, kind=kind, label=case.label, N=shape.N, H=shape.H, V=shape.V, dtype=shape.dtype,
                real_tokens=inputs.real_tokens)
    inputs.zero_grads()
    try:
        run = case.build(inputs, device)
    except Unavailable as exc:
        pytest.skip(str(exc))

    def target():
        out = run()
        _sync(device)
        return out

    grads = inputs.grad_bytes if kind in ("loss", "floor") else 0
    if device.type == "cuda":
        info["memory_method"] = "torch.cuda.max_memory_allocated delta after reset_peak_memory_stats"
    else:
        info["memory_method"] = "VmHWM - VmRSS after clear_refs=5 and malloc_trim, in-process"
    try:
        if benchmark.enabled:
            t0 = time.perf_counter()
            out = target()
            info["first_call_s"] = time.perf_counter() - t0
            info["check"] = check_value(case, out, inputs)
            del out
            inputs.zero_grads()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                target()
                info["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            elif cpu_hwm_supported():
                with CpuPeak() as peak:
                    target()
                info["peak_bytes"] = peak.bytes
            n = rounds or (5 if device.type == "cuda" else 2)
            benchmark.pedantic(target, setup=inputs.zero_grads, rounds=n, warmup_rounds=0, iterations=1)
        else:  # smoke: one cold call, memory included
            inputs.zero_grads()
            if device.type == "cpu" and cpu_hwm_supported():
                with CpuPeak() as peak:
                    out = benchmark.pedantic(target, setup=inputs.zero_grads)
                info["peak_bytes"] = peak.bytes
            else:
                out = benchmark.pedantic(target, setup=inputs.zero_grads)
            info["check"] = check_value(case, out, inputs)
        if info.get("peak_bytes") is not None:
            info["peak_minus_grads_bytes"] = max(0, info["peak_bytes"] - grads)
        if info.get("check") is not None:
            assert math.isfinite(info["check"]), f"{case.id}: non-finite result"
    finally:
        inputs.zero_grads()

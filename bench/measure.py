"""Timing and peak-memory measurement of one case on one shape.

Timing: CUDA: CUDA events around each call (after one untimed first call, which absorbs
compilation and autotuning, and one warm-up call), repetitions sized to ~0.3 s per case
(3 to 20), median reported. CPU: ``time.perf_counter`` around each call, an untimed first
call (cold calls cost up to 2x and allocate one-time workspaces, also for eager code),
``warmup`` more untimed calls, then ``rounds`` timed ones; the *minimum* is reported
(``time_s``): on a shared 2-core machine noise only ever adds time.

Peak memory beyond inputs (gradients included; ``peak - grads`` is reported as well):
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the call (inputs resident, gradients freed).
- CPU (Linux): the process's resident high-water mark. Each case runs in a fresh
  subprocess (bench/worker.py); after the inputs exist and the warm-up call is done,
  gradients are freed, ``malloc_trim(0)`` hands freed heap pages back to the kernel, the
  high-water mark is reset by writing "5" to ``/proc/self/clear_refs``, and the first
  timed call's peak is ``VmHWM - VmRSS(before)``. It counts every byte the process
  touches (torch tensors, MKL/oneDNN workspaces, allocator slack), not only tensors.
"""
from __future__ import annotations

import ctypes
import gc
import math
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, Optional

import torch

from bench.cases import BY_KEY, Case
from bench.peers import Unavailable
from bench.shapes import ALL, Inputs, Shape, make_inputs

MiB = 1024 * 1024


# ---------------------------------------------------------------- CPU memory (Linux /proc)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_hwm_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


class CpuPeak:
    """Context: resets the RSS high-water mark on entry; ``.bytes`` = peak above entry RSS."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc):
        self.bytes = max(0, _status_kb("VmHWM") - self.base) * 1024
        return False


# ---------------------------------------------------------------- checks (untimed)


def check_value(case: Case, out, inp: Inputs) -> Optional[float]:
    """A number every correct implementation agrees on: ||grad_hidden|| for losses, the masked
    sum of logps for log-prob passes."""
    if case.kind == "loss":
        g = inp.hidden.grad
        return None if g is None else float(g.double().norm())
    if case.kind == "logprobs":
        return float((out.double() * inp.mask).sum())
    return None


# ---------------------------------------------------------------- one case, in this process


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_cuda(run: Callable, reset: Callable, device, target_s=0.3, min_reps=3, max_reps=20):
    times = []
    est = None
    reps = min_reps
    i = 0
    while i < reps:
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if est is None:
            est = times[0]
            reps = max(min_reps, min(max_reps, math.ceil(target_s / max(est, 1e-6))))
        i += 1
    return times


def run_case(case: Case, shape: Shape, device: torch.device, *, warmup: int = 1, rounds: int = 2,
             memory: bool = True, inputs: Optional[Inputs] = None, first_call: bool = True) -> Dict:
    """Time one case on one shape in this process; returns the result record.

    ``first_call=False`` (CPU quick mode only): no untimed first call, the cold call is timed.
    """
    rec = dict(kind=case.kind, case=case.id, label=case.label, group=case.group, shape=shape.name,
               N=shape.N, H=shape.H, V=shape.V, dtype=shape.dtype, device=device.type, status="ok")
    inp = inputs
    try:
        if inp is None:
            inp = make_inputs(shape, device)
        rec["real_tokens"] = inp.real_tokens
        t0 = time.perf_counter()
        run = case.build(inp, device)
        reset = inp.zero_grads
        rec["setup_s"] = time.perf_counter() - t0
        if first_call or device.type == "cuda":
            t0 = time.perf_counter()
            out = run()  # compilation, autotuning, lazy initialization
            _sync(device)
            rec["first_call_s"] = time.perf_counter() - t0
            rec["check"] = check_value(case, out, inp)
            del out
        for _ in range(warmup):
            reset()
            run()
        _sync(device)
        reset()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            _sync(device)
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
            rec["times_s"] = _time_cuda(run, reset, device)
        else:
            times = []
            for r in range(rounds):
                reset()
                peak = CpuPeak() if (r == 0 and memory and cpu_hwm_supported()) else None
                if peak is not None:
                    peak.__enter__()
                t = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - t)
                if peak is not None:
                    peak.__exit__(None, None, None)
                    rec["peak_bytes"] = peak.bytes
                if "check" not in rec:
                    rec["check"] = check_value(case, out, inp)
                del out
            rec["times_s"] = times
            if "first_call_s" not in rec:
                rec["first_call_s"] = times[0]
        # grad_h and grad_W exist at the peak of a loss (and are the floor's outputs)
        rec["grad_bytes"] = inp.grad_bytes if case.kind in ("loss", "floor") else 0
        rec["median_s"] = statistics.median(rec["times_s"])
        rec["min_s"] = min(rec["times_s"])
        rec["time_s"] = rec["median_s"] if device.type == "cuda" else rec["min_s"]
    except Unavailable as exc:
        rec.update(status="skipped", reason=str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        rec.update(status="oom", reason=str(exc).splitlines()[0][:200])
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        rec.update(status="error", reason=f"{type(exc).__name__}: {msg[0][:300] if msg else ''}",
                   traceback=traceback.format_exc()[-3000:])
    finally:
        if inp is not None:
            inp.zero_grads()
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return rec


def lookup(kind: str, case_id: str) -> Case:
    return BY_KEY[f"{kind}/{case_id}"]


def shape_by_name(name: str) -> Shape:
    return ALL[name]

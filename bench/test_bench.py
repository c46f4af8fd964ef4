"""The benchmarks: one test per kind, each parametrized by case and shape (bench/conftest.py).

- ``test_loss``: forward + backward of the GRPO loss, grpo_kernels' backends and the peers;
- ``test_logprobs``: token_logprobs alone (the reference-model pass, under no_grad) vs the
  peers' log-prob passes;
- ``test_floor``: the three-matmul floor (logits, grad_hidden, grad_weight) every loss time is
  compared to;
- ``test_level``: sequence-level importance sampling (GSPO) vs token level, per backend, in
  the same run (``pytest bench -k test_level --benchmark-group-by=group``);
- ``test_chunk``: the loss at a grid of chunk sizes (rows or bytes) per backend, with Liger
  eager, for plan.py's chunk rule (``bench/report.py --sweep-chunks``).

Timing: CUDA: CUDA events around each call (after one untimed first call, which absorbs
compilation and autotuning, and one warm-up call), repetitions sized to ~0.3 s per case
(3 to 20), median reported by bench/report.py (the events are ``extra_info["event_s"]``).
CPU: ``time.perf_counter`` (pytest-benchmark's timer) around each call, an untimed first
call (cold calls cost up to 2x and allocate one-time workspaces, also for eager code), then
``rounds`` (2) timed ones; bench/report.py reports the *minimum*: on a shared 2-core machine
noise only ever adds time. ``--bench-cold`` (and --benchmark-disable) skip the untimed first
call: the cold call is what is measured.

Peak memory beyond inputs (gradients included; ``peak - grads`` is reported as well), through
``grpo_kernels.memory.peak_memory_bytes``:
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the call (inputs resident, gradients freed), on one more call
  after the warm-up.
- CPU (Linux): the process's resident high-water mark, over the first timed call: gradients
  are freed, ``malloc_trim(0)`` hands freed heap pages back to the kernel, the high-water mark
  is reset by writing "5" to ``/proc/self/clear_refs``, and the peak is ``VmHWM - VmRSS(before)``.
  It counts every byte the process touches (torch tensors, MKL/oneDNN workspaces, allocator
  slack), not only tensors; it is per case only when the process runs one case (bench/report.py
  starts a fresh one per case and shape on the CPU).

``extra_info`` holds the record bench/report.py merges: the case and shape, ``first_call_s``,
``check`` (a number every correct implementation agrees on), ``peak_bytes``, ``grad_bytes``,
``peak_minus_grads_bytes``, ``memory_method`` and, for grpo_kernels' cases, the package path.
"""
from __future__ import annotations

import gc
import math
import os
import sys
import time

import pytest
import torch

from bench.cases import Unavailable, check_value, cheap_skip_reason, malloc_trim

GROUPS = {"floor": "loss", "level": "importance-sampling level", "chunk": "chunk sweep"}  # pytest-benchmark group, else the kind


def _peak_bytes(fn, device):
    """grpo_kernels.memory's peak of ``fn()``; None (``fn`` run all the same) without /proc."""
    from grpo_kernels.memory import peak_memory_bytes

    try:
        return peak_memory_bytes(fn, device)
    except OSError:  # /proc/self/clear_refs not writable: raised before fn ran
        fn()
        return None


def measure(benchmark, config, case, shape, device, inputs) -> None:
    """Benchmark one case on one shape (see the module docstring for what is measured)."""
    cuda = device.type == "cuda"
    benchmark.group = f"{GROUPS.get(case.kind, case.kind)} {shape.name}"
    info = benchmark.extra_info
    info.update(kind=case.kind, case=case.id, label=case.label, group=case.group, shape=shape.name, N=shape.N,
                H=shape.H, V=shape.V, dtype=shape.dtype, device=device.type, real_tokens=inputs.real_tokens,
                grad_bytes=inputs.grad_bytes if case.kind != "logprobs" else 0,  # grads exist at a loss' peak
                memory_method="torch.cuda.max_memory_allocated delta after reset_peak_memory_stats" if cuda
                else "VmHWM - VmRSS after malloc_trim and clear_refs=5, first timed call")
    reason = cheap_skip_reason(case, device)
    if reason is not None:
        pytest.skip(reason)
    inputs.zero_grads()
    try:
        run = case.build(inputs, device)
    except Unavailable as exc:
        pytest.skip(str(exc))
    if case.group in ("ours", "before"):
        info["grpo_kernels"] = os.path.dirname(sys.modules["grpo_kernels"].__file__)
    events = []

    def call():
        if not cuda:
            return run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        end.record()
        end.synchronize()
        events.append(start.elapsed_time(end) / 1e3)
        return out

    cold = config.getoption("--bench-cold") or not benchmark.enabled
    rounds = config.getoption("--bench-rounds")
    pending = {"peak": not cuda}  # CPU: the memory is that of the first timed call

    def setup():
        inputs.zero_grads()
        if pending["peak"]:
            gc.collect()
            malloc_trim()

    def timed():
        if not pending["peak"]:
            return call()
        pending["peak"], out = False, []
        info["peak_bytes"] = _peak_bytes(lambda: out.append(call()), device)
        return out[0]

    try:
        if not cold:
            t0 = time.perf_counter()
            out = call()  # compilation, autotuning, lazy initialization
            info["first_call_s"] = time.perf_counter() - t0
            info["check"] = check_value(case.kind, out, inputs)
            del out
            if cuda:
                inputs.zero_grads()
                call()  # one warm-up call, which sizes the repetitions
        if cuda:
            rounds = rounds or (max(3, min(20, math.ceil(0.3 / max(events[-1], 1e-6)))) if events else 3)
            inputs.zero_grads()
            gc.collect()
            torch.cuda.empty_cache()
            info["peak_bytes"] = _peak_bytes(call, device)
        events.clear()
        out = benchmark.pedantic(timed, setup=setup, rounds=rounds or 2, iterations=1)
        if "check" not in info:
            info["check"] = check_value(case.kind, out, inputs)
        del out
        if cuda:
            info["event_s"] = list(events)
        if info.get("peak_bytes") is not None:
            info["peak_minus_grads_bytes"] = max(0, info["peak_bytes"] - info["grad_bytes"])
        if info.get("check") is not None:
            assert math.isfinite(info["check"]), f"{case.id}: non-finite result"
    finally:
        inputs.zero_grads()
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()


def test_loss(benchmark, pytestconfig, case, shape, bench_device, bench_inputs):
    measure(benchmark, pytestconfig, case, shape, bench_device, bench_inputs)


def test_logprobs(benchmark, pytestconfig, case, shape, bench_device, bench_inputs):
    measure(benchmark, pytestconfig, case, shape, bench_device, bench_inputs)


def test_floor(benchmark, pytestconfig, case, shape, bench_device, bench_inputs):
    measure(benchmark, pytestconfig, case, shape, bench_device, bench_inputs)


def test_level(benchmark, pytestconfig, case, shape, bench_device, bench_inputs):
    measure(benchmark, pytestconfig, case, shape, bench_device, bench_inputs)


def test_chunk(benchmark, pytestconfig, case, shape, bench_device, bench_inputs):
    measure(benchmark, pytestconfig, case, shape, bench_device, bench_inputs)

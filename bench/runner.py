"""Runs a benchmark set: the job order, subprocess isolation on the CPU, the GPU time budget,
and the cpp extension's build (done once, up front, so no timed call pays for it)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from bench.cases import Case
from bench.measure import run_case
from bench.shapes import Inputs, Shape, make_inputs
from bench.worker import PREFIX

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_CMD = "from grpo_kernels.backends import cuda; m = cuda.load_extension(); print('has_cuda', m.has_cuda())"


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


class CppBuild:
    """The cpp extension's JIT build in a subprocess (cached on disk for every later process)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, allow: bool):
        self.proc = None
        self.error: Optional[str] = None
        try:
            from grpo_kernels.backends import cuda as cpp

            self.error = cpp.BACKEND.supports(device, dtype)
            ready = self.error is not None or cpp.prebuilt_available()
        except Exception as exc:
            self.error, ready = f"grpo_kernels.backends.cuda import failed: {type(exc).__name__}: {exc}", True
        if ready:
            return
        if not allow:
            self.error = "cpp extension not prebuilt (quick mode does not JIT-build it)"
            return
        env = _env({"MAX_JOBS": os.environ.get("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))})
        self.log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty compiler must never block
        self.proc = subprocess.Popen([sys.executable, "-c", BUILD_CMD], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float) -> Optional[str]:
        """None when the extension is ready, else the reason it is not."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(1.0, timeout))
                self.log.seek(0)
                out = self.log.read()
                if self.proc.returncode != 0:
                    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
                    self.error = "cpp extension build failed: " + (" | ".join(lines[-2:])[-400:] if lines else "?")
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.error = f"cpp extension build did not finish within the time budget ({timeout:.0f} s)"
            self.proc = None
        return self.error


_GROUP_ORDER = {"ours": 0, "floor": 1, "peer": 2}


def order(cases: List[Case], shapes: List[Shape], device: torch.device):
    """GPU: by tier, then shape, so the time budget cuts the least important jobs. CPU: by shape.
    Inside a shape: our backends, the floor, then the peers (slowest to compile last)."""
    jobs = [(c, s) for s in shapes for c in cases]
    if device.type == "cuda":
        jobs.sort(key=lambda j: (j[0].tier, shapes.index(j[1]), _GROUP_ORDER[j[0].group]))
    else:
        jobs.sort(key=lambda j: (shapes.index(j[1]), j[0].kind == "logprobs", _GROUP_ORDER[j[0].group]))
    return jobs


def _precheck(case: Case, device: torch.device) -> Optional[str]:
    """Cheap reasons to skip without starting a process."""
    if case.id == "ours:triton" and device.type == "cpu":
        return "triton needs CUDA here (the TRITON_INTERPRET=1 interpreter is far too slow for these shapes)"
    for prefix, module in (("liger", "liger_kernel"), ("trl:", "trl")):
        if case.id.startswith(prefix) and importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def _skip(case: Case, shape: Shape, device, reason: str, status="skipped") -> Dict:
    return dict(kind=case.kind, case=case.id, label=case.label, group=case.group, shape=shape.name, N=shape.N,
                H=shape.H, V=shape.V, dtype=shape.dtype, device=device.type, status=status, reason=reason)


def _run_subprocess(case: Case, shape: Shape, device, warmup: int, rounds: int, timeout: float, env) -> Dict:
    job = json.dumps(dict(kind=case.kind, case=case.id, shape=shape.name, warmup=warmup, rounds=rounds,
                          device=str(device)))
    try:
        p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "worker.py"), job], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _skip(case, shape, device, f"timed out after {timeout:.0f} s", status="error")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return _skip(case, shape, device, f"worker exited {p.returncode}: {' | '.join(tail)[-400:]}", status="error")


def run_set(cases: List[Case], shapes: List[Shape], device: torch.device, *, warmup: int, rounds: int,
            isolate: bool, budget_s: Optional[float], allow_build: bool, first_call: bool = True,
            log: Callable[[str], None] = print) -> List[Dict]:
    start = time.monotonic()
    results: List[Dict] = []
    build = None
    cpp_reason: Optional[str] = None
    cpp_waited = False
    if any(c.id == "ours:cpp" for c in cases) and shapes:
        build = CppBuild(device, shapes[0].torch_dtype, allow_build)
        if device.type == "cpu":  # two cores: build first rather than beside the measurements
            log("building the cpp extension (if not cached) ...")
            cpp_reason, cpp_waited = build.wait(900.0), True
    env = _env({"GRPO_BENCH_NO_BUILD": "0" if allow_build else "1"})
    if not allow_build:
        os.environ["GRPO_BENCH_NO_BUILD"] = "1"
    inputs: Dict[str, Inputs] = {}
    for case, shape in order(cases, shapes, device):
        elapsed = time.monotonic() - start
        tag = f"[{elapsed:6.1f}s] {case.kind:8s} {case.id:14s} {shape.name}"
        reason = _precheck(case, device)
        if reason is None and case.id == "ours:cpp":
            if not cpp_waited:
                left = (budget_s - elapsed) if budget_s else 900.0
                cpp_reason, cpp_waited = build.wait(left - 30.0), True
            reason = cpp_reason
        if reason is None and budget_s is not None and elapsed > budget_s:
            reason = f"time budget of {budget_s:.0f} s spent"
        if reason is not None:
            results.append(_skip(case, shape, device, reason))
            log(f"{tag}  skipped: {reason}")
            continue
        if isolate:
            rec = _run_subprocess(case, shape, device, warmup, rounds, timeout=900.0, env=env)
        else:
            if shape.name not in inputs:
                inputs.clear()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                inputs[shape.name] = make_inputs(shape, device)
            rec = run_case(case, shape, device, warmup=warmup, rounds=rounds, inputs=inputs[shape.name],
                           first_call=first_call)
        results.append(rec)
        if rec["status"] == "ok":
            peak = rec.get("peak_bytes")
            log(f"{tag}  {rec['time_s'] * 1e3:10.2f} ms  peak {peak / 2**20 if peak is not None else float('nan'):9.1f} MiB"
                f"  (first call {rec['first_call_s']:.1f} s)")
        else:
            log(f"{tag}  {rec['status']}: {rec.get('reason')}")
    inputs.clear()
    return results

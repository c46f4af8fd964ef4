"""Benchmark report: detects the device, runs its set through pytest-benchmark
(bench/test_bench.py), writes markdown tables, JSON and plots.

    python bench/report.py                # CPU set on a CPU machine, GPU set with CUDA
    python bench/report.py --quick        # CI smoke run: smallest CPU shape, one cold call per case, in-process
    python bench/report.py --out DIR      # outputs (default bench/out/)
    python bench/report.py --compare-with PATH   # also before:* = PATH's grpo_kernels: before/after ratios
    python bench/report.py --render OUT/results.json --out DIR   # re-render a saved run
    python bench/report.py --sweep-chunks --out DIR   # chunk sizes (rows, bytes) x backends, + Liger eager, floor

Each (case, shape) is one pytest run, ``pytest bench/test_bench.py --bench-case KIND/ID
--bench-shape NAME --benchmark-json F --junitxml F``: in a fresh subprocess on the CPU (so that
the process's memory high-water mark is that case's), and for every ``before:*`` case (which
imports grpo_kernels from the other checkout); in this process on the GPU and with --quick.
Its record is the benchmark's ``extra_info`` plus the times, or the reason from the junit XML
when it was skipped or failed. The GPU run order puts the least important jobs last, and no
job starts after --budget-s, so that one GPU run fits in 8 minutes. The cpp extension is
built once, up front, so that no timed call pays for it.

Outputs under --out: report.md (also printed to stdout), results.json, <set>_loss.png and
<set>_logprobs.png (time and peak memory vs N per case). No assertion on time anywhere; the
exit status is 1 when a row is an error or an OOM, or a check value is over its tolerance
(bench/verdict.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from bench import cases as case_defs  # noqa: E402
from bench import verdict  # noqa: E402
from bench.cases import RATIO_PEERS, Case, Shape  # noqa: E402

TEST_FILE = os.path.join("bench", "test_bench.py")
PYTEST_FLAGS = ["-p", "no:cacheprovider", "-p", "no:terminal", "--benchmark-quiet"]  # the junit XML has the errors

# ================================================================== running the jobs


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


class CppBuild:
    """The cpp extension's JIT build in a subprocess (cached on disk for every later process),
    of this checkout's sources or, with ``checkout``, another's."""

    def __init__(self, device: torch.device, dtype: torch.dtype, checkout: Optional[str] = None):
        use = f"cases.use_grpo_kernels_from({checkout!r}); " if checkout else ""
        cmd = (f"import sys, torch; sys.path.insert(0, {REPO!r}); from bench import cases; {use}"
               f"r = cases.backend_unavailable('cpp', torch.device({str(device)!r}), {dtype}, build=True); "
               "print(r or 'cpp extension ready'); sys.exit(1 if r else 0)")
        env = _env({"MAX_JOBS": os.environ.get("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))})
        self.log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty compiler must never block
        self.proc = subprocess.Popen([sys.executable, "-c", cmd], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        self.error: Optional[str] = None

    def wait(self, timeout: float) -> Optional[str]:
        """None when the extension is ready, else the reason it is not."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(1.0, timeout))
                self.log.seek(0)
                lines = [ln for ln in self.log.read().strip().splitlines() if ln.strip()]
                if self.proc.returncode != 0:
                    self.error = "cpp extension unavailable: " + (" | ".join(lines[-2:])[-400:] if lines else "?")
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.error = f"cpp extension build did not finish within the time budget ({timeout:.0f} s)"
            self.proc = None
        return self.error


_GROUP_ORDER = {"ours": 0, "before": 1, "floor": 2, "peer": 3}
_KIND_ORDER = {"loss": 0, "floor": 0, "chunk": 0, "logprobs": 1, "level": 2}


def order(cases: List[Case], shapes: List[Shape], device: torch.device):
    """GPU: by tier, then shape, so the time budget cuts the least important jobs. CPU: by shape.
    Inside a shape: our backends, the before:* ones, the floor, then the peers (slowest to compile last)."""
    jobs = [(c, s) for s in shapes for c in cases]
    if device.type == "cuda":
        jobs.sort(key=lambda j: (j[0].tier, shapes.index(j[1]), _GROUP_ORDER[j[0].group]))
    else:
        jobs.sort(key=lambda j: (shapes.index(j[1]), _KIND_ORDER[j[0].kind], _GROUP_ORDER[j[0].group]))
    return jobs


def _record(case: Case, shape: Shape, device, **fields) -> Dict:
    return dict(kind=case.kind, case=case.id, label=case.label, group=case.group, shape=shape.name, N=shape.N,
                H=shape.H, V=shape.V, dtype=shape.dtype, device=device.type, **fields)


def _read_record(case: Case, shape: Shape, device, json_path: str, xml_path: str, rc, output: str) -> Dict:
    """The record of one pytest run: the benchmark's extra_info and times, else why there is none."""
    if os.path.exists(json_path):
        with open(json_path) as f:
            benchmarks = json.load(f)["benchmarks"]
        if benchmarks:
            rec = dict(benchmarks[0]["extra_info"], status="ok")
            times = rec.pop("event_s", None) or benchmarks[0]["stats"]["data"]
            rec.update(times_s=times, min_s=min(times), median_s=statistics.median(times))
            rec["time_s"] = rec["median_s"] if device.type == "cuda" else rec["min_s"]
            return rec
    testcase = None
    if os.path.exists(xml_path):
        testcase = next(ET.parse(xml_path).getroot().iter("testcase"), None)
    for tag, status in (("skipped", "skipped"), ("failure", "error"), ("error", "error")):
        el = None if testcase is None else testcase.find(tag)
        if el is not None:
            msg = (el.get("message") or "").strip().splitlines()
            reason = msg[0][:300] if msg else tag
            if status == "error" and "out of memory" in reason.lower():
                status = "oom"
            return _record(case, shape, device, status=status, reason=reason, traceback=(el.text or "")[-3000:])
    tail = " | ".join(output.strip().splitlines()[-3:])[-400:]
    return _record(case, shape, device, status="error", reason=f"pytest exited {rc} without a result: {tail}")


def run_job(case: Case, shape: Shape, device, *, isolate: bool, rounds: Optional[int], cold: bool,
            allow_build: bool, before: Optional[str], timeout: float = 900.0) -> Dict:
    """One (case, shape) through pytest-benchmark, in a subprocess or in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path, xml_path = os.path.join(tmp, "bench.json"), os.path.join(tmp, "junit.xml")
        args = [f"{TEST_FILE}::test_{case.kind}", "--bench-case", case.key, "--bench-shape", shape.name, "--bench-device", device.type,
                "--benchmark-json", json_path, "--junitxml", xml_path, *PYTEST_FLAGS]
        args += (["--bench-rounds", str(rounds)] if rounds else []) + (["--bench-cold"] if cold else [])
        args += ([] if allow_build else ["--bench-no-build"])
        args += ["--bench-before", before] if case.group == "before" else []
        if isolate:
            try:
                p = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=REPO, env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return _record(case, shape, device, status="error", reason=f"timed out after {timeout:.0f} s")
            rc, output = p.returncode, p.stdout
        else:
            import pytest

            cwd = os.getcwd()
            os.chdir(REPO)
            try:
                rc, output = pytest.main(args), ""
            finally:
                os.chdir(cwd)
                # a failed test's frames (sys.last_*) would keep its tensors alive into the next job
                sys.last_type = sys.last_value = sys.last_traceback = None
                if hasattr(sys, "last_exc"):
                    sys.last_exc = None
        return _read_record(case, shape, device, json_path, xml_path, rc, output)


def run_set(cases: List[Case], shapes: List[Shape], device: torch.device, *, rounds: Optional[int], cold: bool,
            isolate: bool, budget_s: Optional[float], allow_build: bool, before: Optional[str],
            log: Callable[[str], None] = print, keep_order: bool = False) -> List[Dict]:
    """Every (case, shape) job; ``keep_order``: shape by shape, the cases in the order given
    (the chunk sweep's interleaving), else ``order``'s."""
    start = time.monotonic()
    builds: Dict[str, CppBuild] = {}  # per checkout of grpo_kernels: "ours" or "before"
    if allow_build and shapes:
        for c in cases:
            if c.backend == "cpp" and c.group not in builds and case_defs.cheap_skip_reason(c, device) is None:
                builds[c.group] = CppBuild(device, shapes[0].torch_dtype, before if c.group == "before" else None)
    if device.type == "cpu" and builds:  # two cores: build first rather than beside the measurements
        log("building the cpp extension (if not cached) ...")
        for b in builds.values():
            b.wait(900.0)
    results: List[Dict] = []
    width = max([14] + [len(c.id) for c in cases])
    jobs = [(c, s) for s in shapes for c in cases] if keep_order else order(cases, shapes, device)
    for case, shape in jobs:
        elapsed = time.monotonic() - start
        tag = f"[{elapsed:6.1f}s] {case.kind:8s} {case.id:{width}s} {shape.name}"
        reason = case_defs.cheap_skip_reason(case, device)
        if reason is None and case.backend == "cpp" and case.group in builds:
            reason = builds[case.group].wait(((budget_s - elapsed) if budget_s else 900.0) - 30.0)
        if reason is None and budget_s is not None and elapsed > budget_s:
            reason = f"time budget of {budget_s:.0f} s spent"
        if reason is not None:
            results.append(_record(case, shape, device, status="skipped", reason=reason))
            log(f"{tag}  skipped: {reason}")
            continue
        # before:* import another grpo_kernels; on the CPU, ours:* then run alike, each in a fresh process
        alone = isolate or case.group == "before" or (before is not None and device.type == "cpu"
                                                      and case.group == "ours")
        rec = run_job(case, shape, device, isolate=alone, rounds=rounds, cold=cold, allow_build=allow_build,
                      before=before)
        results.append(rec)
        if rec["status"] == "ok":
            peak = rec.get("peak_bytes")
            first = f"  (first call {rec['first_call_s']:.1f} s)" if "first_call_s" in rec else ""
            log(f"{tag}  {rec['time_s'] * 1e3:10.2f} ms  peak {peak / 2**20 if peak is not None else float('nan'):9.1f}"
                f" MiB{first}")
        else:
            log(f"{tag}  {rec['status']}: {rec.get('reason')}")
    return results


# ================================================================== tables and plots

MiB = 2 ** 20
KIND_TITLES = {
    "loss": "GRPO loss, forward + backward (grads of hidden and weight)",
    "logprobs": "token_logprobs alone (reference-model pass, no grad)",
    "level": "sequence- vs token-level importance sampling (GSPO), forward + backward, slightly off-policy",
}
BAR = 1.15  # the speed bar: within 1.15x of the three-matmul floor on an H100


def _ok(r):
    return r.get("status") == "ok"


def _index(results):
    return {(r["kind"], r["case"], r["shape"]): r for r in results}


def _shapes(results):
    return list(OrderedDict.fromkeys(r["shape"] for r in results))


def _ms(s: Optional[float]) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _x(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MiB:.0f}"


def _time(idx, kind, case, shape):
    r = idx.get((kind, case, shape))
    return r["time_s"] if r is not None and _ok(r) else None


def _peak(r, minus_grads=False):
    if r is None or not _ok(r) or r.get("peak_bytes") is None:
        return None
    return max(0, r["peak_bytes"] - r.get("grad_bytes", 0)) if minus_grads else r["peak_bytes"]


def _before(case: str) -> Optional[str]:
    """ours:cpp -> before:cpp (the same case on the other checkout)."""
    return "before:" + case[len("ours:"):] if case.startswith("ours:") else (case if case.startswith("before:")
                                                                              else None)


def _token(case: str) -> str:
    """ours:cpp:sequence -> ours:cpp:token (the level table's baseline)."""
    return case.rsplit(":", 1)[0] + ":token"


def _check_delta(idx, r) -> str:
    if r.get("check") is None:
        return "-"
    if r["case"] == "ref:eager":
        return "(ref)"
    delta = verdict.check_delta(idx, r)
    return "-" if delta is None else f"{delta:.0e}"


def _columns(results, kind: str, shape: str):
    """The ratio columns of one table: (title, row case -> (kind, baseline case))."""
    idx = _index(results)
    have = lambda k, c: _time(idx, k, c, shape) is not None  # noqa: E731
    cols = []
    if kind == "loss":
        cols += [(f"÷ {f}", lambda c, f=f: ("floor", f)) for f in ("floor:real", "floor") if have("floor", f)]
    if kind == "level":
        cols.append(("÷ token", lambda c: (kind, _token(c))))
    if any(r["group"] == "before" and _ok(r) and r["kind"] == kind for r in results):
        cols.append(("÷ before", lambda c: (kind, _before(c))))
    cols += [(f"÷ {p}", lambda c, p=p: (kind, p)) for p in RATIO_PEERS if have(kind, p)]
    return cols


def shape_table(results: List[Dict], kind: str, shape: str) -> str:
    idx = _index(results)
    rows = [r for r in results if r["kind"] == kind and r["shape"] == shape]
    cols = _columns(results, kind, shape)
    mem_peers = [r for p in case_defs.MEMORY_PEERS
                 if (r := idx.get((kind, p, shape))) is not None and _ok(r) and _peak(r) is not None]
    head = ["case", "time ms"] + [t for t, _ in cols] + ["peak MiB", "peak−grads MiB"]
    head += [f"mem ÷ {r['case']}" for r in mem_peers] + ["Δcheck"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floors = [idx[("floor", f, shape)] for f in ("floor:real", "floor") if kind == "loss" and ("floor", f, shape) in idx]
    for r in rows + floors:
        if not _ok(r):
            continue
        t = r["time_s"]
        cells = [f"`{r['case']}`", _ms(t)] + [_x(t, _time(idx, *base(r["case"]), shape)) for _, base in cols]
        cells += [_mib(_peak(r)), _mib(_peak(r, True))] + [_x(_peak(r), _peak(m)) for m in mem_peers]
        cells.append(_check_delta(idx, r))
        out.append("| " + " | ".join(cells) + " |")
    for r in rows:
        if not _ok(r):
            out.append(f"\n- `{r['case']}` {r['status']}: {r.get('reason', '')}")
    return "\n".join(out)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _ratios(idx, shapes, row, base, value=lambda r: r["time_s"]) -> List[float]:
    """value(row) / value(base) on every shape that has both; row and base are (kind, case)."""
    pairs = [(idx.get((*row, s)), idx.get((*base, s))) for s in shapes]
    return [value(a) / value(b) for a, b in pairs if a and b and _ok(a) and _ok(b) and value(a) and value(b)]


def _summary(ratios) -> str:
    return f"{_geomean(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} shapes)"


def key_figures(results: List[Dict], gpu: bool) -> str:
    idx = _index(results)
    shapes = _shapes(results)
    ours = sorted({r["case"] for r in results if r["group"] == "ours" and r["kind"] == "loss" and _ok(r)})
    chunked = ours + ["liger", "trl:chunked"]  # every method that avoids the full [N, V] logits by design
    lines = []
    # memory at N=4096, V=32768 (every H / dtype of the set)
    mem_shapes = [s for s in shapes if any(r["shape"] == s and r["N"] == 4096 and r["V"] == 32768 for r in results)]
    for s in mem_shapes:
        ref = idx.get(("loss", "ref:eager", s))
        for c in chunked:
            r = idx.get(("loss", c, s))
            if r is None or not _ok(r) or _peak(ref) is None or _peak(r) is None:
                continue
            lines.append(
                f"- memory, {s}, `{c}` vs materialized reference: peak {_mib(_peak(r))} / {_mib(_peak(ref))} MiB"
                f" = **{_x(_peak(r), _peak(ref))}**; beyond inputs and grads {_mib(_peak(r, True))} /"
                f" {_mib(_peak(ref, True))} MiB = **{_x(_peak(r, True), _peak(ref, True))}**")
    # memory against Liger on every shape (issue 16's bar on the CPU: at or below Liger eager's)
    for c in ours:
        for p in ("liger:eager", "liger"):
            m = _ratios(idx, shapes, ("loss", c), ("loss", p), _peak)
            if m:
                at_or_below = sum(x <= 1.0 for x in m)
                lines.append(f"- memory, loss, `{c}` ÷ `{p}` (peak beyond inputs): {_summary(m)}; "
                             f"at or below on {at_or_below} of {len(m)} shapes")
    # speed: geometric mean over shapes of time(ours) / time(peer); floor ratios
    for kind in ("loss", "logprobs"):
        for c in sorted({r["case"] for r in results if r["group"] == "ours" and r["kind"] == kind and _ok(r)}):
            parts = [f"÷ {p} {_summary(x)}" for p in RATIO_PEERS if (x := _ratios(idx, shapes, (kind, c), (kind, p)))]
            for f in ("floor:real", "floor") if kind == "loss" else ():
                ratios = _ratios(idx, shapes, (kind, c), ("floor", f))
                if ratios:
                    bar = (f"; within the {BAR}x bar on {sum(x <= BAR for x in ratios)} of {len(ratios)} shapes"
                           if gpu and f == "floor:real" else "")
                    parts.append(f"÷ {f} max {max(ratios):.2f}x, geomean {_geomean(ratios):.2f}x{bar}")
            if parts:
                lines.append(f"- speed, {kind}, `{c}`: " + "; ".join(parts))
    # before -> after: this checkout's grpo_kernels against --compare-with's
    for kind in KIND_TITLES:
        for c in sorted({r["case"] for r in results if r["group"] == "ours" and r["kind"] == kind and _ok(r)}):
            row, base = (kind, c), (kind, _before(c))
            t, m = _ratios(idx, shapes, row, base), _ratios(idx, shapes, row, base, _peak)
            if t:
                mem = f"; peak {_summary(m)}" if m else ""
                lines.append(f"- after ÷ before, {kind}, `{c}` ÷ `{_before(c)}`: time {_summary(t)}{mem}")
    lines.append("- ratios are time(row) ÷ time(column case) on the same shape: below 1 is faster; "
                 "`Δcheck` is the relative difference of ||grad_hidden|| (loss) or the masked logp sum "
                 "(logprobs) from `ref:eager`, a guard that every row computes the same thing.")
    return "\n".join(lines)


def markdown(results: List[Dict], meta: Dict[str, str]) -> str:
    gpu = meta.get("device_type") == "cuda"
    parts = [f"### {meta['title']}", ""]
    parts += [f"- {k}: {v}" for k, v in meta.items() if k not in ("title", "device_type", "set")]
    parts += ["", "#### Key figures", "", key_figures(results, gpu), ""]
    for kind in KIND_TITLES:
        shapes = [s for s in _shapes(results) if any(r["kind"] == kind and r["shape"] == s for r in results)]
        if not shapes:
            continue
        parts += [f"#### {KIND_TITLES[kind]}", ""]
        for s in shapes:
            label = next(r for r in results if r["shape"] == s)
            real = next((r.get("real_tokens") for r in results if r["shape"] == s and r.get("real_tokens")), None)
            parts += [f"**{s}** (N={label['N']}, real tokens {real}, H={label['H']}, V={label['V']}, {label['dtype']})",
                      "", shape_table(results, kind, s), ""]
    return "\n".join(parts)


def plot(results: List[Dict], path_prefix: str) -> List[str]:
    """time and peak memory vs N, one column per (H, V, dtype), one figure per kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    styles = {"floor": "k--x", "ours": "-o", "before": "--^", "peer": ":s"}
    written = []
    for kind in KIND_TITLES:
        rows = [r for r in results if _ok(r) and (r["kind"] == kind or (kind == "loss" and r["kind"] == "floor"))]
        if not any(r["kind"] == kind for r in rows):
            continue
        cols = list(OrderedDict.fromkeys((r["H"], r["V"], r["dtype"]) for r in rows))
        fig, axes = plt.subplots(2, len(cols), figsize=(max(6.0, 4.2 * len(cols)), 7), squeeze=False)
        for j, (H, V, dt) in enumerate(cols):
            sub = [r for r in rows if (r["H"], r["V"], r["dtype"]) == (H, V, dt)]
            for case in OrderedDict.fromkeys(r["case"] for r in sub):
                pts = sorted((r["N"], r["time_s"] * 1e3, _peak(r)) for r in sub if r["case"] == case)
                group = next(r["group"] for r in sub if r["case"] == case)
                style = "k:+" if case == "floor:real" else styles.get(group, ":s")
                axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], style, label=case, ms=4)
                if pts[0][2] is not None and group != "floor":
                    axes[1][j].plot([p[0] for p in pts], [(p[2] or 0) / MiB for p in pts], style, label=case, ms=4)
            axes[0][j].set_title(f"H={H} V={V} {dt}", fontsize=9)
            for i, ylabel in enumerate(("time (ms)", "peak MiB beyond inputs")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (positions)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.suptitle(KIND_TITLES[kind], fontsize=10)
        fig.tight_layout()
        path = f"{path_prefix}_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ================================================================== the chunk sweep


def chunk_rows_of(case_id: str, shape: Shape, real: int, device) -> Optional[int]:
    """Rows per chunk that grpo_kernels' plan gives a chunk-sweep case on ``real`` rows of this shape."""
    parts = case_id.split(":")
    if len(parts) != 3 or parts[0] != "ours":
        return None
    try:
        from grpo_kernels import plan
        from grpo_kernels.backends import get_backend

        backend = get_backend(parts[1], device, shape.torch_dtype)
        name, _, value = parts[2].partition("=")
        if name == "rows":
            return plan.chunk_rows(real, shape.V, shape.torch_dtype, backend, int(value), device)
        rows = lambda: plan.chunk_rows(real, shape.V, shape.torch_dtype, backend, None, device)  # noqa: E731
        return case_defs.with_chunk_bytes(rows, value if name == "bytes" and value else None)()
    except Exception:
        return None


def merge_repeats(runs: List[List[Dict]]) -> List[Dict]:
    """One record per (kind, case, shape) from the repeats: every timed call's time, the time the
    minimum of them (noise on a shared machine only adds), the peak the median of the repeats'."""
    merged: Dict[tuple, Dict] = OrderedDict()
    for run in runs:
        for r in run:
            key = (r["kind"], r["case"], r["shape"])
            m = merged.get(key)
            if m is None or not _ok(m):
                merged[key] = dict(r, repeat_min_s=[r["time_s"]] if _ok(r) else [],
                                   repeat_peak_bytes=[r.get("peak_bytes")] if _ok(r) else [])
                continue
            if _ok(r):
                m["times_s"] = list(m["times_s"]) + list(r["times_s"])
                m["repeat_min_s"].append(r["time_s"])
                m["repeat_peak_bytes"].append(r.get("peak_bytes"))
    for m in merged.values():
        if _ok(m):
            m["time_s"] = m["min_s"] = min(m["times_s"])
            m["median_s"] = statistics.median(m["times_s"])
            peaks = [p for p in m["repeat_peak_bytes"] if p is not None]
            if peaks:
                m["peak_bytes"] = statistics.median(peaks)
    return list(merged.values())


def chunk_table(results: List[Dict], shape: str) -> str:
    """One shape of the chunk sweep: every grid point against the default, Liger eager and the floor."""
    idx = _index(results)
    rows = [r for r in results if r["shape"] == shape and r["kind"] == "chunk"]
    liger = idx.get(("chunk", "liger:eager", shape))
    floor_r = idx.get(("floor", "floor:real", shape))
    head = ["case", "rows/chunk", "logits MiB", "time ms", "÷ own default", "÷ liger:eager", "÷ floor:real",
            "peak MiB", "peak−grads MiB", "peak ÷ liger:eager", "repeats (min ms each)", "Δcheck"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows + ([floor_r] if floor_r else []):
        if not _ok(r):
            out.append(f"| `{r['case']}` | {r['status']}: {r.get('reason', '')[:120]} |" + " |" * (len(head) - 2))
            continue
        parts = r["case"].split(":")
        default = idx.get(("chunk", f"ours:{parts[1]}:default", shape)) if parts[0] == "ours" else None
        t = r["time_s"]
        n_rows = r.get("chunk_rows")
        chunk_mib = "-" if r.get("logits_bytes") is None else f"{r['logits_bytes'] / MiB:.0f}"
        lig = lambda v: _x(v(r), v(liger)) if liger is not None and _ok(liger) else "-"  # noqa: E731
        check_ref = idx.get(("chunk", "ours:torch:default", shape))
        check = "-"
        if r.get("check") is not None and check_ref and _ok(check_ref) and check_ref.get("check"):
            check = f"{abs(r['check'] - check_ref['check']) / abs(check_ref['check']):.0e}"
        out.append("| " + " | ".join([
            f"`{r['case']}`", "-" if n_rows is None else str(n_rows), chunk_mib, _ms(t),
            _x(t, default["time_s"]) if default and _ok(default) else "-",
            lig(lambda x: x["time_s"]),
            _x(t, floor_r["time_s"]) if floor_r and _ok(floor_r) else "-",
            _mib(_peak(r)), _mib(_peak(r, True)), lig(_peak),
            " / ".join(_ms(x) for x in r.get("repeat_min_s", [t])), check]) + " |")
    return "\n".join(out)


def sweep_markdown(results: List[Dict], meta: Dict[str, str]) -> str:
    parts = [f"### {meta['title']}", ""]
    parts += [f"- {k}: {v}" for k, v in meta.items() if k not in ("title", "device_type", "set")]
    for s in _shapes(results):
        label = next(r for r in results if r["shape"] == s)
        real = next((r.get("real_tokens") for r in results if r["shape"] == s and r.get("real_tokens")), None)
        parts += ["", f"**{s}** (N={label['N']}, real tokens {real}, H={label['H']}, V={label['V']}, {label['dtype']})",
                  "", chunk_table(results, s)]
    return "\n".join(parts)


def run_sweep(args, device: torch.device, log=print) -> int:
    """--sweep-chunks: the chunk-size grid of every backend at every shape of the set, with Liger
    eager and the floor, each job in a fresh process, the whole job list ``--repeats`` times,
    interleaved (forward, then backward order, ...) so that a drift of the machine's speed falls
    on every case alike."""
    set_name = args.set or "chunks"
    shapes = [s for s in case_defs.SETS[set_name] if (not args.n or s.N in args.n)
              and (not args.shapes or s.name in args.shapes)]
    if args.shapes and not shapes:
        ap.error(f"--shapes {' '.join(args.shapes)}: none in set {set_name!r} "
                 f"({' '.join(s.name for s in case_defs.SETS[set_name])})")
    grid = case_defs.chunk_grid(args.chunk_backends, args.chunk_rows, args.chunk_bytes)
    if args.cases:
        grid = [c for c in grid if c.id in args.cases]
    jobs_per_repeat = len(grid) * len(shapes)
    log(f"grpo_kernels chunk sweep: {len(shapes)} shapes x {len(grid)} cases x {args.repeats} repeats "
        f"({jobs_per_repeat * args.repeats} processes), out {args.out}")
    # rows per chunk as planned now, before any job runs (the jobs import this checkout's plan.py)
    planned = {}
    for shape in shapes:
        real = int(case_defs.completion_mask(shape.B, shape.T, shape.pad, "cpu").sum())
        for c in grid:
            planned[(c.id, shape.name)] = chunk_rows_of(c.id, shape, real, device)
    load0, t0 = _loadavg(), time.monotonic()
    runs = []
    for k in range(args.repeats):
        order_ = grid if k % 2 == 0 else grid[::-1]
        runs.append(run_set(order_, shapes, device, rounds=args.rounds, cold=False, isolate=True,
                            budget_s=args.budget_s, allow_build=True, before=None, log=log,
                            keep_order=True))
    results = merge_repeats(runs)
    for r in results:
        shape = case_defs.SHAPES[r["shape"]]
        r["chunk_rows"] = planned.get((r["case"], r["shape"]))
        if r["chunk_rows"] is not None:
            r["logits_bytes"] = r["chunk_rows"] * shape.V * shape.torch_dtype.itemsize
    meta = {
        "title": f"grpo_kernels chunk sweep: set `{set_name}` on {device.type}",
        "device_type": device.type, "set": set_name, "device": _device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(["bench/report.py"] + (args.argv if args.argv is not None else sys.argv[1:])),
        "versions": f"torch {torch.__version__}, liger-kernel {_version('liger-kernel')}, grpo_kernels {_git(REPO)}",
        "workload": "GRPO loss forward + backward, dapo, beta 0, on-policy, ~20% padding (bench/cases.py)",
        "timing": (f"each job a fresh process: an untimed first call, then {args.rounds or 2} timed round(s); "
                   f"the job list {args.repeats}x, interleaved; time = the minimum over every timed call"),
        "memory": "VmHWM − VmRSS over the first timed call (after malloc_trim), the median over the repeats; "
                  "`peak` includes grad_hidden + grad_weight, `peak−grads` does not",
        "wall time": f"{time.monotonic() - t0:.0f} s",
        "load average (1 min) at start / end": f"{load0} / {_loadavg()}",
    }
    md = sweep_markdown(results, meta)
    with open(os.path.join(args.out, "chunk_sweep.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "chunk_sweep.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    log("\n" + md)
    log(f"\nwrote {os.path.join(args.out, 'chunk_sweep.md')}, chunk_sweep.json")
    return 0


# ================================================================== the command


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "not installed"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def _git(path: str) -> str:
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=path, capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        rev, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        return (rev + (" (+ uncommitted changes)" if dirty else "")) or "unknown"
    except Exception:
        return "unknown"


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return "?"


def _write(out: str, results: List[Dict], meta: Dict) -> str:
    md = markdown(results, meta)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    pngs = plot(results, os.path.join(out, meta.get("set", meta["device_type"])))
    print("\n" + md)
    print(f"\nwrote {os.path.join(out, 'report.md')}, results.json" + "".join(f", {os.path.basename(p)}" for p in pngs))
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: smallest CPU shape, 1 cold call, in-process")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "out"), help="output directory")
    ap.add_argument("--set", choices=sorted(case_defs.SETS), help="shape set (default: from the device)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--n", type=int, nargs="*", help="only these N")
    ap.add_argument("--shapes", nargs="*", help="only these shape names (e.g. N8192-H4096-V151936-bf16)")
    ap.add_argument("--cases", nargs="*", help="only these case ids (e.g. ours:torch ref:eager floor)")
    ap.add_argument("--kinds", nargs="*", choices=["loss", "logprobs", "floor", "level"],
                    help=f"only these kinds (default {' '.join(case_defs.REPORT_KINDS)})")
    ap.add_argument("--rounds", type=int, help="timed rounds (default: CPU 2, quick 1, CUDA ~0.3 s worth)")
    ap.add_argument("--budget-s", type=float, help="stop starting jobs after this many seconds "
                    "(default 360 on the GPU, so that one run fits in 8 minutes; 75 with --quick)")
    ap.add_argument("--in-process", action="store_true", help="CPU: no subprocess per case (less isolated memory)")
    ap.add_argument("--compare-with", metavar="CHECKOUT", help="also run every selected ours:* case as before:* "
                    "on the grpo_kernels of this other checkout (a subprocess each), for before/after ratios")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only re-render report.md and the plots from a "
                    "results.json written earlier (into --out)")
    g = ap.add_argument_group("chunk sweep (--sweep-chunks)")
    g.add_argument("--sweep-chunks", action="store_true", help="the loss of every backend at a grid of chunk "
                   "sizes (rows and byte budgets) on every shape of --set (default `chunks`: the CPU set plus "
                   "V=151936), with Liger eager and floor:real; writes chunk_sweep.md / .json")
    g.add_argument("--chunk-rows", type=int, nargs="*", default=list(case_defs.CHUNK_ROWS),
                   help=f"rows-per-chunk grid (default {' '.join(map(str, case_defs.CHUNK_ROWS))})")
    g.add_argument("--chunk-bytes", nargs="*", default=list(case_defs.CHUNK_BYTES),
                   help=f"byte-budget grid, GRPO_KERNELS_CHUNK_BYTES values (default {' '.join(case_defs.CHUNK_BYTES)})")
    g.add_argument("--chunk-backends", nargs="*", default=list(case_defs.CHUNK_BACKENDS), help="backends swept")
    g.add_argument("--repeats", type=int, default=2, help="times the whole job list runs, interleaved (default 2)")
    args = ap.parse_args(argv)
    args.argv = argv
    os.makedirs(args.out, exist_ok=True)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        _write(args.out, saved["results"], saved["meta"])
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.sweep_chunks:
        return run_sweep(args, device)
    set_name = args.set or case_defs.default_set(device, args.quick)
    shapes = [s for s in case_defs.SETS[set_name] if (not args.n or s.N in args.n)
              and (not args.shapes or s.name in args.shapes)]
    if args.shapes and not shapes:
        ap.error(f"--shapes {' '.join(args.shapes)}: none in set {set_name!r} "
                 f"({' '.join(s.name for s in case_defs.SETS[set_name])})")
    kinds = args.kinds or case_defs.REPORT_KINDS
    selected = case_defs.select(kinds, args.cases, device_type=device.type)
    before = os.path.abspath(args.compare_with) if args.compare_with else None
    if before:
        if not os.path.isfile(os.path.join(before, "grpo_kernels", "__init__.py")):
            ap.error(f"--compare-with {before}: no grpo_kernels/ there")
        wanted = {c.id[len("ours:"):] for c in selected if c.group == "ours"}
        selected += [c for c in case_defs.select(kinds, before=True) if c.id[len("before:"):] in wanted]
    cpu_quick = args.quick and device.type == "cpu"
    rounds = args.rounds or (1 if args.quick else None)
    if args.budget_s is not None:
        budget = args.budget_s
    else:  # GPU: one run within 8 minutes; quick: CI's 2 minutes
        budget = 360.0 if device.type == "cuda" else (75.0 if args.quick else None)
    isolate = device.type == "cpu" and not args.quick and not args.in_process

    load0 = _loadavg()
    t0 = time.monotonic()
    print(f"grpo_kernels bench: set {set_name!r} on {device} ({len(shapes)} shapes x {len(selected)} cases), "
          f"out {args.out}", flush=True)
    results = run_set(selected, shapes, device, rounds=rounds, cold=cpu_quick, isolate=isolate, budget_s=budget,
                      allow_build=not args.quick, before=before, log=lambda s: print(s, flush=True))
    wall = time.monotonic() - t0

    if device.type == "cuda":
        timing = ("CUDA events around each call after an untimed first call and one warm-up call; "
                  "3-20 repetitions (~0.3 s per case), median")
        memory = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the call"
    else:
        timing = f"time.perf_counter, an untimed first call, then the minimum of {rounds or 2} timed round(s)"
        if cpu_quick:
            timing = ("QUICK SMOKE RUN: one cold call per case (includes compilation and lazy initialization, "
                      "also in the memory figure): these are not benchmark numbers")
        memory = ("process VmHWM after writing 5 to /proc/self/clear_refs (post input creation, malloc_trim'd), "
                  "minus VmRSS before the call; " + ("one fresh subprocess per case" if isolate else "in-process"))
    meta = {
        "title": f"grpo_kernels benchmarks: set `{set_name}` on {device.type}",
        "device_type": device.type,
        "set": set_name,
        "device": _device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv else "bench/report.py"]
                                        + (argv if argv is not None else sys.argv[1:])),
        "versions": (f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
                     f"trl {_version('trl')}, liger-kernel {_version('liger-kernel')}, "
                     f"transformers {_version('transformers')}, pytest-benchmark {_version('pytest-benchmark')}, "
                     f"grpo_kernels {_git(REPO)}"),
        "backend='auto' picks": case_defs.auto_backend(device, shapes[0].torch_dtype if shapes else torch.float32),
        "workload": ("TRL 1.16 defaults: loss_type dapo, beta 0, epsilon 0.2, on-policy (old_logps None), "
                     "temperature 1; B = groups x 4 completions of T tokens, right-padded, ~20% padding"),
        "timing": timing,
        "memory": memory + "; `peak` includes the gradients, `peak−grads` subtracts grad_hidden + grad_weight",
        "floor": ("`floor` = h@W.T, G@W, G.T@h over all N rows; `floor:real` = the same over the real tokens "
                  "(a padding-skipping method needs only these)"),
        "wall time": f"{wall:.0f} s",
        "load average (1 min) at start / end": f"{load0} / {_loadavg()} (other processes competing for the cores skew times)",
    }
    if before:
        meta["before"] = (f"`before:*` = the grpo_kernels of {before} at {_git(before)}, each case in a fresh "
                          "process (on the CPU their `ours:*` counterparts too); `ours:*` = this checkout's")
    _write(args.out, results, meta)
    return _verdict(results)


def _verdict(results) -> int:
    """The exit status: 1 when a row is an error / OOM or a check is over its tolerance
    (bench/verdict.py), with one line per reason."""
    failed = verdict.failures(results)
    for line in failed:
        print(f"bench FAILED: {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark report: detects the device, runs its set, writes a markdown table, JSON and plots.

    python bench/report.py                # CPU set on a CPU machine, GPU set with CUDA
    python bench/report.py --quick        # CI smoke run: smallest CPU shape, 1 round, in-process
    python bench/report.py --out DIR      # outputs (default bench/out/)

Outputs under --out: report.md (also printed to stdout), results.json, <set>_loss.png and
<set>_logprobs.png (time and peak memory vs N per case). No assertion on time anywhere.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import cases as case_defs  # noqa: E402
from bench import writer  # noqa: E402
from bench.runner import REPO, run_set  # noqa: E402
from bench.shapes import SETS, default_set, shapes_for  # noqa: E402


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


def _git() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + (" (+ uncommitted changes)" if dirty else "")) or "unknown"
    except Exception:
        return "unknown"


def _auto_backend(device, dtype) -> str:
    try:
        from grpo_kernels.backends import get_backend

        return get_backend("auto", device, dtype).name
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: smallest CPU shape, 1 round, in-process")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "out"), help="output directory")
    ap.add_argument("--set", choices=sorted(SETS), help="shape set (default: from the device)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--n", type=int, nargs="*", help="only these N")
    ap.add_argument("--cases", nargs="*", help="only these case ids (e.g. ours:torch ref:eager floor)")
    ap.add_argument("--kinds", nargs="*", choices=["loss", "logprobs", "floor"], help="only these kinds")
    ap.add_argument("--rounds", type=int, help="timed rounds on the CPU (default 2, quick 1)")
    ap.add_argument("--budget-s", type=float, help="stop starting jobs after this many seconds "
                    "(default 360 on the GPU, so that one run fits in 8 minutes; 75 with --quick)")
    ap.add_argument("--in-process", action="store_true", help="CPU: no subprocess per case (less isolated memory)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only re-render report.md and the plots from a "
                    "results.json written earlier (into --out)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        md = writer.markdown(saved["results"], saved["meta"])
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(md + "\n")
        set_name = saved["meta"].get("set", saved["meta"]["device_type"])
        writer.plot(saved["results"], os.path.join(args.out, set_name))
        print(md)
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_name = args.set or default_set(device, args.quick)
    shapes = shapes_for(set_name, args.n)
    selected = case_defs.select(args.kinds, args.cases)
    rounds = args.rounds or (1 if args.quick else 2)
    if args.budget_s is not None:
        budget = args.budget_s
    else:  # GPU: one run within 8 minutes; quick: CI's 2 minutes
        budget = 360.0 if device.type == "cuda" else (75.0 if args.quick else None)
    isolate = device.type == "cpu" and not args.quick and not args.in_process
    os.makedirs(args.out, exist_ok=True)

    load0 = _loadavg()
    t0 = time.monotonic()
    print(f"grpo_kernels bench: set {set_name!r} on {device} ({len(shapes)} shapes x {len(selected)} cases), "
          f"out {args.out}", flush=True)
    results = run_set(selected, shapes, device, warmup=0 if device.type == "cpu" else 1, rounds=rounds,
                      isolate=isolate, budget_s=budget, allow_build=not args.quick,
                      first_call=not (args.quick and device.type == "cpu"),
                      log=lambda s: print(s, flush=True))
    wall = time.monotonic() - t0

    if device.type == "cuda":
        timing = ("CUDA events around each call after an untimed first call and one warm-up call; "
                  "3-20 repetitions (~0.3 s per case), median")
        memory = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the call"
    else:
        timing = f"time.perf_counter, an untimed first call, then the minimum of {rounds} timed round(s)"
        if args.quick:
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
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv else "bench/report.py"] + (argv if argv is not None else sys.argv[1:])),
        "versions": (f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}, "
                     f"trl {_version('trl')}, liger-kernel {_version('liger-kernel')}, "
                     f"transformers {_version('transformers')}, grpo_kernels {_git()}"),
        "backend='auto' picks": _auto_backend(device, shapes[0].torch_dtype if shapes else torch.float32),
        "workload": ("TRL 1.16 defaults: loss_type dapo, beta 0, epsilon 0.2, on-policy (old_logps None), "
                     "temperature 1; B = groups x 4 completions of T tokens, right-padded, ~20% padding"),
        "timing": timing,
        "memory": memory + "; `peak` includes the gradients, `peak−grads` subtracts grad_hidden + grad_weight",
        "floor": ("`floor` = h@W.T, G@W, G.T@h over all N rows; `floor:real` = the same over the real tokens "
                  "(a padding-skipping method needs only these)"),
        "wall time": f"{wall:.0f} s",
        "load average (1 min) at start / end": f"{load0} / {_loadavg()} (other processes competing for the cores skew times)",
    }
    md = writer.markdown(results, meta)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    pngs = writer.plot(results, os.path.join(args.out, set_name))
    print("\n" + md)
    print(f"\nwrote {os.path.join(args.out, 'report.md')}, results.json" + "".join(f", {os.path.basename(p)}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

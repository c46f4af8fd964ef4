"""CPU comparison of ``distill_loss`` with TRL 1.16's ``_chunked_divergence_loss`` (its torch path
on the CPU, ``ChunkedDivergenceFunction``), Liger's ``LigerFusedLinearJSDLoss`` (eager) and the
materialized loss (both [N, V] logits, autograd: ``reference.reference_distill_loss`` in fp32),
forward + backward.

Every (method, beta) runs in a fresh process: one warm-up call, then one timed call (wall and
CPU time: on a shared machine the CPU time is the steadier figure) whose peak
resident memory beyond what existed before it (``grpo_kernels.memory.peak_memory_bytes``: the
gradients it allocates included, the inputs not) is recorded.

    python bench/distill_compare.py                      # N=1024, H=256, H_t=512, V=32768, fp32
    python bench/distill_compare.py --n 2048 --betas 0 1
    python bench/distill_compare.py --backend torch      # ours on one backend (default: auto)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("ours", "trl", "liger", "materialized")


def _inputs(n, h, ht, v, seed=0, device="cpu", dtype="fp32"):
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(seed)
    d = dict(hidden=torch.randn(1, n, h, generator=g), weight=torch.randn(v, h, generator=g) * 0.05,
             teacher_hidden=torch.randn(1, n, ht, generator=g), teacher_weight=torch.randn(v, ht, generator=g) * 0.05)
    d = {k: x.to(device=device, dtype=dt) for k, x in d.items()}
    d["mask"] = torch.ones(1, n, dtype=torch.bool, device=device)
    return d


def _step(method, beta, d, backend="auto"):
    """One forward + backward of ``method``; returns the loss."""
    if method in ("ours", "materialized"):
        from grpo_kernels import distill_loss

        loss = distill_loss(d["hidden"], d["weight"], d["teacher_hidden"], d["teacher_weight"], d["mask"], beta=beta,
                            backend="reference" if method == "materialized" else backend)
    elif method == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        loss, _, _ = _chunked_divergence_loss(d["hidden"], d["teacher_hidden"], d["weight"], d["teacher_weight"],
                                              d["mask"], beta)
    else:
        import torch
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        n = d["hidden"].shape[1]
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False)
        loss = fn(d["hidden"].view(n, -1), d["weight"], d["teacher_hidden"].view(n, -1), d["teacher_weight"],
                  torch.zeros(n, dtype=torch.long, device=d["hidden"].device))
    loss.backward()
    return loss


def one(method, beta, n, h, ht, v, threads=None, backend="auto", device="cpu", dtype="fp32"):
    """Runs in the child process: warm-up, then the timed and measured call."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if threads:
        torch.set_num_threads(threads)

    from grpo_kernels.memory import peak_memory_bytes

    d = _inputs(n, h, ht, v, device=device, dtype=dtype)
    for k in ("hidden", "weight"):
        d[k].requires_grad_(True)
    _step(method, beta, d, backend)
    for k in ("hidden", "weight"):
        d[k].grad = None
    box = {}

    def timed():
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = _step(method, beta, d, backend).detach()
        sync()
        box["seconds"], box["cpu"] = time.perf_counter() - t0, time.process_time() - c0
        box["loss"] = float(loss)

    peak = peak_memory_bytes(timed, dev)
    if method == "ours":
        from grpo_kernels.backends import divergence_backend
        from grpo_kernels.options import ExecutionOptions

        method = f"ours-{divergence_backend(ExecutionOptions(backend=backend), dev, d['hidden'].dtype)[0].name}"
    return dict(method=method, beta=beta, seconds=box["seconds"], cpu_seconds=box["cpu"], peak_mib=None if peak is None else peak / 2**20,
                loss=box["loss"], threads=torch.get_num_threads())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--ht", type=int, default=512)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--backend", default="auto", help="ours: the distill_loss backend (default auto)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--json-out", help="also write the rows to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--one", nargs=2, metavar=("METHOD", "BETA"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], float(a.one[1]), a.n, a.h, a.ht, a.v, a.threads, a.backend, a.device, a.dtype)))
        return
    print(f"N={a.n} H={a.h} H_t={a.ht} V={a.v} {a.dtype} on {a.device}, forward+backward, fresh process per row")
    # the child imports this checkout's grpo_kernels, not whichever is installed
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    print(f"{'method':<14}{'beta':>6}{'seconds':>10}{'CPU s':>10}{'peak MiB':>10}{'loss':>14}")
    rows = []
    for beta in a.betas:
        for method in a.methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", method, str(beta), "--n", str(a.n),
                   "--h", str(a.h), "--ht", str(a.ht), "--v", str(a.v), "--threads", str(a.threads),
                   "--backend", a.backend, "--device", a.device, "--dtype", a.dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:  # a peer that cannot run here: its row says why, the others go on
                print(f"{method:<14}{beta:>6}  FAILED: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", flush=True)
                rows.append(dict(method=method, beta=beta, error=proc.stderr[-2000:]))
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{r['method']:<14}{r['beta']:>6}{r['seconds']:>10.2f}{r['cpu_seconds']:>10.2f}{r['peak_mib']:>10.0f}"
                  f"{r['loss']:>14.6g}",
                  flush=True)

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(dict(n=a.n, h=a.h, ht=a.ht, v=a.v, dtype=a.dtype, device=a.device, rows=rows), f, indent=1)
    return 1 if any("error" in r for r in rows if r["method"].startswith("ours")) else 0


if __name__ == "__main__":
    sys.exit(main())

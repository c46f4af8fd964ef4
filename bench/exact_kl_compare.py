"""``grpo_loss(kl_estimator="full")`` (the exact KL to the reference, from the reference's hidden
states and head, in the policy's sweep) against the k3 path it replaces (the reference's
log-probs from ``token_logprobs`` under ``no_grad``, then ``grpo_loss`` with ``ref_logps``),
forward + backward, a fresh process per row, on the CPU or a GPU.

Both rows count what a training step does for its KL term: the k3 row includes the reference
log-prob pass (2NHV flops) that the exact row folds into the loss's sweep (one more matmul per
chunk: the same 2NHV). Peak is the memory beyond the inputs, gradients included.

    python bench/exact_kl_compare.py                        # N=2048, H=256, H_r=512, V=32768, fp32
    python bench/exact_kl_compare.py --device cuda --dtype bf16 --n 4096 --h 2048 --hr 2048 --v 151936
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("k3", "full")


def _inputs(n, h, hr, v, device, dtype, seed=0):
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    g = torch.Generator().manual_seed(seed)
    B = 8
    T = n // B
    d = dict(hidden=torch.randn(B, T, h, generator=g), weight=torch.randn(v, h, generator=g) * 0.05,
             ref_hidden=torch.randn(B, T, hr, generator=g), ref_weight=torch.randn(v, hr, generator=g) * 0.05)
    d = {k: x.to(device=device, dtype=dt) for k, x in d.items()}
    d["targets"] = torch.randint(0, v, (B, T), generator=g).to(device)
    d["advantages"] = torch.randn(B, generator=g).to(device)
    d["mask"] = torch.ones(B, T, dtype=torch.bool, device=device)
    return d


def _step(method, d, backend):
    import torch

    from grpo_kernels import grpo_loss, token_logprobs

    kw = dict(beta=0.04, loss_type="dapo", backend=backend)
    if method == "k3":
        with torch.no_grad():
            ref = token_logprobs(d["ref_hidden"], d["ref_weight"], d["targets"], backend=backend)
        loss = grpo_loss(d["hidden"], d["weight"], d["targets"], d["advantages"], d["mask"], None, ref, **kw)
    else:
        loss = grpo_loss(d["hidden"], d["weight"], d["targets"], d["advantages"], d["mask"], None, None,
                         ref_hidden=d["ref_hidden"], ref_weight=d["ref_weight"], kl_estimator="full", **kw)
    loss.backward()
    return loss


def one(method, a):
    """In the child: a warm-up call, then the timed and measured one."""
    import torch

    from grpo_kernels.memory import peak_memory_bytes

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    d = _inputs(a.n, a.h, a.hr, a.v, a.device, a.dtype)
    for k in ("hidden", "weight"):
        d[k].requires_grad_(True)
    _step(method, d, a.backend)
    box = {}

    def timed():
        for k in ("hidden", "weight"):
            d[k].grad = None
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = _step(method, d, a.backend).detach()
        sync()
        box.update(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0, loss=float(loss))

    peak = peak_memory_bytes(timed, dev)
    return dict(method=method, seconds=box["seconds"], cpu_seconds=box["cpu"],
                peak_mib=None if peak is None else peak / 2**20, loss=box["loss"], threads=torch.get_num_threads())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=256)
    p.add_argument("--hr", type=int, default=512)
    p.add_argument("--v", type=int, default=32768)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--json-out")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a)))
        return 0
    print(f"N={a.n} H={a.h} H_r={a.hr} V={a.v} {a.dtype} on {a.device}, backend {a.backend}, forward+backward")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    print(f"{'KL':<6}{'seconds':>10}{'CPU s':>10}{'peak MiB':>10}{'loss':>14}")
    rows = []
    for method in METHODS:
        cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--one", method]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{method:<6}  FAILED: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", flush=True)
            rows.append(dict(method=method, error=proc.stderr[-2000:]))
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{method:<6}{r['seconds']:>10.2f}{r['cpu_seconds']:>10.2f}{r['peak_mib']:>10.0f}{r['loss']:>14.6g}", flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(dict(vars(a), rows=rows), f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

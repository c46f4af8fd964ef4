"""Runs one case on one shape in a fresh process (the CPU measurements) and prints its record.

python bench/worker.py '{"kind": "loss", "case": "ours:torch", "shape": "N1024-H1024-V32768-fp32",
                         "warmup": 1, "rounds": 2}'
The record is the last stdout line, prefixed with ``BENCH_RESULT ``.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.measure import lookup, run_case, shape_by_name  # noqa: E402

PREFIX = "BENCH_RESULT "


def main(argv) -> int:
    job = json.loads(argv[1])
    device = torch.device(job.get("device", "cpu"))
    rec = run_case(lookup(job["kind"], job["case"]), shape_by_name(job["shape"]), device,
                   warmup=job.get("warmup", 1), rounds=job.get("rounds", 2))
    sys.stdout.flush()
    print(PREFIX + json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""One loss case in one process, for paired whole-process timings (A B A B ... under
``/usr/bin/time -v`` or any such tool): the inputs of a bench shape, a warm-up call, then one
timed call; prints its time and its peak RSS beyond the inputs (gradients included).

    python bench/one_case.py N4096-H1024-V32768-fp32 cpp        # plan.py's rule
    GRPO_KERNELS_CHUNK_BYTES=256MiB python bench/one_case.py N4096-H1024-V32768-fp32 cpp
    python bench/one_case.py N4096-H1024-V32768-fp32 liger      # Liger eager (compiled=False)
"""
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import cases  # noqa: E402
from grpo_kernels.memory import peak_memory_bytes  # noqa: E402


def main(shape_name: str, what: str) -> None:
    shape, device = cases.SHAPES[shape_name], torch.device("cpu")
    inp = cases.make_inputs(shape, device)
    run = (cases.build_liger_loss(inp, device, compiled=False) if what == "liger"
           else cases.ours_loss(what)(inp, device))
    run()
    inp.zero_grads()
    gc.collect()
    cases.malloc_trim()
    t0 = time.perf_counter()
    peak = peak_memory_bytes(run, device)
    dt = time.perf_counter() - t0
    print(f"{shape.name} {what} chunk={os.environ.get('GRPO_KERNELS_CHUNK_BYTES', 'rule')} {dt:.3f} s "
          f"peak {peak / 2**20:.0f} MiB peak-grads {(peak - inp.grad_bytes) / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""Run one forward+backward in this process and print its peak memory beyond the inputs.

Usage: python memory_probe.py BACKEND N V H CHUNK_BYTES. Linux only: the high-water mark
(VmHWM) is reset after the inputs exist, by writing 5 to /proc/self/clear_refs.
"""
import os
import sys


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def main():
    backend, N, V, H, chunk_bytes = sys.argv[1], *map(int, sys.argv[2:6])
    os.environ["GRPO_KERNELS_CHUNK_BYTES"] = str(chunk_bytes)
    import torch

    torch.set_num_threads(1)
    from grpo_kernels import grpo_loss

    g = torch.Generator().manual_seed(0)
    B = N // 64
    hidden = torch.randn(B, 64, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    targets = torch.randint(0, V, (B, 64), generator=g)
    mask = torch.ones(B, 64, dtype=torch.bool)
    adv = torch.randn(B, generator=g)
    # warm up allocator paths and imports on a tiny problem, then measure the real one
    grpo_loss(hidden[:1, :2], weight, targets[:1, :2], adv[:1], mask[:1, :2], backend=backend).backward()
    hidden.grad = weight.grad = None
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss = grpo_loss(hidden, weight, targets, adv, mask, backend=backend)
    loss.backward()
    peak = _status_kb("VmHWM")
    print((peak - base) * 1024)


if __name__ == "__main__":
    main()

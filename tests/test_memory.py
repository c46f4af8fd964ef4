"""Peak memory: the chunked path stays under its chunk bound; the oracle grows with N*V.

Each case runs in a fresh subprocess, whose resident-set high-water mark is reset after
its inputs exist (Linux /proc/self/clear_refs), so the figure is what the loss allocates.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = os.path.join(os.path.dirname(__file__), "memory_probe.py")
MiB = 2**20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")


# glibc's adaptive mmap threshold and lazy trimming make RSS lag or lead the live bytes by
# tens of MiB from run to run (measured 26-70 MiB for one case); a fixed threshold returns
# every large buffer on free, so the high-water mark follows the live allocations (+-0.2 MiB).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def peak_bytes(backend, N, V, H, chunk_bytes=16 * MiB):
    out = subprocess.run([sys.executable, PROBE, backend, str(N), str(V), str(H), str(chunk_bytes)],
                         capture_output=True, text=True, check=True, timeout=600,
                         env={**os.environ, **MALLOC_ENV})
    return int(out.stdout.strip().splitlines()[-1])


def test_chunked_peak_stays_under_chunk_bound_while_reference_grows():
    N, V, H = 1024, 16384, 64
    logits_bytes = N * V * 4  # one fp32 [N, V] matrix: 64 MiB
    grads_bytes = (N * H + 2 * V * H) * 4  # grad_hidden, grad_weight and its fp32 accumulator
    chunked = peak_bytes("torch", N, V, H)
    reference = peak_bytes("reference", N, V, H)
    # chunk budget (16 MiB incl. temporaries) + gradients + O(N) vectors + allocator slack
    bound = 16 * MiB + grads_bytes + 24 * MiB
    print(f"chunked peak {chunked / MiB:.1f} MiB, reference {reference / MiB:.1f} MiB, "
          f"one [N,V] fp32 = {logits_bytes / MiB:.0f} MiB")
    assert chunked < bound
    assert chunked < logits_bytes  # never even one [N, V] matrix
    assert reference > 2 * logits_bytes  # the oracle materializes several


def test_chunked_peak_does_not_grow_with_n():
    V, H = 16384, 64
    small = peak_bytes("torch", 512, V, H)
    large = peak_bytes("torch", 2048, V, H)
    # 4x the rows adds only the O(N*H) gradient and O(N) vectors, not 4x the logits
    assert large - small < (2048 - 512) * H * 4 * 3 + 8 * MiB

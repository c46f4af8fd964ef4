"""plan.py's chunk rule: rows per chunk from a target byte budget, a minimum row count and a byte
cap, per device type (bench/RESULTS.md, "Chunk sizing from measurement"); GRPO_KERNELS_CHUNK_BYTES
overrides it with a plain byte budget."""
from __future__ import annotations

import pytest
import torch

from grpo_kernels import plan
from grpo_kernels.backends.torch_chunked import BACKEND as TORCH
from grpo_kernels.plan import ChunkRule

MiB = 2**20


class _NoTemps:  # a backend with no temporaries per element (cpp, triton)
    temp_bytes_per_elem = 0

    def temp_bytes(self, device):
        return 0


CPP = _NoTemps()


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv("GRPO_KERNELS_CHUNK_BYTES", raising=False)


def _bytes(rows, vocab, dtype, backend, device="cpu"):
    return rows * vocab * (torch.empty((), dtype=dtype).element_size() + backend.temp_bytes(device))


@pytest.mark.parametrize("n, vocab, backend, expected", [
    (820, 32768, CPP, 820),      # N=1024 bench shape: one chunk (102 MiB)
    (3280, 32768, CPP, 1094),    # N=4096: 3 chunks of 1094 rows (1280 buy 160 MiB), not 1280 x 2 + 720
    (3280, 32768, TORCH, 1094),  # slabs: no per-logit temporaries on the CPU, the plan of cpp
    (820, 151936, CPP, 274),     # V=151936: 276 rows buy 160 MiB (at least 256) -> 3 chunks of 274
    (820, 151936, TORCH, 274),
    (1, 32768, CPP, 1),
    (0, 32768, CPP, 1),
])
def test_cpu_rule_rows(n, vocab, backend, expected):
    rows = plan.chunk_rows(n, vocab, torch.float32, backend, None, "cpu")
    assert rows == expected
    assert _bytes(rows, vocab, torch.float32, backend) <= plan.chunk_budget("cpu")


@pytest.mark.parametrize("n", [1, 100, 511, 512, 513, 3280, 10**6, 2**33 + 5])
@pytest.mark.parametrize("vocab", [1000, 32768, 151936, 2**18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rule_honours_the_byte_cap_and_covers_the_rows(n, vocab, dtype):
    for backend in (CPP, TORCH):
        rows = plan.chunk_rows(n, vocab, dtype, backend, None, "cpu")
        per_row = _bytes(1, vocab, dtype, backend)
        assert 1 <= rows <= n
        assert rows * per_row <= max(plan.chunk_budget("cpu"), per_row)
        rule = plan.chunk_rule("cpu", dtype)
        # balancing at most halves the rows the rule aims at (min_rows, or the target's, under the cap)
        aim = min(n, max(rule.min_rows, rule.target_bytes // per_row), max(1, rule.max_bytes // per_row))
        assert rows == aim or rows * 2 > aim


def test_cuda_rule_is_the_measured_byte_budget():
    """No GPU data for another rule: CUDA keeps 384 MiB of logits a chunk, unbalanced."""
    rule = plan.chunk_rule("cuda", torch.bfloat16)
    assert rule == ChunkRule(target_bytes=plan.CUDA_CHUNK_BYTES)
    assert plan.chunk_budget("cuda") == 384 * MiB
    n, vocab = 8192, 151936
    assert plan.chunk_rows(n, vocab, torch.bfloat16, CPP, None, "cuda") == 384 * MiB // (vocab * 2)


def test_rule_arithmetic():
    rule = ChunkRule(target_bytes=100, min_rows=4, max_bytes=300, balance=True)
    assert rule.rows(1000, 10) == 10       # the target buys 10 rows
    assert rule.rows(1000, 50) == 4        # 2 rows buy the target: the minimum
    assert rule.rows(1000, 100) == 3       # the minimum would exceed the cap: the cap
    assert rule.rows(21, 10) == 7          # 3 chunks of 7, not 10 + 10 + 1
    assert rule.rows(3, 10) == 3
    assert ChunkRule(target_bytes=100).rows(21, 10) == 10  # unbalanced


def test_override_is_a_plain_byte_budget(monkeypatch):
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_BYTES", "32MiB")
    # no minimum row count, no balancing: 32 MiB of fp32 rows at V=151936 is 55 rows
    assert plan.chunk_rows(820, 151936, torch.float32, CPP, None, "cpu") == 55
    assert plan.chunk_rows(3280, 32768, torch.float32, CPP, None, "cuda") == 256
    assert plan.chunk_budget("cpu") == plan.chunk_budget("cuda") == 32 * MiB


def test_chunk_size_wins():
    assert plan.chunk_rows(3280, 32768, torch.float32, CPP, 100, "cpu") == 100
    assert plan.chunk_rows(50, 32768, torch.float32, CPP, 100, "cpu") == 50

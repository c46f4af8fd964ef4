"""Sequence-level importance sampling (GSPO) vs token level, per backend, in the same run.

Token level is one fused sweep (6NHV flops). Sequence level is one sweep too when every
sequence fits in a chunk ("sequence"); "sequence-recompute" forces the stats sweep plus
recomputing gradient sweep (8NHV) that a sequence longer than a chunk gets.
Run: ``pytest bench/test_bench_sequence_level.py --benchmark-group-by=group``.
"""
import pytest

from bench.cases import LEVEL_BY_KEY, LEVEL_CASES
from bench.pytest_case import run_benchmark


@pytest.mark.parametrize("case_id", [c.id for c in LEVEL_CASES])
def test_level(benchmark, case_id, shape, bench_device, bench_inputs, pytestconfig):
    run_benchmark(benchmark, "loss", case_id, shape, bench_device, bench_inputs,
                  pytestconfig.getoption("--bench-rounds"), cases=LEVEL_BY_KEY, group="importance-sampling level")

"""token_logprobs alone (the reference-model pass, under no_grad) vs the peers' log-prob passes."""
import pytest

from bench.cases import select
from bench.pytest_case import run_benchmark

IDS = [c.id for c in select(kinds=["logprobs"])]


@pytest.mark.parametrize("case_id", IDS)
def test_logprobs(benchmark, case_id, shape, bench_device, bench_inputs, pytestconfig):
    run_benchmark(benchmark, "logprobs", case_id, shape, bench_device, bench_inputs,
                  pytestconfig.getoption("--bench-rounds"))

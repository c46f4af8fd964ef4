"""The three-matmul floor (logits, grad_hidden, grad_weight) every loss time is compared to."""
import pytest

from bench.pytest_case import run_benchmark


@pytest.mark.parametrize("case_id", ["floor", "floor:real"])
def test_floor(benchmark, case_id, shape, bench_device, bench_inputs, pytestconfig):
    run_benchmark(benchmark, "floor", case_id, shape, bench_device, bench_inputs,
                  pytestconfig.getoption("--bench-rounds"))

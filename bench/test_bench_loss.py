"""Forward + backward of the GRPO loss: grpo_kernels' backends and the peers, per shape."""
import pytest

from bench.cases import select
from bench.pytest_case import run_benchmark

IDS = [c.id for c in select(kinds=["loss"])]


@pytest.mark.parametrize("case_id", IDS)
def test_loss(benchmark, case_id, shape, bench_device, bench_inputs, pytestconfig):
    run_benchmark(benchmark, "loss", case_id, shape, bench_device, bench_inputs,
                  pytestconfig.getoption("--bench-rounds"))

"""pytest-benchmark suites of grpo_kernels vs its peers (run: ``pytest bench``).

Options: ``--bench-set quick|cpu|gpu`` (default: ``quick`` with --benchmark-disable, else
``gpu`` with CUDA, else ``cpu``), ``--bench-device cpu|cuda``, ``--bench-rounds R``.
Smoke run (CI): ``pytest bench -q --benchmark-disable``: one cold call per case on the
smallest CPU shape. Each benchmark's ``extra_info`` holds the peak memory beyond inputs
(``peak_bytes``, gradients included, and ``peak_minus_grads_bytes``) with the method used
(``memory_method``), the first call's time and a correctness ``check`` value. Here the CPU
peak is measured in-process (bench/report.py isolates each case in a subprocess instead).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.shapes import SETS, make_inputs  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("grpo_kernels bench")
    g.addoption("--bench-set", choices=sorted(SETS), default=None, help="shape set")
    g.addoption("--bench-device", choices=["cpu", "cuda"], default=None, help="device")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds (CPU 2, CUDA 5)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _set(config) -> str:
    name = config.getoption("--bench-set")
    if name:
        return name
    if config.getoption("benchmark_disable", default=False):
        return "quick"
    return "gpu" if _device(config).type == "cuda" else "cpu"


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = SETS[_set(metafunc.config)]
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes], scope="module")


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="module")
def bench_inputs(shape, bench_device):
    inputs = make_inputs(shape, bench_device)
    yield inputs
    del inputs
    if bench_device.type == "cuda":
        torch.cuda.empty_cache()

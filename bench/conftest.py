"""pytest-benchmark suite of grpo_kernels vs its peers (run: ``pytest bench``): its options,
the parametrization of every benchmark by case and shape, and the inputs fixture.

Options: ``--bench-set quick|cpu|gpu`` (default: ``quick`` with --benchmark-disable, else
``gpu`` with CUDA, else ``cpu``), ``--bench-shape NAME`` / ``--bench-case KIND/ID`` (only
these; repeatable), ``--bench-device cpu|cuda``, ``--bench-rounds R``, ``--bench-cold`` (no
untimed first call: the cold call is measured), ``--bench-no-build`` (never JIT-build the cpp
extension), ``--bench-before PATH`` (only the ``before:*`` cases, with grpo_kernels imported
from the checkout PATH). Smoke run (CI): ``pytest bench -q --benchmark-disable``: one cold
call per case on the smallest CPU shape. Each benchmark's ``extra_info`` holds the peak
memory beyond inputs and the rest of bench/report.py's record (see bench/test_bench.py).
Here everything runs in one process; bench/report.py runs one (case, shape) per process on
the CPU, which is what makes its CPU memory figures per case.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cases  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("grpo_kernels bench")
    g.addoption("--bench-set", choices=sorted(cases.SETS), default=None, help="shape set")
    g.addoption("--bench-shape", action="append", choices=sorted(cases.SHAPES), help="only this shape (repeatable)")
    g.addoption("--bench-case", action="append", metavar="KIND/ID", help="only this case, e.g. loss/ours:cpp")
    g.addoption("--bench-device", choices=["cpu", "cuda"], default=None, help="device")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds (CPU 2, CUDA ~0.3 s worth, 3-20)")
    g.addoption("--bench-cold", action="store_true", help="no untimed first call (CI smoke numbers)")
    g.addoption("--bench-no-build", action="store_true", help="never JIT-build the cpp extension")
    g.addoption("--bench-before", metavar="PATH", help="run the before:* cases on PATH's grpo_kernels")


def pytest_configure(config):
    cases.ALLOW_BUILD = not config.getoption("--bench-no-build", default=False)
    before = config.getoption("--bench-before", default=None)
    if before:
        cases.use_grpo_kernels_from(before)


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _shapes(config):
    if config.getoption("--bench-shape"):
        return [cases.SHAPES[n] for n in config.getoption("--bench-shape")]
    name = config.getoption("--bench-set")
    if not name:
        quick = config.getoption("benchmark_disable", default=False)
        name = cases.default_set(_device(config), quick)
    return cases.SETS[name]


def pytest_generate_tests(metafunc):
    """test_<kind>(case, shape): every case of that kind (bench/cases.py) on every shape."""
    if not {"case", "shape"} <= set(metafunc.fixturenames):
        return
    config = metafunc.config
    kind = metafunc.function.__name__[len("test_"):]
    chosen = config.getoption("--bench-case")
    ids = [k.split("/", 1)[1] for k in chosen or () if k.startswith(kind + "/")] or None
    pool = cases.select([kind], ids if kind == "chunk" else None, before=bool(config.getoption("--bench-before")),
                        device_type=_device(config).type)
    selected = [c for c in pool if not chosen or c.key in chosen]
    shapes = _shapes(config)
    metafunc.parametrize("case", selected, ids=[c.id for c in selected])
    metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes], scope="module")


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="module")
def bench_inputs(shape, bench_device):
    return cases.inputs_for(shape, bench_device)


def pytest_collection_modifyitems(config, items):
    """A kind none of whose cases is selected (--bench-case, --bench-before) is deselected, not
    reported as an empty-parameter-set skip."""
    empty = [i for i in items if "case" in getattr(i, "fixturenames", ()) and not isinstance(
        getattr(getattr(i, "callspec", None), "params", {}).get("case"), cases.Case)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [i for i in items if i not in empty]

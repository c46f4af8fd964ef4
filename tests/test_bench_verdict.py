"""bench/verdict.py: the exit status of bench/report.py (an error / OOM row or a check over its
tolerance fails the run; skipped peers do not; a required backend's skip does)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import verdict  # noqa: E402

SHAPE = "N1024-H1024-V32768-fp32"


def row(case, status="ok", check=None, kind="loss", dtype="float32", reason=None):
    r = dict(kind=kind, case=case, shape=SHAPE, dtype=dtype, status=status, check=check)
    if reason is not None:
        r["reason"] = reason
    return r


def test_a_clean_run_passes():
    results = [row("ref:eager", check=10.0), row("ours:torch", check=10.0 * (1 + 5e-10)),
               row("ours:cpp", check=10.0), row("floor"), row("liger", "skipped", reason="liger_kernel is not installed"),
               row("ours:triton", "skipped", reason="time budget of 75 s spent")]
    assert verdict.failures(results) == []


@pytest.mark.parametrize("status", ["error", "oom"])
def test_error_and_oom_rows_fail(status):
    out = verdict.failures([row("ref:eager", check=1.0), row("ours:cpp", status, reason="CUDA out of memory")])
    assert out == [f"loss ours:cpp {SHAPE}: {status}: CUDA out of memory"]


@pytest.mark.parametrize("dtype, rel, fails", [("float32", 2e-4, True), ("float32", 5e-5, False),
                                               ("bfloat16", 2e-2, False), ("bfloat16", 5e-2, True)])
def test_a_check_over_its_tolerance_fails(dtype, rel, fails):
    out = verdict.failures([row("ref:eager", check=4.0, dtype=dtype), row("ours:triton", check=4.0 * (1 + rel), dtype=dtype)])
    assert bool(out) == fails, out
    if fails:
        assert "ours:triton" in out[0] and "differs from the reference's" in out[0]


def test_a_nan_check_fails_and_level_rows_compare_with_torch():
    results = [row("ours:torch:sequence", check=2.0, kind="level"), row("ours:cpp:sequence", check=float("nan"), kind="level")]
    assert len(verdict.failures(results)) == 1
    assert verdict.check_reference({(r["kind"], r["case"], r["shape"]): r for r in results}, results[1]) is results[0]


def test_a_required_backend_that_was_skipped_fails(monkeypatch):
    results = [row("ours:cpp", "skipped", reason="the cpp extension failed to build: nvcc error"),
               row("ours:triton", "skipped", reason="time budget of 360 s spent")]
    monkeypatch.delenv("GRPO_KERNELS_REQUIRE_BACKENDS", raising=False)
    assert verdict.failures(results) == []
    monkeypatch.setenv("GRPO_KERNELS_REQUIRE_BACKENDS", "cpp,triton")
    out = verdict.failures(results)
    assert len(out) == 1 and "backend 'cpp' is required" in out[0] and "nvcc error" in out[0]

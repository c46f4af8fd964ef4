"""GRPO_KERNELS_REQUIRE_BACKENDS (tests/support.py): a listed backend that cannot run fails the
test instead of skipping it, so that the GPU check never passes on a failed JIT build."""
from __future__ import annotations

import pytest

import support


def outcome(name: str) -> str:
    """What ``support.require(name, "cuda")`` does: "skip", "fail" (with its message) or "run". A
    skip must not escape here: pytest would report this test as skipped, never as failed."""
    try:
        support.require(name, "cuda")
    except pytest.skip.Exception as exc:
        return f"skip: {exc}"
    except pytest.fail.Exception as exc:
        return f"fail: {exc}"
    return "run"


@pytest.fixture
def cannot_run(monkeypatch):
    """Every backend 'cannot run' here, as after a failed JIT build."""
    monkeypatch.setattr(support, "unavailable_reason", lambda *a, **k: "RuntimeError: the JIT build failed")


def test_unlisted_backends_skip(cannot_run, monkeypatch):
    monkeypatch.delenv(support.REQUIRE_ENV, raising=False)
    assert outcome("cpp") == "skip: RuntimeError: the JIT build failed"


@pytest.mark.parametrize("setting", ["cpp,triton", " triton , cpp ", "cuda"])
def test_listed_backends_fail(cannot_run, monkeypatch, setting):
    monkeypatch.setenv(support.REQUIRE_ENV, setting)
    assert outcome("cpp") == ("fail: backend 'cpp' is required here (GRPO_KERNELS_REQUIRE_BACKENDS) but cannot "
                              "run: RuntimeError: the JIT build failed")
    assert outcome("triton").startswith("fail: backend 'triton'" if "triton" in setting else "skip: ")
    assert outcome("torch").startswith("skip: ")  # torch is not listed: it still skips


def test_unknown_names_are_an_error(monkeypatch):
    monkeypatch.setenv(support.REQUIRE_ENV, "cpp,trition")
    with pytest.raises(ValueError, match=r"GRPO_KERNELS_REQUIRE_BACKENDS='cpp,trition': unknown backend\(s\) \['trition'\]"):
        support.required_backends()


def test_backends_that_run_are_unaffected(monkeypatch):
    monkeypatch.setenv(support.REQUIRE_ENV, "cpp,triton")
    monkeypatch.setattr(support, "unavailable_reason", lambda *a, **k: None)
    assert outcome("cpp") == outcome("triton") == "run"

"""The GRPO_KERNELS_* environment variables: parsed in one place (grpo_kernels/env.py), each
bad value a ValueError that names the variable, every variable listed in docs/design.md."""
from __future__ import annotations

import os
import re

import pytest
import torch

from grpo_kernels import env, grpo_loss, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("raw, expected", [
    ("268435456", 2**28), ("256MiB", 2**28), ("256M", 2**28), ("256 mib", 2**28), ("1GiB", 2**30),
    ("1.5GiB", 3 * 2**29), ("500MB", 500 * 10**6), ("64KiB", 2**16),
])
def test_chunk_bytes_accepts_sizes(monkeypatch, raw, expected):
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_BYTES", raw)
    assert plan.chunk_budget("cpu") == plan.chunk_budget("cuda") == expected


def test_chunk_bytes_drives_the_chunking(monkeypatch):
    """The issue's repro: 256MiB used to fail at the first call with int('256MiB')."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 16, generator=g, requires_grad=True)
    w = torch.randn(1000, 16, generator=g)
    args = (torch.randint(0, 1000, (2, 8), generator=g), torch.randn(2, generator=g), torch.ones(2, 8))
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_BYTES", "256MiB")
    loss = grpo_loss(h, w, *args, backend="torch")
    # 12000 bytes: 3 rows of 1000 x 4 bytes (on the CPU the torch backend's slabs count no temporaries)
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_BYTES", "12KB")
    p = plan.plan_call(h.detach().reshape(16, 16), w, *_opts(), need_grads=(True, False, False), loss=True)
    assert p.chunk_rows == 3 and len(p.bounds) == 6
    torch.testing.assert_close(grpo_loss(h, w, *args, backend="torch"), loss)


def _opts():
    from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel

    return GRPOOptions(), ExecutionOptions(backend="torch"), VocabParallel()


BAD = {
    "GRPO_KERNELS_CHUNK_BYTES": ("256 MeB", lambda: plan.chunk_budget("cpu")),
    "GRPO_KERNELS_GRAD_WEIGHT_ACCUM": ("fp16", env.grad_weight_accum),
    "GRPO_KERNELS_AUTO_BUILD": ("no", env.auto_build),
    "GRPO_KERNELS_NO_CUDA": ("yes", env.no_cuda),
    "GRPO_KERNELS_VERBOSE_BUILD": ("2", env.verbose_build),
    "GRPO_KERNELS_TRITON_AUTOTUNE": ("off", env.triton_autotune),
    "GRPO_KERNELS_TRITON_BLOCK_V": ("100", env.triton_block_v),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_values_name_the_variable(monkeypatch, name):
    raw, read = BAD[name]
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        read()


@pytest.mark.parametrize("raw", ["0", "-5", "abc", "1e9", "12 parsecs"])
def test_bad_sizes(monkeypatch, raw):
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_BYTES", raw)
    with pytest.raises(ValueError, match="GRPO_KERNELS_CHUNK_BYTES"):
        plan.chunk_budget("cpu")


def test_every_variable_is_parsed_in_env_and_documented():
    names = set()
    for base, _, files in os.walk(os.path.join(ROOT, "grpo_kernels")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(base, f)) as fh:
                    text = fh.read()
                names |= set(re.findall(r"GRPO_KERNELS_[A-Z_0-9]+", text))
                if f != "env.py":  # read nowhere else
                    assert not re.search(r"environ(?:\.get)?\(?\[?\s*[\"']GRPO_KERNELS_", text), f
    with open(os.path.join(ROOT, "setup.py")) as fh:
        names |= set(re.findall(r"GRPO_KERNELS_[A-Z_0-9]+", fh.read()))
    with open(os.path.join(ROOT, "docs", "design.md")) as fh:
        documented = set(re.findall(r"`(GRPO_KERNELS_[A-Z_0-9]+)", fh.read()))
    assert set(BAD) <= names
    assert names <= documented, sorted(names - documented)

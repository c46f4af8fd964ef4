"""token_statistics (log-prob, entropy and sum_pi_squared in one sweep) against the float64 oracle
on materialized logits, every backend, and its bad inputs."""
from __future__ import annotations

import pytest
import torch

from support import TOLERANCES, backend_params, device_for_tests, rel_err, require, stable_seed
from grpo_kernels import token_stats
from grpo_kernels.api import token_statistics
from grpo_kernels.reference import reference_token_statistics

DEVICE = device_for_tests()


def _data(dtype, seed, N=(3, 7), H=12, V=53, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*N, H, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6).to(dtype).to(DEVICE)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.2).to(dtype).to(DEVICE)
    t = torch.randint(0, V, N, generator=g).to(DEVICE)
    return h, w, b, t


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_statistics_match_the_oracle(backend, dtype, softcap, temperature):
    require(backend, DEVICE, dtype)
    h, w, b, t = _data(dtype, stable_seed("stats", backend, dtype, softcap, temperature))
    got = token_statistics(h, w, t, bias=b, temperature=temperature, logit_softcap=softcap, backend=backend,
                           chunk_size=5)
    want = reference_token_statistics(h.double(), w.double(), t, b.double(), temperature, softcap)
    tol = TOLERANCES[dtype][0]
    for name, x, ref in zip(("logp", "entropy", "sum_pi_squared"), got, want):
        assert x.shape == t.shape and not x.requires_grad, name
        assert x.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert rel_err(x, ref) < tol, (name, rel_err(x, ref))
    assert bool(((got.sum_pi_squared > 0) & (got.sum_pi_squared <= 1 + tol)).all())


def test_every_row_written_whatever_the_chunking(monkeypatch):
    """The result buffers come from torch.empty: poison them (NaN) and check every row is written,
    over chunkings that do and do not divide the rows, and slabs smaller than a chunk."""
    h, w, b, t = _data(torch.float64, 3, N=(23,), V=41)
    real_empty = torch.empty

    def poisoned(*a, **k):
        out = real_empty(*a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(token_stats.torch, "empty", poisoned)
    monkeypatch.setattr(token_stats, "SLAB_ELEMS", 3 * 41)
    want = reference_token_statistics(h, w, t, b, 0.8, None)
    for chunk in (1, 4, 23, 64):
        got = token_statistics(h, w, t, bias=b, temperature=0.8, backend="torch", chunk_size=chunk)
        for x, ref in zip(got, want):
            assert rel_err(x, ref) < 1e-12, chunk


def test_huge_logits_and_peaked_rows():
    """Logits of 1e4 (exp would overflow) and one-hot rows: sum_pi_squared stays in (0, 1]."""
    h, w, b, t = _data(torch.float64, 4, N=(6,), scale=1.0)
    h = h * 1e3
    got = token_statistics(h, w, t, bias=b, backend="torch")
    want = reference_token_statistics(h, w, t, b)
    assert rel_err(got.sum_pi_squared, want[2]) < 1e-12
    assert bool((got.sum_pi_squared <= 1).all())


def test_no_entropy_and_reference_backend():
    h, w, b, t = _data(torch.float64, 5)
    got = token_statistics(h, w, t, bias=b, return_entropy=False, backend="torch")
    ref = token_statistics(h, w, t, bias=b, return_entropy=False, backend="reference")
    assert bool((got.entropy == 0).all()) and bool((ref.entropy == 0).all())
    assert rel_err(got.sum_pi_squared, ref.sum_pi_squared) < 1e-12
    assert rel_err(got.logp, ref.logp) < 1e-12


def test_inputs_that_require_grad_give_detached_results():
    h, w, b, t = _data(torch.float64, 6)
    got = token_statistics(h.requires_grad_(True), w.requires_grad_(True), t, backend="torch")
    assert not any(x.requires_grad for x in got)


def test_bad_inputs():
    h, w, b, t = _data(torch.float64, 7)
    with pytest.raises(ValueError, match="targets"):
        token_statistics(h, w, t[:, :3], backend="torch")
    with pytest.raises(TypeError, match="return_entropy"):
        token_statistics(h, w, t, return_entropy=1, backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        token_statistics(h, w, t, temperature=0.0, backend="torch")

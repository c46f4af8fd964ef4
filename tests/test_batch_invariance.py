"""batch_invariant=True: a token's log-prob, entropy and grad_hidden row are bitwise independent
of the other rows, the batch size, the row's position, padding and chunk_size, and
token_logprobs equals grpo_loss's metrics.logps bitwise, on every backend.

Without the mode the same row's logits differ in the last bits between GEMMs of different row
counts (MKL picks its blocking by shape), so the reference pass, the old-policy pass and the
training pass can disagree whenever their batches differ; the first test shows that this is
real here, so that the others are not vacuous.
"""
from __future__ import annotations

import pytest
import torch

from support import backend_params, device_for_tests, require
from grpo_kernels import grpo_loss, token_logprobs

DEVICE = device_for_tests()
H = 32


def _size(backend):
    # the Triton interpreter runs every program in Python: fewer rows and a smaller vocabulary
    return (301, 300) if backend != "triton" or DEVICE != "cpu" else (67, 260)


def _data(backend, seed=0):
    V, n = _size(backend)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g).to(DEVICE)
    weight = (0.4 * torch.randn(V, H, generator=g)).to(DEVICE)
    bias = (0.1 * torch.randn(V, generator=g)).to(DEVICE)
    targets = torch.randint(0, V, (n,), generator=g).to(DEVICE)
    coef = torch.randn(n, generator=g).to(DEVICE)  # a per-row upstream gradient
    return hidden, weight, bias, targets, coef


def _rows(backend, hidden, weight, bias, targets, coef, **kw):
    """(logp, entropy, grad_hidden) of these rows, batch_invariant unless told otherwise."""
    h = hidden.clone().requires_grad_(True)
    logp, ent = token_logprobs(h, weight, targets, bias=bias, return_entropy=True, backend=backend,
                               **{"batch_invariant": True, **kw})
    (logp * coef).sum().backward()
    return logp.detach(), ent.detach(), h.grad


def test_without_the_mode_rows_do_depend_on_the_batch():
    require("torch", DEVICE, torch.float32)
    hidden, weight, bias, targets, coef = _data("torch")
    whole = _rows("torch", hidden, weight, bias, targets, coef, batch_invariant=False)
    alone = [_rows("torch", hidden[i:i + 1], weight, bias, targets[i:i + 1], coef[i:i + 1], batch_invariant=False)
             for i in range(0, hidden.shape[0], 10)]
    differs = any(not torch.equal(a[0], whole[0][i * 10:i * 10 + 1]) for i, a in enumerate(alone))
    if not differs:
        pytest.skip("this BLAS gives the same bits for every GEMM shape here: nothing to show")
    assert differs


@pytest.mark.parametrize("backend", backend_params())
def test_rows_alone_in_batches_at_positions_and_chunk_sizes(backend):
    require(backend, DEVICE, torch.float32)
    hidden, weight, bias, targets, coef = _data(backend)
    n = hidden.shape[0]
    whole = _rows(backend, hidden, weight, bias, targets, coef)
    # (start, rows, chunk_size): single rows, odd batches at odd offsets, a chunk of 1, tiles
    cuts = [(0, 1, None), (n - 1, 1, None), (5, 7, None), (3, n - 3, 3), (1, 257, None), (0, n, 64), (0, n, 257)]
    for start, rows, chunk in cuts:
        sl = slice(start, start + rows)
        part = _rows(backend, hidden[sl], weight, bias, targets[sl], coef[sl], chunk_size=chunk)
        for name, got, want in zip(("logp", "entropy", "grad_hidden"), part, whole):
            assert torch.equal(got, want[sl]), (name, start, rows, chunk)


@pytest.mark.parametrize("backend", backend_params())
def test_rows_in_a_shuffled_batch(backend):
    """The same rows in another order (hence other positions and tile neighbours)."""
    require(backend, DEVICE, torch.float32)
    hidden, weight, bias, targets, coef = _data(backend, seed=1)
    perm = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    whole = _rows(backend, hidden, weight, bias, targets, coef)
    shuffled = _rows(backend, hidden[perm], weight, bias, targets[perm], coef[perm])
    for got, want in zip(shuffled, whole):
        assert torch.equal(got, want[perm])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_logps_equal_token_logprobs_with_padding(backend, level):
    """grpo_loss's metrics.logps (its own sweep, padding rows dropped first) equal
    token_logprobs of the same rows, with and without padding around them."""
    require(backend, DEVICE, torch.float32)
    hidden, weight, bias, targets, _ = _data(backend, seed=3)
    n = hidden.shape[0]
    B, T = 4, n // 4
    hidden, targets = hidden[: B * T], targets[: B * T]
    ref = token_logprobs(hidden, weight, targets, bias=bias, backend=backend, batch_invariant=True)
    g = torch.Generator().manual_seed(4)
    for padded in (False, True):
        mask = (torch.rand(B, T, generator=g) > 0.3) if padded else torch.ones(B, T, dtype=torch.bool)
        mask = mask.to(DEVICE)
        h = hidden.view(B, T, H).clone().requires_grad_(True)
        _, metrics = grpo_loss(h, weight, targets.view(B, T), torch.randn(B, generator=g).to(DEVICE), mask,
                               bias=bias, backend=backend, batch_invariant=True, return_metrics=True,
                               importance_sampling_level=level, chunk_size=37)
        keep = mask.reshape(-1)
        assert torch.equal(metrics.logps.reshape(-1)[keep], ref[keep]), padded

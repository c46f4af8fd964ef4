"""Sequence-level importance sampling in one vocabulary sweep (6NHV flops).

When every sequence fits in a chunk, chunks are cut at sequence boundaries and each
chunk's gradient coefficient comes from its own statistics; a sequence longer than a
chunk falls back to stats sweep + recomputing gradient sweep. Both paths are checked
against the float64 oracle, and the number of logits rows each computes is counted
(the flop claim: n rows once, not twice).
"""
from __future__ import annotations

import pytest
import torch

from support import (
    backend_params, check_against_oracle, device_for_tests, make_batch, require, run_loss, stable_seed,
    well_conditioned_batch,
)
from grpo_kernels import grpo_loss, plan, sweep
from grpo_kernels.options import LOSS_TYPES

DEVICE = device_for_tests()
B, T = 6, 5


@pytest.mark.parametrize(
    "lengths, max_rows, expected",
    [
        ([3, 0, 2, 4, 1], 5, [(0, 5), (5, 10)]),
        ([5, 5, 5], 5, [(0, 5), (5, 10), (10, 15)]),
        ([1, 1, 1, 1], 3, [(0, 3), (3, 4)]),
        ([2, 0, 0], 4, [(0, 2)]),
        ([0, 0], 4, []),
        ([], 4, []),
        ([2, 6, 1], 5, None),
    ],
)
def test_sequence_chunks_pack_whole_sequences(lengths, max_rows, expected):
    assert plan.sequence_chunks(lengths, max_rows) == expected


@pytest.fixture
def logits_rows(monkeypatch):
    """Counts the rows of every logits matmul of the vocabulary pass."""
    counted = []
    real = sweep.logits

    def counting(h, weight, bias, tile=None):
        counted.append(h.shape[0])
        return real(h, weight, bias, tile)

    monkeypatch.setattr(sweep, "logits", counting)
    return counted


# chunk_size T: one sequence per chunk at most, shorter ones packed; 2T + 1: two or three
# sequences per chunk; 2 (< the longest sequence): the recomputing fallback
PATHS = {"aligned_T": (T, 1), "aligned_2T": (2 * T + 1, 1), "fallback": (2, 2)}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sequence_level_paths_match_oracle(backend, dtype, path, loss_type, logits_rows):
    dtype = getattr(torch, dtype)
    require(backend, DEVICE, dtype)
    chunk_size, sweeps = PATHS[path]
    opts = dict(loss_type=loss_type, importance_sampling_level="sequence", beta=0.04, temperature=0.9,
                max_completion_length=T, epsilon_high=1.1 if loss_type == "cispo" else 0.28, chunk_size=chunk_size)
    batch = well_conditioned_batch(dtype, stable_seed(loss_type, path, "seq"), opts, B=B, T=T, device=DEVICE)
    del logits_rows[:]
    check_against_oracle(backend, batch, dtype, **opts)
    n_valid = int(batch["mask"].sum())
    assert sum(logits_rows) == sweeps * n_valid, logits_rows  # each logit computed once (aligned) or twice
    assert max(logits_rows) <= chunk_size


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "extra",
    [dict(top_entropy_quantile=0.4), dict(use_bias_correction_kl=True, beta=0.1), dict(delta=1.2),
     dict(importance_sampling_ratio="row"), dict(entropy_coef=0.2)],
    ids=["entropy_quantile", "bias_correction_kl", "delta", "vllm_is_ratio", "entropy_bonus"],
)
def test_sequence_level_aligned_options(backend, extra, logits_rows):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(B=B, T=T, dtype=torch.float64, device=DEVICE, seed=stable_seed(sorted(extra)), off_policy=0.3)
    opts = {**dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, chunk_size=T + 2), **extra}
    if opts.get("importance_sampling_ratio") == "row":
        g = torch.Generator().manual_seed(9)
        opts["importance_sampling_ratio"] = (torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    check_against_oracle(backend, batch, torch.float64, **opts)
    n_valid = int(batch["mask"].sum())
    # the entropy mask needs every entropy before the first coefficient: one stats sweep more
    assert sum(logits_rows) == (2 if "top_entropy_quantile" in extra else 1) * n_valid


@pytest.mark.parametrize("backend", backend_params())
def test_sequence_level_all_masked_batch(backend, logits_rows):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(B=B, T=T, dtype=torch.float64, device=DEVICE, seed=4)
    batch["mask"] = torch.zeros_like(batch["mask"])
    out, grads = run_loss(grpo_loss, batch, backend=backend, loss_type="dapo", importance_sampling_level="sequence",
                          beta=0.04, chunk_size=T)
    assert out.item() == 0.0 and logits_rows == []
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))

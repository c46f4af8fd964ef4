"""Every backend against the float64 oracle (grpo_kernels.reference): loss and all gradients.

Parametrized over tests/backends.py's BACKENDS, so a new backend joins by adding its name.
"""
from __future__ import annotations

import pytest
import torch

from support import (
    backend_params, check_against_oracle, device_for_tests, make_batch, rel_err, require, run_loss, stable_seed,
    well_conditioned_batch,
)
from grpo_kernels import grpo_loss
from grpo_kernels.options import LOSS_TYPES
from grpo_kernels.reference import reference_grpo_loss

DEVICE = device_for_tests()


def low_precision(backend: str) -> torch.dtype:
    # the Triton interpreter's numpy has no bfloat16: fp16 there, bf16 everywhere else
    return torch.float16 if (backend == "triton" and DEVICE == "cpu") else torch.bfloat16


def loss_options(loss_type, level):
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, temperature=0.9,
                max_completion_length=7, epsilon_high=0.28, chunk_size=4)
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.1  # its clamp on the ratio itself: active for some tokens
    return opts


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float64", "float32", "low"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_grads_match_oracle(backend, dtype, level, loss_type):
    dtype = low_precision(backend) if dtype == "low" else getattr(torch, dtype)
    opts = loss_options(loss_type, level)
    batch = well_conditioned_batch(dtype, stable_seed(loss_type, level), opts, device=DEVICE)
    check_against_oracle(backend, batch, dtype, **opts)


OPTION_CASES = {
    "delta": dict(loss_type="grpo", delta=1.05),
    "bias_correction_kl": dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True),
    "bias_correction_kl_seq": dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=True,
                                   importance_sampling_level="sequence"),
    "entropy_quantile": dict(loss_type="dapo", top_entropy_quantile=0.5),
    "entropy_quantile_seq": dict(loss_type="grpo", top_entropy_quantile=0.3, importance_sampling_level="sequence"),
    "softcap": dict(loss_type="grpo", logit_softcap=2.0, temperature=0.7),
    "hot_temperature": dict(loss_type="dapo", temperature=3.0),
    "num_items": dict(loss_type="cispo", num_items_in_batch=11, epsilon_high=1.1),
    "sapo_temps": dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    "eps_default": dict(loss_type="bnpo", epsilon_low=0.1),
    "no_beta": dict(loss_type="luspo", beta=0.0),
    "chunk_1": dict(loss_type="dapo", chunk_size=1),
    "chunk_auto": dict(loss_type="dapo", chunk_size=None),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_match_oracle(backend, case):
    opts = dict(beta=0.04, max_completion_length=5, chunk_size=3)
    opts.update(OPTION_CASES[case])
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=7, off_policy=0.3)
    check_against_oracle(backend, batch, torch.float64, **opts)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", ["token", "row"])
def test_importance_sampling_ratio(backend, shape):
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=3)
    B, T = batch["mask"].shape
    g = torch.Generator().manual_seed(5)
    ratio = (torch.rand((B, T) if shape == "token" else (B, 1), generator=g, dtype=torch.float64) + 0.5)
    check_against_oracle(backend, batch, torch.float64, loss_type="dapo",
                         importance_sampling_ratio=ratio.to(DEVICE), beta=0.02)


@pytest.mark.parametrize("backend", backend_params())
def test_token_advantages_no_bias(backend):
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=11, bias=False, token_advantages=True)
    check_against_oracle(backend, batch, torch.float64, loss_type="grpo", beta=0.0)


@pytest.mark.parametrize("backend", backend_params())
def test_on_policy_equals_detached_logps(backend):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=2)
    batch["old_logps"] = None
    out_none, grads_none = run_loss(grpo_loss, batch, backend=backend, loss_type="grpo", beta=0.04)
    from grpo_kernels import token_logprobs

    with torch.no_grad():
        cur = token_logprobs(batch["hidden"], batch["weight"], batch["targets"], bias=batch["bias"])
    batch["old_logps"] = cur
    out_old, grads_old = run_loss(grpo_loss, batch, backend=backend, loss_type="grpo", beta=0.04)
    assert rel_err(out_none, out_old) < 1e-12
    for a, b in zip(grads_none, grads_old):
        assert rel_err(a, b) < 1e-12
    ref_out, _ = run_loss(reference_grpo_loss, batch, loss_type="grpo", beta=0.04)
    assert rel_err(out_none, ref_out) < 1e-10


@pytest.mark.parametrize("backend", backend_params())
def test_fully_masked_batch_is_zero_not_nan(backend):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=4)
    batch["mask"] = torch.zeros_like(batch["mask"])
    for lt in LOSS_TYPES:
        out, grads = run_loss(grpo_loss, batch, backend=backend, loss_type=lt, beta=0.1, max_completion_length=5)
        assert out.item() == 0.0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", backend_params())
def test_masked_rows_get_zero_grad_and_junk_there_is_ignored(backend):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=6)
    clean, clean_grads = run_loss(grpo_loss, batch, backend=backend, loss_type="grpo", beta=0.1)
    keep = batch["mask"]
    batch["old_logps"] = batch["old_logps"].masked_fill(~keep, float("inf"))
    batch["ref_logps"] = batch["ref_logps"].masked_fill(~keep, float("nan"))
    dirty, dirty_grads = run_loss(grpo_loss, batch, backend=backend, loss_type="grpo", beta=0.1)
    assert torch.equal(clean, dirty)
    assert torch.equal(clean_grads[0], dirty_grads[0])
    assert torch.equal(clean_grads[0][~keep], torch.zeros_like(clean_grads[0][~keep]))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_metrics_match_oracle(backend, loss_type):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=8, off_policy=0.4)
    opts = dict(loss_type=loss_type, beta=0.05, epsilon_high=1.1 if loss_type == "cispo" else 0.2)
    (loss, m), _ = run_loss(grpo_loss, batch, backend=backend, return_metrics=True, **opts)
    (ref_loss, rm), _ = run_loss(reference_grpo_loss, batch, return_metrics=True, **opts)
    keep = batch["mask"]
    assert rel_err(m.logps[keep], rm["logps"][keep]) < 1e-10
    assert rel_err(m.entropy[keep], rm["entropy"][keep]) < 1e-10
    assert torch.equal(m.logps[~keep], torch.zeros_like(m.logps[~keep]))
    for key in ("kl_mean", "entropy_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
                "cispo_clip_ratio"):
        ours, theirs = getattr(m, key), rm.get(key)
        if theirs is None:
            assert ours is None, key
        else:
            assert abs(ours.item() - theirs.item()) < 1e-10, key
    if loss_type == "dapo":  # the batch is built so that some ratios do clip
        assert m.clip_ratio_region.item() > 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_tiny(backend, level):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(B=3, T=3, H=4, V=7, dtype=torch.float64, device=DEVICE, seed=9, off_policy=0.1)

    def f(h, w, b):
        return grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"],
                         batch["ref_logps"], bias=b, backend=backend, loss_type="bnpo", beta=0.1,
                         importance_sampling_level=level, logit_softcap=3.0, temperature=0.8, chunk_size=2)

    inputs = tuple(batch[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weighted_mask_with_entropy_quantile(backend, level):
    """A non-binary mask (token weights) with top_entropy_quantile < 1: TRL thresholds
    entropies * mask.float(), so the weights scale the entropies compared (not a 0/1 mask)."""
    batch = make_batch(dtype=torch.float64, seed=11)
    weights = 0.25 + torch.rand(batch["mask"].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    batch["mask"] = batch["mask"].double() * weights.to(batch["mask"].device)
    check_against_oracle(backend, batch, torch.float64, top_entropy_quantile=0.5, importance_sampling_level=level,
                         beta=0.04, loss_type="grpo")

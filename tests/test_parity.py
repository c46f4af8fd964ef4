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
    # TRL 1.16's additions
    "vespo": dict(loss_type="vespo"),
    "vespo_params": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.0, vespo_k_neg=2.5,
                         vespo_lambda_neg=1.0, num_items_in_batch=9),
    "entropy_coef": dict(loss_type="dapo", entropy_coef=0.05),
    "entropy_coef_grpo_seq": dict(loss_type="grpo", entropy_coef=0.2, importance_sampling_level="sequence"),
    "entropy_coef_quantile": dict(loss_type="bnpo", entropy_coef=0.1, top_entropy_quantile=0.5),
    "entropy_coef_chunk_1": dict(loss_type="sapo", entropy_coef=0.1, chunk_size=1),
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.02),
    "off_policy_mask_vespo": dict(loss_type="vespo", off_policy_mask_threshold=0.02, entropy_coef=0.01),
}

#: verl 0.9.1's objectives by their pieces (the oracle: objective_loss on materialized log-probs, itself
#: checked against verl's ppo_loss in tests/test_integrations_verl.py)
VERL_CASES = {
    "vanilla": dict(policy_loss="vanilla", epsilon_high=0.28, clip_ratio_c=1.5),
    "vanilla_seq_mean": dict(policy_loss="vanilla", loss_agg_mode="seq-mean-token-mean", kl_estimator="low_var_kl"),
    "vanilla_norm": dict(policy_loss="vanilla", loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=7.0),
    "token_sum_dp": dict(policy_loss="gpg", loss_agg_mode="token-sum", dp_size=2, kl_estimator="k1+"),
    "global_tokens": dict(policy_loss="cispo", num_items_in_batch=40, dp_size=4, kl_estimator="abs"),
    "global_sequences": dict(policy_loss="dro", dro_beta=0.3, loss_agg_mode="seq-mean-token-sum",
                             num_sequences_in_batch=5, kl_estimator="k2"),
    "gspo": dict(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", entropy_coef=0.01),
    "geo_mean": dict(policy_loss="geo_mean", kl_estimator="low_var_kl+"),
    "sapo": dict(policy_loss="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, entropy_coef=0.02),
    "dppo_tv": dict(policy_loss="dppo_tv", clip_ratio_c=20.0),
    "dppo_kl": dict(policy_loss="dppo_kl", loss_agg_mode="seq-mean-token-mean"),
    "clip_cov": dict(policy_loss="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9),
    "kl_cov": dict(policy_loss="kl_cov", kl_cov_ratio=0.2, ppo_kl_coef=0.5),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_match_oracle(backend, case):
    opts = dict(beta=0.04, max_completion_length=5, chunk_size=3)
    opts.update(OPTION_CASES[case])
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=7, off_policy=0.3)
    check_against_oracle(backend, batch, torch.float64, **opts)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", sorted(VERL_CASES))
def test_verl_objectives_match_oracle(backend, case):
    opts = dict(beta=0.04, chunk_size=3)
    opts.update(VERL_CASES[case])
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=13, off_policy=0.3)
    if case == "clip_cov":  # its excluded tokens are drawn at random: the same draw in both calls
        require(backend, DEVICE, torch.float64)
        torch.manual_seed(0)
        out, grads = run_loss(grpo_loss, batch, backend=backend, **opts)
        torch.manual_seed(0)
        ref, ref_grads = run_loss(reference_grpo_loss, batch, **opts)
        assert rel_err(out, ref) < 1e-10
        assert all(rel_err(a, b) < 1e-10 for a, b in zip(grads, ref_grads))
        return
    check_against_oracle(backend, batch, torch.float64, **opts)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float32", "low"])
@pytest.mark.parametrize("case", ["vanilla_seq_mean", "gspo", "sapo", "token_sum_dp"])
def test_verl_objectives_low_precision(backend, dtype, case):
    dtype = low_precision(backend) if dtype == "low" else getattr(torch, dtype)
    opts = dict(beta=0.04, chunk_size=3, **VERL_CASES[case])
    batch = well_conditioned_batch(dtype, stable_seed(case), opts, device=DEVICE)
    check_against_oracle(backend, batch, dtype, **opts)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", ["vespo", "dapo"])
def test_off_policy_mask_with_sampling_logps(backend, loss_type):
    """The sampler's log-probs (NaN where it could not score) drive TRL's off-policy mask."""
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=21, off_policy=0.2)
    g = torch.Generator().manual_seed(4)
    sampling = batch["old_logps"] + 0.3 * torch.randn(batch["old_logps"].shape, generator=g,
                                                      dtype=torch.float64).to(DEVICE)
    sampling[0, 1] = float("nan")
    check_against_oracle(backend, batch, torch.float64, loss_type=loss_type, off_policy_mask_threshold=0.05,
                         sampling_logps=sampling, beta=0.02)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", ["token", "row"])
def test_vespo_folds_the_importance_sampling_ratio(backend, shape):
    batch = make_batch(dtype=torch.float64, device=DEVICE, seed=23, off_policy=0.2)
    B, T = batch["mask"].shape
    g = torch.Generator().manual_seed(6)
    ratio = torch.rand((B, T) if shape == "token" else (B, 1), generator=g, dtype=torch.float64) + 0.5
    check_against_oracle(backend, batch, torch.float64, loss_type="vespo", importance_sampling_ratio=ratio.to(DEVICE))


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

"""objective.py's two forms (analytic epilogue, autograd objective) against each other and TRL."""
from __future__ import annotations

import zlib

import pytest
import torch

from grpo_kernels import epilogue, metrics, objective
from grpo_kernels.options import TOKEN_LOSS_TYPES as LOSS_TYPES, GRPOOptions


def _inputs(n=40, seed=0, with_ref=True, with_scale=True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 4
    old = logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) if with_ref else None
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5 if with_scale else None
    weight = torch.rand(n, generator=g, dtype=torch.float64)
    return logp, epilogue.TokenInputs(old=old, adv=adv, weight=weight, ref=ref, policy_scale=scale)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("variant", ["plain", "kl", "kl_bias_corr", "delta", "on_policy"])
def test_epilogue_equals_autograd_of_per_token_loss(loss_type, variant):
    logp, ti = _inputs(seed=zlib.crc32(repr((loss_type, variant)).encode()) % 997)
    opts = dict(loss_type=loss_type, max_completion_length=8, epsilon_high=1.2 if loss_type == "cispo" else 0.28)
    if variant in ("kl", "kl_bias_corr"):
        opts.update(beta=0.07, use_bias_correction_kl=variant == "kl_bias_corr")
    if variant == "delta":
        opts["delta"] = 1.1
    if variant == "on_policy":
        ti.old = None
    o = GRPOOptions(**opts).validate()
    epi = epilogue.token_epilogue(logp, ti, o)

    # the same math through torch autograd on a [1, n] "batch" whose weights we impose
    x = logp.clone().requires_grad_(True)
    old = x.detach() if ti.old is None else ti.old
    w = torch.exp(x - old)
    per_token = objective.policy_term(w, ti.adv, x, o) * ti.policy_scale
    if o.beta:
        kl = objective.k3_kl(x, ti.ref)
        per_token = per_token + o.beta * (kl * w if o.use_bias_correction_kl else kl)
    total = (per_token * ti.weight).sum()
    (grad,) = torch.autograd.grad(total, x)
    torch.testing.assert_close(epi.loss.sum(), total.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(epi.dlogp, grad, rtol=1e-12, atol=1e-12)


def test_clip_boundaries_follow_torch_tie_rules():
    # ratios exactly at 1 - eps, 1 + eps and 1 (ties between the clipped and unclipped terms)
    o = GRPOOptions(loss_type="grpo", epsilon_low=0.25, epsilon_high=0.5).validate()
    ratios = torch.tensor([0.75, 1.5, 1.0, 0.5, 2.0], dtype=torch.float64)
    old = torch.zeros(5, dtype=torch.float64)
    logp = torch.log(ratios)
    adv = torch.tensor([-1.0, 1.0, 2.0, -1.0, 1.0], dtype=torch.float64)
    epi = epilogue.token_epilogue(logp, epilogue.TokenInputs(old, adv, torch.ones(5, dtype=torch.float64)), o)
    x = logp.clone().requires_grad_(True)
    w = torch.exp(x - old)
    (g,) = torch.autograd.grad(objective.policy_term(w, adv, x, o).sum(), x)
    torch.testing.assert_close(epi.dlogp, g, rtol=0, atol=1e-15)
    assert epi.dlogp[3] == 0 and epi.dlogp[4] == 0  # clipped: no gradient


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_weights_normalize_like_trl(loss_type):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 6, generator=g) > 0.4
    mask[0] = False
    per_token = torch.randn(4, 6, generator=g, dtype=torch.float64)
    o = GRPOOptions(loss_type=loss_type, max_completion_length=9).validate()
    m = mask.double()
    if loss_type in ("grpo", "sapo"):
        want = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        want = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        want = (per_token * m).sum() / (4 * 9)
    elif loss_type in ("dapo", "cispo"):
        want = (per_token * m).sum() / m.sum()
    else:
        want = (per_token * m).sum(-1).mean()
    got = (per_token * objective.token_weights(mask, o, torch.float64)).sum()
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_high_entropy_mask_matches_trl_quantile():
    g = torch.Generator().manual_seed(2)
    ent = torch.rand(3, 8, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(3, 8, generator=g) > 0.3
    got = metrics.high_entropy_mask(ent, mask, 0.25)
    thr = torch.quantile(ent[mask].float(), 0.75)
    want = ((ent * mask) >= thr) & mask
    assert torch.equal(got, want)
    assert got.sum() < mask.sum()

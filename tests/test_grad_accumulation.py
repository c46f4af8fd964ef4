"""Gradient accumulation: a batch split into K micro-batches of equal row counts, each loss
normalized as TRL 1.16 normalizes it, the gradients summed by repeated ``backward``.

TRL's normalizers under gradient accumulation (``GRPOTrainer._compute_loss``):

- dapo, cispo: ``sum(per_token_loss * mask) / num_items_in_batch`` with
  ``num_items_in_batch`` = the completion tokens of the *whole* accumulated batch (one
  process). The sum over micro-batches is exactly the one-batch loss: **exact**.
- grpo, sapo (mean over rows of per-row token means), dr_grpo (sum / (B *
  max_completion_length)), luspo (mean over rows of per-row sums): each micro-batch loss
  is divided by the number of accumulation steps K. With equal row counts per micro-batch
  (TRL's per_device_train_batch_size) every row keeps its weight 1/B: **exact**.
- bnpo: ``sum / mask.sum()`` per micro-batch, divided by K: a token mean per micro-batch,
  averaged over micro-batches. Equal to the one-batch token mean only when every
  micro-batch has the same number of completion tokens; otherwise it is only what TRL
  does (tested as such: against the oracle on each micro-batch).
- ``top_entropy_quantile < 1``: the entropy threshold is a quantile of the micro-batch's
  own tokens (as in TRL), so no loss type is exact under accumulation; tested as TRL does
  it, per micro-batch.

"Exact" means equal up to floating-point summation order: relative error (in norm) below
1e-12 in float64, 1e-5 in float32 (cuBLAS sums another order for another batch shape).
"""
from __future__ import annotations

import pytest
import torch

from support import backend_params, device_for_tests, require
from grpo_kernels import grpo_loss
from grpo_kernels.options import LOSS_TYPES
from grpo_kernels.reference import reference_grpo_loss

DEVICE = device_for_tests()
B, T, H, V = 8, 7, 16, 53
EXACT = ("dapo", "cispo", "grpo", "sapo", "dr_grpo", "luspo")
PER_STEP_DIVIDED = ("grpo", "sapo", "bnpo", "dr_grpo", "luspo")


def make(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        hidden=(0.7 * torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(dtype),
        weight=(0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype),
        bias=(0.2 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype),
        targets=torch.randint(0, V, (B, T), generator=g),
        mask=torch.rand(B, T, generator=g) > 0.3,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_logps=-4 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ref_logps=-4 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        importance_sampling_ratio=torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
    )
    d["mask"][:, 0] = True
    d["mask"][3] = False  # a fully masked completion
    d["mask"][5, 1:] = False  # a one-token completion: micro-batches get unequal token counts
    side = torch.float64 if dtype == torch.float64 else torch.float32
    for k in ("advantages", "old_logps", "ref_logps", "importance_sampling_ratio"):
        d[k] = d[k].to(side)
    return {k: v.to(DEVICE) for k, v in d.items()}


def options(loss_type, level="token"):
    o = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, epsilon_high=0.28,
             max_completion_length=T + 3)
    if loss_type == "cispo":
        o["epsilon_high"] = 1.5
    return o


def leaves(b):
    return {k: b[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}


def accumulate(fn, b, K, opts, *, trl_normalizers=True):
    """Sum of the K micro-batch losses (backward on each), TRL's normalizers; returns
    (summed loss, grad_hidden, grad_weight, grad_bias)."""
    p = leaves(b)
    total_tokens = int(b["mask"].sum())
    step = B // K
    acc = 0.0
    for k in range(K):
        rows = slice(k * step, (k + 1) * step)
        o = dict(opts)
        if trl_normalizers and o["loss_type"] in ("dapo", "cispo"):
            o["num_items_in_batch"] = total_tokens
        loss = fn(p["hidden"][rows], p["weight"], b["targets"][rows], b["advantages"][rows], b["mask"][rows],
                  b["old_logps"][rows], b["ref_logps"][rows], bias=p["bias"],
                  importance_sampling_ratio=b["importance_sampling_ratio"][rows], **o)
        if trl_normalizers and o["loss_type"] in PER_STEP_DIVIDED:
            loss = loss / K
        loss.backward()
        acc = acc + loss.detach()
    return acc, p["hidden"].grad, p["weight"].grad, p["bias"].grad


def one_batch(fn, b, opts):
    p = leaves(b)
    loss = fn(p["hidden"], p["weight"], b["targets"], b["advantages"], b["mask"], b["old_logps"], b["ref_logps"],
              bias=p["bias"], importance_sampling_ratio=b["importance_sampling_ratio"], **opts)
    loss.backward()
    return loss.detach(), p["hidden"].grad, p["weight"].grad, p["bias"].grad


def assert_same(got, want, dtype):
    """Equal up to summation order: relative error in norm (a per-element relative error
    is meaningless for the near-zero elements of a gradient)."""
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        err = (a.double() - e.double()).norm().item()
        assert err <= rtol * e.double().norm().item() + 1e-30, \
            f"{name}: relative error {err / max(e.double().norm().item(), 1e-300):.3e} > {rtol}"


def _oracle(hidden, weight, targets, advantages, mask, old, ref, *, bias, importance_sampling_ratio, **opts):
    d = lambda x: None if x is None else x.double()  # noqa: E731
    return reference_grpo_loss(hidden.double(), weight.double(), targets, d(advantages), mask, d(old), d(ref),
                               bias=d(bias), importance_sampling_ratio=d(importance_sampling_ratio), **opts)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("loss_type", EXACT)
def test_exact_loss_types_accumulate_to_the_one_batch_gradient(backend, dtype, level, K, loss_type):
    require(backend, DEVICE, dtype)
    b = make(dtype, seed=K)
    opts = dict(options(loss_type, level), backend=backend)
    want = one_batch(grpo_loss, b, opts)
    got = accumulate(grpo_loss, b, K, opts)
    assert_same(got, want, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("K", [2, 4])
def test_bnpo_accumulates_per_micro_batch_token_means(backend, level, K):
    """bnpo under accumulation is TRL's mean over micro-batches of their token means, not
    the one-batch token mean (they differ here: the micro-batches' token counts differ)."""
    require(backend, DEVICE, torch.float64)
    b = make(torch.float64, seed=11)
    opts = dict(options("bnpo", level), backend=backend)
    got = accumulate(grpo_loss, b, K, opts)
    oracle = accumulate(_oracle, b, K, options("bnpo", level))
    assert_same(got, oracle, torch.float64)
    full = one_batch(grpo_loss, b, opts)
    assert not torch.allclose(got[0], full[0], rtol=1e-6), "bnpo would be exact only with equal token counts"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_trl_per_micro_batch(backend, loss_type):
    """Whatever the loss type, each micro-batch step equals TRL's (the oracle) with the same
    normalizers: also with an entropy mask, whose quantile is per micro-batch."""
    require(backend, DEVICE, torch.float64)
    b = make(torch.float64, seed=5)
    for extra in ({}, {"top_entropy_quantile": 0.6}):
        opts = dict(options(loss_type), **extra)
        got = accumulate(grpo_loss, b, 2, dict(opts, backend=backend))
        want = accumulate(_oracle, b, 2, opts)
        assert_same(got, want, torch.float64)


@pytest.mark.parametrize("backend", backend_params())
def test_tensor_num_items_in_batch(backend):
    """TRL passes num_items_in_batch as a 0-d tensor: same result as the int."""
    require(backend, DEVICE, torch.float64)
    b = make(torch.float64, seed=3)
    opts = dict(options("dapo"), backend=backend)
    n = b["mask"].sum()
    base = dict(hidden=b["hidden"][:4], weight=b["weight"], targets=b["targets"][:4],
                advantages=b["advantages"][:4], mask=b["mask"][:4], old_logps=b["old_logps"][:4],
                ref_logps=b["ref_logps"][:4])
    as_int = grpo_loss(*base.values(), num_items_in_batch=int(n), **opts)
    as_tensor = grpo_loss(*base.values(), num_items_in_batch=n, **opts)
    torch.testing.assert_close(as_tensor, as_int, rtol=0, atol=0)


def test_bnpo_is_exact_with_equal_token_counts():
    """The condition under which bnpo accumulates exactly: equal completion tokens per
    micro-batch (here: a full mask)."""
    b = make(torch.float64, seed=2)
    b["mask"] = torch.ones_like(b["mask"])
    opts = dict(options("bnpo"), backend="torch")
    assert_same(accumulate(grpo_loss, b, 4, opts), one_batch(grpo_loss, b, opts), torch.float64)

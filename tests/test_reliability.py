"""The autograd and precision patterns of real training loops, on every backend.

Each test is a way training code calls a loss that once went wrong somewhere: under
torch.autocast, with retained graphs and the usual ways of zeroing gradients, twice through
torch.autograd.grad, under gradient checkpointing, into existing .grad, with a frozen or a
tied head. The answer is always the oracle's (or a clear error), never a silently wrong one.
"""
from __future__ import annotations

import pytest
import torch

from backends import backend_params, require
from helpers import TOLERANCES, as_double, make_batch, rel_err, run_loss
from grpo_kernels import grpo_loss, token_logprobs
from grpo_kernels.reference import reference_grpo_loss, reference_token_logprobs

AUTOCAST = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _rounded(batch, dtype):
    """The float64 oracle's inputs: the head's operands rounded as autocast rounds them."""
    out = as_double(batch)
    for k in ("hidden", "weight", "bias"):
        if batch[k] is not None:
            out[k] = batch[k].to(dtype).double()
    return out


def _close(out, grads, ref_out, ref_grads, dtype):
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(out, ref_out) < tol_loss, (float(out), float(ref_out))
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32, name  # the fp32 leaves get fp32 gradients
        assert rel_err(g, rg) < tol_grad, name


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", AUTOCAST)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_loss_under_cpu_autocast(backend, dtype, loss_type):
    """The issue's repro crashed ('Expected out tensor to have dtype c10::BFloat16')."""
    require(backend, "cpu", dtype)
    batch = make_batch(dtype=torch.float32, seed=21)
    batch["old_logps"] = None  # on-policy: no ratio sits at a clip boundary that rounding could flip
    opts = dict(beta=0.04, loss_type=loss_type)
    with torch.autocast("cpu", dtype=dtype):
        out, grads = run_loss(grpo_loss, batch, backend=backend, **opts)
    assert out.dtype == torch.float32
    ref_out, ref_grads = run_loss(reference_grpo_loss, _rounded(batch, dtype), **opts)
    _close(out, grads, ref_out, ref_grads, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", AUTOCAST)
def test_token_logprobs_under_cpu_autocast_backward_inside(backend, dtype):
    require(backend, "cpu", dtype)
    batch = make_batch(dtype=torch.float32, seed=22)
    h = batch["hidden"].clone().requires_grad_(True)
    w = batch["weight"].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        logp, ent = token_logprobs(h, w, batch["targets"], return_entropy=True, backend=backend)
        (logp.sum() + 0.5 * ent.sum()).backward()  # the backward inside autocast too
    r = _rounded(batch, dtype)
    h64 = r["hidden"].clone().requires_grad_(True)
    w64 = r["weight"].clone().requires_grad_(True)
    ref_logp, ref_ent = reference_token_logprobs(h64, w64, batch["targets"])
    (ref_logp.sum() + 0.5 * ref_ent.sum()).backward()
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert logp.dtype == torch.float32
    assert rel_err(logp, ref_logp) < tol_loss and rel_err(ent, ref_ent) < tol_loss
    assert h.grad.dtype == torch.float32 and rel_err(h.grad, h64.grad) < tol_grad
    assert rel_err(w.grad, w64.grad) < tol_grad


def test_autocast_leaves_float64_alone():
    """autocast casts fp32/fp16/bf16 operands only (as torch does): fp64 runs in fp64."""
    batch = make_batch(dtype=torch.float64, seed=23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_loss(grpo_loss, batch, backend="torch", beta=0.04)
    ref_out, ref_grads = run_loss(reference_grpo_loss, batch, beta=0.04)
    assert out.dtype == torch.float64 and rel_err(out, ref_out) < 1e-10
    assert all(rel_err(g, rg) < 1e-10 for g, rg in zip(grads, ref_grads))

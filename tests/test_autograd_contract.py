"""How the gradients computed in the forward leave through autograd (grpo_kernels.ops)."""
from __future__ import annotations

import pytest
import torch

from backends import backend_params, device_for_tests, require
from helpers import make_batch
from grpo_kernels import grpo_loss

DEVICE = device_for_tests()


def _loss(batch, backend, **kw):
    h = batch["hidden"].detach().clone().requires_grad_(True)
    w = batch["weight"].detach().clone().requires_grad_(True)
    loss = grpo_loss(h, w, batch["targets"], batch["advantages"], batch["mask"], batch["old_logps"],
                     batch["ref_logps"], bias=batch["bias"], backend=backend, beta=0.04, chunk_size=4, **kw)
    return h, w, loss


@pytest.mark.parametrize("backend", backend_params())
def test_scaled_loss_scales_the_gradients(backend):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(seed=21, device=DEVICE)
    h1, w1, loss = _loss(batch, backend)
    loss.backward()
    h3, w3, loss = _loss(batch, backend)
    (-2.5 * loss).backward()  # grad_loss != 1: the multiply path
    assert torch.allclose(w3.grad, -2.5 * w1.grad, rtol=1e-13, atol=0)
    assert torch.allclose(h3.grad, -2.5 * h1.grad, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_retained_graph_is_right_or_refuses(backend):
    # loss.backward() hands out the saved gradients without a copy (a second [V, H] tensor is
    # 1.2 GB at V=151936, H=4096), so .grad may be the saved tensor itself. A second backward
    # through a retained graph is still right (it accumulates into itself: 2x); once that
    # buffer has changed, autograd's version check refuses a third, never a silent wrong number.
    require(backend, DEVICE, torch.float64)
    batch = make_batch(seed=22, device=DEVICE)
    h, w, loss = _loss(batch, backend)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(w.grad, 2 * first)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", backend_params())
def test_retained_graph_with_a_scaled_loss_can_run_again(backend):
    require(backend, DEVICE, torch.float64)
    batch = make_batch(seed=23, device=DEVICE)
    h, w, loss = _loss(batch, backend)
    for _ in range(3):  # grad_loss != 1 takes the product: fresh tensors every time
        gw, = torch.autograd.grad(0.5 * loss, w, retain_graph=True)
    h2, w2, loss2 = _loss(batch, backend)
    loss2.backward()
    assert torch.allclose(gw, 0.5 * w2.grad, rtol=1e-13, atol=0)

"""token_logprobs (and entropy) against log_softmax on materialized logits, every backend."""
from __future__ import annotations

import pytest
import torch

from support import TOLERANCES, backend_params, device_for_tests, rel_err, require
from grpo_kernels import token_logprobs
from grpo_kernels.reference import reference_token_logprobs

DEVICE = device_for_tests()


def _data(dtype, seed=0, N=(2, 7), H=12, V=53, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*N, H, generator=g, dtype=torch.float64) * 0.8).to(dtype).to(DEVICE)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6).to(dtype).to(DEVICE)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.2).to(dtype).to(DEVICE) if bias else None
    t = torch.randint(0, V, N, generator=g).to(DEVICE)
    t.view(-1)[0], t.view(-1)[-1] = 0, V - 1
    return h, w, b, t


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_entropy_and_their_grads(backend, dtype, softcap, temperature):
    require(backend, DEVICE, dtype)
    h, w, b, t = _data(dtype)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    logp, ent = token_logprobs(*leaves[:2], t, bias=leaves[2], temperature=temperature, logit_softcap=softcap,
                               return_entropy=True, backend=backend, chunk_size=5)
    ref_leaves = [x.double().clone().requires_grad_(True) for x in (h, w, b)]
    rlogp, rent = reference_token_logprobs(ref_leaves[0], ref_leaves[1], t, ref_leaves[2], temperature, softcap)
    tol = TOLERANCES[dtype][0]
    assert logp.shape == t.shape and ent.shape == t.shape
    assert rel_err(logp, rlogp) < tol and rel_err(ent, rent) < tol
    g = torch.Generator().manual_seed(1)
    up_l = torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE)
    up_e = torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ((logp * up_l.to(logp.dtype)).sum() + (ent * up_e.to(ent.dtype)).sum()).backward()
    ((rlogp * up_l).sum() + (rent * up_e).sum()).backward()
    for x, rx in zip(leaves, ref_leaves):
        assert rel_err(x.grad, rx.grad) < TOLERANCES[dtype][1]


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_logprobs_and_entropy(backend):
    require(backend, DEVICE, torch.float64)
    h, w, b, t = _data(torch.float64, N=(5,), H=3, V=6)

    def f(h, w, b):
        return token_logprobs(h, w, t, bias=b, return_entropy=True, logit_softcap=2.5, temperature=0.7,
                              backend=backend, chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(x.clone().requires_grad_(True) for x in (h, w, b)))


def test_matches_log_softmax_without_bias_and_no_grad():
    h, w, _, t = _data(torch.float32, bias=False)
    with torch.no_grad():
        logp = token_logprobs(h, w, t)
    want = torch.log_softmax(h @ w.T, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, want, rtol=1e-5, atol=1e-5)
    assert not logp.requires_grad


@pytest.mark.parametrize("backend", backend_params())
def test_without_entropy_the_backend_skips_it(backend, monkeypatch):
    """return_entropy=False is the log-prob-only pass: the backend is asked for no entropy
    (need_entropy=False, the entropy's sum is skipped in the kernels), with the same log-probs
    and gradients as the full pass."""
    from grpo_kernels.backends import get_backend

    require(backend, DEVICE, torch.float64)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 5, 16, generator=g, dtype=torch.float64).to(DEVICE)
    weight = (0.5 * torch.randn(301, 16, generator=g, dtype=torch.float64)).to(DEVICE)
    targets = torch.randint(0, 301, (6, 5), generator=g).to(DEVICE)
    be = get_backend(backend, torch.device(DEVICE), torch.float64)
    seen, real = [], be.row_stats

    def spy(*args, need_entropy=True, **kwargs):
        seen.append(need_entropy)
        st = real(*args, need_entropy=need_entropy, **kwargs)
        if not need_entropy:
            assert torch.equal(st.entropy, torch.zeros_like(st.entropy))
        return st

    monkeypatch.setattr(be, "row_stats", spy)
    grads = []
    for want_entropy in (True, False):
        h = hidden.clone().requires_grad_(True)
        out = token_logprobs(h, weight, targets, return_entropy=want_entropy, backend=backend, chunk_size=7)
        logp = out[0] if want_entropy else out
        (logp * torch.linspace(-1, 1, logp.numel(), dtype=logp.dtype, device=DEVICE).view_as(logp)).sum().backward()
        grads.append((logp.detach(), h.grad))
        assert seen and all(flag is want_entropy for flag in seen)
        seen.clear()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-13, atol=1e-13)
    ref = reference_token_logprobs(hidden.reshape(-1, 16).cpu(), weight.cpu(), targets.reshape(-1).cpu())[0]
    assert rel_err(grads[1][0].reshape(-1), ref) < TOLERANCES[torch.float64][0]

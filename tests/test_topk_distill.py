"""topk_forward_kl (verl's top-k distillation rows from hidden states) against the float64 oracle on
materialized logits: values and gradients, with softcap, bias, temperature and the log-prob clamp."""
from __future__ import annotations

import pytest
import torch

from support import TOLERANCES, rel_err, stable_seed
from grpo_kernels.reference import reference_topk_forward_kl
from grpo_kernels.topk_distill import topk_forward_kl

K, V, H = 4, 31, 10


def _data(dtype, seed, lead=(3, 6)):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, H, generator=g, dtype=torch.float64) * 0.9).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    lt, ids = torch.log_softmax(torch.randn(*lead, V, generator=g, dtype=torch.float64) * 2, -1).topk(K, dim=-1)
    return h, w, b, ids, lt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softcap,temperature,clamp", [(None, 1.0, None), (3.0, 0.7, -2.5), (None, 1.3, -10.0)])
def test_rows_and_gradients_match_the_oracle(dtype, softcap, temperature, clamp):
    h, w, b, ids, lt = _data(dtype, stable_seed("topk", dtype, softcap, temperature, clamp))
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    rows = topk_forward_kl(leaves[0], leaves[1], ids, lt.to(dtype), bias=leaves[2], temperature=temperature,
                           logit_softcap=softcap, log_prob_min_clamp=clamp, chunk_size=5)
    ref_leaves = [x.double().clone().requires_grad_(True) for x in (h, w, b)]
    ref = reference_topk_forward_kl(ref_leaves[0], ref_leaves[1], ids, lt.to(dtype).double(), ref_leaves[2],
                                    temperature, softcap, clamp)
    tol, gtol = TOLERANCES[dtype]
    for x, r in zip(rows[:3], ref):
        assert x.shape == ids.shape[:-1] and rel_err(x, r) < tol
    assert not rows.student_mass.requires_grad and rows.overlap_count.dtype == torch.int64
    up = torch.randn(ids.shape[:-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (rows.losses * up.to(rows.losses.dtype)).sum().backward()
    (ref[0] * up).sum().backward()
    for x, r in zip(leaves, ref_leaves):
        assert rel_err(x.grad, r.grad) < gtol


def test_gradcheck():
    h, w, b, ids, lt = _data(torch.float64, 3, lead=(5,))

    def f(h, w, b):
        return topk_forward_kl(h, w, ids, lt, bias=b, logit_softcap=2.0, temperature=0.8, log_prob_min_clamp=-4.0,
                               chunk_size=2).losses

    assert torch.autograd.gradcheck(f, tuple(x.clone().requires_grad_(True) for x in (h, w, b)))


def test_overlap_diagnostics_by_hand():
    """The student's own top-k against the teacher's ids: a teacher that copies the student overlaps
    fully; one holding the student's K lowest ids overlaps not at all (advantage 0)."""
    h, w, b, _, _ = _data(torch.float64, 4, lead=(6,))
    logp = torch.log_softmax(h @ w.T + b, -1)
    top, low = logp.topk(K, dim=-1), (-logp).topk(K, dim=-1)
    full = topk_forward_kl(h, w, top.indices, top.values, bias=b)
    assert bool((full.overlap_count == K).all())
    assert float(full.losses.abs().max()) < 1e-12
    none = topk_forward_kl(h, w, low.indices, logp.gather(-1, low.indices), bias=b)
    assert bool((none.overlap_count == 0).all()) and bool((none.overlap_token_advantage == 0).all())


def test_exported_from_the_package_top_level():
    import grpo_kernels
    from grpo_kernels import api

    assert grpo_kernels.topk_forward_kl is topk_forward_kl
    assert grpo_kernels.token_statistics is api.token_statistics
    assert {"topk_forward_kl", "token_statistics"} <= set(grpo_kernels.__all__)


def test_no_double_backward():
    """The backward op (grpo_kernels::topk_forward_kl_backward) has no autograd of its own: a
    create_graph backward is a clear error, not a silently wrong second derivative."""
    g = torch.Generator().manual_seed(stable_seed("topk-double-backward"))
    h = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 6, dtype=torch.float64, generator=g)
    ids = torch.randint(0, 9, (4, 2), generator=g)
    rows = topk_forward_kl(h, w, ids, torch.full((4, 2), -1.5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="topk_forward_kl has no double backward"):
        torch.autograd.grad(rows.losses.sum(), [h], create_graph=True)

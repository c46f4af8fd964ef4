"""What is specific to the Triton divergence kernel (backends/triton/divergence_kernel.py), beside
the backend-independent contract of tests/test_distill_backends.py: the tiling (V not a multiple
of the tile, V = 1, many tiles per row), a [] coef against a per-row one, a student and a teacher
of different dtypes, columns masked with -inf in both heads, NaN logits, heads whose logits differ
by a large offset (the endpoint KLs must not cancel it), fixed tiles bitwise equal across calls
and for a row wherever it sits (batch invariance), and the host's checks.

Each case is checked against the float64 oracle (``reference.reference_distill_loss`` on the
logits themselves: hidden = the logits, weight = the identity), with outputs NaN-poisoned. On the
CPU the kernel runs under TRITON_INTERPRET=1 (conftest.py); the interpreter is slow, so the
shapes are small and the tile is lowered to make several tiles per row:

    python -m pytest tests/test_triton_divergence.py -q
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from support import TOLERANCES, stable_seed  # noqa: E402
from grpo_kernels.backends.triton import BACKEND as TRITON  # noqa: E402
from grpo_kernels.backends.triton import common, divergence_kernel  # noqa: E402
from grpo_kernels.divergence import DivergenceSpec, HeadTransform  # noqa: E402
from grpo_kernels.options import ExecutionOptions  # noqa: E402
from grpo_kernels.reference import reference_distill_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(TRITON.supports(torch.device(DEVICE), torch.float32) is not None,
                       reason=f"triton backend unavailable: {TRITON.supports(torch.device(DEVICE), torch.float32)}"),
    # numpy's warnings for the IEEE results of masked columns (-inf - -inf), discarded by the kernel
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
EX = ExecutionOptions().validate()
BETAS = (0.0, 0.3, 1.0)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel outputs (D, entropy) start as NaN: an element the kernel does not write fails."""
    monkeypatch.setattr(common, "empty", lambda shape, dtype, device: torch.full(
        shape if isinstance(shape, tuple) else (shape,), float("nan"), dtype=dtype, device=device))


@pytest.fixture
def tile(monkeypatch):
    """Sets the interpreter's vocabulary tile (default 128)."""
    monkeypatch.delenv("GRPO_KERNELS_TRITON_BLOCK_V", raising=False)
    return lambda block: monkeypatch.setattr(common, "INTERPRET_BLOCK_V", block)


def spec_of(beta, softcaps=(3.0, None)):
    return DivergenceSpec(beta, HeadTransform(1.2, softcaps[0], 0.8), HeadTransform(0.9, softcaps[1], 0.8))


def oracle(zs, zt, spec, coef):
    """(D, entropy, coef * dD/dz_s) in float64 by the definitions (autograd; the oracle's loss
    over one row at a time is that row's D)."""
    n, V = zs.shape
    eye = torch.eye(V, dtype=torch.float64, device=zs.device)
    h = zs.double().detach().requires_grad_(True)
    s, t = spec.student, spec.teacher
    kw = dict(beta=spec.beta, temperature=s.temperature, logit_scale=s.scale, teacher_logit_scale=t.scale,
              logit_softcap=s.softcap, teacher_logit_softcap=t.softcap, num_items_in_batch=1.0)
    _, m = reference_distill_loss(h[None], eye, zt.double()[None], eye, torch.ones(1, n, dtype=torch.bool),
                                  return_metrics=True, **kw)
    total = 0.0
    for i in range(n):
        row = torch.zeros(1, n, dtype=torch.bool)
        row[0, i] = True
        total = total + reference_distill_loss(h[None], eye, zt.double()[None], eye, row, **kw) * coef[i].double()
    (g,) = torch.autograd.grad(total, h)
    return m["divergence"][0], m["entropy"][0], g


def logits(n, V, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, V, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE) for _ in range(2)]


def check(zs, zt, spec, coef, dtype=None):
    """The kernel (in place, on a copy of zs) against the oracle at ``dtype``'s tolerance."""
    tol = TOLERANCES[dtype or zs.dtype][0]
    g = zs.clone()
    div, ent = divergence_kernel.divergence_rows_(g, zt, spec, coef, EX)
    rd, re, rg = oracle(zs, zt, spec, coef.expand(zs.shape[0]))
    for name, got, want in (("divergence", div, rd), ("entropy", ent, re), ("gradient", g, rg)):
        got = got.double()
        assert torch.isfinite(got).all(), name
        assert torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item())), (
            name, (got - want).abs().max().item())
    return div, ent, g


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("V, block", [(1, 16), (37, 16), (200, 16), (64, 16), (300, 128)])
def test_tiles_match_the_oracle_in_float64(tile, beta, V, block):
    """V = 1, V not a multiple of the tile, many tiles per row (up to 13), exact multiples."""
    tile(block)
    zs, zt = logits(3, V, stable_seed("tiles", beta, V), torch.float64)
    coef = torch.rand(3, dtype=torch.float64, generator=torch.Generator().manual_seed(V)).to(DEVICE)
    check(zs, zt, spec_of(beta, (3.0, 4.0)), coef)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("softcaps", [(None, None), (3.0, None), (None, 4.0)])
def test_float32_matches_the_oracle(tile, beta, softcaps):
    tile(32)
    zs, zt = logits(4, 150, stable_seed("fp32", beta, str(softcaps)))
    check(zs, zt, spec_of(beta, softcaps), torch.rand(4, device=DEVICE))


@pytest.mark.parametrize("beta", BETAS)
def test_scalar_coef_is_the_per_row_one_bitwise(tile, beta):
    tile(32)
    zs, zt = logits(4, 100, stable_seed("coef", beta))
    a, b = zs.clone(), zs.clone()
    d1, e1 = divergence_kernel.divergence_rows_(a, zt, spec_of(beta), torch.tensor(0.37, device=DEVICE), EX)
    d2, e2 = divergence_kernel.divergence_rows_(b, zt, spec_of(beta), torch.full((4,), 0.37, device=DEVICE), EX)
    assert torch.equal(a, b) and torch.equal(d1, d2) and torch.equal(e1, e2)
    check(zs, zt, spec_of(beta), torch.tensor(0.37, device=DEVICE))


@pytest.mark.parametrize("beta", BETAS)
def test_a_teacher_of_another_dtype(tile, beta):
    """fp32 student, fp16 teacher (and bf16 on the GPU: the interpreter has none, the host widens it
    exactly); fp64 student, fp32 teacher. The teacher's values are what it holds: the oracle gets
    them widened."""
    tile(32)
    zs, zt = logits(3, 70, stable_seed("mixed", beta))
    teachers = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    for t_dtype in teachers:
        check(zs, zt.to(t_dtype), spec_of(beta), torch.rand(3, device=DEVICE))
    check(zs.double(), zt, spec_of(beta), torch.rand(3, dtype=torch.float64, device=DEVICE))


def test_a_bfloat16_teacher_is_its_float32_widening_bitwise(tile):
    tile(32)
    zs, zt = logits(3, 70, stable_seed("bf16 teacher"))
    zt = zt.to(torch.bfloat16)
    a, b = zs.clone(), zs.clone()
    coef = torch.rand(3, device=DEVICE)
    r1 = divergence_kernel.divergence_rows_(a, zt, spec_of(0.5), coef, EX)
    r2 = divergence_kernel.divergence_rows_(b, zt.float(), spec_of(0.5), coef, EX)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1]) and torch.equal(a, b)


@pytest.mark.parametrize("beta", BETAS)
def test_a_large_offset_between_the_heads_does_not_cancel(tile, beta):
    """Teacher = student + 300 + small noise (plain logits): p and q are close (D ~ 1e-3) while
    every logit differs by 300 between the heads. Rounding a log-prob as ``u - lse`` would cost
    ~300 eps = 2e-5 absolute, a few percent of D; the kernel's D stays within 1e-3 relative."""
    tile(32)
    g = torch.Generator().manual_seed(stable_seed("offset", beta))
    zs = (torch.randn(4, 120, generator=g) * 2).to(DEVICE)
    zt = zs + 300.0 + 0.05 * torch.randn(4, 120, generator=g).to(DEVICE)
    spec = DivergenceSpec(beta, HeadTransform(), HeadTransform())
    div, _, _ = check(zs, zt, spec, torch.rand(4, device=DEVICE))
    want = oracle(zs, zt, spec, torch.ones(4))[0]
    assert ((div.double() - want).abs() <= 1e-3 * want).all(), ((div.double() - want) / want).tolist()


@pytest.mark.parametrize("beta", BETAS)
def test_columns_masked_in_both_heads_add_nothing(tile, beta):
    """-inf logits in the same columns of both heads (a masked vocabulary): the divergence and
    entropy of the unmasked columns, a 0 gradient in the masked ones, nothing NaN."""
    tile(16)
    zs, zt = logits(3, 80, stable_seed("masked", beta))
    keep = torch.ones(80, dtype=torch.bool, device=DEVICE)
    keep[[0, 5, 17, 40, 41, 42, 79]] = False
    spec = DivergenceSpec(beta, HeadTransform(1.0, None, 0.8), HeadTransform(1.0, None, 0.8))
    coef = torch.rand(3, device=DEVICE)
    g = zs.masked_fill(~keep, float("-inf"))
    div, ent = divergence_kernel.divergence_rows_(g, zt.masked_fill(~keep, float("-inf")), spec, coef, EX)
    rd, re, rg = oracle(zs[:, keep].contiguous(), zt[:, keep].contiguous(), spec, coef)
    tol = TOLERANCES[torch.float32][0]
    assert torch.allclose(div.double(), rd, rtol=tol, atol=tol) and torch.allclose(ent.double(), re, rtol=tol, atol=tol)
    assert torch.allclose(g[:, keep].double(), rg, rtol=tol, atol=tol) and (g[:, ~keep] == 0).all()


def test_nan_logits_give_nan_rows(tile):
    tile(16)
    zs, zt = logits(3, 40, stable_seed("nan"))
    zs[0, 7] = float("nan")
    zt[1, 33] = float("nan")
    for beta in BETAS:
        div, ent = divergence_kernel.divergence_rows_(zs.clone(), zt, spec_of(beta), None, EX)
        assert div[:2].isnan().all() and ent[0].isnan() and not ent[1:].isnan().any() and not div[2].isnan()


@pytest.mark.parametrize("beta", BETAS)
def test_fixed_tiles_are_bitwise_reproducible_and_batch_invariant(tile, beta):
    """Two calls give the same bits, and a row gives the same bits alone, among other rows, or at
    another address (a slice starting mid-row-block: the tiles start at the row's column 0)."""
    tile(32)
    ex = ExecutionOptions(deterministic=True).validate()
    zs, zt = logits(6, 101, stable_seed("bitwise", beta))
    coef = torch.rand(6, device=DEVICE)
    runs = []
    for _ in range(2):
        g = zs.clone()
        runs.append((*divergence_kernel.divergence_rows_(g, zt, spec_of(beta), coef, ex), g))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    flat_s, flat_t = torch.cat([torch.zeros(3, device=DEVICE), zs[2:4].reshape(-1)]), zt[2:4].reshape(-1)
    part = flat_s[3:].view(2, 101)  # the rows at an address 12 bytes past the 16-byte boundary
    d, e = divergence_kernel.divergence_rows_(part, flat_t.view(2, 101), spec_of(beta), coef[2:4], ex)
    full_d, full_e, full_g = runs[0]
    assert torch.equal(d, full_d[2:4]) and torch.equal(e, full_e[2:4]) and torch.equal(part, full_g[2:4])


def test_out_may_be_a_strided_view(tile):
    """``out`` with non-contiguous rows gets the gradient through a contiguous copy."""
    tile(16)
    zs, zt = logits(3, 40, stable_seed("strided"))
    coef = torch.rand(3, device=DEVICE)
    buf = torch.full((40, 3), float("nan"), device=DEVICE)
    divergence_kernel.divergence_rows_(zs, zt, spec_of(0.5), coef, EX, out=buf.T)
    g = zs.clone()
    divergence_kernel.divergence_rows_(g, zt, spec_of(0.5), coef, EX)
    assert torch.equal(buf.T, g)


def test_empty_chunks_and_bad_shapes():
    zs = torch.empty(0, 10, device=DEVICE)
    div, ent = divergence_kernel.divergence_rows_(zs, zs.clone(), spec_of(0.5), torch.tensor(1.0), EX)
    assert div.shape == ent.shape == (0,)
    z = torch.zeros(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="zs and zt"):
        divergence_kernel.divergence_rows_(z, torch.zeros(2, 11, device=DEVICE), spec_of(0.5), None, EX)
    with pytest.raises(TypeError, match="zs and zt"):
        divergence_kernel.divergence_rows_(z, torch.zeros(2, 10, dtype=torch.int32), spec_of(0.5), None, EX)
    with pytest.raises(ValueError, match="out must"):
        divergence_kernel.divergence_rows_(z, z, spec_of(0.5), torch.tensor(1.0), EX, out=torch.zeros(2, 10).double())

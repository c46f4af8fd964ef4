"""The divergence row pass of csrc/divergence_sweep.h, the CUDA kernel's code and order run on the CPU.

``CppRowBackend(emulate_device=True).divergence_rows_`` runs the CUDA divergence kernel's launch on
the host (its lanes ``row_threads(V, student dtype)``, 16-byte vectors of the student's type and their
owners, element-by-element sums, the warp xor-shuffle tree and the block merge), so that these tests
check without a GPU the code and the order a GPU runs. ``CppRowBackend()`` (the production CPU path)
is checked against the same oracle where the inputs differ from ``test_distill_backends.py``'s (mixed
teacher dtypes, the transform on both heads):

- against a float64 oracle from the definitions (``grpo_kernels.divergence``; the gradient by
  autograd): beta 0, 0.3 and 1, with scale / softcap / temperature on either head, every storage
  dtype and mixed student / teacher dtypes, tolerances by dtype;
- batch invariance, bitwise: a row gives the same divergence, entropy and gradient bits at every chunk
  position, row stride (V + 1, V + 3) and start offset (0-3 elements after a 16-byte boundary), for
  each head independently;
- the kernel's block sizes 128, 256 and 512; ``coef`` None / [] / [n]; ``out=`` against in place;
  NaN and masked rows.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from support import require, stable_seed
from grpo_kernels.divergence import DivergenceSpec, HeadTransform
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import ExecutionOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_device_emulation import DTYPE_CODE, V_FOR_LANES, placed, same_bits  # noqa: E402

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
NAMES = {F64: "fp64", F32: "fp32", F16: "fp16", BF16: "bf16"}
#: (student, teacher) storage dtypes: each dtype alone, and mixed heads (the teacher read in its own dtype)
PAIRS = [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F32, BF16), (BF16, F32), (F64, F32), (F16, BF16),
         (F32, F64)]
PAIR_PARAMS = [pytest.param(s, t, id=f"{NAMES[s]}-{NAMES[t]}") for s, t in PAIRS]
BETAS = [0.0, 0.3, 1.0]
#: per-head transforms (scale, softcap, temperature); the temperature is shared, as in TRL
SPECS = {
    "plain": (HeadTransform(), HeadTransform()),
    "everything": (HeadTransform(1.3, 4.0, 0.8), HeadTransform(0.7, 6.0, 0.8)),
    "student-softcap": (HeadTransform(1.0, 3.0, 1.2), HeadTransform(1.1, None, 1.2)),
}
#: divergence and entropy (accumulated in fp32 at worst, of inputs exact in every dtype)
STAT_TOL = {F64: 1e-10, F32: 2e-5}
#: the gradient, stored in the student's dtype (relative to each row's largest element)
GRAD_TOL = {F64: 1e-10, F32: 2e-5, F16: 2e-3, BF16: 1e-2}
EXECUTION = ExecutionOptions(backend="cpp").validate()


@pytest.fixture(scope="module")
def emu():
    require("cpp", "cpu", torch.float32)
    from grpo_kernels.backends.cpp import CppRowBackend

    return CppRowBackend(emulate_device=True)


@pytest.fixture(scope="module")
def prod(emu):
    from grpo_kernels.backends.cpp import CppRowBackend

    return CppRowBackend()


def spec_of(beta: float, case: str) -> DivergenceSpec:
    return DivergenceSpec(beta, *SPECS[case])


def heads(n: int, V: int, student, teacher, seed: int):
    """Random logits of both heads, [n, V] each (the teacher close to the student, as in distillation)."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, V, generator=g, dtype=F64) * 2.5 + 0.3
    zt = 0.7 * zs + torch.randn(n, V, generator=g, dtype=F64) * 1.5
    return zs.to(student), zt.to(teacher)


def _u(head: HeadTransform, z: torch.Tensor) -> torch.Tensor:
    y = z * head.scale
    if head.softcap is not None:
        y = head.softcap * torch.tanh(y / head.softcap)
    return y / head.temperature


def oracle(zs, zt, spec: DivergenceSpec, coef):
    """(D, entropy, coef * dD/dz_s) in float64 from the stored logits, by the definitions."""
    z = zs.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(_u(spec.student, z), -1)
    log_q = torch.log_softmax(_u(spec.teacher, zt.double()), -1)
    p, q, b = log_p.exp(), log_q.exp(), spec.beta
    if b == 0.0:
        div = (q * (log_q - log_p)).sum(-1)
    elif b == 1.0:
        div = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.log((1 - b) * p + b * q)
        div = b * (q * (log_q - log_m)).sum(-1) + (1 - b) * (p * (log_p - log_m)).sum(-1)
    ent = -(p * log_p).sum(-1)
    c = torch.ones(()) if coef is None else coef
    (grad,) = torch.autograd.grad((div * c.double()).sum(), z)
    return div.detach(), ent.detach(), grad


def rows(impl, zs, zt, spec, coef, out=None):
    """(D, entropy, gradient) of ``impl``; the gradient into a NaN-poisoned copy (``out`` None) so
    that an element the kernel does not write shows."""
    buf = torch.full_like(zs, float("nan")) if out is None else out
    div, ent = impl.divergence_rows_(zs, zt, spec, coef, EXECUTION, out=buf)
    return div, ent, buf


def assert_matches_oracle(got, want, dtype, what=""):
    div, ent, grad = got
    rdiv, rent, rgrad = want
    acc = accumulation_dtype(dtype)
    assert div.dtype == ent.dtype == acc and grad.dtype == dtype, what
    tol = STAT_TOL[acc]
    for name, x, r in (("divergence", div, rdiv), ("entropy", ent, rent)):
        err = (x.double() - r).abs()
        assert bool((err <= tol * (1 + r.abs())).all()), f"{what}: {name} off by {err.max().item():.3g}"
    scale = rgrad.abs().amax(-1, keepdim=True)
    err = ((grad.double() - rgrad).abs() / scale).max().item()
    assert math.isfinite(err) and err <= GRAD_TOL[dtype], f"{what}: gradient off by {err:.3g} (relative to the row)"


# ----------------------------------------------------------------------------- against float64


@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("V", [37, 301])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("student,teacher", PAIR_PARAMS)
def test_rows_against_float64(emu, prod, student, teacher, beta, V, case):
    spec = spec_of(beta, case)
    zs, zt = heads(6, V, student, teacher, stable_seed("div-emu", NAMES[student], NAMES[teacher], beta, V, case))
    coef = torch.rand(6, generator=torch.Generator().manual_seed(V), dtype=F64).to(accumulation_dtype(student)) + 0.5
    want = oracle(zs, zt, spec, coef)
    for impl in (emu, prod):
        keep = zs.clone()
        assert_matches_oracle(rows(impl, zs, zt, spec, coef), want, student, f"emulate={impl.emulate_device}")
        assert same_bits(zs, keep)  # out= leaves the student's logits alone


@pytest.mark.parametrize("lanes", [128, 256, 512])
@pytest.mark.parametrize("student,teacher", [(F32, F32), (BF16, BF16), (F16, F32), (F64, F64), (F32, BF16)],
                         ids=["fp32", "bf16", "fp16-fp32", "fp64", "fp32-bf16"])
def test_each_block_size(emu, student, teacher, lanes):
    """V chosen so that the kernel launches ``lanes`` threads per row (several warps, the block
    merge of both heads' partials): against float64, and bitwise at other alignments."""
    from grpo_kernels.backends.cpp import load_extension

    V = V_FOR_LANES[student][lanes]
    assert load_extension().row_threads(V, DTYPE_CODE[student]) == lanes
    zs, zt = heads(3, V, student, teacher, stable_seed("div-lanes", NAMES[student], lanes))
    coef = torch.tensor([0.5, 2.0, 1.0], dtype=accumulation_dtype(student))
    for beta in (0.0, 0.5, 1.0):
        spec = spec_of(beta, "everything")
        want = rows(emu, zs, zt, spec, coef)
        assert_matches_oracle(want, oracle(zs, zt, spec, coef), student, f"beta {beta}")
        for offset in (1, 3):
            got = rows(emu, placed(zs, offset, V + 1), placed(zt, 3 - offset, V + 3), spec, coef)
            assert all(same_bits(a, b) for a, b in zip(got, want)), f"beta {beta}, offset {offset}"


# ----------------------------------------------------------------------------- batch invariance, bitwise


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("V", [37, 301])
@pytest.mark.parametrize("student,teacher", [(F32, F32), (F64, F64), (F16, F16), (BF16, BF16), (F32, BF16)],
                         ids=["fp32", "fp64", "fp16", "bf16", "fp32-bf16"])
def test_rows_bitwise_equal_at_every_position_and_alignment(emu, student, teacher, V, beta):
    """The same rows permuted, at row strides V + 1 and V + 3 (successive rows at every alignment),
    start offsets 0-3 for each head (independently), and alone: the same D, entropy and gradient bits."""
    n = 7
    spec = spec_of(beta, "everything")
    zs, zt = heads(n, V, student, teacher, stable_seed("div-bits", NAMES[student], V, beta))
    coef = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=F64).to(accumulation_dtype(student))
    want = rows(emu, zs, zt, spec, coef)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11))
    for offset in range(4):
        for ld in (V + 1, V + 3):
            got = rows(emu, placed(zs[perm], offset, ld), placed(zt[perm], (offset + 1) % 4, ld), spec, coef[perm])
            for name, g, w in zip(("divergence", "entropy", "gradient"), got, want):
                assert same_bits(g, w[perm]), f"{name}: offset {offset}, ld {ld}"
        r = offset + 2
        one = rows(emu, placed(zs[r:r + 1], offset, V + 2), placed(zt[r:r + 1], 3 - offset, V), spec, coef[r:r + 1])
        assert all(same_bits(g, w[r:r + 1]) for g, w in zip(one, want)), f"row {r} alone at offset {offset}"


@pytest.mark.parametrize("emulate", [True, False], ids=["emulation", "production"])
def test_two_runs_are_bitwise_equal(emu, prod, emulate):
    impl = emu if emulate else prod
    zs, zt = heads(9, 301, F32, BF16, 4)
    coef = torch.rand(9, generator=torch.Generator().manual_seed(3))
    for beta in BETAS:
        a, b = rows(impl, zs, zt, spec_of(beta, "everything"), coef), rows(impl, zs, zt, spec_of(beta, "everything"), coef)
        assert all(same_bits(x, y) for x, y in zip(a, b)), beta


# ----------------------------------------------------------------------------- coef and out


@pytest.mark.parametrize("emulate", [True, False], ids=["emulation", "production"])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["fp32", "bf16", "fp64"])
def test_coef_forms_and_out(emu, prod, dtype, beta, emulate):
    """coef None: D and entropy only, the logits and ``out`` untouched; a [] coef gives the bits of
    the same value per row; ``out=`` the bits of the in-place form, which overwrites the logits."""
    impl = emu if emulate else prod
    spec = spec_of(beta, "student-softcap")
    acc = accumulation_dtype(dtype)
    zs, zt = heads(5, 301, dtype, dtype, stable_seed("div-coef", NAMES[dtype], beta))
    keep = zs.clone()
    out = torch.full_like(zs, float("nan"))
    d0, e0 = impl.divergence_rows_(zs, zt, spec, None, EXECUTION, out=out)
    assert same_bits(zs, keep) and torch.isnan(out).all()
    d1, e1, g1 = rows(impl, zs, zt, spec, torch.tensor(0.75, dtype=acc))
    d2, e2, g2 = rows(impl, zs, zt, spec, torch.full((5,), 0.75, dtype=acc))
    assert same_bits(zs, keep)
    assert all(same_bits(a, b) for a, b in ((d0, d1), (e0, e1), (d1, d2), (e1, e2), (g1, g2)))
    d3, e3 = impl.divergence_rows_(zs, zt, spec, torch.full((5,), 0.75, dtype=acc), EXECUTION)  # in place
    assert same_bits(zs, g2) and same_bits(d3, d2) and same_bits(e3, e2)
    assert_matches_oracle((d1, e1, g1), oracle(keep, zt, spec, torch.tensor(0.75, dtype=F64)), dtype)


# ----------------------------------------------------------------------------- special rows


@pytest.mark.parametrize("beta", BETAS)
def test_nan_and_masked_rows_stay_in_their_row(emu, prod, beta):
    """A NaN student logit makes its row's D, entropy and gradient NaN; the rows beside it keep their
    bits. A student logit masked to -inf (p = 0 there) gives a finite row whose gradient is 0 at the
    masked column, as the contract's p * (...) terms say; the production path agrees on both."""
    spec = spec_of(beta, "plain")
    zs, zt = heads(4, 37, F32, F32, stable_seed("div-nan", beta))
    zs[1, 5] = float("nan")
    zs[2, :10] = float("-inf")
    zt[2, :10] = float("-inf")  # masked in both heads: every beta stays finite
    coef = torch.ones(4)
    got = rows(emu, zs, zt, spec, coef)
    assert all(torch.isnan(x[1]).all() for x in got)
    finite = [0, 2, 3]
    assert all(torch.isfinite(x[finite]).all() for x in got)
    assert bool((got[2][2, :10] == 0).all())
    alone = rows(emu, zs[finite].clone(), zt[finite].clone(), spec, coef[finite])
    assert all(same_bits(a, b[finite]) for a, b in zip(alone, got))
    ref = oracle(zs[[0, 3]], zt[[0, 3]], spec, coef[[0, 3]])
    assert_matches_oracle(tuple(x[[0, 3]] for x in got), ref, F32)
    other = rows(prod, zs, zt, spec, coef)
    assert all(torch.equal(torch.isnan(a), torch.isnan(b)) for a, b in zip(got, other))
    assert torch.allclose(other[0][finite], got[0][finite], rtol=1e-5, atol=1e-6)


def test_empty_chunk(emu, prod):
    for impl in (emu, prod):
        zs, zt = torch.empty(0, 37), torch.empty(0, 37, dtype=BF16)
        div, ent = impl.divergence_rows_(zs, zt, spec_of(0.5, "plain"), torch.empty(0), EXECUTION)
        assert div.shape == ent.shape == (0,)

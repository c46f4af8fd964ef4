"""The CUDA kernels' code and summation order, run on the CPU.

csrc/row_sweep.h holds the row work once for the CUDA kernels and the CPU row pass. With
``CppRowBackend(emulate_device=True)`` the CPU extension runs it under the device-emulation policy:
the kernels' lane count (``row_threads(V, dtype)``), their 16-byte vectors and which lane owns them,
their element-by-element sums, the warp xor-shuffle tree and the block merge. So these tests check,
without a GPU, the code and the order a GPU runs (not its bits: ``__expf`` and FMA contraction
differ in the last place):

- against the float64 oracle, with the contract's tolerances by dtype: row statistics, the gradient,
  the fused rows (advantages given or computed from rewards), group_normalize;
- batch invariance, bitwise: a row gives the same lse / entropy / target logit / gradient / loss bits
  at every chunk position, row stride and alignment (rows starting 0-3 elements after a 16-byte
  boundary, V not a multiple of 4 or 8), as ``batch_invariant=True`` promises;
- determinism, NaN / inf rows, one-column and empty chunks, and the lane counts 128, 256 and 512.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from support import require, stable_seed
from grpo_kernels.backends.base import accumulation_dtype
from grpo_kernels.objective import TokenInputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_row_pass_contract as contract  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_PARAMS = [pytest.param(dt, id=name) for name, dt in DTYPES.items()]
#: csrc/row_pass.h's DType codes
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
#: V not a multiple of 4 or 8: every row stride below leaves rows at every 16-byte alignment
VOCABS = [37, 301]
#: per dtype, a V for each of the kernels' block sizes
V_FOR_LANES = {
    torch.float32: {128: 301, 256: 5003, 512: 9001},
    torch.bfloat16: {128: 301, 256: 9001, 512: 17001},
    torch.float16: {128: 301, 256: 9001, 512: 17001},
    torch.float64: {128: 301, 256: 3001, 512: 5001},
}
MAX_ROWS = 16  # per-row upstream gradients are drawn for this many rows, then indexed
FUSED = {"fp32": ["dapo-delta-beta-scale", "cispo-beta-biaskl-scale", "sapo-beta", "grpo-off_policy"],
         "fp64": ["dapo-delta-beta-scale", "sapo-beta-biaskl-scale"]}


@pytest.fixture(scope="module")
def emu():
    require("cpp", "cpu", torch.float32)
    from grpo_kernels.backends.cpp import CppRowBackend

    return CppRowBackend(emulate_device=True)


@pytest.fixture(scope="module")
def ext(emu):
    from grpo_kernels.backends.cpp import load_extension

    return load_extension()


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so that NaN == NaN and -0 != +0)."""
    return x.detach().contiguous().view(INT_VIEW[x.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def placed(rows: torch.Tensor, offset: int, ld: int) -> torch.Tensor:
    """``rows`` [n, V] copied into a view of a larger buffer: row r starts ``offset + r * ld``
    elements after a 16-byte boundary; the gaps hold large numbers that a stray read would show."""
    n, V = rows.shape
    buf = torch.full((offset + n * ld + 8,), 1000.0, dtype=rows.dtype)
    assert buf.data_ptr() % 16 == 0
    view = buf[offset:offset + n * ld].view(n, ld)[:, :V]
    view.copy_(rows)
    return view


def token_inputs(n: int, acc: torch.dtype, seed: int) -> TokenInputs:
    g = contract.gen(seed)
    r = lambda: torch.randn(n, generator=g, dtype=torch.float64).to(acc)  # noqa: E731
    return TokenInputs(old=r() - 2.0, adv=r(), weight=torch.rand(n, generator=g, dtype=torch.float64).to(acc) + 0.1,
                       ref=r() - 2.0, policy_scale=None)


def take(ti: TokenInputs, idx: torch.Tensor) -> TokenInputs:
    return TokenInputs(old=ti.old[idx], adv=ti.adv[idx], weight=ti.weight[idx], ref=ti.ref[idx], policy_scale=None)


def sweep(impl, z: torch.Tensor, t: torch.Tensor, ti: TokenInputs, options, idx=None) -> dict:
    """Every output of the three row kernels for chunk ``z`` (left as it is): the statistics, the
    gradient given them, and the fused statistics / loss / dL/dlogp / gradient. ``idx`` [n]: the
    rows' indices in the chunk that ``ti`` and the per-row upstream gradients belong to."""
    n = z.shape[0]
    idx = torch.arange(n) if idx is None else idx
    execution = contract.execution_for(impl)
    acc = accumulation_dtype(z.dtype)
    g = contract.gen(5)
    assert n <= MAX_ROWS
    dlogp, dent = (torch.randn(MAX_ROWS, generator=g, dtype=torch.float64).to(acc)[idx] for _ in range(2))
    st = impl.row_stats(z, t, options, execution)
    grad = z.clone()
    impl.row_grad_(grad, t, st, dlogp, dent, options, execution)
    fused = z.clone()
    fst, epi = impl.row_fused_(fused, t, take(ti, idx), options, execution)
    return dict(lse=st.lse, entropy=st.entropy, target_logit=st.target_logit, grad=grad, fused_lse=fst.lse,
                fused_entropy=fst.entropy, loss=epi.loss, dlogp=epi.dlogp, fused_grad=fused)


def assert_rows_match(got: dict, want: dict, rows, what: str):
    """got's row i has the bits of want's row rows[i], for every output."""
    for name, w in want.items():
        g = got[name]
        for i, r in enumerate(rows):
            assert same_bits(g[i], w[r]), f"{what}: {name} of row {r} differs (at position {i})"


# ----------------------------------------------------------------------------- against float64


@pytest.mark.parametrize("xform", list(contract.XFORMS))
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_row_stats_against_float64(emu, dtype, V, xform):
    contract.check_row_stats(emu, "cpu", dtype, (9, V, 3), contract.XFORMS[xform],
                             seed=stable_seed("emu-stats", dtype, V, xform))


@pytest.mark.parametrize("with_dentropy", [False, True], ids=["dlogp", "dlogp-dentropy"])
@pytest.mark.parametrize("xform", ["temp0.7", "temp1.3-softcap5"])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_row_grad_against_float64(emu, dtype, V, xform, with_dentropy):
    contract.check_row_grad(emu, "cpu", dtype, (9, V, 5), contract.XFORMS[xform], with_dentropy,
                            seed=stable_seed("emu-grad", dtype, V, xform, with_dentropy))


def _fused_params():
    out = []
    for name, dt in DTYPES.items():
        cases = FUSED.get(name, contract.LOW_PRECISION_CASES[:2])
        out += [pytest.param(dt, case, id=f"{name}-{case}") for case in cases]
    return out


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype,case", _fused_params())
def test_row_fused_against_float64(emu, dtype, case, V):
    contract.check_row_fused(emu, "cpu", dtype, case, shape=(8, V, 3), seed=stable_seed("emu-fused", dtype, case, V))


@pytest.mark.parametrize("case", list(contract.REWARD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_row_fused_rewards_against_float64(emu, dtype, case):
    """The advantages from the rewards in the fused epilogue; the batch std (scale "batch") by the
    kernels' block reduction over row_threads(V) lanes (B = 1024: more sequences than lanes)."""
    contract.check_row_fused_rewards(emu, "cpu", dtype, case, seed=stable_seed("emu-rewards", dtype, case), V=301)


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("case", list(contract.GROUP_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_group_normalize_against_float64(emu, dtype, case, mode):
    """The one-block kernel: the batch std over 256 lanes, lane l normalizing groups l, l + 256, ..."""
    contract.check_group_normalize(emu, "cpu", dtype, case, mode, 1e-4, seed=stable_seed("emu-group", case, mode))


# ----------------------------------------------------------------------------- batch invariance, bitwise


@pytest.mark.parametrize("xform", ["plain", "temp1.3-softcap5"])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_rows_bitwise_equal_at_every_position_and_alignment(emu, dtype, V, xform):
    """The same rows at other chunk positions (a permutation, a single row), row strides
    (ld = V + 1, V + 3: successive rows at every alignment) and start offsets 0-3 elements from a
    16-byte boundary give the same bits for every output of the three kernels."""
    n = 7
    options = contract.row_options(contract.XFORMS[xform], loss_type="dapo", beta=0.04, delta=1.3)
    z, t = contract.make_logits(n, V, dtype, "cpu", stable_seed("emu-bits", dtype, V))
    ti = token_inputs(n, accumulation_dtype(dtype), seed=3)
    idx = torch.arange(n)
    want = sweep(emu, z.contiguous(), t, ti, options, idx)
    perm = torch.randperm(n, generator=contract.gen(11))
    for offset in range(4):
        for ld in (V + 1, V + 3):
            got = sweep(emu, placed(z[perm], offset, ld), t[perm], ti, options, perm)
            assert_rows_match(got, want, perm.tolist(), f"offset {offset}, ld {ld}")
        for r in (0, 4, n - 1):
            one = torch.tensor([r])
            got = sweep(emu, placed(z[one], offset, V + 2), t[one], ti, options, one)
            assert_rows_match(got, want, [r], f"row {r} alone at offset {offset}")


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_two_runs_are_bitwise_equal(emu, dtype):
    n, V = 12, 301
    options = contract.row_options((0.9, 20.0), loss_type="sapo", beta=0.02)
    z, t = contract.make_logits(n, V, dtype, "cpu", 7, pad=3)
    ti = token_inputs(n, accumulation_dtype(dtype), seed=4)
    a, b = sweep(emu, z, t, ti, options), sweep(emu, z, t, ti, options)
    for name in a:
        assert same_bits(a[name], b[name]), name


# ----------------------------------------------------------------------------- special rows and shapes


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_nan_and_inf_rows_stay_in_their_row(emu, dtype):
    """A NaN logit makes its row's statistics and gradient NaN; an all -inf row has lse = entropy =
    -inf; a +inf logit gives a non-finite lse. The finite rows beside them keep their bits, and each
    special row gives what the production CPU path gives (the same semantics)."""
    from grpo_kernels.backends.cpp import CppRowBackend

    n, V = 6, 37
    z, t = contract.make_logits(n, V, dtype, "cpu", 21, masked=False)
    z[1, 5] = float("nan")
    z[2] = float("-inf")
    z[3, 30] = float("inf")
    z[4, :20] = float("-inf")  # partly masked: finite
    t[4] = 25
    options = contract.row_options((1.0, None), loss_type="grpo")
    ti = token_inputs(n, accumulation_dtype(dtype), seed=5)
    got = sweep(emu, z, t, ti, options)
    assert torch.isnan(got["lse"][1]) and torch.isnan(got["entropy"][1]) and torch.isnan(got["grad"][1]).all()
    assert got["lse"][2].item() == float("-inf") and got["entropy"][2].item() == float("-inf")
    assert not torch.isfinite(got["lse"][3])
    finite = [0, 4, 5]
    assert torch.isfinite(got["lse"][finite]).all() and torch.isfinite(got["grad"][finite]).all()
    alone = sweep(emu, z[finite].clone(), t[finite], ti, options, torch.tensor(finite))
    assert_rows_match(alone, got, finite, "finite rows beside special ones")
    prod = sweep(CppRowBackend(), z, t, ti, options)
    kind = lambda x: (x.isnan(), x.isposinf(), x.isneginf())  # noqa: E731
    for name in ("lse", "entropy", "target_logit", "grad", "loss", "fused_grad"):
        for r in (1, 2, 3):
            for a, b in zip(kind(got[name][r]), kind(prod[name][r])):
                assert torch.equal(a, b), (name, r)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_one_column_rows(emu, dtype):
    contract.check_row_stats(emu, "cpu", dtype, (5, 1, 3), (0.7, None), seed=1)
    contract.check_row_grad(emu, "cpu", dtype, (5, 1, 3), (1.3, 5.0), True, seed=2)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_empty_chunk(emu, dtype):
    options = contract.row_options((1.0, None), loss_type="dapo", beta=0.04)
    z = torch.empty(0, 37, dtype=dtype)
    t = torch.empty(0, dtype=torch.int64)
    out = sweep(emu, z, t, token_inputs(0, accumulation_dtype(dtype), seed=0), options)
    assert all(v.shape[0] == 0 for v in out.values())


# ----------------------------------------------------------------------------- the kernels' block sizes


@pytest.mark.parametrize("lanes", [128, 256, 512])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_each_block_size(emu, ext, dtype, lanes):
    """V chosen so that the kernels launch ``lanes`` threads per row (more than 32: several warps,
    the block merge): against float64, and bitwise at every alignment."""
    V = V_FOR_LANES[dtype][lanes]
    assert ext.row_threads(V, DTYPE_CODE[dtype]) == lanes
    contract.check_row_stats(emu, "cpu", dtype, (4, V, 1), (0.8, None), seed=stable_seed("emu-lanes", dtype, lanes))
    options = contract.row_options((1.0, None), loss_type="cispo", epsilon_high=1.1)
    z, t = contract.make_logits(3, V, dtype, "cpu", lanes)
    ti = token_inputs(3, accumulation_dtype(dtype), seed=6)
    idx = torch.arange(3)
    want = sweep(emu, z.contiguous(), t, ti, options, idx)
    for offset in range(1, 4):
        got = sweep(emu, placed(z, offset, V + 1), t, ti, options, idx)
        assert_rows_match(got, want, idx.tolist(), f"offset {offset}")


def test_emulation_needs_cpu_tensors(emu):
    from grpo_kernels.backends.cpp import CppRowBackend

    assert not CppRowBackend().emulate_device and emu.emulate_device
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to pass a CUDA tensor")
    z = torch.zeros(2, 5, device="cuda")
    with pytest.raises(ValueError, match="CPU tensors only"):
        emu.row_stats(z, torch.zeros(2, dtype=torch.int64, device="cuda"), contract.row_options(),
                      contract.execution_for(emu))

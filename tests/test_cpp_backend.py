"""The compiled row pass (csrc/, backend "cpp") on CPU tensors, row by row, against float64 torch.

The extension is JIT-built once per session (module-scoped fixture; ~30 s the first time,
then loaded from the on-disk cache). References: ``torch_chunked.BACKEND`` on float64
copies of the logits, ``objective.token_epilogue`` and ``advantages.normalize_groups`` in
float64. Every output the kernels write is poisoned with NaN first; inputs are fresh
random numbers (never zeros). tests/test_cuda_gpu.py runs the same ``check_*`` functions
on CUDA tensors.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grpo_kernels.backends.base import RowStats
from grpo_kernels.backends.torch_chunked import BACKEND as TORCH_BACKEND
from grpo_kernels.objective import TokenInputs, token_epilogue
from grpo_kernels.options import GRPOOptions

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]
# relative tolerance of statistics and gradients by logits dtype (half: the gradient is
# stored in half precision)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
       torch.float16: torch.float32}

# (n, V, row stride padding): V not a multiple of any vector width, tiny rows, a row of 1,
# rows that start misaligned (stride V + pad), Qwen's vocabulary
SHAPES = [(6, 1003, 0), (3, 8, 0), (4, 1, 0), (5, 517, 3), (7, 64, 1), (2, 151936, 0)]
SHAPE_IDS = ["n6-V1003", "n3-V8", "n4-V1", "n5-V517-pad3", "n7-V64-pad1", "n2-V151936"]
# (temperature, softcap)
XFORMS = [(1.0, None), (0.7, None), (1.0, 30.0), (1.3, 5.0)]
XFORM_IDS = ["plain", "temp0.7", "softcap30", "temp1.3-softcap5"]

_KIND = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2}

OPTION_CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8),
    "dapo": dict(loss_type="dapo"),
    "luspo": dict(loss_type="luspo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.1),
    "sapo": dict(loss_type="sapo"),
    "grpo-eps0": dict(loss_type="grpo", epsilon_low=0.0, epsilon_high=0.0),  # ratio 1 on both bounds
    "dapo-asym-delta": dict(loss_type="dapo", epsilon_low=0.1, epsilon_high=0.28, delta=1.15),
    "grpo-beta": dict(loss_type="grpo", beta=0.04),
    "grpo-beta-biascorr": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    "bnpo-beta-delta": dict(loss_type="bnpo", beta=0.1, delta=1.05),
    "cispo-beta": dict(loss_type="cispo", epsilon_high=0.9, beta=0.02),
    "sapo-beta-temps": dict(loss_type="sapo", beta=0.05, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
}
# token inputs variants: (off-policy, with ref, with policy_scale)
TOKEN_VARIANTS = {"offpolicy": (True, True, False), "onpolicy": (False, True, False),
                  "scaled": (True, True, True)}


# -- helpers -------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(n, V, dtype, device, seed, pad=0, neg_inf=True):
    """[n, V] logits (a view with row stride V + pad when pad > 0), some -inf entries."""
    g = gen(seed)
    full = torch.randn(n, V + pad, generator=g, dtype=torch.float64) * 2.5 + 0.3
    if neg_inf and V > 2:
        full[0, 1] = float("-inf")
        full[n - 1, V - 2] = float("-inf")
    z = full.to(dtype).to(device)
    return z[:, :V] if pad else z


def random_targets(n, V, device, seed):
    t = torch.randint(0, V, (n,), generator=gen(seed + 1))
    t[0] = -1
    if n > 1:
        t[1] = V - 1
    if n > 2:
        t[2] = 0
    if n > 3 and V > 2:
        t[3] = V - 2  # the target is an entry that another row has at -inf: finite here
    return t.to(device)


def nan_vec(n, dtype, device):
    return torch.full((n,), float("nan"), dtype=dtype, device=device)


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def assert_close(x, ref, tol, what=""):
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert x.shape == ref.shape, (what, x.shape, ref.shape)
    same_nonfinite = torch.isfinite(ref) | (x == ref) | (torch.isnan(x) & torch.isnan(ref))
    assert bool(same_nonfinite.all()), f"{what}: non-finite mismatch {x[~same_nonfinite]} vs {ref[~same_nonfinite]}"
    assert bool(torch.isfinite(x[torch.isfinite(ref)]).all()), f"{what}: non-finite output where ref is finite"
    fin = torch.isfinite(ref)
    if fin.any():
        scale = max(ref[fin].abs().max().item(), 1e-30)
        torch.testing.assert_close(x[fin], ref[fin], rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def ext_row_stats(ext, z, t, temperature, softcap):
    n = z.shape[0]
    acc = ACC[z.dtype]
    out = [nan_vec(n, acc, z.device) for _ in range(3)]
    ext.row_stats(z, t, *out, temperature, softcap, stream_of(z))
    return RowStats(*out)


def reference_stats(z, t, temperature, softcap):
    return TORCH_BACKEND.row_stats(z.double(), t, temperature, softcap)


def reference_grad(z, t, lse, ent, dlogp, dent, temperature, softcap):
    g = z.double().clone()
    TORCH_BACKEND.row_grad_(g, t, lse, ent, dlogp, dent, temperature, softcap)
    return g


def option_args(o: GRPOOptions) -> dict:
    return dict(kind=_KIND[o.loss_type], lo=1.0 - o.epsilon_low, hi=1.0 + o.eps_high,
                delta=o.delta, eps_high=o.eps_high, sapo_pos=o.sapo_temperature_pos,
                sapo_neg=o.sapo_temperature_neg, beta=o.beta, bias_correction_kl=o.use_bias_correction_kl)


def random_token_inputs(logp64, seed, variant, device, dtype=torch.float64):
    """TokenInputs around the given fp64 logps (so that some ratios clip), in ``dtype``."""
    off_policy, with_ref, scaled = TOKEN_VARIANTS[variant]
    n = logp64.shape[0]
    g = gen(seed + 7)
    logp64 = logp64.cpu()
    old = logp64 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) if off_policy else None
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    if n > 2:
        adv[1] = 0.0  # A = 0: torch.minimum's tie
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    ref = logp64 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64) if with_ref else None
    scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5 if scaled else None
    to = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return TokenInputs(old=to(old), adv=to(adv), weight=to(weight), ref=to(ref), policy_scale=to(scale))


def cast_inputs(ti: TokenInputs, dtype, device=None) -> TokenInputs:
    fields = (ti.old, ti.adv, ti.weight, ti.ref, ti.policy_scale)
    return TokenInputs(*(None if x is None else x.to(device=device, dtype=dtype) for x in fields))


def cpu64(ti: TokenInputs) -> TokenInputs:
    return cast_inputs(ti, torch.float64, "cpu")


# -- the checks (shared with tests/test_cuda_gpu.py) ---------------------------------------


def check_row_stats(ext, device, dtype, shape, xform, seed=0):
    n, V, pad = shape
    temperature, softcap = xform
    z = random_logits(n, V, dtype, device, seed, pad)
    t = random_targets(n, V, device, seed)
    got = ext_row_stats(ext, z, t, temperature, softcap)
    ref = reference_stats(z.cpu(), t.cpu(), temperature, softcap)
    tol = TOL[dtype] if dtype == torch.float64 else 1e-5  # stats accumulate in fp32 at worst
    for name in ("lse", "entropy", "target_logit"):
        x = getattr(got, name)
        assert x.dtype == ACC[dtype] and x.device == z.device
        assert_close(x, getattr(ref, name), tol, name)
    assert float(got.target_logit[0]) == 0.0  # target -1


def check_row_grad(ext, device, dtype, shape, xform, with_dentropy, seed=0):
    n, V, pad = shape
    temperature, softcap = xform
    z = random_logits(n, V, dtype, device, seed, pad)
    t = random_targets(n, V, device, seed)
    ref_stats = reference_stats(z.cpu(), t.cpu(), temperature, softcap)
    g = gen(seed + 3)
    dlogp = torch.randn(n, generator=g, dtype=torch.float64)
    dent = torch.randn(n, generator=g, dtype=torch.float64) if with_dentropy else None
    ref = reference_grad(z.cpu(), t.cpu(), ref_stats.lse, ref_stats.entropy, dlogp, dent, temperature, softcap)
    acc = ACC[dtype]
    work = z.clone()
    untouched = None
    if pad:  # the padding columns of the strided rows must stay as they were
        base = torch.randn(n, V + pad, generator=g, dtype=torch.float64).to(dtype).to(device)
        base[:, :V] = z
        work = base[:, :V]
        untouched = base[:, V:].clone()
    else:
        work.fill_(float("nan"))  # poison the in-place buffer, then put the logits back
        work.copy_(z)
    on = lambda x: None if x is None else x.to(device=device, dtype=acc)  # noqa: E731
    ext.row_grad_(work, t, on(ref_stats.lse), on(ref_stats.entropy), on(dlogp), on(dent),
                  temperature, softcap, stream_of(work))
    assert_close(work, ref, TOL[dtype], "grad")
    if untouched is not None:
        assert torch.equal(base[:, V:], untouched)


def check_row_fused(ext, device, dtype, case, variant, xform=(1.0, None), shape=(6, 1003, 0), seed=0):
    n, V, pad = shape
    temperature, softcap = xform
    options = GRPOOptions(**OPTION_CASES[case]).validate()
    z = random_logits(n, V, dtype, device, seed, pad)
    t = random_targets(n, V, device, seed)
    ref_stats = reference_stats(z.cpu(), t.cpu(), temperature, softcap)
    ti = cast_inputs(random_token_inputs(ref_stats.logp, seed, variant, "cpu"), ACC[dtype], device)
    ref_epi = token_epilogue(ref_stats.logp, cpu64(ti), options)
    ref_grad = reference_grad(z.cpu(), t.cpu(), ref_stats.lse, ref_stats.entropy, ref_epi.dlogp, None,
                              temperature, softcap)
    acc = ACC[dtype]
    outs = [nan_vec(n, acc, device) for _ in range(5)]
    work = z.clone()
    beta = options.beta
    ext.row_fused_(work, t, ti.old, ti.adv, ti.weight, ti.ref if beta != 0.0 else None, ti.policy_scale,
                   *outs, temperature, softcap, **option_args(options), stream=stream_of(work))
    lse, ent, tl, loss, dlogp = outs
    tol = TOL[dtype]
    stat_tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(lse, ref_stats.lse, stat_tol, "lse")
    assert_close(ent, ref_stats.entropy, stat_tol, "entropy")
    assert_close(tl, ref_stats.target_logit, stat_tol, "target_logit")
    epi_tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close(loss, ref_epi.loss, epi_tol, "loss")
    assert_close(dlogp, ref_epi.dlogp, epi_tol, "dlogp")
    assert_close(work, ref_grad, tol, "grad")


def check_backend_api(device, dtype, seed=0):
    """The Python wrapper (CppRowBackend) against the torch backend, through the RowBackend API."""
    from grpo_kernels.backends.cuda import BACKEND

    n, V = 5, 777
    z = random_logits(n, V, dtype, device, seed)
    t = random_targets(n, V, device, seed)
    st = BACKEND.row_stats(z, t, 0.9, 20.0)
    ref = reference_stats(z.cpu(), t.cpu(), 0.9, 20.0)
    for name in ("lse", "entropy", "target_logit"):
        assert_close(getattr(st, name), getattr(ref, name), 1e-10 if dtype == torch.float64 else 1e-5, name)
    dlogp = torch.randn(n, generator=gen(seed), dtype=torch.float64)
    dent = torch.randn(n, generator=gen(seed + 1), dtype=torch.float64)
    work = z.clone()
    # stats and upstream gradients in other dtypes / layouts are accepted and converted
    BACKEND.row_grad_(work, t, st.lse, st.entropy, dlogp.to(device), dent.to(device).float(), 0.9, 20.0)
    assert_close(work, reference_grad(z.cpu(), t.cpu(), ref.lse, ref.entropy, dlogp, dent.float().double(),
                                      0.9, 20.0), TOL[dtype], "grad")
    options = GRPOOptions(loss_type="grpo", beta=0.04).validate()
    ti = random_token_inputs(ref.logp, seed, "offpolicy", device, ACC[dtype])
    work = z.clone()
    stats, epi = BACKEND.row_fused_(work, t, 0.9, 20.0, ti, options)
    ref_epi = token_epilogue(ref.logp, cpu64(ti), options)
    epi_tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert_close(epi.loss, ref_epi.loss, epi_tol, "loss")
    assert_close(epi.dlogp, ref_epi.dlogp, epi_tol, "dlogp")
    assert_close(stats.lse, ref.lse, 1e-10 if dtype == torch.float64 else 1e-5, "lse")
    ref_grad = reference_grad(z.cpu(), t.cpu(), ref.lse, ref.entropy, ref_epi.dlogp, None, 0.9, 20.0)
    assert_close(work, ref_grad, TOL[dtype], "fused grad")


def check_token_epilogue(ext, device, dtype, case, variant, seed=0, n=257):
    options = GRPOOptions(**OPTION_CASES[case]).validate()
    logp64 = -torch.rand(n, generator=gen(seed), dtype=torch.float64) * 6
    ti = cast_inputs(random_token_inputs(logp64, seed, variant, "cpu"), dtype, device)
    logp = logp64.to(device=device, dtype=dtype)
    if ti.old is not None:
        ti.old[3] = logp[3]  # ratio exactly 1: clamp's inclusive bounds when epsilon = 0
        ti.old[6] = logp[6] - 120.0  # exp overflows in fp32: saturated ratio
        ti.old[7] = logp[7] - 1000.0  # overflows in fp64 too
        ti.old[9] = logp[9] - 1000.0
        ti.weight[9] = 0.0  # a zero weight wins over a saturated loss
    if ti.ref is not None:
        ti.ref[8] = logp[8] + 900.0  # saturated exp in the KL term
    if ti.policy_scale is not None:
        ti.policy_scale[7] = 0.0
    # the objective in the same dtype (its saturation point depends on the dtype), on the CPU
    ref = token_epilogue(logp.cpu(), cast_inputs(ti, dtype, "cpu"), options)
    loss, dlogp = nan_vec(n, dtype, device), nan_vec(n, dtype, device)
    ext.token_epilogue(logp, ti.old, ti.adv, ti.weight, ti.ref if options.beta != 0.0 else None, ti.policy_scale,
                       loss, dlogp, **option_args(options), stream=stream_of(logp))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(loss, ref.loss, tol, "loss")
    assert_close(dlogp, ref.dlogp, tol, "dlogp")
    # the backend method: same numbers, the objective's own dtype rules
    from grpo_kernels.backends.cuda import BACKEND

    epi = BACKEND.token_epilogue(logp, ti, options)
    same = token_epilogue(logp, ti, options)
    assert epi.loss.dtype == same.loss.dtype and epi.loss.device == same.loss.device
    assert_close(epi.loss, same.loss, tol, "backend loss")
    assert_close(epi.dlogp, same.dlogp, tol, "backend dlogp")


def check_nan_and_neg_inf_rows(ext, device, dtype):
    """A NaN logit makes its row's statistics NaN (never silently dropped); an all -inf row
    has lse -inf; an empty chunk is a no-op."""
    V = 1003
    z = random_logits(6, V, torch.float64, "cpu", 31, neg_inf=False)
    z[0, 0] = float("nan")  # first element
    z[1] = float("-inf")
    z[1, 700] = float("nan")  # a NaN among -inf only
    z[2, V - 1] = float("nan")  # the tail
    z[3] = float("-inf")  # all -inf
    z[4, 17:900] = float("-inf")
    z = z.to(device=device, dtype=dtype)
    t = torch.tensor([1, 2, 3, 4, 5, 6], device=device)
    st = ext_row_stats(ext, z, t, 1.0, None)
    lse = st.lse.cpu()
    assert bool(torch.isnan(lse[:3]).all()), lse
    assert lse[3].item() == float("-inf")
    assert bool(torch.isfinite(lse[4:]).all())
    ref = reference_stats(z[4:].cpu(), t[4:].cpu(), 1.0, None)
    assert_close(st.lse[4:], ref.lse, 1e-10 if dtype == torch.float64 else 1e-5, "lse")
    assert_close(st.entropy[4:], ref.entropy, 1e-10 if dtype == torch.float64 else 1e-5, "entropy")
    empty = torch.empty(0, 11, dtype=dtype, device=device)
    st = ext_row_stats(ext, empty, torch.empty(0, dtype=torch.int64, device=device), 1.0, None)
    assert st.lse.shape == (0,)


GROUP_CASES = {
    "plain": dict(B=24, G=4, nan=()),
    "nan-rows": dict(B=24, G=4, nan=(1, 5, 6, 7)),  # group 1 keeps one scored row
    "all-nan-group": dict(B=16, G=4, nan=(8, 9, 10, 11)),
    "equal-group": dict(B=12, G=3, nan=(), equal=(0, 1, 2)),
    "G1": dict(B=6, G=1, nan=(2,)),
    "B1": dict(B=1, G=1, nan=()),
    "one-group": dict(B=16, G=16, nan=(3,)),
    "large": dict(B=4096, G=8, nan=(17, 100)),
}


def check_group_normalize(ext, device, dtype, case, mode, eps, seed=0):
    from grpo_kernels.advantages import normalize_groups

    spec = GROUP_CASES[case]
    B, G = spec["B"], spec["G"]
    r = torch.randn(B, generator=gen(seed), dtype=torch.float64) * 2 + 0.5
    for i in spec.get("equal", ()):
        r[i] = 0.75
    for i in spec["nan"]:
        r[i] = float("nan")
    r = r.to(dtype)
    ref = normalize_groups(r.double(), G, mode, eps)
    acc = ACC[dtype]
    mode_id = {"group": 0, "batch": 1, "none": 2}[mode]
    out = nan_vec(B, acc, device)
    rr = r.to(device=device, dtype=acc)
    ext.group_normalize(rr, out, G, mode_id, eps, stream=stream_of(rr))
    tol = 1e-10 if acc == torch.float64 else 1e-5
    assert_close(out, ref, tol, "advantages")
    from grpo_kernels.backends.cuda import BACKEND

    adv = BACKEND.group_normalize(r.to(device), G, mode, eps)
    expect = normalize_groups(r.to(device), G, mode, eps)
    assert adv.dtype == expect.dtype and adv.device == expect.device
    assert_close(adv, expect, tol, "backend advantages")


def check_group_advantages_api(device):
    """advantages.group_advantages(backend="cpp") == backend="torch" (K reward functions, NaNs)."""
    from grpo_kernels.advantages import group_advantages

    g = gen(3)
    rewards = torch.randn(32, 3, generator=g, dtype=torch.float64).float()
    rewards[1, 0] = float("nan")
    rewards[5] = float("nan")  # unscorable row
    rewards = rewards.to(device)
    for mode in ("group", "batch", "none"):
        a = group_advantages(rewards, 4, scale_rewards=mode, weights=[1.0, 0.5, 2.0], backend="cpp")
        b = group_advantages(rewards, 4, scale_rewards=mode, weights=[1.0, 0.5, 2.0], backend="torch")
        assert a.dtype == b.dtype and a.device == b.device
        assert_close(a, b, 1e-5, mode)
        assert a[5].item() == 0.0


# -- CPU tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    from grpo_kernels.backends import cuda

    reason = cuda.BACKEND.supports(torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(f"backend 'cpp' unavailable: {reason}")
    return cuda.load_extension()


@pytest.mark.parametrize("xform", XFORMS, ids=XFORM_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_stats(ext, dtype, shape, xform):
    check_row_stats(ext, "cpu", dtype, shape, xform)


@pytest.mark.parametrize("with_dentropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("xform", XFORMS, ids=XFORM_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_grad(ext, dtype, shape, xform, with_dentropy):
    check_row_grad(ext, "cpu", dtype, shape, xform, with_dentropy)


@pytest.mark.parametrize("variant", sorted(TOKEN_VARIANTS))
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_fused_matches_composition(ext, dtype, case, variant):
    check_row_fused(ext, "cpu", dtype, case, variant)


@pytest.mark.parametrize("xform", XFORMS[1:], ids=XFORM_IDS[1:])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_fused_transforms_and_shapes(ext, dtype, xform):
    check_row_fused(ext, "cpu", dtype, "grpo-beta", "offpolicy", xform=xform, shape=(5, 517, 3))
    check_row_fused(ext, "cpu", dtype, "dapo-asym-delta", "scaled", xform=xform, shape=(3, 8, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backend_api(ext, dtype):
    check_backend_api("cpu", dtype)


@pytest.mark.parametrize("variant", sorted(TOKEN_VARIANTS))
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_token_epilogue(ext, dtype, case, variant):
    check_token_epilogue(ext, "cpu", dtype, case, variant)


@pytest.mark.parametrize("eps", [1e-4, 0.0], ids=["eps1e-4", "eps0"])
@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("case", sorted(GROUP_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_group_normalize(ext, dtype, case, mode, eps):
    check_group_normalize(ext, "cpu", dtype, case, mode, eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_and_neg_inf_rows(ext, dtype):
    check_nan_and_neg_inf_rows(ext, "cpu", dtype)


def test_group_advantages_api(ext):
    check_group_advantages_api("cpu")


def test_bad_inputs_raise(ext):
    z = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    out = [torch.empty(4) for _ in range(3)]
    with pytest.raises(RuntimeError, match="dtype"):
        ext.row_stats(z.to(torch.int32), t, *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.row_stats(torch.randn(10, 4).t(), t, *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="targets"):
        ext.row_stats(z, t.int(), *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="lse"):
        ext.row_stats(z, t, torch.empty(4, dtype=torch.float64), out[1], out[2], 1.0, None, 0)
    with pytest.raises(RuntimeError, match="temperature"):
        ext.row_stats(z, t, *out, 0.0, None, 0)
    with pytest.raises(RuntimeError, match="ref"):
        ext.token_epilogue(torch.randn(4), None, torch.randn(4), torch.rand(4), None, None, torch.empty(4),
                           torch.empty(4), kind=0, lo=0.8, hi=1.2, delta=None, eps_high=0.2, sapo_pos=1.0,
                           sapo_neg=1.05, beta=0.1, bias_correction_kl=False)
    with pytest.raises(RuntimeError, match="multiple"):
        ext.group_normalize(torch.randn(6), torch.empty(6), 4, 0, 1e-4)


def test_supports_and_prebuilt(ext):
    from grpo_kernels.backends import cuda

    assert cuda.BACKEND.name == "cpp"
    assert cuda.BACKEND.supports(torch.device("cpu"), torch.bfloat16) is None
    assert cuda.BACKEND.supports(torch.device("cpu"), torch.int32) is not None
    assert cuda.BACKEND.temp_bytes_per_elem == 0
    assert cuda.prebuilt_available()  # loaded (and cached on disk) by the fixture
    if not torch.cuda.is_available():
        assert cuda.BACKEND.supports(torch.device("cuda"), torch.float32) is not None
        assert ext.has_cuda() in (True, False)


def test_import_never_compiles(tmp_path):
    """With an empty build cache, importing and asking prebuilt_available() builds nothing."""
    code = textwrap.dedent(
        """
        import time, sys
        t0 = time.time()
        import grpo_kernels
        from grpo_kernels.backends import cuda, get_backend
        import torch
        assert cuda._ext is None
        print(cuda.prebuilt_available(), get_backend("auto", torch.device("cpu"), torch.float32).name)
        assert cuda._ext is None
        print(time.time() - t0)
        """
    )
    env = dict(os.environ, GRPO_KERNELS_BUILD_DIR=str(tmp_path / "cache"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    first = res.stdout.split()[0]
    from grpo_kernels.backends.cuda import _prebuilt_module_exists

    if not _prebuilt_module_exists():
        assert first == "False", res.stdout
        assert "torch" in res.stdout.split()[1]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))


def test_parity_suite_lists_cpp():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from backends import BACKENDS

    assert "cpp" in BACKENDS

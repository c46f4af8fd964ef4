"""Kernel-level tests of the Triton backend (grpo_kernels/backends/triton) against float64 torch.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py when CUDA is absent)
with small shapes and small vocabulary tiles; float32, float16 and float64 there. On a CUDA
machine the same tests run compiled (autotuned), plus bfloat16 and a chunk whose element
offsets pass 2^31 (the GPU-only cases are marked ``gpu`` and skip without CUDA):

    python -m pytest tests/test_triton_backend.py -q

Every kernel output is allocated NaN-filled (``_common.empty`` is patched) and every element
is compared, so an element a kernel fails to write shows up as NaN.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from grpo_kernels import objective  # noqa: E402
from grpo_kernels.advantages import group_advantages, normalize_groups  # noqa: E402
from grpo_kernels.backends import get_backend  # noqa: E402
from grpo_kernels.backends.base import RowBackend  # noqa: E402
from grpo_kernels.backends.torch_chunked import BACKEND as TORCH  # noqa: E402
from grpo_kernels.backends.triton import BACKEND as TRITON  # noqa: E402
from grpo_kernels.backends.triton import _common, advantages_kernel  # noqa: E402
from grpo_kernels.objective import TokenInputs  # noqa: E402
from grpo_kernels.options import LOSS_TYPES, GRPOOptions  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
pytestmark = [
    pytest.mark.skipif(
        TRITON.supports(torch.device(DEVICE), torch.float32) is not None,
        reason=f"triton backend unavailable: {TRITON.supports(torch.device(DEVICE), torch.float32)}",
    ),
    # numpy's warnings for IEEE results the torch reference produces as well (0/0 -> NaN -> 0, a
    # saturated fp32 ratio times A -> inf), raised by the interpreter's numpy ops
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

#: relative tolerance (to the reference's largest magnitude) by input dtype
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float64, torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel does not write fails the comparison."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,), float("nan"),
                          dtype=dtype, device=device)

    monkeypatch.setattr(_common, "empty", nan_empty)


@pytest.fixture(params=["tile64", "default"])
def tile(request, monkeypatch):
    """A fixed 64-wide vocabulary tile (V = 300 spans 5 tiles, the last one partial), or the
    default launch (interpreter: a 128 tile; GPU: autotuned)."""
    if request.param == "tile64":
        monkeypatch.setenv("GRPO_KERNELS_TRITON_BLOCK_V", "64")
    else:
        monkeypatch.delenv("GRPO_KERNELS_TRITON_BLOCK_V", raising=False)
    return request.param


def close(x, ref, rtol, what="", elementwise=False):
    """Every element finite where the reference is (and equal where it is not), and within
    ``rtol * max|ref|`` of it; with ``elementwise``, within ``rtol * max(|ref_i|, median|ref|)``
    (so that a few huge elements, e.g. saturated ratios, cannot hide errors in the others)."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert x.shape == ref.shape, what
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), fin), f"{what}: non-finite pattern differs"
    assert torch.equal(x[~fin].nan_to_num(), ref[~fin].nan_to_num()), f"{what}: non-finite values differ"
    if not fin.any():
        return
    r = ref[fin]
    if elementwise:
        bound = rtol * r.abs().clamp(min=max(r.abs().median().item(), 1e-30))
    else:
        bound = torch.full_like(r, rtol * max(r.abs().max().item(), 1e-30))
    err = (x[fin] - r).abs()
    worst = (err / bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: element {worst.item()} off by {err[worst].item():.3e} (ref {r[worst].item():.6e}, "
        f"bound {bound[worst].item():.3e})"
    )


def make_logits(n, V, dtype, seed, masked=True):
    """Random logits (rounded to dtype) with targets at 0, V-1 and -1 and, if ``masked``,
    rows with -inf entries (a masked vocabulary); targets never sit on a -inf logit."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.5 + 0.3
    targets = torch.randint(1, V - 1, (n,), generator=g)
    targets[0], targets[-1] = 0, V - 1
    if n > 3:
        targets[3] = -1
    if masked and n > 2:
        z[1, 2::3] = float("-inf")  # targets[1] moved off the masked columns
        targets[1] = 1
        z[2, V // 2:] = float("-inf")  # a masked tail spanning whole tiles
        targets[2] = V // 3
    return z.to(dtype).to(DEVICE), targets.to(DEVICE)


def ref_stats(z, targets, temperature, softcap):
    return TORCH.row_stats(z.double(), targets, temperature, softcap)


# ----------------------------------------------------------------------------- backend plumbing


def test_dispatch_and_supports():
    dev = torch.device(DEVICE)
    assert get_backend("triton", dev, torch.float32) is TRITON
    assert TRITON.name == "triton" and TRITON.temp_bytes_per_elem == 0
    for dt in (torch.float32, torch.float64, torch.float16):
        assert TRITON.supports(dev, dt) is None
    assert TRITON.supports(dev, torch.int64) is not None
    if not CUDA:
        assert "bfloat16" in TRITON.supports(torch.device("cpu"), torch.bfloat16)
        assert TRITON.supports(torch.device("cuda"), torch.float32) is not None
    else:
        assert TRITON.supports(dev, torch.bfloat16) is None


# ----------------------------------------------------------------------------- row_stats / row_grad_

ROW_CASES = [(1.0, None), (0.7, None), (1.3, 2.5)]  # (temperature, softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature,softcap", ROW_CASES, ids=["plain", "temp", "softcap"])
def test_row_stats(tile, dtype, temperature, softcap):
    z, tg = make_logits(6, 300, dtype, seed=1)
    z0 = z.clone()
    st = TRITON.row_stats(z, tg, temperature, softcap)
    ref = ref_stats(z, tg, temperature, softcap)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = RTOL[torch.float64] if dtype == torch.float64 else 1e-5  # fp32 accumulation of exact inputs
    for name in ("lse", "entropy", "target_logit"):
        out = getattr(st, name)
        assert out.dtype == acc, name
        close(out, getattr(ref, name), rtol, name)
    assert (st.target_logit[3] == 0).item()  # target -1: not in this slice
    assert torch.equal(z, z0)  # read only


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("temperature,softcap", ROW_CASES, ids=["plain", "temp", "softcap"])
@pytest.mark.parametrize("with_dentropy", [False, True], ids=["logp", "logp+entropy"])
def test_row_grad(tile, dtype, temperature, softcap, with_dentropy):
    n, V = 6, 300
    z, tg = make_logits(n, V, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    ref = ref_stats(z, tg, temperature, softcap)
    dlogp = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
    dent = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE) if with_dentropy else None
    # the chunk is a row-strided view into a larger buffer: the margins must stay untouched
    buf = torch.full((n + 1, V + 5), 7.0, dtype=dtype, device=DEVICE)
    buf[:n, :V] = z
    view = buf[:n, :V]
    TRITON.row_grad_(view, tg, ref.lse, ref.entropy, dlogp, dent, temperature, softcap)
    expect = z.double().clone()
    TORCH.row_grad_(expect, tg, ref.lse, ref.entropy, dlogp, dent, temperature, softcap)
    assert view.dtype == dtype
    close(view, expect, RTOL[dtype], "grad")
    assert (buf[n] == 7).all() and (buf[:, V:] == 7).all()


def test_row_grad_noncontiguous_rows():
    """Column-strided logits (rows not contiguous) go through a contiguous copy."""
    z, tg = make_logits(4, 40, torch.float32, seed=4)
    zt = z.t().contiguous().t()  # same values, stride (1, 4)
    ref = ref_stats(z, tg, 0.9, None)
    dlogp = torch.linspace(-1, 1, 4, dtype=torch.float64, device=DEVICE)
    st = TRITON.row_stats(zt, tg, 0.9, None)
    close(st.lse, ref.lse, 1e-5, "lse")
    TRITON.row_grad_(zt, tg, ref.lse, ref.entropy, dlogp, None, 0.9, None)
    expect = z.double().clone()
    TORCH.row_grad_(expect, tg, ref.lse, ref.entropy, dlogp, None, 0.9, None)
    close(zt, expect, 1e-5, "grad")


def test_row_stats_extremes():
    """Huge logits (no cancellation in the entropy), a one-hot row, and a row of only -inf
    (lse = entropy = -inf, as the torch backend gives)."""
    V = 150
    z = torch.randn(4, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    z[0] += 1e4
    z[1] = float("-inf")
    z[1, 17] = 3.0
    z[2] = float("-inf")
    z[3] *= 40.0
    tg = torch.tensor([5, 17, -1, V - 1])
    z, tg = z.to(DEVICE), tg.to(DEVICE)
    st = TRITON.row_stats(z, tg, 1.0, None)
    ref = ref_stats(z, tg, 1.0, None)
    close(st.lse, ref.lse, 1e-12, "lse")
    # the torch reference loses ~1e-12 relative in lse - sum(p u) at |u| ~ 1e4: shift row 0 first
    shifted = ref_stats(z[:1] - 1e4, tg[:1], 1.0, None)
    close(st.entropy[:1], shifted.entropy, 1e-13, "entropy, large logits")
    # row 3 is nearly one-hot (entropy ~ 4e-10): absolute agreement, at the reference's precision
    assert (st.entropy[[1, 3]] - ref.entropy[[1, 3]]).abs().max().item() < 1e-11
    assert st.entropy[1].item() == 0.0
    assert st.lse[2].item() == float("-inf") and st.entropy[2].item() == float("-inf")


def test_small_vocab_single_partial_tile():
    z, tg = make_logits(3, 37, torch.float32, seed=6, masked=False)
    st = TRITON.row_stats(z, tg, 1.0, None)
    ref = ref_stats(z, tg, 1.0, None)
    close(st.lse, ref.lse, 1e-5, "lse")
    close(st.entropy, ref.entropy, 1e-5, "entropy")


def test_empty_chunk():
    z = torch.empty(0, 50, device=DEVICE)
    tg = torch.empty(0, dtype=torch.int64, device=DEVICE)
    st = TRITON.row_stats(z, tg, 1.0, None)
    assert st.lse.shape == (0,)
    TRITON.row_grad_(z, tg, st.lse, st.entropy, st.lse, None, 1.0, None)
    opts = GRPOOptions().validate()
    e = torch.empty(0, device=DEVICE)
    st, epi = TRITON.row_fused_(z, tg, 1.0, None, TokenInputs(None, e, e), opts)
    assert epi.loss.shape == (0,)


# ----------------------------------------------------------------------------- the GRPO epilogue


def token_inputs(n, dtype, seed, on_policy, beta, policy_scale, logp=None):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    base = logp.detach().double().cpu() if logp is not None else -1.5 + rnd()
    adv = rnd()
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    weight[-1] = 0.0  # a masked token: exactly 0, whatever its loss
    old = None if on_policy else base + 0.3 * rnd()
    ref = base + 0.3 * rnd() if beta else None
    scale = torch.rand(n, generator=g, dtype=torch.float64) * 2 if policy_scale else None
    if scale is not None:
        scale[0] = 0.0
    to = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return TokenInputs(old=to(old), adv=to(adv), weight=to(weight), ref=to(ref), policy_scale=to(scale))


def options_for(loss_type, beta=0.0, bias_kl=False, delta=None):
    kw = dict(loss_type=loss_type, beta=beta, use_bias_correction_kl=bias_kl, epsilon_high=0.28,
              max_completion_length=16, sapo_temperature_neg=1.05)
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1
    if delta is not None:
        kw["delta"] = delta
    return GRPOOptions(**kw).validate()


EPI_CASES = {
    "on_policy": dict(on_policy=True, beta=0.0, bias_kl=False, scale=False, delta=None),
    "off_policy": dict(on_policy=False, beta=0.0, bias_kl=False, scale=False, delta=None),
    "beta": dict(on_policy=False, beta=0.04, bias_kl=False, scale=False, delta=None),
    "beta_bias_kl_scale": dict(on_policy=False, beta=0.1, bias_kl=True, scale=True, delta=None),
    "on_policy_beta_bias_kl": dict(on_policy=True, beta=0.1, bias_kl=True, scale=False, delta=None),
    "delta": dict(on_policy=False, beta=0.04, bias_kl=False, scale=True, delta=1.05),
}


def epi_case_params():
    out = []
    for lt in LOSS_TYPES:
        for name, case in EPI_CASES.items():
            if case["delta"] is not None and lt in ("cispo", "sapo"):
                continue  # delta only exists for the clipped family
            out.append(pytest.param(lt, name, id=f"{lt}-{name}"))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss_type,case", epi_case_params())
def test_token_epilogue_kernel(dtype, loss_type, case):
    c = EPI_CASES[case]
    n = 37
    g = torch.Generator().manual_seed(11)
    logp = (-2.0 * torch.rand(n, generator=g, dtype=torch.float64) - 0.05).to(dtype).to(DEVICE)
    ti = token_inputs(n, dtype, 12, c["on_policy"], c["beta"], c["scale"], logp)
    if not c["on_policy"]:
        ti.old[1] = logp[1] - 150.0  # exp(log ratio) saturates instead of overflowing
        ti.old[2] = logp[2] + 150.0
    opts = options_for(loss_type, c["beta"], c["bias_kl"], c["delta"])
    out = TRITON.token_epilogue(logp, ti, opts)
    ref = objective.token_epilogue(logp, ti, opts)  # same dtype: the exact port, saturation included
    assert out.loss.dtype == dtype and out.dlogp.dtype == dtype
    close(out.loss, ref.loss, RTOL[dtype], "loss", elementwise=True)
    close(out.dlogp, ref.dlogp, RTOL[dtype], "dlogp", elementwise=True)
    assert out.loss[-1].item() == 0.0 and out.dlogp[-1].item() == 0.0  # weight 0


def test_token_epilogue_shapes_and_fallbacks():
    opts = options_for("dapo", 0.04)
    logp = -torch.rand(3, 4, dtype=torch.float32, device=DEVICE) - 0.1
    ti = TokenInputs(old=logp + 0.1, adv=torch.randn(3, 4, device=DEVICE), weight=torch.rand(3, 4, device=DEVICE),
                     ref=logp - 0.2)
    out = TRITON.token_epilogue(logp, ti, opts)
    ref = objective.token_epilogue(logp, ti, opts)
    assert out.loss.shape == (3, 4)
    close(out.loss, ref.loss, 1e-5, "loss")
    close(out.dlogp, ref.dlogp, 1e-5, "dlogp")
    with pytest.raises(ValueError):
        TRITON.token_epilogue(logp, ti, opts.replace(importance_sampling_level="sequence"))
    with pytest.raises(ValueError):
        TRITON.token_epilogue(logp, TokenInputs(None, ti.adv, ti.weight), opts)  # beta without ref


def composition(z, tg, temperature, softcap, ti, opts):
    """The base class's row_fused_: row_stats -> objective.token_epilogue -> row_grad_, in torch."""
    zz = z.double().clone()
    ti64 = TokenInputs(*(None if t is None else t.double() for t in (ti.old, ti.adv, ti.weight, ti.ref,
                                                                       ti.policy_scale)))
    st, epi = RowBackend.row_fused_(TORCH, zz, tg, temperature, softcap, ti64, opts)
    return zz, st, epi


def check_fused(z, tg, temperature, softcap, ti, opts, dtype):
    zz, rst, repi = composition(z, tg, temperature, softcap, ti, opts)
    zk = z.clone()
    st, epi = TRITON.row_fused_(zk, tg, temperature, softcap, ti, opts)
    stat_tol = RTOL[torch.float64] if dtype == torch.float64 else 1e-5
    for name in ("lse", "entropy", "target_logit"):
        close(getattr(st, name), getattr(rst, name), stat_tol, name)
    tol = RTOL[dtype]
    close(epi.loss, repi.loss, max(tol, stat_tol), "loss")
    close(epi.dlogp, repi.dlogp, max(tol, stat_tol), "dlogp")
    close(zk, zz, tol, "grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("loss_type,case", epi_case_params())
def test_row_fused_matches_composition(dtype, loss_type, case):
    c = EPI_CASES[case]
    n, V = 8, 200
    z, tg = make_logits(n, V, dtype, seed=21)
    temperature, softcap = (0.8, None) if loss_type in ("grpo", "cispo", "luspo") else (1.0, 3.0)
    cur = ref_stats(z, tg, temperature, softcap).logp
    ti = token_inputs(n, dtype, 22, c["on_policy"], c["beta"], c["scale"], cur)
    opts = options_for(loss_type, c["beta"], c["bias_kl"], c["delta"])
    check_fused(z, tg, temperature, softcap, ti, opts, dtype)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d in (torch.float16, torch.bfloat16)],
                         ids=[i for d, i in zip(DTYPES, DTYPE_IDS) if d in (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "sapo"])
def test_row_fused_low_precision(tile, dtype, loss_type):
    n, V = 6, 300
    z, tg = make_logits(n, V, dtype, seed=31)
    cur = ref_stats(z, tg, 0.9, None).logp
    ti = token_inputs(n, torch.float32, 32, False, 0.04, True, cur)
    check_fused(z, tg, 0.9, None, ti, options_for(loss_type, 0.04), dtype)


def test_row_fused_tiles_and_softcap(tile):
    z, tg = make_logits(5, 300, torch.float64, seed=41)
    cur = ref_stats(z, tg, 1.2, 4.0).logp
    ti = token_inputs(5, torch.float64, 42, False, 0.1, True, cur)
    check_fused(z, tg, 1.2, 4.0, ti, options_for("bnpo", 0.1, True, 1.1), torch.float64)


def test_row_fused_rejects_sequence_level():
    z, tg = make_logits(3, 40, torch.float32, seed=51, masked=False)
    ti = token_inputs(3, torch.float32, 52, False, 0.0, False, None)
    opts = GRPOOptions(importance_sampling_level="sequence").validate()
    with pytest.raises(ValueError):
        TRITON.row_fused_(z, tg, 1.0, None, ti, opts)


# ----------------------------------------------------------------------------- group_normalize


def rewards_with_nans(B, G, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, generator=g, dtype=torch.float64) * 2 + 1
    if B >= 2 * G and G > 1:
        r[1] = float("nan")  # an unscorable row
        r[G: 2 * G] = float("nan")  # a whole group unscorable
        r[G + 1] = 0.75  # ... but one: a group with a single scorable reward
    if B >= 3 * G and G > 1:
        r[2 * G: 3 * G] = 0.5  # a group of equal rewards: 0 / eps
    return r.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["float64", "float32", "float16"])
@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("B,G", [(20, 4), (15, 5), (6, 1), (1, 1), (24, 24)])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_group_normalize(dtype, mode, B, G, eps):
    r = rewards_with_nans(B, G, dtype, seed=B * 7 + G)
    out = TRITON.group_normalize(r, G, mode, eps)
    ref = normalize_groups(r, G, mode, eps)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    close(out, ref, 1e-12 if dtype == torch.float64 else 1e-5, "advantages")


def test_group_normalize_loops_over_long_groups(monkeypatch):
    monkeypatch.setattr(advantages_kernel, "MAX_BLOCK", 16)
    for mode in ("group", "batch", "none"):
        r = rewards_with_nans(120, 40, torch.float32, seed=3)
        close(TRITON.group_normalize(r, 40, mode, 1e-4), normalize_groups(r, 40, mode, 1e-4), 1e-5, mode)


def test_group_normalize_bool_modes_errors_and_public_api():
    r = rewards_with_nans(12, 4, torch.float32, seed=9)
    close(TRITON.group_normalize(r, 4, True, 1e-4), normalize_groups(r, 4, "group", 1e-4), 1e-5, "True")
    close(TRITON.group_normalize(r, 4, False, 1e-4), normalize_groups(r, 4, "none", 1e-4), 1e-5, "False")
    with pytest.raises(ValueError):
        TRITON.group_normalize(r, 5, "group", 1e-4)
    with pytest.raises(ValueError):
        TRITON.group_normalize(r, 4, "nope", 1e-4)
    multi = torch.randn(12, 3, device=DEVICE)
    multi[0] = float("nan")
    close(group_advantages(multi, 4, backend="triton"), group_advantages(multi, 4, backend="torch"), 1e-5, "api")


# ----------------------------------------------------------------------------- GPU only


@gpu
def test_gpu_autotuned_and_fixed_configs_agree(monkeypatch):
    z, tg = make_logits(64, 50_000, torch.bfloat16, seed=61)
    ref = ref_stats(z, tg, 1.0, None)
    tuned = TRITON.row_stats(z, tg, 1.0, None)
    monkeypatch.setenv("GRPO_KERNELS_TRITON_AUTOTUNE", "0")
    fixed = TRITON.row_stats(z, tg, 1.0, None)
    for st in (tuned, fixed):
        close(st.lse, ref.lse, 1e-5, "lse")
        close(st.entropy, ref.entropy, 1e-5, "entropy")
    ti = token_inputs(64, torch.float32, 62, False, 0.04, True, ref.logp)
    monkeypatch.delenv("GRPO_KERNELS_TRITON_AUTOTUNE")
    check_fused(z, tg, 1.0, None, ti, options_for("dapo", 0.04), torch.bfloat16)  # tuned, restore_value


@gpu
def test_gpu_deterministic_runs_are_bitwise_equal():
    z, tg = make_logits(32, 40_000, torch.bfloat16, seed=71)
    ti = token_inputs(32, torch.float32, 72, False, 0.04, False, ref_stats(z, tg, 1.0, None).logp)
    opts = GRPOOptions(beta=0.04, deterministic=True).validate()
    outs = []
    for _ in range(2):
        zk = z.clone()
        st, epi = TRITON.row_fused_(zk, tg, 1.0, None, ti, opts)
        outs.append((zk, st.lse, epi.loss))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@gpu
def test_gpu_int64_row_offsets():
    """A chunk of more than 2^31 elements: the last rows start past int32 element offsets."""
    V = 2**17
    n = 2**31 // V + 3
    need = n * V * 2 * 2.5  # the chunk, and its copy while the in-place kernel autotunes
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    z = torch.empty(n, V, dtype=torch.bfloat16, device="cuda")
    z.normal_(0, 2, generator=torch.Generator(device="cuda").manual_seed(0))
    tg = torch.randint(0, V, (n,), device="cuda")
    tail = slice(n - 3, n)
    st = TRITON.row_stats(z, tg, 1.0, None)
    ref = ref_stats(z[tail], tg[tail], 1.0, None)
    close(st.lse[tail], ref.lse, 1e-5, "lse")
    close(st.entropy[tail], ref.entropy, 1e-5, "entropy")
    close(st.target_logit[tail], ref.target_logit, 1e-5, "target_logit")
    zt = z[tail].clone()
    dlogp = torch.randn(n, device="cuda", dtype=torch.float32)
    TRITON.row_grad_(z, tg, st.lse, st.entropy, dlogp, None, 1.0, None)
    expect = zt.double()
    TORCH.row_grad_(expect, tg[tail], ref.lse, ref.entropy, dlogp[tail].double(), None, 1.0, None)
    close(z[tail], expect, RTOL[torch.bfloat16], "grad")


# ----------------------------------------------------------------------------- the compiled (GPU) path, without a GPU

_COMPILE_SCRIPT = r"""
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from grpo_kernels.backends.triton import advantages_kernel as ak, objective_kernel as ok, row_kernels as rk

def build(fn, types, consts, num_warps):
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": 2})

row = dict(stride="i64", tgt_ptr="*i64", V="i32", temperature="fp64", softcap="fp64")
scal = dict(lo="fp64", hi="fp64", delta="fp64", eh="fp64", beta="fp64", tau_pos="fp64", tau_neg="fp64")
n = 0
for zt, a, acc in (("bf16", "fp32", tl.float32), ("fp64", "fp64", tl.float64)):
    build(rk.row_stats_kernel, dict(row, z_ptr="*" + zt, lse_ptr="*" + a, ent_ptr="*" + a, tgl_ptr="*" + a),
          dict(HAS_SOFTCAP=True, HAS_TEMP=True, ACC=acc, BLOCK_V=4096), 8)
    build(rk.row_grad_kernel, dict(row, z_ptr="*" + zt, lse_ptr="*" + a, ent_ptr="*" + a, dlogp_ptr="*" + a,
                                   dent_ptr="*" + a), dict(HAS_SOFTCAP=True, HAS_TEMP=True, HAS_DENT=True, ACC=acc,
                                                           BLOCK_V=2048), 8)
    vecs = {k + "_ptr": "*" + a for k in ("old", "adv", "weight", "ref", "scale", "lse", "ent", "tgl", "loss", "dlogp")}
    for loss in (0, 1, 2):
        build(rk.row_fused_kernel, dict(row, **scal, **vecs, z_ptr="*" + zt),
              dict(CAP=88.722, HAS_SOFTCAP=loss == 0, HAS_TEMP=True, ACC=acc, LOSS=loss, HAS_OLD=loss != 2,
                   HAS_DELTA=loss == 0, HAS_SCALE=True, HAS_KL=True, BIAS_KL=loss == 1, BLOCK_V=4096), 16)
    build(ok.token_epilogue_kernel, dict(scal, n="i32", **{k + "_ptr": "*" + a for k in (
          "logp", "old", "adv", "weight", "ref", "scale", "loss", "dlogp")}),
          dict(CAP=88.722, ACC=acc, LOSS=0, HAS_OLD=True, HAS_DELTA=True, HAS_SCALE=True, HAS_KL=True,
               BIAS_KL=True, BLOCK=1024), 4)
    build(ak.batch_std_kernel, dict(r_ptr="*" + a, std_ptr="*" + a, B="i32"), dict(ACC=acc, BLOCK=1024), 4)
    for mode in (0, 1, 3):
        build(ak.group_normalize_kernel, dict(r_ptr="*" + a, out_ptr="*" + a, std_ptr="*" + a, G="i32", eps="fp64"),
              dict(MAXF=3.0e38, MODE=mode, ACC=acc, BLOCK=64), 4)
print("COMPILED OK")
"""


def test_kernels_compile_for_cuda():
    """The non-interpreted path (libdevice tanh, fp64 scalar arguments, every kernel) compiles to an
    sm_90 cubin with Triton's own toolchain: no GPU needed, so CPU-only CI checks it too."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=root)
    if out.returncode != 0 and ("ptxas" in out.stderr and "not found" in out.stderr.lower()):
        pytest.skip("no ptxas in this triton installation")
    assert out.returncode == 0 and "COMPILED OK" in out.stdout, out.stderr[-4000:]

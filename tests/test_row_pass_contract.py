"""The row-pass contract (grpo_kernels/backends/base.py), one suite for every backend.

Every test here runs for each backend of tests/backends.py (torch, triton, cpp) on the CPU and,
where there is one, on CUDA (those cases are marked ``gpu``); a backend that cannot run (no
triton, no compiler, no interpreter, a dtype it lacks) is skipped with its reason. Each primitive
is checked against the float64 torch reference math on materialized logits, never against another
backend:

- ``row_stats``: lse / entropy / target logit of ``u = softcap(z) / T`` from ``logsumexp``,
  ``log_softmax`` and ``gather`` in float64 (target < 0: 0, "not in this vocabulary slice");
- ``row_grad_``: the gradient of ``sum(dlogp * logp + dentropy * entropy)`` with respect to the raw
  logits, by float64 autograd through that same math, with and without ``dentropy``, given the
  statistics (the global ones for a vocabulary slice);
- ``row_fused_`` (backends that have one): the composition ``row_stats -> epilogue.token_epilogue
  -> row_grad_`` for every loss type and option case: its statistics against float64, its loss and
  dL/dlogp against ``epilogue.token_epilogue`` of those statistics (in the accumulation dtype, as
  the sweep composes it), its gradient by float64 autograd with that dL/dlogp;
- ``group_normalize`` (backends that have one): ``advantages.normalize_groups`` in float64.

Inputs are fresh random numbers (seeded per case), with -inf logits, targets < 0, row-strided
chunks, several dtypes. Every float tensor a backend allocates uninitialized (``torch.empty``,
``empty_like``, ``empty_strided``, ``Tensor.new_empty``: the Triton backend's ``common.empty`` and
the cpp backend's outputs) starts NaN-filled (``poisoned``), and every element is compared, so an
element a kernel does not write fails. The tests at the end check that these checks fail on
deliberately wrong backends.

The ``check_*`` helpers are shared with the backend-specific files (test_triton_backend.py: tile
configs; test_cuda_gpu.py: CUDA-only shapes), which keep only what is specific to one backend.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import pytest
import torch

from support import backend_params, device_for_tests, require, stable_seed
from grpo_kernels import epilogue, group_advantages
from grpo_kernels.advantages import normalize_groups
from grpo_kernels.backends import get_backend
from grpo_kernels.backends.base import RowBackend, RowStats
from grpo_kernels.backends.torch_chunked import TorchRowBackend
from grpo_kernels.epilogue import TokenInputs, accumulation_dtype
from grpo_kernels.options import CLIPPED_LOSS_TYPES, TOKEN_LOSS_TYPES as LOSS_TYPES, ExecutionOptions, GRPOOptions

pytestmark = [
    # numpy's warnings under the Triton interpreter for IEEE results the torch reference gives as
    # well (a saturated fp32 ratio times A -> inf; exp(-inf) of masked logits)
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

NAN, NEG_INF = float("nan"), float("-inf")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp64", "fp32", "fp16", "bf16"]
#: statistics: accumulated in fp32 at worst (of inputs that are exact in every dtype)
STAT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
#: gradients: stored in the logits' dtype (relative to the gradient's scale)
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: the per-token loss and dL/dlogp of the fused kernels (accumulation dtype)
EPI_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

#: (n, V, row padding): several tiles with a partial last one; misaligned row starts (stride V + pad);
#: a vocabulary of 8 and of 1; Qwen's vocabulary (compiled backends only)
SHAPES = {
    "n6-V300": (6, 300, 0),
    "n5-V517-pad3": (5, 517, 3),
    "n7-V64-pad1": (7, 64, 1),
    "n3-V8": (3, 8, 0),
    "n4-V1": (4, 1, 0),
    "n2-V151936": (2, 151936, 0),
}
#: (temperature, logit_softcap)
XFORMS = {"plain": (1.0, None), "temp0.7": (0.7, None), "softcap30": (1.0, 30.0), "temp1.3-softcap5": (1.3, 5.0)}
#: the Triton interpreter (numpy) needs ~10 s per row pass over V = 151936
INTERPRETER_MAX_V = 10_000

# ----------------------------------------------------------------------------- the backends


def _devices():
    extra = device_for_tests()
    return ["cpu"] + ([extra] if extra != "cpu" else [])


def _params():
    out = []
    for device in _devices():
        for p in backend_params():
            (name,) = p.values
            marks = [pytest.mark.gpu] if device != "cpu" else []
            out.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return out


class Subject:
    """A backend under test: its registry name, the device, and ``use(dtype)`` -> the backend
    (skipping with the reason when it cannot run on that device / dtype)."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device

    def use(self, dtype=torch.float32) -> RowBackend:
        require(self.name, self.device, dtype)
        return get_backend(self.name, torch.device(self.device), dtype)

    @property
    def interpreted(self) -> bool:
        return self.name == "triton" and self.device == "cpu"


@pytest.fixture(params=_params())
def backend(request) -> Subject:
    return Subject(*request.param)


def execution_for(impl: RowBackend, deterministic: bool = False) -> ExecutionOptions:
    name = impl.name if impl.name in ("torch", "triton", "cpp") else "auto"
    return ExecutionOptions(backend=name, deterministic=deterministic).validate()


def skip_if_too_slow(subject: Subject, V: int) -> None:
    if subject.interpreted and V > INTERPRETER_MAX_V:
        pytest.skip(f"V={V} is too slow under the Triton interpreter (runs compiled on CUDA)")


# ----------------------------------------------------------------------------- poisoned allocations

_ALLOCATORS = ("empty", "empty_like", "empty_strided")


@contextlib.contextmanager
def poisoned():
    """Within: every float tensor that ``torch.empty`` / ``empty_like`` / ``empty_strided`` /
    ``Tensor.new_empty`` hands out is NaN-filled. Yields the list of those tensors (kept alive,
    so that ``covers`` can tell an output that started as one of them)."""
    made = []

    def wrap(fn):
        @functools.wraps(fn)
        def alloc(*args, **kwargs):
            t = fn(*args, **kwargs)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                t.fill_(NAN)
                made.append(t)
            return t

        return alloc

    saved = {name: getattr(torch, name) for name in _ALLOCATORS}
    had_new_empty = "new_empty" in torch.Tensor.__dict__
    saved_new_empty = torch.Tensor.new_empty
    try:
        for name, fn in saved.items():
            setattr(torch, name, wrap(fn))
        torch.Tensor.new_empty = wrap(saved_new_empty)
        yield made
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        if had_new_empty:
            torch.Tensor.new_empty = saved_new_empty
        else:
            del torch.Tensor.new_empty


def covers(made, t: torch.Tensor) -> bool:
    """Whether ``t`` lives in one of the poisoned allocations."""
    ptr = t.untyped_storage().data_ptr()
    return any(m.untyped_storage().data_ptr() == ptr for m in made)


# ----------------------------------------------------------------------------- inputs


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def nan_vec(n, dtype, device):
    return torch.full((n,), NAN, dtype=dtype, device=device)


def make_logits(n, V, dtype, device, seed, pad=0, masked=True):
    """[n, V] logits in ``dtype`` (with ``pad``: a view with row stride V + pad whose padding holds
    other random numbers) and int64 targets: 0, V - 1, -1 ("not in this slice") and random ones.
    With ``masked``: -inf logits (row 0 at column 1, row 1 every third column, row 2 a tail spanning
    whole tiles), never under a target."""
    g = gen(seed)
    full = torch.randn(n, V + pad, generator=g, dtype=torch.float64) * 2.5 + 0.3
    t = torch.randint(0, V, (n,), generator=g)
    t[0] = 0
    if n > 1:
        t[-1] = V - 1
    if n > 3:
        t[3] = -1
    if masked and V > 2:
        full[0, 1] = NEG_INF
    if masked and V >= 8:
        if n > 1:
            full[1, 2:V:3] = NEG_INF
            t[1] = 1
        if n > 2:
            full[2, V // 2:V] = NEG_INF
            t[2] = V // 3
    z = full.to(dtype).to(device)
    return (z[:, :V] if pad else z), t.to(device)


def row_options(xform=(1.0, None), **kwargs) -> GRPOOptions:
    temperature, softcap = xform
    return GRPOOptions(temperature=temperature, logit_softcap=softcap, **kwargs).validate()


# ----------------------------------------------------------------------------- the float64 reference


def scaled64(z: torch.Tensor, options: GRPOOptions) -> torch.Tensor:
    """u = softcap(z) / T in float64."""
    u = z.double()
    if options.logit_softcap is not None:
        c = options.logit_softcap
        u = torch.tanh(u / c) * c
    return u / options.temperature


def _gather(u, targets):
    valid = targets >= 0
    picked = u.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros((), dtype=u.dtype))


def _entropy(logp_all):
    """-sum p log p, with the 0 * -inf of masked logits taken as 0 (also in the backward)."""
    p = logp_all.exp()
    return -(p * torch.where(p > 0, logp_all, torch.zeros((), dtype=logp_all.dtype))).sum(-1)


def reference_stats(z, targets, options) -> RowStats:
    """Float64 statistics on the CPU from the materialized logits. A row of only -inf has
    lse = entropy = -inf (``lse - sum(p * u)`` with an empty sum)."""
    u = scaled64(z.detach().cpu(), options)
    t = targets.cpu()
    lse = torch.logsumexp(u, -1)
    ent = _entropy(torch.log_softmax(u, -1))
    ent = torch.where(torch.isneginf(lse) | torch.isnan(lse), lse, ent)
    return RowStats(lse=lse, entropy=ent, target_logit=_gather(u, t))


def reference_grad(z, targets, dlogp, dentropy, options) -> torch.Tensor:
    """d/dz of sum(dlogp * (target_logit - lse) + dentropy * entropy) by float64 autograd on the
    CPU (0 at -inf logits). The rows must not be all -inf."""
    z64 = z.detach().cpu().double()
    fin = torch.isfinite(z64)
    leaf = torch.where(fin, z64, torch.zeros(())).requires_grad_(True)
    u = scaled64(torch.where(fin, leaf, z64), options)
    lse = torch.logsumexp(u, -1)
    obj = (dlogp.detach().cpu().double() * (_gather(u, targets.cpu()) - lse)).sum()
    if dentropy is not None:
        obj = obj + (dentropy.detach().cpu().double() * _entropy(torch.log_softmax(u, -1))).sum()
    obj.backward()
    return leaf.grad


# ----------------------------------------------------------------------------- comparisons


def close(x, ref, rtol, what="", elementwise=False, scale=0.0):
    """Same shape; finite exactly where the reference is (and equal where it is not); within
    ``rtol * max(max|ref|, scale)`` of it, or with ``elementwise`` within
    ``rtol * max(|ref_i|, median|ref|)`` (so that a few huge elements cannot hide the others)."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    bad = torch.isfinite(x) != fin
    assert not bad.any(), f"{what}: non-finite pattern differs at {bad.nonzero().flatten()[:8].tolist()}"
    assert torch.equal(x[~fin].nan_to_num(), ref[~fin].nan_to_num()), f"{what}: non-finite values differ"
    if not fin.any():
        return
    r = ref[fin]
    if elementwise:
        bound = rtol * r.abs().clamp(min=max(r.abs().median().item(), scale, 1e-30))
    else:
        bound = torch.full_like(r, rtol * max(r.abs().max().item(), scale, 1e-30))
    err = (x[fin] - r).abs()
    worst = (err / bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: element {worst.item()} off by {err[worst].item():.3e} (ref {r[worst].item():.6e}, "
        f"bound {bound[worst].item():.3e})"
    )


def check_stats(st: RowStats, ref: RowStats, dtype, device, what=""):
    acc = accumulation_dtype(dtype)
    for name in ("lse", "entropy", "target_logit"):
        out = getattr(st, name)
        assert out.dtype == acc, f"{what}{name}: dtype {out.dtype}, expected {acc}"
        assert out.device.type == torch.device(device).type, f"{what}{name}: on {out.device}"
        close(out, getattr(ref, name), STAT_TOL[dtype], what + name)


# ----------------------------------------------------------------------------- the checks


def check_row_stats(impl, device, dtype, shape, xform, seed=0, execution=None):
    """row_stats of a fresh chunk against the float64 reference; the chunk is read only."""
    n, V, pad = shape
    options = row_options(xform)
    z, t = make_logits(n, V, dtype, device, seed, pad)
    z0 = z.clone()
    with poisoned():
        st = impl.row_stats(z, t, options, execution or execution_for(impl))
    check_stats(st, reference_stats(z, t, options), dtype, device)
    assert bool((st.target_logit[t < 0] == 0).all()), "target < 0: target_logit must be 0"
    assert torch.equal(z, z0), "row_stats changed its input"


def check_row_grad(impl, device, dtype, shape, xform, with_dentropy, seed=0, execution=None):
    """row_grad_ in place on a fresh chunk (row-strided with ``pad``: the padding stays as it was),
    given the float64 statistics in the accumulation dtype (target_logit NaN: unused)."""
    n, V, pad = shape
    options = row_options(xform)
    acc = accumulation_dtype(dtype)
    z, t = make_logits(n, V, dtype, device, seed, pad)
    ref = reference_stats(z, t, options)
    g = gen(seed + 3)
    dlogp = torch.randn(n, generator=g, dtype=torch.float64).to(acc)
    dent = torch.randn(n, generator=g, dtype=torch.float64).to(acc) if with_dentropy else None
    expect = reference_grad(z, t, dlogp, dent, options)
    if pad:
        buf = z.as_strided((n, V + pad), (V + pad, 1)).clone()  # the chunk and its padding
        work = buf[:, :V]
        margin = buf[:, V:].clone()
    else:
        work = z.clone()
    stats = RowStats(ref.lse.to(device=device, dtype=acc), ref.entropy.to(device=device, dtype=acc),
                     nan_vec(n, acc, device))
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    with poisoned():
        out = impl.row_grad_(work, t, stats, on(dlogp), on(dent), options, execution or execution_for(impl))
    assert out is None, "row_grad_ returns None (the gradient is written in place)"
    assert work.dtype == dtype
    scale = dlogp.abs().max().item() + (0.0 if dent is None else dent.abs().max().item())
    close(work, expect, GRAD_TOL[dtype], "grad", scale=scale)
    if pad:
        assert torch.equal(buf[:, V:], margin), "row_grad_ wrote outside the chunk"


def _loss_kwargs(loss_type):
    return {"dr_grpo": dict(max_completion_length=16), "cispo": dict(epsilon_high=1.1)}.get(loss_type, {})


#: option variants per loss type: (extra options, off-policy, policy_scale)
VARIANTS = {
    "on_policy": ({}, False, False),
    "off_policy": ({}, True, False),
    "beta": (dict(beta=0.04), True, False),
    "beta-biaskl-scale": (dict(beta=0.1, use_bias_correction_kl=True), True, True),
    "on_policy-beta-biaskl": (dict(beta=0.1, use_bias_correction_kl=True), False, False),
    "delta-beta-scale": (dict(delta=1.05, beta=0.04), True, True),  # delta: the clipped family only
}
SPECIAL_CASES = {
    # ratio exactly 1 on both (inclusive) clip bounds
    "grpo-eps0-on_policy": (dict(loss_type="grpo", epsilon_low=0.0, epsilon_high=0.0), False, False),
    "dapo-asym-delta": (dict(loss_type="dapo", epsilon_low=0.1, epsilon_high=0.28, delta=1.15), True, True),
    "cispo-eh0.9-beta": (dict(loss_type="cispo", epsilon_high=0.9, beta=0.02), True, False),
    "sapo-temps-beta": (dict(loss_type="sapo", beta=0.05, sapo_temperature_pos=0.8, sapo_temperature_neg=1.3),
                        True, True),
}


def _fused_cases():
    cases = {}
    for lt in LOSS_TYPES:
        for name, (extra, off, scaled) in VARIANTS.items():
            if "delta" in extra and lt not in CLIPPED_LOSS_TYPES:
                continue
            cases[f"{lt}-{name}"] = (dict(loss_type=lt, **_loss_kwargs(lt), **extra), off, scaled)
    cases.update(SPECIAL_CASES)
    # every case gets a transform, and each loss type sees several
    xf = list(XFORMS.values())
    return {name: (kw, off, scaled, xf[i % len(xf)]) for i, (name, (kw, off, scaled)) in enumerate(cases.items())}


FUSED_CASES = _fused_cases()
#: the fp16 / bf16 fused cases: one per loss type, with KL and a policy scale
LOW_PRECISION_CASES = [f"{lt}-delta-beta-scale" if lt in CLIPPED_LOSS_TYPES else f"{lt}-beta-biaskl-scale"
                       for lt in LOSS_TYPES]


def make_token_inputs(logp64, acc, device, seed, off_policy, scaled, saturate=False):
    """TokenInputs around the float64 log-probs (so that some ratios clip) in ``acc``: a zero
    advantage (torch.minimum's tie), a zero weight (a masked token), a zero policy scale, and ref
    always given (ignored at beta = 0); the zeros only with 6 rows or more, so that enough rows keep
    a gradient. ``saturate``: ratios and KL terms whose exp overflows."""
    n = logp64.shape[0]
    g = gen(seed + 7)
    base = logp64.detach().cpu().double()
    rnd = lambda: torch.randn(n, generator=g, dtype=torch.float64)  # noqa: E731
    old = base + 0.15 * rnd() if off_policy else None  # most ratios inside the clip range, some out
    adv = rnd()
    weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    ref = base + 0.3 * rnd()
    scale = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.1 if scaled else None
    if n >= 6:  # enough rows left with a gradient
        adv[1] = 0.0
        weight[-1] = 0.0
        if scale is not None:
            scale[0] = 0.0
    if saturate:
        assert n >= 8 and old is not None
        old[2] = base[2] - 150.0  # exp(log ratio) saturates in fp32
        old[4] = base[4] + 150.0  # ratio ~ 0
        old[5] = base[5] - 1000.0  # saturates in fp64 too
        old[-1] = base[-1] - 1000.0  # ... with weight 0: exactly 0 all the same
        ref[6] = base[6] + 900.0  # the KL term's exp saturates
        # a KL term of d^2 / 2 cancels (exp(d) - d - 1 loses 6e-8 / kl relative in fp32), and a
        # saturated ratio times it would show that rounding as is: keep d away from 0 there
        for i, d in ((2, 0.5), (4, -0.5), (5, 0.7)):
            ref[i] = base[i] + d
    to = lambda x: None if x is None else x.to(device=device, dtype=acc)  # noqa: E731
    return TokenInputs(old=to(old), adv=to(adv), weight=to(weight), ref=to(ref), policy_scale=to(scale))


def on_cpu(ti: TokenInputs, dtype) -> TokenInputs:
    f = (ti.old, ti.adv, ti.weight, ti.ref, ti.policy_scale)
    cpu = lambda x, dt=dtype: None if x is None else x.detach().cpu().to(dt)  # noqa: E731
    return TokenInputs(*(cpu(x) for x in f), rewards=cpu(ti.rewards), reward_weights=cpu(ti.reward_weights),
                       seq=cpu(ti.seq, torch.int64))


def check_row_fused(impl, device, dtype, case, shape=(8, 300, 0), xform=None, seed=0, saturate=False,
                    execution=None):
    """row_fused_ == row_stats -> epilogue.token_epilogue -> row_grad_: the statistics against
    float64, the loss and dL/dlogp against epilogue.token_epilogue (in the accumulation dtype, as the
    sweep composes it) of those statistics, the gradient against float64 autograd with that dL/dlogp
    (rows whose dL/dlogp overflows or saturates are left out of the gradient comparison)."""
    kw, off_policy, scaled, case_xform = FUSED_CASES[case]
    n, V, pad = shape
    options = row_options(xform or case_xform, **kw)
    acc = accumulation_dtype(dtype)
    z, t = make_logits(n, V, dtype, device, seed, pad)
    ref = reference_stats(z, t, options)
    ti = make_token_inputs(ref.logp, acc, device, seed, off_policy, scaled, saturate)
    if pad:
        buf = z.as_strided((n, V + pad), (V + pad, 1)).clone()
        work = buf[:, :V]
        margin = buf[:, V:].clone()
    else:
        work = z.clone()
    with poisoned():
        st, out = impl.row_fused_(work, t, ti, options, execution or execution_for(impl))
    check_stats(st, ref, dtype, device, "fused ")
    # the epilogue of the statistics just checked (an fp32 logp is off by ~1e-6; a saturated ratio
    # times a KL term of d^2/2 would turn that into 1e-4 relative, which is no kernel error)
    epi = epilogue.token_epilogue(st.logp.detach().cpu(), on_cpu(ti, acc), options)
    for name in ("loss", "dlogp"):
        got = getattr(out, name)
        assert got.dtype == acc, f"{name}: dtype {got.dtype}, expected {acc}"
        close(got, getattr(epi, name), EPI_TOL[acc], name, elementwise=True)
    finite_rows = torch.isfinite(epi.dlogp) & (epi.dlogp.abs() < 1e6)
    expect = reference_grad(z, t, torch.where(finite_rows, epi.dlogp, 0.0), None, options)
    if n >= 6:
        assert out.loss[-1].item() == 0.0 and out.dlogp[-1].item() == 0.0, "a zero weight gives exactly 0"
    assert V == 1 or expect.abs().max() > 0, "a vacuous case: the gradient is 0 everywhere"
    rows = finite_rows.to(work.device)
    scale = epi.dlogp[finite_rows].abs().max().item() if finite_rows.any() else 0.0
    close(work[rows], expect[finite_rows], GRAD_TOL[dtype], "grad", scale=scale)
    if pad:
        assert torch.equal(buf[:, V:], margin), "row_fused_ wrote outside the chunk"


#: the fused epilogue's rewards -> advantages: (B, R, G, scale_rewards, NaN rewards (row, column or None))
REWARD_CASES = {
    "B8-R2-G4-group-nan": (8, 2, 4, "group", ((1, 0), (5, None))),
    "B8-R3-G2-batch-nan": (8, 3, 2, "batch", ((0, 1), (3, None), (2, None))),  # an all-NaN group
    "B6-R1-G3-none": (6, 1, 3, "none", ()),
    "B4-R2-G1-group": (4, 2, 1, "group", ((2, 0),)),
    "B12-R2-G12-batch": (12, 2, 12, "batch", ((7, None),)),
    "B8-R2-G4-group-all-nan-group": (8, 2, 4, "group", ((4, None), (5, None), (6, None), (7, None))),
    # more sequences than a CUDA block has threads: the batch std by block reductions
    "B1024-R3-G16-batch-nan": (1024, 3, 16, "batch", ((5, None), (100, 1), (700, 2))),
}


def check_row_fused_rewards(impl, device, dtype, case, seed=0, n=10, V=300):
    """row_fused_ with the advantages computed in its epilogue from rewards [B, R], weights [R] and each
    row's sequence index (TokenInputs.adv None): the statistics against float64, the per-row
    advantages, loss and dL/dlogp against epilogue.token_epilogue of those statistics (which computes
    them with group_advantages), the gradient by float64 autograd."""
    B, R, G, mode, nans = REWARD_CASES[case]
    options = row_options((0.9, None), loss_type="grpo", beta=0.04, num_generations=G, scale_rewards=mode)
    acc = accumulation_dtype(dtype)
    z, t = make_logits(n, V, dtype, device, seed)
    ref = reference_stats(z, t, options)
    base = make_token_inputs(ref.logp, acc, device, seed, True, True)
    g = gen(seed + 11)
    rewards = torch.randn(B, R, generator=g, dtype=torch.float64)
    for i, k in nans:
        if k is None:
            rewards[i] = NAN
        else:
            rewards[i, k] = NAN
    weights = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    seq = torch.randint(0, B, (n,), generator=g)
    seq[0], seq[1] = 5 % B, 0  # an unscorable sequence's rows (advantage 0) where it exists
    to = lambda x, dt=acc: x.to(device=device, dtype=dt)  # noqa: E731
    ti = TokenInputs(old=base.old, adv=None, weight=base.weight, ref=base.ref, policy_scale=base.policy_scale,
                     rewards=to(rewards), reward_weights=to(weights), seq=to(seq, torch.int64))
    work = z.clone()
    with poisoned():
        st, out = impl.row_fused_(work, t, ti, options, execution_for(impl))
    check_stats(st, ref, dtype, device, "fused rewards ")
    epi = epilogue.token_epilogue(st.logp.detach().cpu(), on_cpu(ti, acc), options)
    assert out.adv is not None and out.adv.dtype == acc, "row_fused_ returns the rows' advantages"
    expect_adv = group_advantages(rewards, G, scale_rewards=mode, weights=weights, eps=1e-4)[seq]
    # the mirror is group_advantages (of rewards rounded to acc), the kernel its formula in acc
    close(epi.adv, expect_adv, EPI_TOL[acc], "mirror advantages")
    close(out.adv, epi.adv, EPI_TOL[acc], "advantages")
    for name in ("loss", "dlogp"):  # (relative to the largest: G = 1 leaves only tiny KL terms)
        close(getattr(out, name), getattr(epi, name), EPI_TOL[acc], name)
    expect = reference_grad(z, t, epi.dlogp, None, options)
    close(work, expect, GRAD_TOL[dtype], "grad", scale=epi.dlogp.abs().max().item())


@pytest.mark.parametrize("case", list(REWARD_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_row_fused_computes_advantages_from_rewards(backend, dtype, case):
    impl = fused_impl(backend, dtype)
    check_row_fused_rewards(impl, backend.device, dtype, case, seed=stable_seed("fused-rewards", dtype, case))


GROUP_CASES = {
    "plain": dict(B=24, G=4, nan=()),
    "nan-rows": dict(B=24, G=4, nan=(1, 5, 6, 7)),  # group 1 keeps one scorable row
    "all-nan-group": dict(B=16, G=4, nan=(8, 9, 10, 11)),
    "equal-group": dict(B=12, G=3, nan=(), equal=(0, 1, 2)),  # 0 / eps
    "G1": dict(B=6, G=1, nan=(2,)),
    "B1": dict(B=1, G=1, nan=()),
    "one-group": dict(B=16, G=16, nan=(3,)),
    "many-groups": dict(B=480, G=8, nan=(17, 100)),
}


def check_group_normalize(impl, device, dtype, case, mode, eps, seed=0):
    """group_normalize on combined rewards [B] (fp32 / fp64, as group_advantages passes them)
    against normalize_groups in float64."""
    spec = GROUP_CASES[case]
    B, G = spec["B"], spec["G"]
    r = torch.randn(B, generator=gen(seed), dtype=torch.float64) * 2 + 0.5
    for i in spec.get("equal", ()):
        r[i] = 0.75
    for i in spec["nan"]:
        r[i] = NAN
    r = r.to(dtype)
    r_dev = r.to(device)
    with poisoned():
        out = impl.group_normalize(r_dev, G, mode, eps)
    acc = accumulation_dtype(dtype)
    assert out.dtype == acc and out.shape == (B,) and out.device == r_dev.device
    close(out, normalize_groups(r.double(), G, mode, eps), STAT_TOL[dtype], f"advantages {case} {mode} eps={eps}")
    assert torch.equal(r_dev.cpu().nan_to_num(), r.nan_to_num()), "group_normalize changed its input"


# ----------------------------------------------------------------------------- the contract's shape


def test_backend_declares_the_contract(backend):
    impl = backend.use()
    dev = torch.device(backend.device)
    assert isinstance(impl, RowBackend)
    assert impl.supports(dev, torch.float32) is None
    assert isinstance(impl.supports(dev, torch.int64), str), "an integer chunk has no softmax: a reason"
    assert isinstance(impl.temp_bytes_per_elem, int) and impl.temp_bytes_per_elem >= 0
    assert isinstance(impl.temp_bytes(dev), int) and impl.temp_bytes(dev) >= 0
    assert isinstance(impl.deterministic, bool)
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(impl.row_stats) == ["logits", "targets", "options", "execution", "need_entropy"]
    assert params(impl.row_grad_) == ["logits", "targets", "stats", "dlogp", "dentropy", "options", "execution"]
    if impl.row_fused_ is not None:
        assert params(impl.row_fused_) == ["logits", "targets", "token_inputs", "options", "execution"]
    if impl.group_normalize is not None:
        assert params(impl.group_normalize) == ["rewards", "num_generations", "scale_rewards", "eps"]
    assert not hasattr(impl, "token_epilogue"), "the standalone epilogue left the contract"


def test_poison_reaches_the_preallocated_outputs(backend):
    """The NaN poisoning is no dead letter: the kernels' outputs start as poisoned allocations."""
    impl = backend.use()
    if backend.name == "torch":
        pytest.skip("the torch backend computes its outputs with torch ops: nothing is preallocated")
    z, t = make_logits(4, 40, torch.float32, backend.device, seed=1)
    options = row_options(beta=0.04)
    with poisoned() as made:
        st = impl.row_stats(z, t, options, execution_for(impl))
        outs = [st.lse, st.entropy, st.target_logit]
        if impl.row_fused_ is not None:
            ti = make_token_inputs(st.logp, torch.float32, backend.device, 1, True, True)
            st2, epi = impl.row_fused_(z.clone(), t, ti, options, execution_for(impl))
            outs += [st2.lse, st2.entropy, st2.target_logit, epi.loss, epi.dlogp]
        if impl.group_normalize is not None:
            outs.append(impl.group_normalize(torch.randn(8, device=backend.device), 4, "group", 1e-4))
    assert all(covers(made, o) for o in outs)


# ----------------------------------------------------------------------------- row_stats


@pytest.mark.parametrize("xform", list(XFORMS.values()), ids=list(XFORMS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_stats(backend, dtype, shape, xform):
    impl = backend.use(dtype)
    skip_if_too_slow(backend, shape[1])
    check_row_stats(impl, backend.device, dtype, shape, xform, seed=stable_seed("stats", dtype, shape, xform))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("xform", [(1.0, None), (0.7, 30.0)], ids=["plain", "temp_softcap"])
def test_row_stats_without_entropy(backend, dtype, xform):
    """need_entropy=False (the log-prob-only pass): lse and target_logit as with the entropy,
    every output written (poisoned), the entropy 0."""
    impl = backend.use(dtype)
    z, t = make_logits(9, 200, dtype, backend.device, seed=stable_seed("no_entropy", dtype, xform))
    options = row_options(xform)
    with poisoned():
        st = impl.row_stats(z, t, options, execution_for(impl), need_entropy=False)
    ref = reference_stats(z, t, options)
    check_stats(RowStats(st.lse, ref.entropy.to(st.lse), st.target_logit), ref, dtype, backend.device, "no entropy: ")
    assert torch.equal(st.entropy, torch.zeros_like(st.entropy))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_row_stats_extremes(backend, dtype):
    """Huge logits (no cancellation in the entropy), a single finite logit (entropy 0), a nearly
    one-hot row, a row of only -inf (lse = entropy = -inf); the gradient of the finite rows."""
    impl = backend.use(dtype)
    V = 150
    z = torch.randn(5, V, dtype=torch.float64, generator=gen(5))
    z[0] += 1e4
    z[1] = NEG_INF
    z[1, 17] = 3.0
    z[2] *= 40.0
    z[3] = NEG_INF
    z[4] = z[4] * 0.01 - 2e3
    z = z.to(dtype).to(backend.device)
    t = torch.tensor([5, 17, V - 1, -1, 0], device=backend.device)
    options, execution = row_options(), execution_for(impl)
    with poisoned():
        st = impl.row_stats(z, t, options, execution)
    ref = reference_stats(z, t, options)
    tol = STAT_TOL[dtype]
    close(st.lse, ref.lse, tol, "lse", elementwise=True)
    close(st.target_logit, ref.target_logit, tol, "target_logit", elementwise=True)
    # entropies of 0 .. 5: absolute agreement (row 2 is ~4e-10, row 1 exactly 0)
    fin = torch.isfinite(ref.entropy)
    assert (st.entropy.cpu().double()[fin] - ref.entropy[fin]).abs().max().item() < tol * 10
    assert st.entropy[1].item() == 0.0
    assert st.lse[3].item() == NEG_INF and st.entropy[3].item() == NEG_INF
    if dtype != torch.float64:
        return  # an fp32 lse of 1e4 is only good to ~1e-3 absolute: p = exp(u - lse) is off by 0.1%
    rows = torch.tensor([0, 1, 2, 4], device=z.device)
    dlogp = torch.randn(4, generator=gen(6), dtype=torch.float64).to(z.device)
    dent = torch.randn(4, generator=gen(7), dtype=torch.float64).to(z.device)
    work = z[rows].clone()
    with poisoned():
        impl.row_grad_(work, t[rows], RowStats(st.lse[rows], st.entropy[rows], st.target_logit[rows]), dlogp, dent,
                       options, execution)
    close(work, reference_grad(z[rows], t[rows], dlogp, dent, options), GRAD_TOL[dtype], "grad", scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_nan_logit_makes_its_row_nan(backend, dtype, request):
    """A NaN logit is never silently dropped: its row's lse and entropy are NaN (first element, the
    tail, among -inf only); the other rows are right."""
    impl = backend.use(dtype)
    V = 300
    z = torch.randn(5, V, dtype=torch.float64, generator=gen(31))
    z[0, 0] = NAN
    z[1] = NEG_INF
    z[1, 200] = NAN
    z[2, V - 1] = NAN
    z = z.to(dtype).to(backend.device)
    t = torch.tensor([1, 2, 3, 4, 5], device=backend.device)
    options = row_options()
    with poisoned():
        st = impl.row_stats(z, t, options, execution_for(impl))
    assert bool(torch.isnan(st.lse[:3]).all()), st.lse
    assert bool(torch.isnan(st.entropy[:3]).all()), st.entropy
    check_stats(RowStats(st.lse[3:], st.entropy[3:], st.target_logit[3:]), reference_stats(z[3:], t[3:], options),
                dtype, backend.device)


def test_empty_chunk(backend):
    impl = backend.use()
    z = torch.empty(0, 50, device=backend.device)
    t = torch.empty(0, dtype=torch.int64, device=backend.device)
    options, execution = row_options(beta=0.04), execution_for(impl)  # beta: the fused kernel reads ref
    st = impl.row_stats(z, t, options, execution)
    assert all(getattr(st, k).shape == (0,) and getattr(st, k).dtype == torch.float32
               for k in ("lse", "entropy", "target_logit"))
    e = torch.empty(0, device=backend.device)
    assert impl.row_grad_(z, t, st, e, e, options, execution) is None
    if impl.row_fused_ is not None:
        st, epi = impl.row_fused_(z, t, TokenInputs(e, e, e, e, e), options, execution)
        assert st.lse.shape == (0,) and epi.loss.shape == (0,) and epi.dlogp.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("xform", [(1.0, None), (1.3, 5.0)], ids=["plain", "temp_softcap"])
def test_torch_slabs_are_the_whole_chunk_bitwise(dtype, xform, monkeypatch):
    """The torch backend works through a CPU chunk in slabs of rows (``slab_elems``): statistics
    (with and without the entropy) and gradients (with and without dentropy) are bitwise those
    of the whole chunk at once, for slabs of 1 row, of 2 (a partial last one) and of 3, on a
    row-strided chunk with -inf logits and a target < 0. The contract suite above checks the
    whole chunk against float64; its chunks are smaller than one slab."""
    impl = TorchRowBackend()
    n, V = 7, 517
    z, t = make_logits(n, V, dtype, "cpu", seed=stable_seed("slabs", dtype, xform), pad=3)
    options, execution = row_options(xform), execution_for(impl)
    g = gen(11)
    dlogp = torch.randn(n, generator=g, dtype=torch.float64).to(accumulation_dtype(dtype))
    dent = torch.randn(n, generator=g, dtype=torch.float64).to(accumulation_dtype(dtype))

    def run(slab_elems):
        monkeypatch.setattr(impl, "slab_elems", slab_elems)
        outs = []
        for need_entropy in (True, False):
            st = impl.row_stats(z, t, options, execution, need_entropy=need_entropy)
            outs += [st.lse, st.entropy, st.target_logit]
        st = impl.row_stats(z, t, options, execution)
        for d in (None, dent):
            work = z.clone()
            impl.row_grad_(work, t, st, dlogp, d, options, execution)
            outs.append(work)
        return outs

    whole = run({})
    assert impl._slabs(z) == [(0, n)]
    for rows in (1, 2, 3):
        monkeypatch.setattr(impl, "slab_elems", {"cpu": rows * V})
        assert len(impl._slabs(z)) == -(-n // rows)
        sliced = run({"cpu": rows * V})
        for k, (a, b) in enumerate(zip(whole, sliced)):
            assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(
                a.nan_to_num(), b.nan_to_num()), f"output {k}, slabs of {rows} rows"


def test_torch_temporaries_by_device():
    """On the CPU the slabs bound the temporaries (the chunk rule sees none); on a device without a
    slab size the whole chunk's (9 bytes a logit) count."""
    impl = TorchRowBackend()
    assert impl.temp_bytes("cpu") == 0
    assert impl.temp_bytes("cuda") == impl.temp_bytes_per_elem == 9
    assert impl._slabs(torch.empty(100, 32768))[:2] == [(0, 32), (32, 64)]  # 2^20 logits a slab


def test_column_strided_chunk_is_right_or_refused(backend):
    """Rows that are not contiguous (beyond the contract): right numbers, or a clear error that
    leaves the chunk as it was; never silently wrong."""
    impl = backend.use()
    z, t = make_logits(4, 40, torch.float32, backend.device, seed=4)
    options, execution = row_options((0.9, None)), execution_for(impl)
    zt = z.t().contiguous().t()  # the same values, strides (1, 4)
    try:
        st = impl.row_stats(zt, t, options, execution)
    except (RuntimeError, ValueError) as exc:
        assert "contiguous" in str(exc)
        assert torch.equal(zt, z)
        return
    ref = reference_stats(z, t, options)
    check_stats(st, ref, torch.float32, backend.device)
    dlogp = torch.linspace(-1, 1, 4, device=backend.device)
    impl.row_grad_(zt, t, RowStats(ref.lse.float().to(z.device), ref.entropy.float().to(z.device), st.target_logit),
                   dlogp, None, options, execution)
    close(zt, reference_grad(z, t, dlogp, None, options), GRAD_TOL[torch.float32], "grad", scale=1.0)


# ----------------------------------------------------------------------------- row_grad_


@pytest.mark.parametrize("with_dentropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("xform", list(XFORMS.values()), ids=list(XFORMS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_grad(backend, dtype, shape, xform, with_dentropy):
    impl = backend.use(dtype)
    skip_if_too_slow(backend, shape[1])
    check_row_grad(impl, backend.device, dtype, shape, xform, with_dentropy,
                   seed=stable_seed("grad", dtype, shape, xform, with_dentropy))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_row_grad_of_vocab_slices_with_global_stats(backend, dtype):
    """Vocabulary parallelism: each slice's statistics with its local targets (-1 where the target
    lies in another slice), and each slice's gradient from the *global* statistics, put together,
    are the full rows' ones."""
    impl = backend.use(dtype)
    n, V, cut = 6, 300, 128
    options, execution = row_options((1.3, 5.0)), execution_for(impl)
    z, t = make_logits(n, V, dtype, backend.device, seed=stable_seed("slices", dtype))
    acc = accumulation_dtype(dtype)
    full = reference_stats(z, t, options)
    g = gen(8)
    dlogp = torch.randn(n, generator=g, dtype=torch.float64).to(acc)
    dent = torch.randn(n, generator=g, dtype=torch.float64).to(acc)
    expect = reference_grad(z, t, dlogp, dent, options)
    work = z.clone()
    glob = RowStats(*(x.to(device=z.device, dtype=acc) for x in (full.lse, full.entropy, full.target_logit)))
    for lo, hi in ((0, cut), (cut, V)):
        local = torch.where((t >= lo) & (t < hi), t - lo, torch.full_like(t, -1))
        with poisoned():
            st = impl.row_stats(work[:, lo:hi], local, options, execution)
        check_stats(st, reference_stats(z[:, lo:hi], local, options), dtype, backend.device, f"slice [{lo}, {hi}) ")
        with poisoned():
            impl.row_grad_(work[:, lo:hi], local, glob, dlogp.to(z.device), dent.to(z.device), options, execution)
    close(work, expect, GRAD_TOL[dtype], "grad", scale=2.0)


def test_row_grad_converts_upstream_gradients(backend):
    """Upstream gradients as autograd hands them over: another float dtype, a stride-0 expanded
    view (the backward of a sum), a strided view; statistics as views of a longer RowStats."""
    impl = backend.use()
    n, V = 6, 300
    options, execution = row_options((0.9, 20.0)), execution_for(impl)
    z, t = make_logits(n, V, torch.float32, backend.device, seed=9)
    ref = reference_stats(z, t, options)
    dlogp = torch.full((1,), 0.75, dtype=torch.float64, device=backend.device).expand(n)
    dent_buf = torch.randn(2 * n, generator=gen(10)).to(backend.device)
    dent = dent_buf[::2]
    longer = [torch.cat([x.float(), torch.randn(3, dtype=torch.float32)]).to(backend.device)
              for x in (ref.lse, ref.entropy, ref.target_logit)]
    stats = RowStats(*(x[:n] for x in longer))
    work = z.clone()
    with poisoned():
        impl.row_grad_(work, t, stats, dlogp, dent, options, execution)
    close(work, reference_grad(z, t, dlogp, dent, options), GRAD_TOL[torch.float32], "grad", scale=1.0)


# ----------------------------------------------------------------------------- row_fused_


def fused_impl(backend: Subject, dtype) -> RowBackend:
    impl = backend.use(dtype)
    if impl.row_fused_ is None:
        pytest.skip(f"backend {backend.name!r} has no fused kernel (row_fused_ is None): the sweep composes "
                    "row_stats -> epilogue.token_epilogue -> row_grad_")
    return impl


@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_row_fused_matches_composition(backend, dtype, case):
    impl = fused_impl(backend, dtype)
    check_row_fused(impl, backend.device, dtype, case, seed=stable_seed("fused", dtype, case))


@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_row_fused_low_precision(backend, dtype, case):
    impl = fused_impl(backend, dtype)
    check_row_fused(impl, backend.device, dtype, case, seed=stable_seed("fused-lp", dtype, case))


@pytest.mark.parametrize("shape", [SHAPES[k] for k in ("n5-V517-pad3", "n3-V8", "n4-V1", "n2-V151936")],
                         ids=["n5-V517-pad3", "n3-V8", "n4-V1", "n2-V151936"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_row_fused_shapes(backend, dtype, shape):
    impl = fused_impl(backend, dtype)
    skip_if_too_slow(backend, shape[1])
    check_row_fused(impl, backend.device, dtype, "dapo-asym-delta", shape=shape, xform=(1.3, 5.0),
                    seed=stable_seed("fused-shape", dtype, shape))


@pytest.mark.parametrize("case", [f"{lt}-{v}" for lt in LOSS_TYPES for v in ("beta", "beta-biaskl-scale")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_row_fused_saturated_ratios(backend, dtype, case):
    """exp(log ratio) and the KL term's exp saturate at the accumulation dtype's largest value (as
    epilogue.exp_sat), never inf * 0; a zero weight wins over a saturated loss."""
    impl = fused_impl(backend, dtype)
    check_row_fused(impl, backend.device, dtype, case, saturate=True, seed=stable_seed("fused-sat", dtype, case))


def test_row_fused_rejects_sequence_level(backend):
    impl = fused_impl(backend, torch.float32)
    z, t = make_logits(3, 40, torch.float32, backend.device, seed=51)
    ti = make_token_inputs(torch.full((3,), -2.0, dtype=torch.float64), torch.float32, backend.device, 52, True, False)
    with pytest.raises(ValueError, match="token"):
        impl.row_fused_(z, t, ti, row_options(importance_sampling_level="sequence"), execution_for(impl))


# ----------------------------------------------------------------------------- determinism


def test_deterministic_runs_are_bitwise_equal(backend):
    impl = backend.use()
    if not impl.deterministic:
        pytest.skip(f"backend {backend.name!r} does not promise a fixed reduction order")
    execution = execution_for(impl, deterministic=True)
    options = row_options((0.9, 20.0), loss_type="grpo", beta=0.04)
    z, t = make_logits(6, 300, torch.float32, backend.device, seed=71)
    dlogp, dent = (torch.randn(6, generator=gen(s)).to(backend.device) for s in (72, 73))
    ti = make_token_inputs(reference_stats(z, t, options).logp, torch.float32, backend.device, 74, True, True)
    runs = []
    for _ in range(2):
        st = impl.row_stats(z, t, options, execution)
        work = z.clone()
        impl.row_grad_(work, t, st, dlogp, dent, options, execution)
        out = [st.lse, st.entropy, st.target_logit, work]
        if impl.row_fused_ is not None:
            fz = z.clone()
            fst, epi = impl.row_fused_(fz, t, ti, options, execution)
            out += [fst.lse, epi.loss, epi.dlogp, fz]
        runs.append(out)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- group_normalize


def group_impl(backend: Subject) -> RowBackend:
    impl = backend.use()
    if impl.group_normalize is None:
        pytest.skip(f"backend {backend.name!r} has no group_normalize kernel: group_advantages uses "
                    "advantages.normalize_groups")
    return impl


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("case", list(GROUP_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_group_normalize(backend, dtype, case, mode):
    impl = group_impl(backend)
    for eps in (1e-4, 0.0):
        check_group_normalize(impl, backend.device, dtype, case, mode, eps, seed=stable_seed("group", case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_group_advantages_through_the_backend(backend, dtype):
    """The public path: group_advantages(backend=name) == backend='torch' ([B, K] rewards with NaNs,
    weights, TRL's boolean scale_rewards, low-precision rewards)."""
    group_impl(backend)
    rewards = torch.randn(32, 3, generator=gen(3), dtype=torch.float64)
    rewards[1, 0] = NAN
    rewards[5] = NAN  # unscorable row
    rewards = rewards.to(dtype).to(backend.device)
    for mode in ("group", "batch", "none", True, False):
        kw = dict(scale_rewards=mode, weights=[1.0, 0.5, 2.0])
        with poisoned():
            a = group_advantages(rewards, 4, backend=backend.name, **kw)
        b = group_advantages(rewards.cpu(), 4, backend="torch", **kw)
        assert a.dtype == b.dtype == torch.float32 and a.device == rewards.device
        close(a, b, 1e-5, f"scale_rewards={mode}")
        assert a[5].item() == 0.0


# ----------------------------------------------------------------------------- the checks can fail


class _Composed(TorchRowBackend):
    """The torch primitives with row_fused_ as their composition (what a fused kernel must equal)."""

    def row_fused_(self, logits, targets, token_inputs, options, execution):
        st = self.row_stats(logits, targets, options, execution)
        epi = epilogue.token_epilogue(st.logp, token_inputs, options)
        self.row_grad_(logits, targets, st, epi.dlogp, None, options, execution)
        return st, epi

    def group_normalize(self, rewards, num_generations, scale_rewards, eps):
        return normalize_groups(rewards, num_generations, scale_rewards, eps)


class _ScaledGrad(_Composed):
    def row_grad_(self, logits, targets, stats, dlogp, dentropy, options, execution):
        super().row_grad_(logits, targets, stats, dlogp, dentropy, options, execution)
        logits.mul_(1.001)


class _WrongTemperature(_Composed):
    def row_stats(self, logits, targets, options, execution):
        return super().row_stats(logits, targets, options.replace(temperature=options.temperature * 1.001), execution)


class _DropsEntropyGrad(_Composed):
    def row_grad_(self, logits, targets, stats, dlogp, dentropy, options, execution):
        super().row_grad_(logits, targets, stats, dlogp, None, options, execution)


class _SkipsLastRow(_Composed):
    """Writes its statistics into preallocated outputs, all rows but the last."""

    def row_stats(self, logits, targets, options, execution):
        st = super().row_stats(logits, targets, options, execution)
        out = RowStats.empty(logits.shape[0], logits.dtype, logits.device)
        for k in ("lse", "entropy", "target_logit"):
            getattr(out, k)[:-1] = getattr(st, k)[:-1]
        return out


class _WrongEpilogue(_Composed):
    def row_fused_(self, logits, targets, token_inputs, options, execution):
        return super().row_fused_(logits, targets, token_inputs, options.replace(beta=0.0), execution)


class _RewardsAsGroupMode(_Composed):
    """Computes the advantages with scale_rewards="group" whatever the mode."""

    def row_fused_(self, logits, targets, token_inputs, options, execution):
        return super().row_fused_(logits, targets, token_inputs, options.replace(scale_rewards="group"), execution)


class _BatchAsGroup(_Composed):
    def group_normalize(self, rewards, num_generations, scale_rewards, eps):
        return super().group_normalize(rewards, num_generations, "group" if scale_rewards == "batch" else scale_rewards,
                                       eps)


def test_the_checks_pass_a_correct_backend():
    impl = _Composed()
    for dtype in (torch.float64, torch.float32):
        check_row_stats(impl, "cpu", dtype, SHAPES["n6-V300"], XFORMS["temp1.3-softcap5"])
        check_row_grad(impl, "cpu", dtype, SHAPES["n5-V517-pad3"], XFORMS["temp0.7"], True)
        check_row_fused(impl, "cpu", dtype, "grpo-beta-biaskl-scale")
        check_row_fused(impl, "cpu", dtype, "sapo-beta", saturate=True)
        check_group_normalize(impl, "cpu", dtype, "nan-rows", "batch", 1e-4)
        check_row_fused_rewards(impl, "cpu", dtype, "B8-R3-G2-batch-nan")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("bug,check", [
    (_ScaledGrad, lambda impl, dt: check_row_grad(impl, "cpu", dt, SHAPES["n6-V300"], XFORMS["plain"], False)),
    (_ScaledGrad, lambda impl, dt: check_row_fused(impl, "cpu", dt, "dapo-off_policy")),
    (_WrongTemperature, lambda impl, dt: check_row_stats(impl, "cpu", dt, SHAPES["n6-V300"], XFORMS["temp0.7"])),
    (_WrongTemperature, lambda impl, dt: check_row_fused(impl, "cpu", dt, "cispo-beta")),
    (_DropsEntropyGrad, lambda impl, dt: check_row_grad(impl, "cpu", dt, SHAPES["n3-V8"], XFORMS["plain"], True)),
    (_SkipsLastRow, lambda impl, dt: check_row_stats(impl, "cpu", dt, SHAPES["n3-V8"], XFORMS["plain"])),
    (_WrongEpilogue, lambda impl, dt: check_row_fused(impl, "cpu", dt, "grpo-beta")),
    (_BatchAsGroup, lambda impl, dt: check_group_normalize(impl, "cpu", dt, "plain", "batch", 1e-4)),
    (_RewardsAsGroupMode, lambda impl, dt: check_row_fused_rewards(impl, "cpu", dt, "B8-R3-G2-batch-nan")),
], ids=["grad*1.001", "fused-grad*1.001", "temperature*1.001", "fused-temperature*1.001", "no-dentropy",
        "unwritten-row", "fused-epilogue-without-KL", "batch-as-group", "rewards-batch-as-group"])
def test_the_checks_fail_a_wrong_backend(bug, check, dtype):
    with pytest.raises(AssertionError):
        check(bug(), dtype)

"""The divergence row pass in Triton (the math: ``grpo_kernels.divergence``).

One program per row of the student's raw logits ``zs`` [n, V] and the teacher's ``zt`` [n, V]
(each row contiguous; the two may differ in dtype, e.g. an fp32 student and a bf16 teacher),
everything in ACC (fp32; fp64 for fp64 student logits). Each head's tile is transformed as
``u = c * tanh(z * scale / c) / T`` (``z * scale / T`` without a softcap). The passes over V, in
BLOCK_V tiles starting at column 0 of the row (so a row's summation order depends on V and the
tile only, never on the row's address or its neighbours: rows are bitwise batch invariant):

1. both heads' online max / sum-exp (rescaled whenever a max grows), the student's entropy sum
   (as ``row_kernels``: ``entropy = log s - t / s``), and at ``beta`` 0 / 1 the KL itself from
   ``KL(q || p) = E_q[d_t - d_s] + log(s_s / s_t)`` with ``d = u - max`` and ``s = sum exp(d)``
   per head (``p`` and ``q`` swapped at 1); every later pass takes ``log p = d_s - log s_s`` (and
   ``log q`` alike), never ``u - lse``, so no logit's magnitude is rounded into a log-prob;
2. only for ``0 < beta < 1``: ``KL(q || m)`` and ``KL(p || m)`` with ``log m`` a logaddexp of
   ``log p + log(1 - beta)`` and ``log q + log beta`` (no underflow of ``m`` itself);
3. with ``coef``: ``coef * dD/dz_s`` into ``out`` (which may be ``zs``: each tile is read
   before it is written, by the same program).

Columns of zero probability contribute exactly 0 (``0 log 0 = 0``, never ``0 * inf``), so a
vocabulary masked with -inf in both heads gives a finite divergence. NaN logits give NaN.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from grpo_kernels.backends.triton import common
from grpo_kernels.backends.triton.common import INTERPRET, tanh, tl_acc, to_acc
from grpo_kernels.divergence import DivergenceSpec, HeadTransform
from grpo_kernels.epilogue import accumulation_dtype

#: the MODE constexpr: which of the contract's three cases a launch computes
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2


# ----------------------------------------------------------------------------- device functions


@triton.jit
def _head(row_ptr, offs, inb, k_in, k_out, CAP: tl.constexpr, ACC: tl.constexpr):
    """(u, th) of one tile of one head: with a softcap ``th = tanh(z * k_in)`` (k_in = scale / c)
    and ``u = th * k_out`` (k_out = c / T); without, ``u = z * k_in`` (k_in = scale / T) and
    ``th = z``. Columns past V: u = -inf (probability 0)."""
    z = tl.load(row_ptr + offs, mask=inb, other=0.0).to(ACC)
    if CAP:
        th = tanh(z * k_in)
        u = th * k_out
    else:
        th = z
        u = z * k_in
    return tl.where(inb, u, float("-inf")), th


@triton.jit
def _online(m, u):
    """One tile of an online max / sum-exp: (new max, the shift used, exp(u - shift), the factor
    that rescales the old sums). All -inf so far: shift by 0 (every exp is 0)."""
    m_new = tl.maximum(m, tl.max(u, axis=0))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    return m_new, m_safe, tl.exp(u - m_safe), tl.exp(m - m_safe)


@triton.jit
def _log_ratio(num, den):
    """log(num / den) as log1p((num - den) / den), with Kahan's log1p(x) = log(u) x / (u - 1), u =
    1 + x (no libdevice under the interpreter): the sums of two close heads are close, and log of
    each would round at |log s| instead of at the small log of their ratio."""
    x = (num - den) / den
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))


@triton.jit
def _log_mix(log_p, log_q, lb1, lb):
    """log((1 - beta) p + beta q) = logaddexp(log p + log(1 - beta), log q + log beta)."""
    a = log_p + lb1
    b = log_q + lb
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi > float("-inf"), hi + tl.log(1.0 + tl.exp(lo - hi)), hi)


@triton.jit
def _stats_pass(zs_row, zt_row, V, ks_in, ks_out, kt_in, kt_out,
                S_CAP: tl.constexpr, T_CAP: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Pass 1 of one row: (cs, ct, ls, lt, entropy, D, r); ``cs`` / ``ct`` are the heads' final
    shifts (the max; 0 for a head of only -inf), ``ls`` / ``lt`` the logs of their sums
    (``lse = c + l``; NaN for a head with NaN logits). At MODE 0 / 1, with w the weighting head
    (the teacher at 0, the student at 1) and o the other, ``a = sum e_w (d_w - d_o)`` (d = u -
    shift) is kept on the current shifts: ``r = a / s_w = E_w[d_w - d_o]`` and ``D = r + log(s_o /
    s_w)`` take no difference of the logits' magnitudes, so D stays accurate when p is close to q
    (an offset between the heads' logits never enters). D and r are 0 at MODE 2."""
    ms = tl.full((), float("-inf"), ACC)  # running maxima, shifts, sums exp(u - shift)
    mt = tl.full((), float("-inf"), ACC)
    cs = tl.full((), 0.0, ACC)
    ct = tl.full((), 0.0, ACC)
    ss = tl.full((), 0.0, ACC)
    st = tl.full((), 0.0, ACC)
    ts = tl.full((), 0.0, ACC)  # the student's sum exp(u - shift) (u - shift): its entropy
    a = tl.full((), 0.0, ACC)
    nan_s = tl.full((), 0, tl.int32)  # NaN logits: the running max may ignore them, the row must not
    nan_t = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        us, _ths = _head(zs_row, offs, inb, ks_in, ks_out, S_CAP, ACC)
        ut, _tht = _head(zt_row, offs, inb, kt_in, kt_out, T_CAP, ACC)
        nan_s += tl.sum((us != us).to(tl.int32), axis=0)
        nan_t += tl.sum((ut != ut).to(tl.int32), axis=0)
        ms, cs_new, es, al_s = _online(ms, us)
        mt, ct_new, et, al_t = _online(mt, ut)
        ds = us - cs_new
        dt = ut - ct_new
        # a new shift moves every earlier d by (old shift - new shift): sum e'(d + move) = alpha
        # (sum e d + move * s); with s = 0 nothing moves (the old shift is a placeholder)
        move_s = tl.where(ss > 0, cs - cs_new, 0.0)
        move_t = tl.where(st > 0, ct - ct_new, 0.0)
        if MODE == 0:  # columns of zero weight add 0, never 0 * inf
            a = al_t * (a + (move_t - move_s) * st) + tl.sum(et * tl.where(et > 0, dt - ds, 0.0), axis=0)
        elif MODE == 1:
            a = al_s * (a + (move_s - move_t) * ss) + tl.sum(es * tl.where(es > 0, ds - dt, 0.0), axis=0)
        ts = al_s * (ts + move_s * ss) + tl.sum(es * tl.where(es > 0, ds, 0.0), axis=0)
        ss = al_s * ss + tl.sum(es, axis=0)
        st = al_t * st + tl.sum(et, axis=0)
        cs = cs_new
        ct = ct_new
    ss_safe = tl.where(ss > 0, ss, 1.0)
    st_safe = tl.where(st > 0, st, 1.0)
    ls = tl.log(ss_safe)
    lt = tl.log(st_safe)
    entropy = tl.where(ss > 0, ls - ts / ss_safe, ms)  # a row of only -inf: -inf, as lse
    if MODE == 0:
        r = a / st_safe
        div = r + _log_ratio(ss_safe, st_safe)
    elif MODE == 1:
        r = a / ss_safe
        div = r + _log_ratio(st_safe, ss_safe)
    else:
        r = tl.full((), 0.0, ACC)
        div = r
    ls = tl.where(nan_s > 0, float("nan"), ls)
    lt = tl.where(nan_t > 0, float("nan"), lt)
    entropy = tl.where(nan_s > 0, float("nan"), entropy)
    div = tl.where(nan_s + nan_t > 0, float("nan"), div)
    return cs, ct, ls, lt, entropy, div, r


@triton.jit
def _mixture_pass(zs_row, zt_row, V, ks_in, ks_out, kt_in, kt_out, cs, ct, ls, lt, lb1, lb,
                  S_CAP: tl.constexpr, T_CAP: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 2 (0 < beta < 1): (KL(q || m), KL(p || m)) of one row."""
    kl_q = tl.full((), 0.0, ACC)
    kl_p = tl.full((), 0.0, ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        us, _ths = _head(zs_row, offs, inb, ks_in, ks_out, S_CAP, ACC)
        ut, _tht = _head(zt_row, offs, inb, kt_in, kt_out, T_CAP, ACC)
        log_p = (us - cs) - ls
        log_q = (ut - ct) - lt
        log_m = _log_mix(log_p, log_q, lb1, lb)
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        kl_q += tl.sum(q * tl.where(q > 0, log_q - log_m, 0.0), axis=0)
        kl_p += tl.sum(p * tl.where(p > 0, log_p - log_m, 0.0), axis=0)
    return kl_q, kl_p


@triton.jit
def _grad_pass(zs_row, zt_row, out_row, V, ks_in, ks_out, kt_in, kt_out, cs, ct, ls, lt, lb1, lb, w1,
               shift, factor, S_CAP: tl.constexpr, T_CAP: tl.constexpr, MODE: tl.constexpr, ACC: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """Pass 3: out = factor * dD/du_s * du_s/dz_s / (scale / T), tile by tile. ``shift`` is
    pass 1's r at MODE 1 and KL(p || m) at MODE 2; ``w1`` = 1 - beta; ``factor`` = coef * scale / T."""
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        us, ths = _head(zs_row, offs, inb, ks_in, ks_out, S_CAP, ACC)
        ut, _tht = _head(zt_row, offs, inb, kt_in, kt_out, T_CAP, ACC)
        log_p = (us - cs) - ls
        p = tl.exp(log_p)
        if MODE == 0:  # p - q
            g = p - tl.exp((ut - ct) - lt)
        elif MODE == 1:
            # p (log p - log q - D) = p (d_s - d_t - r): r is the p-mean of the very d_s - d_t of
            # pass 1, so no lse and no offset between the heads' logits is rounded into it
            g = p * tl.where(p > 0, ((us - cs) - (ut - ct)) - shift, 0.0)
        else:  # (1 - beta) p (log p - log m - KL(p || m))
            g = w1 * p * tl.where(p > 0, log_p - _log_mix(log_p, (ut - ct) - lt, lb1, lb) - shift, 0.0)
        if S_CAP:
            g = g * (1.0 - ths * ths)
        g = g * factor
        tl.store(out_row + offs, g.to(out_row.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- the kernel


@triton.jit
def divergence_kernel(
    zs_ptr, zs_stride, zt_ptr, zt_stride, out_ptr, out_stride, coef_ptr, coef_stride, div_ptr, ent_ptr, V,
    ks_in: tl.float64, ks_out: tl.float64, kt_in: tl.float64, kt_out: tl.float64, grad_scale: tl.float64,
    beta: tl.float64, lb1: tl.float64, lb: tl.float64,
    S_CAP: tl.constexpr, T_CAP: tl.constexpr, MODE: tl.constexpr, HAS_GRAD: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # lb1, lb = log(1 - beta), log(beta) (MODE 2 only); grad_scale = the student's scale / T.
    # coef_stride is 0 for a [] coef, 1 for a [n] one; coef_ptr is never read without HAS_GRAD.
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride
    ks_in, ks_out = to_acc(ks_in, ACC), to_acc(ks_out, ACC)
    kt_in, kt_out = to_acc(kt_in, ACC), to_acc(kt_out, ACC)
    lb1, lb = to_acc(lb1, ACC), to_acc(lb, ACC)
    cs, ct, ls, lt, entropy, div, shift = _stats_pass(zs_row, zt_row, V, ks_in, ks_out, kt_in, kt_out,
                                                            S_CAP, T_CAP, MODE, ACC, BLOCK_V)
    if MODE == 2:
        kl_q, kl_p = _mixture_pass(zs_row, zt_row, V, ks_in, ks_out, kt_in, kt_out, cs, ct, ls, lt, lb1, lb,
                                   S_CAP, T_CAP, ACC, BLOCK_V)
        b = to_acc(beta, ACC)
        div = b * kl_q + (1.0 - b) * kl_p
        shift = kl_p
    tl.store(div_ptr + row, div)
    tl.store(ent_ptr + row, entropy)
    if HAS_GRAD:
        factor = tl.load(coef_ptr + row * coef_stride).to(ACC) * to_acc(grad_scale, ACC)
        w1 = 1.0 - to_acc(beta, ACC)
        _grad_pass(zs_row, zt_row, out_ptr + row * out_stride, V, ks_in, ks_out, kt_in, kt_out, cs, ct,
                   ls, lt, lb1, lb, w1, shift, factor, S_CAP, T_CAP, MODE, ACC, BLOCK_V)


# ----------------------------------------------------------------------------- autotuning (GPU)


#: the largest tile of fp64 rows: at 4096 columns ptxas spilled (mixture with gradient and both
#: softcaps, sm_90: 20 bytes on 8 warps, 60-92 on 16; tests/test_triton_compile.py), none at 2048
FP64_MAX_BLOCK = 2048


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the vocabulary (a tiny V needs no 8K tile), and fp64 tiles past
    FP64_MAX_BLOCK."""
    cap = FP64_MAX_BLOCK if named_args["zs_ptr"].dtype == torch.float64 else None
    return common.tiles_for(configs, named_args["V"], cap)


#: one program per row, looping over V; each tile holds two heads, so no 8192 tile
DIVERGENCE_CONFIGS = [
    triton.Config({"BLOCK_V": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_V": 4096}, num_warps=16, num_stages=2),
]

if not INTERPRET:
    # the gradient may overwrite the student's logits: the autotuner benchmarks on a copy of
    # ``out`` (which is zs itself in place), restored after every trial
    divergence_tuned = triton.autotune(DIVERGENCE_CONFIGS, key=["V", "MODE", "HAS_GRAD"],
                                       prune_configs_by={"early_config_prune": _prune_configs},
                                       restore_value=["out_ptr"])(divergence_kernel)
else:
    divergence_tuned = None


# ----------------------------------------------------------------------------- host side


def head_args(head: HeadTransform) -> Tuple[float, float, bool]:
    """(k_in, k_out, has softcap) of ``_head`` for ``head``, from ``HeadTransform.kernel_args()``
    (in float64 here; rounded to ACC in the kernel, as torch rounds a Python scalar)."""
    scale, cap, temperature = head.kernel_args()
    if cap == 0.0:
        return scale / temperature, 1.0, False
    return scale / cap, cap / temperature, True


def mode_of(beta: float) -> int:
    """The MODE of ``beta``: the endpoints are their own cases (``grpo_kernels.divergence``)."""
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else MIXTURE


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when each row is contiguous, else a contiguous copy."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _check(zs: torch.Tensor, zt: torch.Tensor, out: Optional[torch.Tensor]) -> None:
    if zs.dim() != 2 or zt.shape != zs.shape:
        raise ValueError(f"zs and zt must be [n, V] of one shape, got {tuple(zs.shape)} and {tuple(zt.shape)}")
    if not (zs.is_floating_point() and zt.is_floating_point()):
        raise TypeError(f"zs and zt must be float tensors, got {zs.dtype} and {zt.dtype}")
    if out is not None and (out.shape != zs.shape or out.dtype != zs.dtype):
        raise ValueError(f"out must be {tuple(zs.shape)} {zs.dtype}, got {tuple(out.shape)} {out.dtype}")


def divergence_rows_(zs: torch.Tensor, zt: torch.Tensor, spec: DivergenceSpec, coef: Optional[torch.Tensor],
                     execution, out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(D [n], entropy [n]) in the accumulation dtype of the student's ``zs`` [n, V] and the
    teacher's ``zt`` [n, V]; with ``coef`` ([] or [n]), ``coef * dD/dz_s`` into ``out`` [n, V]
    (the student's dtype; None: over ``zs``). ``execution.fixed_tiles``: no autotuning."""
    _check(zs, zt, out)
    n, V = zs.shape
    acc = accumulation_dtype(zs.dtype)
    div, ent = common.empty(n, acc, zs.device), common.empty(n, acc, zs.device)
    if n == 0:
        return div, ent
    target = zs if out is None else out
    s, t = _rowwise(zs), _rowwise(zt)
    if INTERPRET and t.dtype == torch.bfloat16:  # numpy has no bfloat16; the conversion is exact
        t = t.float()
    o = s if coef is None or target is zs else _rowwise(target)
    if coef is not None:
        c = coef.detach().to(device=zs.device, dtype=acc).reshape(-1).contiguous()
        c_stride = 0 if coef.dim() == 0 else 1
    else:
        c, c_stride = div, 0
    ks_in, ks_out, s_cap = head_args(spec.student)
    kt_in, kt_out, t_cap = head_args(spec.teacher)
    beta = float(spec.beta)
    mode = mode_of(beta)
    logs = (math.log1p(-beta), math.log(beta)) if mode == MIXTURE else (0.0, 0.0)
    scale, _cap, temperature = spec.student.kernel_args()
    args = (s, s.stride(0), t, t.stride(0), o, o.stride(0), c, c_stride, div, ent, V)
    kwargs = dict(ks_in=ks_in, ks_out=ks_out, kt_in=kt_in, kt_out=kt_out, grad_scale=scale / temperature,
                  beta=beta, lb1=logs[0], lb=logs[1], S_CAP=s_cap, T_CAP=t_cap, MODE=mode,
                  HAS_GRAD=coef is not None, ACC=tl_acc(zs.dtype))
    _launch(n, V, execution.fixed_tiles, args, kwargs)
    if coef is not None and o is not target:
        target.copy_(o)
    return div, ent


def _launch(n: int, V: int, fixed: bool, args, kwargs) -> None:
    with common.device_guard(args[0]):
        if divergence_tuned is not None and common.use_autotune(fixed):
            divergence_tuned[(n,)](*args, **kwargs)
            return
        block, launch = fixed_config(V, args[0].dtype)
        divergence_kernel[(n,)](*args, BLOCK_V=block, **launch, **kwargs)


def fixed_config(V: int, dtype: torch.dtype):
    """(BLOCK_V, launch kwargs) without autotuning: the row kernels' fixed tile
    (``common.fixed_row_config``, GRPO_KERNELS_TRITON_BLOCK_V included), at most FP64_MAX_BLOCK
    for fp64 rows on the GPU."""
    block, launch = common.fixed_row_config(V)
    if not INTERPRET and dtype == torch.float64 and block > FP64_MAX_BLOCK:
        block, launch = FP64_MAX_BLOCK, {"num_warps": common.fixed_num_warps(FP64_MAX_BLOCK)}
    return block, launch

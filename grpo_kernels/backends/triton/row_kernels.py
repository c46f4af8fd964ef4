"""The vocabulary row pass in Triton: statistics, gradient, and both fused with the epilogue.

One chunk of raw logits ``z`` [n, V] (rows contiguous, any float dtype). With
``u = softcap(z) / T`` (``softcap(z) = c * tanh(z / c)`` when given), everything is
computed in ACC (fp32, or fp64 for fp64 logits):

- ``row_stats_kernel``: one program per row sweeps V in BLOCK_V tiles with a running max
  ``m``, ``s = sum exp(u - m)`` and ``t = sum exp(u - m) * (u - m)`` (rescaled whenever ``m``
  grows), giving ``lse = m + log s`` and ``entropy = log s - t / s`` (no cancellation for
  large logits), plus ``u[target]`` (0 for target < 0: "not in this vocabulary slice").
  ``-inf`` logits (masked vocabulary) contribute exactly 0, never ``0 * inf``.
- ``row_grad_kernel``: elementwise over a (row, tile) grid, in place:
  ``g = [dlogp * (onehot - p) - dentropy * p * (u - lse + entropy)] / T * (1 - tanh(z/c)^2)``.
- ``row_fused_kernel``: per row, the statistics sweep, the GRPO epilogue
  (``objective_kernel.grpo_token_epilogue``) on the row's log-prob, then the gradient sweep
  with the epilogue's ``dL/dlogp``: one launch per chunk, nothing [n, V] but the chunk.

Row offsets are int64 (``row * stride`` passes 2^31 for large chunks). On the GPU the tile
size and warp count are autotuned per (V, dtype); under ``TRITON_INTERPRET=1`` a fixed tile.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from grpo_kernels.backends.base import RowStats
from grpo_kernels.backends.triton import common
from grpo_kernels.backends.triton.common import INTERPRET, tanh, tl_acc, to_acc
from grpo_kernels.backends.triton.advantages_kernel import reward_advantage, reward_block
from grpo_kernels.backends.triton.objective_kernel import epilogue_params, grpo_token_epilogue, token_vectors
from grpo_kernels.epilogue import SCALE_MODE_CODES, TokenEpilogue, accumulation_dtype, reward_matrix

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- device functions


@triton.jit
def _consts(temperature, softcap, ACC: tl.constexpr):
    c = to_acc(softcap, ACC)
    return c, 1.0 / c, 1.0 / to_acc(temperature, ACC)


@triton.jit
def _scaled(z, c, inv_c, inv_T, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr):
    """(u, th): u = softcap(z) / T and th = tanh(z / c) (z itself without a softcap)."""
    if HAS_SOFTCAP:
        th = tanh(z * inv_c)
        u = th * c
    else:
        th = z
        u = z
    if HAS_TEMP:
        u = u * inv_T
    return u, th


@triton.jit
def _row_lse_entropy(base, V, c, inv_c, inv_T, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_V: tl.constexpr, HAS_ENT: tl.constexpr):
    # HAS_ENT = False: the log-prob-only pass, without the entropy's sum t (entropy returned as 0)
    m = tl.full((), float("-inf"), ACC)  # running max
    s = tl.full((), 0.0, ACC)  # sum exp(u - m)
    t = tl.full((), 0.0, ACC)  # sum exp(u - m) * (u - m)
    nans = tl.full((), 0, tl.int32)  # NaN logits seen: the running max ignores them, the row must not
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=0.0).to(ACC)
        u, th = _scaled(z, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP)
        u = tl.where(inb, u, float("-inf"))
        nans += tl.sum((u != u).to(tl.int32), axis=0)
        m_new = tl.maximum(m, tl.max(u, axis=0))
        # all -inf so far: shift by 0 (every exp is exp(-inf) = 0, s and t stay 0)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        d = u - m_safe
        e = tl.exp(d)
        alpha = tl.exp(m - m_safe)
        if HAS_ENT:
            ed = e * tl.where(e > 0, d, 0.0)  # -inf logits: 0, not 0 * -inf
            # re-centre t on the new max: sum e'(u - m') = alpha * (t + (m - m') * s); s > 0 iff m finite
            corr = (tl.where(s > 0, m, m_safe) - m_safe) * s
            t = alpha * (t + corr) + tl.sum(ed, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    # a row of only -inf (s = 0, m = -inf): lse = -inf and entropy = lse - 0, as the torch backend
    s_safe = tl.where(s > 0, s, 1.0)
    log_s = tl.log(s_safe)
    lse = tl.where(s > 0, m + log_s, m)
    if HAS_ENT:
        entropy = tl.where(s > 0, log_s - t / s_safe, lse)
        entropy = tl.where(nans > 0, float("nan"), entropy)
    else:
        entropy = tl.full((), 0.0, ACC)
    lse = tl.where(nans > 0, float("nan"), lse)  # NaN logits give NaN, as in the torch and C++ rows
    return lse, entropy


@triton.jit
def _target_logit(base, target, V, c, inv_c, inv_T, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr,
                  ACC: tl.constexpr):
    valid = (target >= 0) & (target < V)
    z = tl.load(base + tl.where(valid, target, 0), mask=valid, other=0.0).to(ACC)
    u, th = _scaled(z, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP)
    return tl.where(valid, u, 0.0)


@triton.jit
def _grad_tile(z, offs, target, lse, entropy, dlogp, dentropy, c, inv_c, inv_T,
               HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_DENT: tl.constexpr):
    u, th = _scaled(z, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP)
    p = tl.exp(u - lse)
    g = -dlogp * p
    g = tl.where(offs == target, g + dlogp, g)
    if HAS_DENT:
        ent_term = p * tl.where(p > 0, u - lse + entropy, 0.0)  # -inf logits: 0, not 0 * -inf
        g = g - ent_term * dentropy
    if HAS_TEMP:
        g = g * inv_T
    if HAS_SOFTCAP:
        g = g * (1.0 - th * th)
    return g


# ----------------------------------------------------------------------------- kernels


@triton.jit
def row_stats_kernel(
    z_ptr, stride, tgt_ptr, lse_ptr, ent_ptr, tgl_ptr, V,
    temperature: tl.float64, softcap: tl.float64,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_ENT: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride
    c, inv_c, inv_T = _consts(temperature, softcap, ACC)
    lse, entropy = _row_lse_entropy(base, V, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP, ACC, BLOCK_V, HAS_ENT)
    target = tl.load(tgt_ptr + row)
    tgl = _target_logit(base, target, V, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP, ACC)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, entropy)
    tl.store(tgl_ptr + row, tgl)


@triton.jit
def row_grad_kernel(
    z_ptr, stride, tgt_ptr, lse_ptr, ent_ptr, dlogp_ptr, dent_ptr, V,
    temperature: tl.float64, softcap: tl.float64,
    HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, HAS_DENT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = offs < V
    c, inv_c, inv_T = _consts(temperature, softcap, ACC)
    target = tl.load(tgt_ptr + row)
    lse = tl.load(lse_ptr + row)
    dlogp = tl.load(dlogp_ptr + row)
    if HAS_DENT:
        entropy = tl.load(ent_ptr + row)
        dentropy = tl.load(dent_ptr + row)
    else:
        entropy = lse
        dentropy = lse
    z = tl.load(base + offs, mask=inb, other=0.0)
    g = _grad_tile(z.to(ACC), offs, target, lse, entropy, dlogp, dentropy, c, inv_c, inv_T,
                   HAS_SOFTCAP, HAS_TEMP, HAS_DENT)
    tl.store(base + offs, g.to(z.dtype), mask=inb)


@triton.jit
def row_fused_kernel(
    z_ptr, stride, tgt_ptr, old_ptr, adv_ptr, weight_ptr, ref_ptr, scale_ptr,
    lse_ptr, ent_ptr, tgl_ptr, loss_ptr, dlogp_ptr, V,
    rew_ptr, rw_ptr, seq_ptr, adv_out_ptr, K, B, G,
    temperature: tl.float64, softcap: tl.float64,
    lo: tl.float64, hi: tl.float64, delta: tl.float64, eh: tl.float64, beta: tl.float64,
    tau_pos: tl.float64, tau_neg: tl.float64, reward_eps: tl.float64,
    CAP: tl.constexpr, MAXF: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_TEMP: tl.constexpr, ACC: tl.constexpr,
    LOSS: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_REWARDS: tl.constexpr, SCALE: tl.constexpr,
    RBLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # HAS_REWARDS: the row's advantage from the rewards [B, K] of its group (sequence seq[row]),
    # computed here in the epilogue (advantages_kernel.reward_advantage) and written to adv_out
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride
    c, inv_c, inv_T = _consts(temperature, softcap, ACC)
    # 1. statistics sweep
    lse, entropy = _row_lse_entropy(base, V, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP, ACC, BLOCK_V, True)
    target = tl.load(tgt_ptr + row)
    tgl = _target_logit(base, target, V, c, inv_c, inv_T, HAS_SOFTCAP, HAS_TEMP, ACC)
    # 2. the GRPO epilogue on this row's log-prob
    logp = tgl - lse
    if HAS_OLD:
        old = tl.load(old_ptr + row)
    else:
        old = logp
    if HAS_REWARDS:
        seq = tl.load(seq_ptr + row)
        adv = reward_advantage(rew_ptr, rw_ptr, K, B, G, seq, to_acc(reward_eps, ACC), to_acc(MAXF, ACC),
                               SCALE, ACC, RBLOCK)
        tl.store(adv_out_ptr + row, adv)
    else:
        adv = tl.load(adv_ptr + row)
    wt = tl.load(weight_ptr + row)
    if HAS_KL:
        ref = tl.load(ref_ptr + row)
    else:
        ref = logp
    if HAS_SCALE:
        sc = tl.load(scale_ptr + row)
    else:
        sc = logp
    loss, dlogp = grpo_token_epilogue(
        logp, old, adv, wt, ref, sc,
        to_acc(lo, ACC), to_acc(hi, ACC), to_acc(delta, ACC), to_acc(eh, ACC), to_acc(beta, ACC),
        to_acc(tau_pos, ACC), to_acc(tau_neg, ACC), to_acc(CAP, ACC),
        LOSS, HAS_DELTA, HAS_SCALE, HAS_KL, BIAS_KL,
    )
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, entropy)
    tl.store(tgl_ptr + row, tgl)
    tl.store(loss_ptr + row, loss)
    tl.store(dlogp_ptr + row, dlogp)
    # 3. gradient sweep, in place
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inb = offs < V
        z = tl.load(base + offs, mask=inb, other=0.0)
        g = _grad_tile(z.to(ACC), offs, target, lse, entropy, dlogp, entropy, c, inv_c, inv_T,
                       HAS_SOFTCAP, HAS_TEMP, False)
        tl.store(base + offs, g.to(z.dtype), mask=inb)


# ----------------------------------------------------------------------------- autotuning (GPU)


def _prune_row_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the vocabulary (``common.tiles_for``)."""
    return common.tiles_for(configs, named_args["V"])


# one program per row, looping over V: tile, warps and pipelining stages
ROW_CONFIGS = [
    triton.Config({"BLOCK_V": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_V": 4096}, num_warps=16, num_stages=2),
    triton.Config({"BLOCK_V": 8192}, num_warps=16, num_stages=2),
    triton.Config({"BLOCK_V": 4096}, num_warps=8, num_stages=3),
]
# elementwise (row, tile) grid. No 8192 tile: on a (row, tile) grid a larger tile only halves the
# number of programs, each of which loads three scalars besides its tile, so 4096 loses little;
# and 8192 needs 16 warps for 16 elements per thread, i.e. at most 128 registers per thread, with
# which ptxas spilled (fp64: 84-184 bytes; bf16 / fp16: 8 when V is not a multiple of 16).
GRAD_CONFIGS = [
    triton.Config({"BLOCK_V": 1024}, num_warps=4),
    triton.Config({"BLOCK_V": 2048}, num_warps=8),
    triton.Config({"BLOCK_V": 4096}, num_warps=8),
]

if not INTERPRET:
    _PRUNE = {"early_config_prune": _prune_row_configs}
    row_stats_tuned = triton.autotune(ROW_CONFIGS, key=["V"], prune_configs_by=_PRUNE)(row_stats_kernel)
    # the in-place kernels benchmark on a copy of the chunk, restored after every trial
    row_grad_tuned = triton.autotune(GRAD_CONFIGS, key=["V"], prune_configs_by=_PRUNE,
                                     restore_value=["z_ptr"])(row_grad_kernel)
    row_fused_tuned = triton.autotune(ROW_CONFIGS, key=["V"], prune_configs_by=_PRUNE,
                                      restore_value=["z_ptr"])(row_fused_kernel)
else:
    row_stats_tuned = row_grad_tuned = row_fused_tuned = None


def _launch(plain, tuned, grid, V: int, deterministic: bool, args, kwargs) -> None:
    """Launch ``tuned`` (autotuned BLOCK_V / warps / stages) or ``plain`` with a fixed config.
    ``grid(block_v)`` gives the launch grid."""
    with common.device_guard(args[0]):
        if tuned is not None and common.use_autotune(deterministic):
            tuned[lambda meta: grid(meta["BLOCK_V"])](*args, **kwargs)
            return
        block, launch = common.fixed_row_config(V)
        plain[grid(block)](*args, BLOCK_V=block, **launch, **kwargs)


# ----------------------------------------------------------------------------- host side


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")


def _rowwise(logits: torch.Tensor) -> torch.Tensor:
    """The logits themselves when each row is contiguous, else a contiguous copy."""
    if logits.shape[1] <= 1 or logits.stride(1) == 1:
        return logits
    return logits.contiguous()


def _vec(x: Optional[torch.Tensor], dtype, device) -> Optional[torch.Tensor]:
    if x is None:
        return None
    return x.detach().to(device=device, dtype=dtype).reshape(-1).contiguous()


def _row_flags(options) -> dict:
    temperature, softcap = options.temperature, options.logit_softcap
    return dict(
        temperature=float(temperature), softcap=1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None, HAS_TEMP=float(temperature) != 1.0,
    )


def _empty(n: int, dtype, device, count: int):
    return [common.empty(n, dtype, device) for _ in range(count)]


def row_stats(logits, targets, options, execution, need_entropy: bool = True) -> RowStats:
    _check_logits(logits)
    n, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    lse, ent, tgl = _empty(n, acc, logits.device, 3)
    if n:
        z = _rowwise(logits)
        tg = _vec(targets, torch.int64, z.device)
        _launch(
            row_stats_kernel, row_stats_tuned, lambda b: (n,), V, execution.fixed_tiles,
            (z, z.stride(0), tg, lse, ent, tgl, V),
            dict(ACC=tl_acc(logits.dtype), HAS_ENT=bool(need_entropy), **_row_flags(options)),
        )
    return RowStats(lse=lse, entropy=ent, target_logit=tgl)


def row_grad_(logits, targets, stats, dlogp, dentropy, options, execution) -> None:
    _check_logits(logits)
    n, V = logits.shape
    if n == 0:
        return
    acc = accumulation_dtype(logits.dtype)
    dev = logits.device
    z = _rowwise(logits)
    has_dent = dentropy is not None
    lse_v, dlogp_v = _vec(stats.lse, acc, dev), _vec(dlogp, acc, dev)
    ent_v = _vec(stats.entropy, acc, dev) if has_dent else lse_v
    dent_v = _vec(dentropy, acc, dev) if has_dent else lse_v
    _launch(
        row_grad_kernel, row_grad_tuned, lambda b: (n, triton.cdiv(V, b)), V, execution.fixed_tiles,
        (z, z.stride(0), _vec(targets, torch.int64, dev), lse_v, ent_v, dlogp_v, dent_v, V),
        dict(ACC=tl_acc(logits.dtype), HAS_DENT=has_dent, **_row_flags(options)),
    )
    if z is not logits:
        logits.copy_(z)


def row_fused_(logits, targets, token_inputs, options, execution):
    """Statistics, the per-token GRPO epilogue and the in-place gradient: one launch."""
    if options.importance_sampling_level != "token":
        raise ValueError("row_fused_ needs importance_sampling_level='token'")
    _check_logits(logits)
    n, V = logits.shape
    acc = accumulation_dtype(logits.dtype)
    dev = logits.device
    lse, ent, tgl, loss, dlogp = _empty(n, acc, dev, 5)
    has_rewards = token_inputs.adv is None and token_inputs.rewards is not None
    adv_out = common.empty(n, acc, dev) if has_rewards else None
    if n:
        z = _rowwise(logits)
        tg = _vec(targets, torch.int64, dev)
        old, adv, weight, ref, scale = token_vectors(token_inputs, (n,), acc, dev, options.beta)
        params = epilogue_params(options, logits.dtype)
        # without rewards the reward pointers are never read (HAS_REWARDS is a constexpr): the
        # launch's own vectors stand in, as lse does for old / ref / scale
        rewards = (_reward_vectors(token_inputs, options, acc, dev) if has_rewards
                   else dict(pointers=(lse, lse, tg), flags=_NO_REWARD_FLAGS))
        _launch(
            row_fused_kernel, row_fused_tuned, lambda b: (n,), V, execution.fixed_tiles,
            (z, z.stride(0), tg, lse if old is None else old, lse if adv is None else adv, weight,
             lse if ref is None else ref, lse if scale is None else scale, lse, ent, tgl, loss, dlogp, V,
             *rewards["pointers"], lse if adv_out is None else adv_out),
            dict(HAS_OLD=old is not None, HAS_SCALE=scale is not None, MAXF=float(torch.finfo(acc).max),
                 **rewards["flags"], **_row_flags(options), **params),
        )
        if z is not logits:
            logits.copy_(z)
    return RowStats(lse=lse, entropy=ent, target_logit=tgl), TokenEpilogue(loss, dlogp, adv_out)


_NO_REWARD_FLAGS = dict(K=1, B=1, G=1, HAS_REWARDS=False, SCALE=0, RBLOCK=16, reward_eps=0.0)


def _reward_vectors(token_inputs, options, acc, dev) -> dict:
    """The fused kernel's reward arguments: pointers (rewards [B, K], weights [K], seq [n]) and keywords
    (K, B, G, HAS_REWARDS, SCALE, RBLOCK, reward_eps)."""
    r, w = reward_matrix(token_inputs.rewards, token_inputs.reward_weights, acc, dev)
    B, K = r.shape
    G = int(options.num_generations)
    return dict(pointers=(r, w, _vec(token_inputs.seq, torch.int64, dev)),
                flags=dict(K=K, B=B, G=G, HAS_REWARDS=True, SCALE=SCALE_MODE_CODES[options.scale_rewards],
                           RBLOCK=reward_block(B, G, options.scale_rewards), reward_eps=float(options.reward_eps)))

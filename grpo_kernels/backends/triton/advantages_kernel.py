"""Group-normalized advantages in Triton: ``advantages.normalize_groups``'s formula.

One program per group of G consecutive rewards (NaN = unscorable, skipped): the group's
nan-mean, its unbiased nan-std (NaN with fewer than two scorable rewards) for
``scale_rewards="group"``, then ``nan_to_num((r - mean) / (std + eps))``. For "batch"
a one-program kernel first computes the whole batch's unbiased nan-std. All in ACC
(fp64 for fp64 rewards, else fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.backends.triton import common
from grpo_kernels.backends.triton.common import INTERPRET, next_pow2, tl_acc, to_acc
from grpo_kernels.epilogue import SCALE_MODE_CODES, accumulation_dtype

#: largest tile of the group kernels (groups / batches longer than this are looped over)
MAX_BLOCK = 4096 if INTERPRET else 1024

# STD modes
STD_GROUP, STD_GIVEN, STD_ZERO, STD_NONE = 0, 1, 2, 3
# reward_advantage's MODE: the contract's scale-mode codes (csrc/row_pass.h's ScaleMode)
SCALE_GROUP = tl.constexpr(SCALE_MODE_CODES["group"])
SCALE_BATCH = tl.constexpr(SCALE_MODE_CODES["batch"])
SCALE_NONE = tl.constexpr(SCALE_MODE_CODES["none"])


@triton.jit
def _reward_values(ptr, w_ptr, K, idx, m, COMBINE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The combined rewards of rows ``idx`` (NaN where not ``m``): ``ptr`` [B] as given, or with
    COMBINE ``nansum_k w_k r[idx, k]`` of rewards ``ptr`` [B, K] and weights ``w_ptr`` [K], NaN for a
    row of only NaN rewards (an unscorable completion: ``epilogue.combine_rewards``)."""
    if COMBINE:
        total = tl.zeros([BLOCK], dtype=ACC)
        scored = tl.zeros([BLOCK], dtype=tl.int32)
        for k in range(0, K):
            x = tl.load(ptr + idx * K + k, mask=m, other=float("nan")).to(ACC)
            p = x * tl.load(w_ptr + k).to(ACC)
            total += tl.where(p == p, p, 0.0)
            scored += (x == x).to(tl.int32)
        return tl.where(scored > 0, total, float("nan"))
    else:
        return tl.load(ptr + idx, mask=m, other=float("nan"))


@triton.jit
def _nan_mean_count(ptr, w_ptr, K, start, length, COMBINE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.full((), 0.0, ACC)
    count = tl.full((), 0.0, ACC)
    for k in range(0, length, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = _reward_values(ptr, w_ptr, K, start + offs, offs < length, COMBINE, ACC, BLOCK)
        ok = x == x
        total += tl.sum(tl.where(ok, x, 0.0), axis=0)
        count += tl.sum(ok.to(ACC), axis=0)
    # NaN when nothing is scorable (0 / 0, without the division)
    return tl.where(count > 0, total / tl.where(count > 0, count, 1.0), float("nan")), count


@triton.jit
def _nan_std(ptr, w_ptr, K, start, length, mean, count, COMBINE: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    """trl nanstd: sqrt(nanmean((x - mean)^2) * n / (n - 1)), NaN when n <= 1."""
    ssq = tl.full((), 0.0, ACC)
    for k in range(0, length, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = _reward_values(ptr, w_ptr, K, start + offs, offs < length, COMBINE, ACC, BLOCK)
        d = x - mean
        ssq += tl.sum(tl.where(x == x, d * d, 0.0), axis=0)
    variance = ssq / tl.where(count > 0, count, 1.0)  # count = 0: correction below gives NaN
    correction = tl.where(count > 1, count / tl.where(count > 1, count - 1.0, 1.0), float("nan"))
    return tl.sqrt(variance * correction)


@triton.jit
def _advantage(a, denom, big, DIVIDE: tl.constexpr):
    """nan_to_num(a / denom) (without DIVIDE: nan_to_num(a)): NaN -> 0, +-inf -> +-finfo.max."""
    if DIVIDE:
        # a / denom, with IEEE's x / 0 (+-inf, or NaN for 0 / 0) spelled out
        q = a / tl.where(denom == 0, 1.0, denom)
        by_zero = tl.where(a > 0, float("inf"), tl.where(a < 0, float("-inf"), float("nan")))
        a = tl.where(denom == 0, by_zero, q)
    a = tl.where(a != a, 0.0, a)
    a = tl.where(a == float("inf"), big, a)
    a = tl.where(a == float("-inf"), -big, a)
    return a


@triton.jit
def reward_advantage(r_ptr, w_ptr, K, B, G, s, eps, big, MODE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    """The advantage of sequence ``s`` from rewards [B, K] and weights [K]: ``normalize_groups`` of
    the combined rewards (MODE: ``epilogue.SCALE_MODE_CODES``, csrc/row_pass.h's ScaleMode), for
    the fused row kernel's epilogue. ``eps`` and ``big`` (finfo.max) in ACC."""
    start = (s // G) * G
    mean, count = _nan_mean_count(r_ptr, w_ptr, K, start, G, True, ACC, BLOCK)
    lane = tl.arange(0, BLOCK)
    mine = _reward_values(r_ptr, w_ptr, K, s + lane, lane < 1, True, ACC, BLOCK)
    x = tl.sum(tl.where(lane == 0, mine, 0.0), axis=0)  # (NaN for an unscorable s: advantage 0)
    if MODE == SCALE_GROUP:
        sigma = _nan_std(r_ptr, w_ptr, K, start, G, mean, count, True, ACC, BLOCK)
        sigma = tl.where(G > 1, sigma, 0.0)
    elif MODE == SCALE_BATCH:
        bmean, bcount = _nan_mean_count(r_ptr, w_ptr, K, 0, B, True, ACC, BLOCK)
        sigma = _nan_std(r_ptr, w_ptr, K, 0, B, bmean, bcount, True, ACC, BLOCK)
        sigma = tl.where(B > 1, sigma, 0.0)
    else:
        sigma = tl.full((), 0.0, ACC)
    return _advantage(x - mean, sigma + eps, big, MODE != SCALE_NONE)


@triton.jit
def batch_std_kernel(r_ptr, std_ptr, B, ACC: tl.constexpr, BLOCK: tl.constexpr):
    mean, count = _nan_mean_count(r_ptr, r_ptr, 1, 0, B, False, ACC, BLOCK)
    tl.store(std_ptr, _nan_std(r_ptr, r_ptr, 1, 0, B, mean, count, False, ACC, BLOCK))


@triton.jit
def group_normalize_kernel(r_ptr, out_ptr, std_ptr, G, eps: tl.float64, MAXF: tl.constexpr,
                           MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * G
    mean, count = _nan_mean_count(r_ptr, r_ptr, 1, start, G, False, ACC, BLOCK)
    if MODE == 0:
        denom = _nan_std(r_ptr, r_ptr, 1, start, G, mean, count, False, ACC, BLOCK) + to_acc(eps, ACC)
    elif MODE == 1:
        denom = tl.load(std_ptr) + to_acc(eps, ACC)
    else:
        denom = tl.full((), 0.0, ACC) + to_acc(eps, ACC)
    big = to_acc(MAXF, ACC)
    for k in range(0, G, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < G
        x = tl.load(r_ptr + start + offs, mask=m, other=0.0)
        tl.store(out_ptr + start + offs, _advantage(x - mean, denom, big, MODE != 3), mask=m)


def reward_block(B: int, G: int, scale_rewards: str) -> int:
    """The tile of ``reward_advantage``: a group's rows, or the batch's under "batch"."""
    return min(MAX_BLOCK, max(16, next_pow2(B if scale_rewards == "batch" else G)))


def group_normalize(rewards: torch.Tensor, num_generations: int, scale_rewards, eps: float):
    """Advantages [B] in the accumulation dtype. Arguments as checked by
    ``advantages.group_advantages``: rewards [B] float, G dividing B, scale_rewards one of
    "group", "batch", "none", eps >= 0."""
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.detach().to(acc).contiguous()
    out = common.empty(r.shape, acc, r.device)
    B, G = r.shape[0], int(num_generations)
    if B == 0:
        return out
    std = torch.empty(1, dtype=acc, device=r.device)
    if scale_rewards == "group":
        mode = STD_GROUP if G > 1 else STD_ZERO
    elif scale_rewards == "batch":
        mode = STD_GIVEN if B > 1 else STD_ZERO
    else:
        mode = STD_NONE
    cap = MAX_BLOCK
    with common.device_guard(r):
        if mode == STD_GIVEN:
            batch_std_kernel[(1,)](r, std, B, ACC=tl_acc(acc), BLOCK=min(cap, max(16, next_pow2(B))))
        group_normalize_kernel[(B // G,)](
            r, out, std, G, float(eps), MAXF=float(torch.finfo(acc).max), MODE=mode, ACC=tl_acc(acc),
            BLOCK=min(cap, max(16, next_pow2(G))),
        )
    return out

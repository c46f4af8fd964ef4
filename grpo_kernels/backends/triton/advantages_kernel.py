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

from grpo_kernels.backends.triton import _common
from grpo_kernels.backends.triton._common import INTERPRET, acc_dtype, next_pow2, tl_acc, to_acc

#: largest tile of the group kernels (groups / batches longer than this are looped over)
MAX_BLOCK = 4096 if INTERPRET else 1024

# STD modes
STD_GROUP, STD_GIVEN, STD_ZERO, STD_NONE = 0, 1, 2, 3


@triton.jit
def _nan_mean_count(ptr, start, length, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.full((), 0.0, ACC)
    count = tl.full((), 0.0, ACC)
    for k in range(0, length, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = tl.load(ptr + start + offs, mask=offs < length, other=float("nan"))
        ok = x == x
        total += tl.sum(tl.where(ok, x, 0.0), axis=0)
        count += tl.sum(ok.to(ACC), axis=0)
    # NaN when nothing is scorable (0 / 0, without the division)
    return tl.where(count > 0, total / tl.where(count > 0, count, 1.0), float("nan")), count


@triton.jit
def _nan_std(ptr, start, length, mean, count, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """trl nanstd: sqrt(nanmean((x - mean)^2) * n / (n - 1)), NaN when n <= 1."""
    ssq = tl.full((), 0.0, ACC)
    for k in range(0, length, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        x = tl.load(ptr + start + offs, mask=offs < length, other=float("nan"))
        d = x - mean
        ssq += tl.sum(tl.where(x == x, d * d, 0.0), axis=0)
    variance = ssq / tl.where(count > 0, count, 1.0)  # count = 0: correction below gives NaN
    correction = tl.where(count > 1, count / tl.where(count > 1, count - 1.0, 1.0), float("nan"))
    return tl.sqrt(variance * correction)


@triton.jit
def batch_std_kernel(r_ptr, std_ptr, B, ACC: tl.constexpr, BLOCK: tl.constexpr):
    mean, count = _nan_mean_count(r_ptr, 0, B, ACC, BLOCK)
    tl.store(std_ptr, _nan_std(r_ptr, 0, B, mean, count, ACC, BLOCK))


@triton.jit
def group_normalize_kernel(r_ptr, out_ptr, std_ptr, G, eps: tl.float64, MAXF: tl.constexpr,
                           MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * G
    mean, count = _nan_mean_count(r_ptr, start, G, ACC, BLOCK)
    if MODE == 0:
        denom = _nan_std(r_ptr, start, G, mean, count, ACC, BLOCK) + to_acc(eps, ACC)
    elif MODE == 1:
        denom = tl.load(std_ptr) + to_acc(eps, ACC)
    else:
        denom = tl.full((), 0.0, ACC) + to_acc(eps, ACC)
    big = to_acc(MAXF, ACC)
    for k in range(0, G, BLOCK):
        offs = k + tl.arange(0, BLOCK)
        m = offs < G
        x = tl.load(r_ptr + start + offs, mask=m, other=0.0)
        a = x - mean
        if MODE != 3:
            # a / denom, with IEEE's x / 0 (+-inf, or NaN for 0 / 0) spelled out
            q = a / tl.where(denom == 0, 1.0, denom)
            by_zero = tl.where(a > 0, float("inf"), tl.where(a < 0, float("-inf"), float("nan")))
            a = tl.where(denom == 0, by_zero, q)
        # nan_to_num(nan=0): NaN -> 0, +-inf -> +-finfo.max
        a = tl.where(a != a, 0.0, a)
        a = tl.where(a == float("inf"), big, a)
        a = tl.where(a == float("-inf"), -big, a)
        tl.store(out_ptr + start + offs, a, mask=m)


def group_normalize(rewards: torch.Tensor, num_generations: int, scale_rewards, eps: float):
    """Advantages [B] in the accumulation dtype. Arguments as checked by
    ``advantages.group_advantages``: rewards [B] float, G dividing B, scale_rewards one of
    "group", "batch", "none", eps >= 0."""
    acc = acc_dtype(rewards.dtype)
    r = rewards.detach().to(acc).contiguous()
    out = _common.empty(r.shape, acc, r.device)
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
    with _common.device_guard(r):
        if mode == STD_GIVEN:
            batch_std_kernel[(1,)](r, std, B, ACC=tl_acc(acc), BLOCK=min(cap, max(16, next_pow2(B))))
        group_normalize_kernel[(B // G,)](
            r, out, std, G, float(eps), MAXF=float(torch.finfo(acc).max), MODE=mode, ACC=tl_acc(acc),
            BLOCK=min(cap, max(16, next_pow2(G))),
        )
    return out

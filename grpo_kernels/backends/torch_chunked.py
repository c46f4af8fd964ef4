"""Portable row pass in torch ops: any device, any float dtype.

Works on one chunk of raw logits at a time; its temporaries are a few fp32 copies of
the chunk, which ``temp_bytes_per_elem`` tells the chunk sizing about. No fused kernel:
the sweep composes ``row_stats``, ``objective.token_epilogue`` and ``row_grad_``.
"""
from __future__ import annotations

from typing import Optional

import torch

from grpo_kernels.backends.base import RowBackend, RowStats, accumulation_dtype


def scaled_logits(logits: torch.Tensor, temperature: float, softcap: Optional[float]) -> torch.Tensor:
    """u = softcap(z) / T in the accumulation dtype (a new [n, V] tensor)."""
    u = logits.to(accumulation_dtype(logits.dtype))
    if softcap is not None:
        u = torch.tanh(u / softcap) * softcap
    return u / temperature if temperature != 1.0 else u


def _gather_targets(u: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets >= 0
    picked = u.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


class TorchRowBackend(RowBackend):
    name = "torch"
    # row_stats' peak: the shifted logits (fp32), p (fp32) and a bool mask next to the chunk.
    # Measured (VmHWM, N=4096, H=1024, V=32768 fp32): 25 bytes per element beyond the chunk's
    # own 4 before 2026-12-01, when p > 0, p * us, zeros_like(us) and the where() were all
    # alive at once; 9 since (bench/RESULTS.md, "Chunk sizing from measurement")
    temp_bytes_per_elem = 9

    def supports(self, device, dtype):
        if not torch.empty((), dtype=dtype).is_floating_point():
            return f"dtype {dtype} is not a floating dtype"
        return None

    def row_stats(self, logits, targets, options, execution, need_entropy=True):
        u = scaled_logits(logits, options.temperature, options.logit_softcap)
        target_logit = _gather_targets(u, targets)
        if not need_entropy:  # the log-prob-only pass: no softmax, no p * u
            lse = torch.logsumexp(u, dim=-1)
            return RowStats(lse=lse, entropy=torch.zeros_like(lse), target_logit=target_logit)
        # entropy = lse - sum(p * u) on max-shifted logits: unshifted, both terms are of the
        # size of |u| and p's rounding (exp of u - lse) is amplified by |u| (fp32 logits of
        # 2e5 with a runner-up 3 nats behind gave an entropy of -342)
        m = u.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of only -inf stays -inf
        us = u.sub_(m) if u.data_ptr() != logits.data_ptr() else u - m
        lse_s = torch.logsumexp(us, dim=-1)
        p = torch.sub(us, lse_s.unsqueeze(1)).exp_()
        # sum(p * u) with -inf logits masked out of the product (p = 0 there), in place: p, us and
        # one bool mask are the only [rows, V] temporaries
        off = (p > 0).logical_not_()
        pu = p.mul_(us).masked_fill_(off, 0.0).sum(-1)
        del off, p
        return RowStats(lse=lse_s + m.squeeze(1), entropy=lse_s - pu, target_logit=target_logit)

    def row_grad_(self, logits, targets, stats, dlogp, dentropy, options, execution):
        temperature, softcap = options.temperature, options.logit_softcap
        lse, entropy = stats.lse, stats.entropy
        u = scaled_logits(logits, temperature, softcap)
        g = torch.sub(u, lse.unsqueeze(1)).exp_()  # p
        if dentropy is not None:
            # dH/du = -p (u - lse + H); computed before p is turned into the logp part
            ent_term = g * (u - lse.unsqueeze(1) + entropy.unsqueeze(1))
            ent_term = torch.where(g > 0, ent_term, torch.zeros_like(ent_term))
        g.mul_(-dlogp.unsqueeze(1))
        valid = targets >= 0
        rows = torch.nonzero(valid).squeeze(1)
        g[rows, targets[rows]] += dlogp[rows]
        if dentropy is not None:
            g.sub_(ent_term * dentropy.unsqueeze(1))
            del ent_term
        if temperature != 1.0:
            g.div_(temperature)
        if softcap is not None:
            t = torch.tanh(logits.to(g.dtype) / softcap)
            g.mul_(1 - t * t)
        logits.copy_(g)


BACKEND = TorchRowBackend()

"""Portable row pass in torch ops: any device, any float dtype.

Works on one chunk of raw logits at a time, on the CPU in slabs of rows (``slab_elems``); its
temporaries are a few fp32 copies of a slab (elsewhere of the chunk, which ``temp_bytes`` tells
the chunk sizing about). No fused kernel:
the sweep composes ``row_stats``, ``epilogue.token_epilogue`` and ``row_grad_``.
"""
from __future__ import annotations

from typing import Optional

import torch

from grpo_kernels.backends import torch_divergence
from grpo_kernels.backends.base import RowBackend, RowStats, slab_bounds
from grpo_kernels.epilogue import accumulation_dtype


def scaled_logits(logits: torch.Tensor, temperature: float, softcap: Optional[float],
                  copy: bool = False) -> torch.Tensor:
    """u = softcap(z) / T in the accumulation dtype, [n, V]: ``logits`` itself when it is already
    in that dtype and neither applies, unless ``copy`` (then always a new tensor, free to modify)."""
    u = logits.to(accumulation_dtype(logits.dtype), copy=copy)
    if softcap is not None:
        u = torch.tanh(u / softcap) * softcap
    return u / temperature if temperature != 1.0 else u


def _gather_targets(u: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets >= 0
    picked = u.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def scaled_chain_into_(g: torch.Tensor, logits: torch.Tensor, temperature: float, softcap: Optional[float]) -> None:
    """``logits`` = g * du/dz for the gradient ``g`` with respect to u = softcap(z) / T (``g`` [n, V]
    is clobbered): the temperature's 1 / T, then the softcap's 1 - tanh(z / c)^2."""
    if temperature != 1.0:
        g.div_(temperature)
    if softcap is not None:
        t = torch.tanh(logits.to(g.dtype) / softcap)
        g.mul_(1 - t * t)
    logits.copy_(g)


class TorchRowBackend(RowBackend):
    name = "torch"
    #: logits per slab: on the CPU, row_stats and row_grad_ work through a chunk in slabs of
    #: about this many logits (32 rows at V=32768), so their fp32 temporaries (the shifted
    #: logits, p, a bool mask, the entropy term: 9-13 bytes per logit) stay ~13 MiB whatever the
    #: chunk and the chunk rule sizes a chunk by its logits alone, as for the fused backends.
    #: Per-row results do not depend on the slab (each op is elementwise or a per-row
    #: reduction; the batch-invariance tests check it bitwise). Measured at N=4096, H=1024,
    #: V=32768 fp32 (bench/RESULTS.md, "The torch backend in slabs"). Other devices take the
    #: whole chunk at once: a slab loop is a kernel launch per op per slab there.
    slab_elems = {"cpu": 2**20}
    #: bytes of temporaries per logit on a device without a slab size (the whole chunk is one
    #: slab): row_stats' peak (the shifted logits, p and a bool mask next to the chunk), measured
    #: (VmHWM, N=4096, H=1024, V=32768 fp32); 25 before 2026-12-01, when p > 0, p * us,
    #: zeros_like(us) and the where() were all alive at once
    temp_bytes_per_elem = 9

    def temp_bytes(self, device) -> int:
        return 0 if torch.device(device).type in self.slab_elems else self.temp_bytes_per_elem

    def divergence_temp_bytes(self, device) -> int:
        return torch_divergence.temp_bytes(device)

    divergence_vocab_parallel = True

    def divergence_rows_(self, zs, zt, spec, coef, execution, out=None, vocab=None):
        return torch_divergence.divergence_rows_(zs, zt, spec, coef, execution, out, vocab)

    def supports(self, device, dtype):
        if not torch.empty((), dtype=dtype).is_floating_point():
            return f"dtype {dtype} is not a floating dtype"
        return None

    def _slabs(self, logits):
        """[start, end) row ranges of the slabs of one chunk."""
        return slab_bounds(logits.shape[0], logits.shape[1], self.slab_elems.get(logits.device.type))

    def row_stats(self, logits, targets, options, execution, need_entropy=True):
        out = RowStats.empty(logits.shape[0], logits.dtype, logits.device)
        for s, e in self._slabs(logits):
            out.put_(s, e, self._slab_stats(logits[s:e], targets[s:e], options, need_entropy))
        return out

    def row_grad_(self, logits, targets, stats, dlogp, dentropy, options, execution):
        for s, e in self._slabs(logits):
            self._slab_grad_(logits[s:e], targets[s:e], stats.lse[s:e], stats.entropy[s:e], dlogp[s:e],
                             None if dentropy is None else dentropy[s:e], options)

    @staticmethod
    def _slab_stats(logits, targets, options, need_entropy):
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

    @staticmethod
    def _slab_grad_(logits, targets, lse, entropy, dlogp, dentropy, options):
        temperature, softcap = options.temperature, options.logit_softcap
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
        scaled_chain_into_(g, logits, temperature, softcap)


BACKEND = TorchRowBackend()

"""The divergence row pass in torch ops (the math: ``grpo_kernels.divergence``): both heads'
logits of one chunk of rows in, the per-row divergence, the student's entropy and the
divergence's gradient with respect to the student's raw logits out.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from grpo_kernels.backends.base import slab_bounds
from grpo_kernels.divergence import DivergenceSpec, HeadTransform
from grpo_kernels.epilogue import accumulation_dtype

#: logits per slab on the CPU (8 rows at V=32768): each slab's temporaries (both heads'
#: transformed logits, the two probability vectors and the gradient: ~6 accumulation-dtype
#: copies) stay ~6 MiB fp32 whatever the chunk, so the chunk rule counts the two logit buffers
#: alone, and the ~20 passes over a slab mostly hit the cache: one thread, 256 x 32768 fp32 rows,
#: beta 0, measured 0.147 s of CPU time in slabs of 2^20 logits, 0.048 s in 2^18, 0.055 s in 2^16.
#: Per-row results do not depend on the slab (every op is elementwise or a row reduction).
SLAB_ELEMS = {"cpu": 2**18}
#: bytes of temporaries per logit of a whole chunk on a device without a slab size (fp32):
#: u_s, u_t, p, q, the gradient and one more (log m, or the log-ratio) alive at once
TEMP_BYTES_PER_ELEM = 24


def temp_bytes(device) -> int:
    """Bytes of temporaries per logit of a chunk the chunk rule must count on ``device``."""
    return 0 if torch.device(device).type in SLAB_ELEMS else TEMP_BYTES_PER_ELEM


def _transform(head: HeadTransform, z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """u [n, V] in ``acc`` (a new tensor; ``z`` is not modified)."""
    z = z.to(acc)
    if head.softcap is None:  # one pass: z * (scale / temperature)
        return torch.mul(z, head.scale / head.temperature)
    return torch.mul(z, head.scale / head.softcap).tanh_().mul_(head.softcap / head.temperature)


def _chain_(head: HeadTransform, g: torch.Tensor, z: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> None:
    """out = coef * g * du/dz, du/dz = (1 - tanh(z * scale / c)^2) * scale / temperature; ``coef``
    [] or [n, 1]. ``g`` is clobbered; ``out`` may be ``z``."""
    if head.softcap is not None:
        t = torch.mul(z.to(g.dtype), head.scale / head.softcap).tanh_()
        g.mul_(t.mul_(t).neg_().add_(1.0))
    factor = coef * (head.scale / head.temperature)
    if out.dtype == g.dtype:  # the last multiply writes the output: no extra pass for the copy
        torch.mul(g, factor, out=out)
    else:
        out.copy_(g.mul_(factor))


def divergence_rows_(zs: torch.Tensor, zt: torch.Tensor, spec: DivergenceSpec, coef: Optional[torch.Tensor],
                     execution=None, out: Optional[torch.Tensor] = None,
                     vocab=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence and student entropy, [n] each in the accumulation dtype, of the
    student's raw logits ``zs`` [n, V] and the teacher's ``zt`` [n, V] (any float dtypes).

    ``coef`` (a [] or [n] tensor: dLoss/dD per row) given: ``coef * dD/dz_s``, the gradient of
    the loss with respect to the student's raw logits, is written into ``out`` [n, V] (None: over
    ``zs``). ``execution`` is unused: every reduction order here is fixed by the slab.
    ``vocab`` (a ``collective.VocabGroup``): ``zs``/``zt`` are this rank's vocabulary slice of
    both heads; the row sums are all-reduced over the group (slabs sized by the global V, so
    that every rank makes the same collectives).
    """
    acc = accumulation_dtype(zs.dtype)
    out = zs if out is None else out
    n = zs.shape[0]
    div = torch.empty(n, dtype=acc, device=zs.device)
    ent = torch.empty(n, dtype=acc, device=zs.device)
    width = zs.shape[1] if vocab is None else vocab.vocab_size
    for s, e in slab_bounds(n, width, SLAB_ELEMS.get(zs.device.type)):
        c = None if coef is None else (coef if coef.dim() == 0 else coef[s:e])
        div[s:e], ent[s:e] = _slab_(zs[s:e], zt[s:e], spec, c, out[s:e], vocab)
    return div, ent


def _log_softmax_pair_(u_s: torch.Tensor, u_t: torch.Tensor, vocab) -> None:
    """Both heads' u - logsumexp(u) per row, in place; the logsumexp over every rank's slice
    under ``vocab``."""
    lse = torch.stack([torch.logsumexp(u_s, dim=-1), torch.logsumexp(u_t, dim=-1)])
    if vocab is not None:
        lse = vocab.logsumexp(lse)
    u_s.sub_(lse[0].unsqueeze(1))
    u_t.sub_(lse[1].unsqueeze(1))


def _row_sums(parts, vocab):
    """The per-row sums ``parts`` ([n] each), summed over the ranks' slices under ``vocab``."""
    if vocab is None:
        return parts
    return tuple(vocab.sum_(torch.stack(parts)).unbind(0))


def _slab_(zs, zt, spec: DivergenceSpec, coef, out, vocab=None):
    acc = accumulation_dtype(zs.dtype)
    beta = spec.beta
    log_p, log_q = _transform(spec.student, zs, acc), _transform(spec.teacher, zt, acc)
    _log_softmax_pair_(log_p, log_q, vocab)
    p = log_p.exp()
    neg_entropy = (p * log_p).sum(-1)
    if beta == 0.0:  # forward KL(q || p)
        q = log_q.exp()
        neg_entropy, div = _row_sums((neg_entropy, (q * (log_q - log_p)).sum(-1)), vocab)
        g = p.sub_(q) if coef is not None else None
    elif beta == 1.0:  # reverse KL(p || q)
        ratio = log_p.sub_(log_q)  # log p - log q (log_p is not needed after this)
        neg_entropy, div = _row_sums((neg_entropy, (p * ratio).sum(-1)), vocab)
        g = p.mul_(ratio.sub_(div.unsqueeze(1))) if coef is not None else None
    else:  # generalized JSD with m = (1 - beta) p + beta q
        log_m = torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))
        q = log_q.exp()
        kl_q = (q * log_q.sub_(log_m)).sum(-1)
        gap = log_p.sub_(log_m)  # log p - log m
        neg_entropy, kl_q, kl_p = _row_sums((neg_entropy, kl_q, (p * gap).sum(-1)), vocab)
        div = beta * kl_q + (1.0 - beta) * kl_p
        g = p.mul_(gap.sub_(kl_p.unsqueeze(1))).mul_(1.0 - beta) if coef is not None else None
    if g is not None:
        _chain_(spec.student, g, zs, coef.unsqueeze(-1) if coef.dim() == 1 else coef, out)
    return div, -neg_entropy

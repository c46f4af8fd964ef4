"""The divergence row pass in torch ops: both heads' logits of one chunk of rows in, the per-row
generalized JSD, the student's entropy and the divergence's gradient with respect to the
student's raw logits out (the gradient written over the student's chunk, in place).

Each head's raw logits ``z`` [n, V] are transformed as TRL 1.16's chunked divergence does:
``y = z * scale``, then ``y = c * tanh(y / c)`` with a softcap ``c``, then ``u = y / temperature``.
With ``log p = u_s - logsumexp(u_s)`` (student), ``log q = u_t - logsumexp(u_t)`` (teacher) and
``m = (1 - beta) p + beta q``:

- ``beta = 0``: ``D = KL(q || p) = sum q (log q - log p)``, ``dD/du_s = p - q``;
- ``beta = 1``: ``D = KL(p || q) = sum p (log p - log q)``, ``dD/du_s = p (log p - log q - D)``;
- otherwise: ``D = beta KL(q || m) + (1 - beta) KL(p || m)``,
  ``dD/du_s = (1 - beta) p (log p - log m - KL(p || m))`` (the terms through ``m`` cancel);

then ``dD/dz_s = dD/du_s / temperature * (1 - tanh(y / c)^2) * scale``. The endpoints are their
own cases: the mixture form's gradient has the wrong limit there (its ``(1 - beta)`` factor or
``m = p``). Everything runs in the accumulation dtype (fp32; fp64 for fp64 student logits).
The student's entropy is ``-sum p log p`` of the transformed (temperature-scaled) logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from grpo_kernels.backends.torch_chunked import slab_bounds
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


@dataclass(frozen=True)
class HeadTransform:
    """One head's logit transform: scale, then softcap (None: none), then temperature."""

    scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    def apply(self, z: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """u [n, V] in ``acc`` (a new tensor; ``z`` is not modified)."""
        z = z.to(acc)
        if self.softcap is None:  # one pass: z * (scale / temperature)
            return torch.mul(z, self.scale / self.temperature)
        return torch.mul(z, self.scale / self.softcap).tanh_().mul_(self.softcap / self.temperature)

    def chain_(self, g: torch.Tensor, z: torch.Tensor, coef: torch.Tensor) -> None:
        """z = coef * g * du/dz, written into ``z``: du/dz = (1 - tanh(z * scale / c)^2) * scale /
        temperature; ``coef`` [] or [n, 1]. ``g`` is clobbered."""
        if self.softcap is not None:
            t = torch.mul(z.to(g.dtype), self.scale / self.softcap).tanh_()
            g.mul_(t.mul_(t).neg_().add_(1.0))
        factor = coef * (self.scale / self.temperature)
        if z.dtype == g.dtype:  # the last multiply writes the chunk: no extra pass for the copy
            torch.mul(g, factor, out=z)
        else:
            z.copy_(g.mul_(factor))


@dataclass(frozen=True)
class DivergenceSpec:
    """The divergence of a distillation call: ``beta`` in [0, 1] and each head's transform
    (the temperature is the same on both sides, as in TRL)."""

    beta: float
    student: HeadTransform
    teacher: HeadTransform


def temp_bytes(device) -> int:
    """Bytes of temporaries per logit of a chunk the chunk rule must count on ``device``."""
    return 0 if torch.device(device).type in SLAB_ELEMS else TEMP_BYTES_PER_ELEM


def divergence_rows_(zs: torch.Tensor, zt: torch.Tensor, spec: DivergenceSpec,
                     coef: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence and student entropy, [n] each in the accumulation dtype, of the
    student's raw logits ``zs`` [n, V] and the teacher's ``zt`` [n, V] (any float dtypes).

    ``coef`` (a [] or [n] tensor: dLoss/dD per row) given: ``zs`` is overwritten with
    ``coef * dD/dz_s``, the gradient of the loss with respect to the student's raw logits.
    """
    acc = accumulation_dtype(zs.dtype)
    n = zs.shape[0]
    div = torch.empty(n, dtype=acc, device=zs.device)
    ent = torch.empty(n, dtype=acc, device=zs.device)
    for s, e in slab_bounds(n, zs.shape[1], SLAB_ELEMS.get(zs.device.type)):
        d, h = _slab_(zs[s:e], zt[s:e], spec, None if coef is None else (coef if coef.dim() == 0 else coef[s:e]))
        div[s:e], ent[s:e] = d, h
    return div, ent


def _log_softmax_(u: torch.Tensor) -> torch.Tensor:
    """u - logsumexp(u) per row, in place."""
    return u.sub_(torch.logsumexp(u, dim=-1, keepdim=True))


def _slab_(zs, zt, spec: DivergenceSpec, coef):
    acc = accumulation_dtype(zs.dtype)
    beta = spec.beta
    log_p = _log_softmax_(spec.student.apply(zs, acc))
    log_q = _log_softmax_(spec.teacher.apply(zt, acc))
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    if beta == 0.0:  # forward KL(q || p)
        q = log_q.exp()
        div = (q * (log_q - log_p)).sum(-1)
        g = p.sub_(q) if coef is not None else None
    elif beta == 1.0:  # reverse KL(p || q)
        ratio = log_p.sub_(log_q)  # log p - log q (log_p is not needed after this)
        div = (p * ratio).sum(-1)
        g = p.mul_(ratio.sub_(div.unsqueeze(1))) if coef is not None else None
    else:  # generalized JSD with m = (1 - beta) p + beta q
        log_m = torch.logaddexp(log_p + math.log(1.0 - beta), log_q + math.log(beta))
        q = log_q.exp()
        kl_q = (q * log_q.sub_(log_m)).sum(-1)
        gap = log_p.sub_(log_m)  # log p - log m
        kl_p = (p * gap).sum(-1)
        div = beta * kl_q + (1.0 - beta) * kl_p
        g = p.mul_(gap.sub_(kl_p.unsqueeze(1))).mul_(1.0 - beta) if coef is not None else None
    if g is not None:
        spec.student.chain_(g, zs, coef.unsqueeze(-1) if coef.dim() == 1 else coef)
    return div, entropy

"""The divergence contract: what a distillation (or exact-KL) row pass takes, in one place that
the torch, Triton and C++ row passes all read.

A divergence row pass gets both heads' raw logits of one chunk of rows, ``zs`` (the student, or
the policy) and ``zt`` (the teacher, or the reference), [n, V] each. Each head's logits are
transformed as TRL 1.16's chunked divergence does: ``y = z * scale``, then ``y = c * tanh(y / c)``
with a softcap ``c``, then ``u = y / temperature``. With ``log p = u_s - logsumexp(u_s)`` (student),
``log q = u_t - logsumexp(u_t)`` (teacher) and ``m = (1 - beta) p + beta q``:

- ``beta = 0``: ``D = KL(q || p) = sum q (log q - log p)``, ``dD/du_s = p - q``;
- ``beta = 1``: ``D = KL(p || q) = sum p (log p - log q)``, ``dD/du_s = p (log p - log q - D)``;
- otherwise: ``D = beta KL(q || m) + (1 - beta) KL(p || m)``,
  ``dD/du_s = (1 - beta) p (log p - log m - KL(p || m))`` (the terms through ``m`` cancel);

then ``dD/dz_s = dD/du_s / temperature * (1 - tanh(y / c)^2) * scale``. The endpoints are their
own cases: the mixture form's gradient has the wrong limit there (its ``(1 - beta)`` factor or
``m = p``). Everything runs in the accumulation dtype (``epilogue.accumulation_dtype``: fp32;
fp64 for fp64 student logits). The student's entropy is ``-sum p log p``.

A backend's ``divergence_rows_(zs, zt, spec, coef, execution, out=None, vocab=None)`` returns
``(D, entropy)``, [n] each in the accumulation dtype; with ``coef`` (dLoss/dD, a [] or [n] tensor)
it writes ``coef * dD/dz_s`` into ``out`` ([n, V], the student's dtype; None: over ``zs``).
``vocab`` (a ``collective.VocabGroup``): the chunk is one rank's vocabulary slice of both heads and
the row sums are combined over the ranks; only a backend with ``divergence_vocab_parallel`` takes
one (``RowBackend.require_whole_vocabulary`` refuses it elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class HeadTransform:
    """One head's logit transform: scale, then softcap (None: none), then temperature."""

    scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    def kernel_args(self) -> Tuple[float, float, float]:
        """(scale, softcap, temperature) as kernels take them: softcap 0.0 means none."""
        return (float(self.scale), 0.0 if self.softcap is None else float(self.softcap), float(self.temperature))


@dataclass(frozen=True)
class DivergenceSpec:
    """The divergence of a call: ``beta`` in [0, 1] and each head's transform (the temperature is
    the same on both sides, as in TRL)."""

    beta: float
    student: HeadTransform
    teacher: HeadTransform

    @classmethod
    def reverse_kl(cls, temperature: float = 1.0, softcap: Optional[float] = None) -> "DivergenceSpec":
        """KL(policy || reference), both heads with the policy's temperature and softcap: GRPO's
        exact KL (``kl_estimator="full"``)."""
        head = HeadTransform(1.0, softcap, temperature)
        return cls(1.0, head, head)

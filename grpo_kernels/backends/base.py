"""The backend interface: the vocabulary row pass over one chunk of logits.

Every backend implements the same two primitives on a chunk of *raw* logits
``z = hidden @ weight.T + bias`` of shape [n, V] (any float dtype, rows contiguous).
With ``s = c * tanh(z / c)`` when a softcap ``c`` is given (else ``s = z``) and
``u = s / temperature``:

- ``row_stats`` returns, per row, fp32 (fp64 for fp64 logits):
  ``lse = logsumexp(u)``, ``entropy = lse - sum(softmax(u) * u)`` and
  ``target_logit = u[target]`` (0 where ``target < 0``, which marks "the target is
  not in this vocabulary slice", used by vocab-parallel).
- ``row_grad_`` overwrites the chunk in place with the gradient with respect to the
  raw logits ``z`` of ``sum_i dlogp_i * logp_i + dentropy_i * entropy_i``, given the
  row statistics (global ones under vocab parallelism):
  ``g_u = dlogp * (onehot - p) - dentropy * p * (u - lse + entropy)`` with
  ``p = exp(u - lse)``, then ``g_z = g_u / temperature * (1 - tanh(z / c)**2)``.

``row_fused_`` is the one-sweep variant used when the loss's per-token gradient
coefficient follows from the token's own log-prob (token-level importance
sampling): it computes the statistics, evaluates the objective's per-token
epilogue and writes the gradient. The default composes the two primitives with
``objective.token_epilogue``; a backend may fuse all three into one kernel.

The matmuls (logits, grad_hidden, grad_weight) stay in ``grpo_kernels.vocab_pass``
and go through torch (cuBLAS / MKL), shared by all backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RowStats:
    """Per-row statistics of one chunk; all [n], accumulation dtype."""

    lse: torch.Tensor
    entropy: torch.Tensor
    target_logit: torch.Tensor

    @property
    def logp(self) -> torch.Tensor:
        return self.target_logit - self.lse

    def put_(self, start: int, end: int, chunk: "RowStats") -> None:
        """Copies one chunk's statistics into rows [start, end)."""
        self.lse[start:end], self.entropy[start:end] = chunk.lse, chunk.entropy
        self.target_logit[start:end] = chunk.target_logit


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every lower precision accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowBackend:
    """Base class of a vocabulary row-pass backend. Subclasses set ``name``."""

    name: str = "base"
    #: bytes of temporaries a backend needs per logit element of a chunk, on top of the
    #: chunk buffer itself (torch ops upcast to fp32 and keep a few [n, V] temporaries;
    #: a fused kernel needs none). Used to size chunks to the byte budget.
    temp_bytes_per_elem: int = 0

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run on (device, dtype), else the reason it cannot."""
        raise NotImplementedError

    def row_stats(
        self, logits: torch.Tensor, targets: torch.Tensor, temperature: float, softcap: Optional[float]
    ) -> RowStats:
        raise NotImplementedError

    def row_grad_(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor,
        dlogp: torch.Tensor,
        dentropy: Optional[torch.Tensor],
        temperature: float,
        softcap: Optional[float],
    ) -> None:
        raise NotImplementedError

    def row_fused_(self, logits, targets, temperature, softcap, token_inputs, options):
        """Stats + per-token objective epilogue + in-place gradient, for one chunk.

        ``token_inputs`` is an ``objective.TokenInputs`` restricted to the chunk's rows.
        Returns ``(stats, epilogue)`` with ``epilogue`` an ``objective.TokenEpilogue``.
        """
        from grpo_kernels import objective

        stats = self.row_stats(logits, targets, temperature, softcap)
        epi = objective.token_epilogue(stats.logp, token_inputs, options)
        self.row_grad_(logits, targets, stats.lse, stats.entropy, epi.dlogp, None, temperature, softcap)
        return stats, epi

    # -- O(B*T) kernels: a backend may replace the torch defaults with fused ones --

    def token_epilogue(self, logp, token_inputs, options):
        """Per-token loss and dL/dlogp from logps [n] (see ``objective.token_epilogue``)."""
        from grpo_kernels import objective

        return objective.token_epilogue(logp, token_inputs, options)

    def group_normalize(self, rewards, num_generations: int, scale_rewards: str, eps: float):
        """Group-normalized advantages from combined rewards [B] (see ``advantages.normalize_groups``)."""
        from grpo_kernels.advantages import normalize_groups

        return normalize_groups(rewards, num_generations, scale_rewards, eps)

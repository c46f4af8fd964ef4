"""The backend contract: the vocabulary row pass over one chunk of logits.

A backend works on a chunk of *raw* logits ``z = hidden @ weight.T + bias`` [n, V] (any
float dtype, rows contiguous). With ``s = c * tanh(z / c)`` for ``options.logit_softcap = c``
(else ``s = z``) and ``u = s / options.temperature``:

- ``row_stats(z, targets, options, execution, need_entropy=True)`` returns, per row, in the
  accumulation dtype (fp32; fp64 for fp64 logits): ``lse = logsumexp(u)``, ``entropy = lse -
  sum(softmax(u) * u)`` and ``target_logit = u[target]`` (0 where ``target < 0``: "not in this
  vocabulary slice", used by vocab-parallel). ``need_entropy=False``: the log-prob-only pass,
  without the entropy's sum (entropy written as 0).
- ``row_grad_(z, targets, stats, dlogp, dentropy, options, execution)`` overwrites the chunk
  with the gradient with respect to ``z`` of ``sum_i dlogp_i * logp_i + dentropy_i *
  entropy_i``, given the row statistics (the global ones under vocab parallelism):
  ``g_u = dlogp * (onehot - p) - dentropy * p * (u - lse + entropy)``, ``p = exp(u - lse)``,
  then ``g_z = g_u / temperature * (1 - tanh(z / c)**2)``.
- ``row_fused_(z, targets, token_inputs, options, execution)`` (optional; ``None`` when a
  backend has no fused kernel): statistics, the objective's per-token epilogue
  (``epilogue.token_epilogue``) and the gradient in one pass, for token-level importance
  sampling. Returns ``(RowStats, epilogue.TokenEpilogue)``.
- ``group_normalize(rewards, num_generations, scale_rewards, eps)`` (optional):
  ``advantages.normalize_groups`` in a kernel.
- ``divergence_rows_(zs, zt, spec, coef, execution, out=None, vocab=None)`` (optional): the divergence row
  pass of distillation and of GRPO's exact KL; its contract is ``grpo_kernels.divergence``.

What crosses the fused boundary, the codes the kernels take and the accumulation dtype are the
epilogue contract: ``grpo_kernels.epilogue``.

``options`` is the call's ``GRPOOptions`` and ``execution`` its ``ExecutionOptions``
(``execution.fixed_tiles``: a fixed reduction order, no autotuning). The matmuls
(logits, grad_hidden, grad_weight) stay in ``grpo_kernels.sweep``, in torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from grpo_kernels.epilogue import accumulation_dtype


@dataclass
class RowStats:
    """Per-row statistics of one chunk; all [n], accumulation dtype."""

    lse: torch.Tensor
    entropy: torch.Tensor
    target_logit: torch.Tensor

    @property
    def logp(self) -> torch.Tensor:
        return self.target_logit - self.lse

    @classmethod
    def empty(cls, n: int, dtype: torch.dtype, device) -> "RowStats":
        acc = accumulation_dtype(dtype)
        return cls(*(torch.empty(n, dtype=acc, device=device) for _ in range(3)))

    def put_(self, start: int, end: int, chunk: "RowStats") -> None:
        """Copies one chunk's statistics into rows [start, end)."""
        self.lse[start:end], self.entropy[start:end] = chunk.lse, chunk.entropy
        self.target_logit[start:end] = chunk.target_logit


class RowBackend:
    """Base class of a vocabulary row-pass backend. Subclasses set ``name``."""

    name: str = "base"
    #: bytes of temporaries per logit element of a chunk beyond the chunk itself (torch ops
    #: upcast to fp32 and keep a few [n, V] temporaries; a fused kernel needs none)
    temp_bytes_per_elem: int = 0
    #: a fixed reduction order per row for a fixed chunking (required by ``deterministic``)
    deterministic: bool = True
    #: the optional primitives; None where a backend has no kernel for them
    row_fused_: Optional[Callable] = None
    group_normalize: Optional[Callable] = None
    divergence_rows_: Optional[Callable] = None
    #: whether ``divergence_rows_`` takes ``vocab=`` (a ``collective.VocabGroup``: the chunk is one
    #: rank's vocabulary slice and its row sums are combined over the ranks)
    divergence_vocab_parallel: bool = False
    #: the devices on which ``auto`` takes this backend's divergence pass (None: every device it
    #: runs on); elsewhere ``auto`` runs the torch pass
    divergence_auto_devices: Optional[Tuple[str, ...]] = None

    def temp_bytes(self, device) -> int:
        """``temp_bytes_per_elem`` on ``device`` (a backend whose temporaries depend on it overrides this)."""
        return self.temp_bytes_per_elem

    def divergence_temp_bytes(self, device) -> int:
        """Bytes of temporaries per logit of a chunk that ``divergence_rows_`` needs on ``device``
        beyond both heads' logits (a fused kernel: none)."""
        return 0

    def require_whole_vocabulary(self, vocab) -> None:
        """Refuses a vocabulary slice (``vocab``, a ``collective.VocabGroup``) in a divergence pass
        without ``divergence_vocab_parallel`` (``backends.divergence_backend`` never picks one)."""
        if vocab is not None:
            raise ValueError(f"backend {self.name!r} has no vocab-parallel divergence row pass")

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run on (device, dtype), else the reason it cannot."""
        raise NotImplementedError

    def row_stats(self, logits, targets, options, execution, need_entropy: bool = True) -> RowStats:
        raise NotImplementedError

    def row_grad_(self, logits, targets, stats: RowStats, dlogp, dentropy, options, execution) -> None:
        raise NotImplementedError


def slab_bounds(n: int, vocab: int, elems: Optional[int]):
    """[start, end) row ranges of slabs of about ``elems`` logits each over n rows of ``vocab``
    (at least one row a slab; ``elems`` None: the whole chunk is one slab)."""
    rows = max(1, n if elems is None else elems // max(vocab, 1))
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]

"""The Triton row backend: fused kernels for the vocabulary pass and the O(B*T) math.

Runs on CUDA devices, and on the CPU under ``TRITON_INTERPRET=1`` (Triton's numpy
interpreter: slow, for tests; it must be set before this package is imported, and has
no bfloat16). Kernels live in:

- ``row_kernels``: ``row_stats``, ``row_grad_`` and the fused ``row_fused_`` (statistics,
  GRPO epilogue and gradient in one launch per chunk);
- ``objective_kernel``: the per-token epilogue (``epilogue.token_epilogue``), a device
  function of the fused row kernel;
- ``advantages_kernel``: ``advantages.normalize_groups``;
- ``divergence_kernel``: ``divergence_rows_``, the divergence row pass of distillation and of
  GRPO's exact KL (``grpo_kernels.divergence``): both heads' rows in one program each.

Environment: ``GRPO_KERNELS_TRITON_AUTOTUNE=0`` (no autotuning on the GPU: a fixed tile),
``GRPO_KERNELS_TRITON_BLOCK_V=<power of 2>`` (that fixed tile). Autotuning is also off
in deterministic runs (``execution.is_deterministic``: ``deterministic=True`` or
``torch.use_deterministic_algorithms``), for every kernel.
The first call per (V, dtype) on the GPU benchmarks a few configurations; the in-place
kernels then keep one extra copy of the chunk while they do.
"""
from __future__ import annotations

import torch

from grpo_kernels.backends.base import RowBackend
from grpo_kernels.backends.triton import advantages_kernel, divergence_kernel, row_kernels
from grpo_kernels.backends.triton.common import INTERPRET

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TritonRowBackend(RowBackend):
    """Fused Triton kernels; no [n, V] temporaries beyond the chunk itself."""

    name = "triton"
    temp_bytes_per_elem = 0
    #: per-row reductions in a fixed order for a fixed tile (autotuning is off when deterministic)
    deterministic = True

    def supports(self, device, dtype):
        device = torch.device(device)
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32, float64)"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            return None
        if device.type == "cpu":
            if not INTERPRET:
                return ("Triton runs on the CPU only through its interpreter: set TRITON_INTERPRET=1 "
                        "before importing grpo_kernels")
            if dtype == torch.bfloat16:
                return "the Triton interpreter (numpy) has no bfloat16"
            return None
        return f"device type {device.type!r} is not supported (cuda; cpu with TRITON_INTERPRET=1)"

    # -- the contract (base.py): the row primitives, the advantage and the divergence kernels --

    def row_stats(self, logits, targets, options, execution, need_entropy=True):
        return row_kernels.row_stats(logits, targets, options, execution, need_entropy)

    def row_grad_(self, logits, targets, stats, dlogp, dentropy, options, execution):
        row_kernels.row_grad_(logits, targets, stats, dlogp, dentropy, options, execution)

    def row_fused_(self, logits, targets, token_inputs, options, execution):
        return row_kernels.row_fused_(logits, targets, token_inputs, options, execution)

    def group_normalize(self, rewards, num_generations, scale_rewards, eps):
        return advantages_kernel.group_normalize(rewards, num_generations, scale_rewards, eps)

    def divergence_rows_(self, zs, zt, spec, coef, execution, out=None, vocab=None):
        self.require_whole_vocabulary(vocab)
        return divergence_kernel.divergence_rows_(zs, zt, spec, coef, execution, out)


BACKEND = TritonRowBackend()

__all__ = ["TritonRowBackend", "BACKEND"]

"""Per-token statistics beyond log-prob and entropy, from the same vocabulary sweep.

``sum_pi_squared`` is ``sum_v softmax(u)_v ** 2`` per token (``u`` the temperature-scaled,
softcapped logits): verl's Optimal Token Baseline reads it as data (no gradient). It needs the
whole row, so it is computed where the row exists: on each chunk of logits of the log-prob sweep,
after the row backend's statistics (which leave the chunk intact) gave the row's ``lse``. That is
one more elementwise pass over the chunk in torch, and no second matmul over the vocabulary.

``forward_statistics(call)`` is that sweep for a ``calls.LogprobsCall`` (forward only: nothing
here is differentiable). It runs inside the custom op ``grpo_kernels::token_statistics``
(``grpo_kernels.ops``), so ``torch.compile(fullgraph=True)`` traces no host read of the sweep;
``grpo_kernels.api.token_statistics`` is the public entry.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from grpo_kernels import plan as planner, sweep
from grpo_kernels.backends.base import RowStats, slab_bounds
from grpo_kernels.backends.torch_chunked import scaled_logits
from grpo_kernels.calls import LogprobsCall
from grpo_kernels.epilogue import accumulation_dtype

__all__ = ["TokenStatistics", "sum_pi_squared_rows", "forward_statistics"]

#: logits per slab of the extra row pass: its fp32 temporaries stay ~8 MiB whatever the chunk
#: (the chunk rule sized the chunk for the row backend's temporaries, not for these)
SLAB_ELEMS = 2**20


class TokenStatistics(NamedTuple):
    """Detached per-token statistics, each [...] (the targets' shape), fp32 (fp64 for fp64 inputs)."""

    logp: torch.Tensor
    entropy: torch.Tensor  # 0 where the entropy was not asked for
    sum_pi_squared: torch.Tensor


def sum_pi_squared_rows(z: torch.Tensor, lse: torch.Tensor, temperature: float,
                        softcap: Optional[float]) -> torch.Tensor:
    """``sum_v exp(2 * (u_v - lse))`` per row of raw logits ``z`` [n, V], with ``u = softcap(z) / T``
    and ``lse = logsumexp(u)`` [n] from the row backend; [n] in the accumulation dtype. Every
    term is <= 1 (no overflow, whatever the logits' size); a row of -inf logits gives 0."""
    acc = accumulation_dtype(z.dtype)
    out = torch.empty(z.shape[0], dtype=acc, device=z.device)
    for s, e in slab_bounds(z.shape[0], z.shape[1], SLAB_ELEMS):
        u = scaled_logits(z[s:e], temperature, softcap, copy=True)
        out[s:e] = u.sub_(lse[s:e].to(acc).unsqueeze(1)).mul_(2.0).exp_().sum(-1)
    return out


def forward_statistics(call: LogprobsCall) -> TokenStatistics:
    """(logp, entropy, sum_pi_squared), [n] each, of ``call`` (no vocab parallelism: the caller
    refuses it), in one sweep: per chunk one matmul, the backend's row statistics, then
    ``sum_pi_squared_rows`` on the same logits."""
    plan = planner.plan_call(call.hidden, call.weight, call.options, call.execution, call.vocab_parallel,
                             need_entropy=call.need_entropy)
    n = call.hidden.shape[0]
    stats = RowStats.empty(n, call.hidden.dtype, call.hidden.device)
    spi = torch.empty(n, dtype=stats.lse.dtype, device=call.hidden.device)
    opts = call.options

    def row_work(s, e, z):
        st = sweep.stats(plan, z, call.targets[s:e])
        stats.put_(s, e, st)
        spi[s:e] = sum_pi_squared_rows(z, st.lse, opts.temperature, opts.logit_softcap)

    with torch.no_grad():
        sweep.sweep(plan, call.hidden, call.weight, call.bias, row_work)
    return TokenStatistics(stats.logp, stats.entropy, spi)

"""GRPO's exact KL to the reference (``kl_estimator="full"``) inside the loss's sweep.

The per-token KL(pi_theta || pi_ref) = sum_v p_v (log p_v - log q_v) over the whole vocabulary
replaces the k3 estimate. The reference's logits ``ref_hidden @ ref_weight.T + ref_bias`` take the
policy's temperature and softcap (``DivergenceSpec.reverse_kl``); the math and the row pass are the
divergence contract's (``grpo_kernels.divergence``), run by the plan's divergence backend.

Why the term separates: TRL's per_token_loss is the policy term (after every mask and the
importance-sampling ratio) plus ``beta * KL_t``, and the loss type's aggregation weight ``w_t`` of a
token (dLoss/dper_token_loss_t) depends on the mask alone. So the loss is the objective with
beta 0 plus ``beta * sum_t w_t KL_t``, and dLoss/dz_t is that objective's gradient plus
``beta * w_t * dKL_t/dz_t``. Per chunk of rows: the reference's logits (no gradient, ever), the
divergence row pass writing ``beta * w_t * dKL_t/dz`` into a separate buffer (it reads the policy's
logits, which the GRPO row pass then overwrites with its own gradient), the GRPO row pass with its
KL term off, then the buffer added into the chunk's gradient.

Under vocab parallelism (``ExactKL.vocab``, the plan's group) both heads hold the same vocabulary
rows on a rank: the divergence pass all-reduces both heads' logsumexps and the KL's row sums, so
KL_t is the global one and its gradient this slice's, and the sweep reduces ``grad_hidden`` (the
KL's part included) once, as for the rest of the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from grpo_kernels import sweep
from grpo_kernels.backends.base import RowBackend
from grpo_kernels.collective import VocabGroup
from grpo_kernels.divergence import DivergenceSpec
from grpo_kernels.options import ExecutionOptions, GRPOOptions
from grpo_kernels.plan import Plan


@dataclass(frozen=True)
class ExactKL:
    """The exact KL of one loss call on its real rows: ``hidden`` [n, H_r] (the reference's hidden
    states at the rows the sweep covers), ``weight`` [V, H_r] and ``bias`` [V] (or None) in the
    reference's own float dtype; ``beta`` the KL coefficient; ``backend`` the divergence row pass;
    ``vocab`` the plan's ``collective.VocabGroup`` under vocab parallelism (``weight`` and ``bias``
    then hold this rank's vocabulary rows, the policy's; None: the whole vocabulary)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    beta: float
    spec: DivergenceSpec
    backend: RowBackend
    execution: ExecutionOptions
    vocab: Optional[VocabGroup] = None

    @classmethod
    def of(cls, ref_hidden: torch.Tensor, ref_weight: torch.Tensor, ref_bias: Optional[torch.Tensor],
           rows: torch.Tensor, options: GRPOOptions, plan: Plan) -> "ExactKL":
        """``ref_hidden`` [B*T, H_r] at the real rows ``rows`` [n]; ``options`` the call's own (with
        its beta, before ``without_exact_kl``); ``plan`` the call's (its divergence backend, execution
        options and vocabulary group)."""
        return cls(ref_hidden.detach().index_select(0, rows), ref_weight.detach(),
                   None if ref_bias is None else ref_bias.detach(), options.beta,
                   DivergenceSpec.reverse_kl(options.temperature, options.logit_softcap), plan.divergence,
                   plan.execution, plan.vocab)

    def rows_(self, start: int, end: int, z: torch.Tensor, coef: Optional[torch.Tensor] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """KL_t [end - start] (accumulation dtype) of the chunk whose policy logits are ``z``
        [end - start, V] (read, not written); with ``coef`` [end - start] (dLoss/dKL_t), ``coef *
        dKL_t/dz`` is written into ``out`` (z's shape and dtype)."""
        tile = sweep.BATCH_INVARIANT_ROWS if self.execution.batch_invariant else None
        with torch.no_grad():  # the reference is a constant: never a graph, never a gradient
            zr = sweep.logits(self.hidden[start:end], self.weight, self.bias, tile)
        # under vocab parallelism both heads' logsumexps and the row sums are all-reduced in the pass:
        # KL_t is the global one on every rank, and the gradient this rank's slice of it
        kl, _ = self.backend.divergence_rows_(z, zr, self.spec, coef, self.execution, out=out, vocab=self.vocab)
        return kl

    def around(self, row_work: Callable, kl_out: torch.Tensor, coef: Optional[torch.Tensor] = None) -> Callable:
        """``row_work(start, end, z)`` (a sweep's per-chunk callback) with the exact KL: each chunk's
        KL into ``kl_out`` [n]; with ``coef`` [n] (dLoss/dKL_t of every real row) the KL's gradient
        is added into ``z`` after ``row_work`` has left the rest of the objective's gradient there."""

        def work(start: int, end: int, z: torch.Tensor) -> None:
            buf = None if coef is None else torch.empty_like(z)
            kl_out[start:end] = self.rows_(start, end, z, None if coef is None else coef[start:end], buf)
            row_work(start, end, z)
            if buf is not None:
                z.add_(buf)

        return work

    def coef(self, kl_weights: torch.Tensor) -> torch.Tensor:
        """dLoss/dKL_t = beta * w_t of the real rows' KL aggregation weights ``kl_weights`` [n]."""
        return kl_weights * self.beta

    def loss(self, kl: torch.Tensor, kl_weights: torch.Tensor) -> torch.Tensor:
        """The KL term of the loss, ``beta * sum_t w_t KL_t`` over the real rows ([n] each)."""
        return (kl * kl_weights).sum() * self.beta

"""plan.plan_loss: every per-call decision of a loss call (the path, whether the fused epilogue
computes the advantages from rewards, the statistics-only entropy sweep, whether dL/dentropy
reaches the row gradient) is made in the plan, from the options, the mask and the backend."""
from __future__ import annotations

import pytest
import torch

from grpo_kernels import plan
from grpo_kernels.backends.base import RowBackend
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel

B, T, H, V = 4, 6, 8, 11


class _Stub(RowBackend):
    name = "stub"

    def __init__(self, fused: bool):
        self.row_fused_ = (lambda *a: None) if fused else None


def _plan(monkeypatch, fused_backend=True, needs=(True, True, False), rewards=False, **options):
    monkeypatch.setattr(plan, "choose_backend", lambda *a: (_Stub(fused_backend), "stub"))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    n = int(mask.sum())
    return plan.plan_loss(torch.zeros(n, H), torch.zeros(V, H), mask, GRPOOptions(**options).validate(),
                          ExecutionOptions(chunk_size=7).validate(), VocabParallel(), needs, rewards=rewards)


# (options, fused backend, needs, rewards) -> (path, rewards_in_kernel, entropy_sweep, entropy_grad, fused)
CASES = {
    "token_rewards_fused": (dict(num_generations=2), True, (True, True, False), True,
                            ("one_sweep", True, False, False, True)),
    "token_rewards_unfused_backend": (dict(num_generations=2), False, (True, True, False), True,
                                      ("one_sweep", False, False, False, False)),
    "token_advantages": (dict(), True, (True, False, False), False, ("one_sweep", False, False, False, True)),
    "no_grads_rewards": (dict(num_generations=2), True, (False, False, False), True,
                         ("forward", False, False, False, True)),
    "sequence_rewards": (dict(importance_sampling_level="sequence", num_generations=2), True, (True, True, False),
                         True, ("sequence_sweep", False, False, False, False)),
    "entropy_bonus": (dict(entropy_coef=0.01), True, (True, True, False), False,
                      ("one_sweep", False, False, True, False)),
    "top_entropy": (dict(top_entropy_quantile=0.5), True, (True, False, False), False,
                    ("one_sweep", False, True, False, True)),
    "batch_scope_top_entropy": (dict(policy_loss="clip_cov"), True, (True, True, False), False,
                                ("two_sweeps", False, False, False, False)),
}


@pytest.mark.parametrize("case", CASES)
def test_loss_plan_decisions(case, monkeypatch):
    options, fused_backend, needs, rewards, want = CASES[case]
    p = _plan(monkeypatch, fused_backend, needs, rewards, **options)
    assert (p.path, p.rewards_in_kernel, p.entropy_sweep, p.entropy_grad, p.fused) == want


def test_sequence_path_cuts_at_sequence_boundaries(monkeypatch):
    """The real rows per sequence (6, 3, 6, 6) packed into chunks of at most 7 rows."""
    p = _plan(monkeypatch, importance_sampling_level="sequence")
    assert p.path == "sequence_sweep" and p.bounds == ((0, 6), (6, 9), (9, 15), (15, 21))

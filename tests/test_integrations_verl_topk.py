"""``grpo_kernels.topk_distill.topk_forward_kl`` against verl 0.9.1's top-k distillation, in verl's venv::

    <verl venv>/bin/python -m pytest -q tests/test_integrations_verl_topk.py -p no:cacheprovider

1. The rows (losses, student / teacher mass, overlap count and token advantage) equal verl's
   ``trainer.distillation.fsdp.losses.compute_forward_kl_topk`` on the materialized student logits
   (its default path float64 to 1e-10; its chunked path, which goes through float32, to 1e-6), with
   and without ``log_prob_min_clamp``.
   verl's ``kl_divergence`` casts both sides to float32 (its one float32 step): the 1e-10 tests run
   verl with that cast taken out (``_fp64_kl``), and one test runs verl as shipped (float32 losses,
   compared at 1e-6).
2. Put in ``model_output`` as verl's logits processor puts them, they give verl's own
   ``distillation_ppo_loss`` (supervised top-k, top-k plus the policy loss, policy-gradient
   distillation) the same loss, metrics and hidden / lm_head gradients as the materialized path.
"""
from __future__ import annotations

import pytest
import torch

verl = pytest.importorskip("verl")
pytest.importorskip("tensordict")

import test_integrations_verl as tiv  # noqa: E402  (its verl_reference harness)
import verl_reference as vr  # noqa: E402
from verl.trainer.distillation import losses as dl  # noqa: E402
from verl.trainer.distillation.fsdp import losses as fsdp_dl  # noqa: E402
from verl.workers.config import DistillationConfig, DistillationLossConfig  # noqa: E402

from grpo_kernels.topk_distill import topk_forward_kl  # noqa: E402

K = 5
KEYS = ("distillation_losses", "student_mass", "teacher_mass", "overlap_count", "overlap_token_advantage")


def _distill_config(clamp=-10.0, chunked=False, **kw):
    loss = DistillationLossConfig(loss_mode="forward_kl_topk", topk=K, log_prob_min_clamp=clamp,
                                  use_chunked_topk=chunked, **kw)
    return DistillationConfig(distillation_loss=loss)


def _teacher(nnz, offsets, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(nnz, tiv.V, generator=g, dtype=torch.float64) * 2.5
    lt, ids = torch.log_softmax(logits, -1).topk(K, dim=-1)
    nested = torch.nested.nested_tensor_from_jagged
    return nested(lt.to(dtype), offsets), nested(ids, offsets)


def _student_logits(h, w, temperature):
    return (h @ w.T) / temperature


@pytest.fixture
def _fp64_kl(monkeypatch):
    """verl's kl_divergence without its float32 cast (the formula is the same)."""
    monkeypatch.setattr(fsdp_dl, "kl_divergence", lambda log_q, log_p: (log_p.exp() * (log_p - log_q)).sum(-1))


def _ours(hidden, weight, t_lp, t_ids, temperature, clamp):
    rows = topk_forward_kl(hidden, weight, t_ids.values(), t_lp.values(), temperature=temperature,
                           log_prob_min_clamp=clamp, chunk_size=7)
    return dict(zip(KEYS, rows))


@pytest.mark.parametrize("clamp", [-10.0, -3.0, None], ids=["clamp-10", "clamp-3", "noclamp"])
@pytest.mark.parametrize("chunked", [False, True], ids=["default", "chunked"])
def test_rows_equal_verls_compute_forward_kl_topk_fp64(clamp, chunked, _fp64_kl):
    case = tiv.ALL_CASES[0]
    hidden, weight, labels, data, offsets = tiv._case_inputs(case, torch.float64, seed=5)
    t_lp, t_ids = _teacher(hidden.shape[0], offsets, seed=6)
    want = fsdp_dl.compute_forward_kl_topk(_student_logits(hidden, weight, 0.8).unsqueeze(0), t_lp, t_ids,
                                           _distill_config(clamp, chunked), "thd")
    got = _ours(hidden, weight, t_lp, t_ids, 0.8, clamp)
    # verl's chunked path takes the student's log-probs through float32 (``.float()`` per chunk)
    tol = 1e-6 if chunked else 1e-10
    for key in KEYS:
        w = want[key].squeeze(0)
        assert got[key].shape == w.shape, key
        if key == "overlap_count":
            assert torch.equal(got[key], w)
        else:
            torch.testing.assert_close(got[key], w, rtol=tol, atol=tol, msg=key)


def _model_output(rows: dict, offsets, log_probs=None):
    mo = {k: torch.nested.nested_tensor_from_jagged(v, offsets) for k, v in rows.items()}
    if log_probs is not None:
        mo["log_probs"] = torch.nested.nested_tensor_from_jagged(log_probs, offsets)
    return mo


def _combined(path, case, hidden, weight, labels, data, offsets, t_lp, t_ids, dcfg):
    """verl's distillation_ppo_loss with model_output from ``path`` (verl's logits processor on
    materialized logits, or ours); -> (loss, metrics, grads of hidden and weight)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    config = vr.build_actor_config(case)
    logp, _ = tiv._materialized(h, w, labels, 1.0)
    if path == "verl":
        rows = {k: v.squeeze(0) for k, v in fsdp_dl.compute_forward_kl_topk(
            _student_logits(h, w, 1.0).unsqueeze(0), t_lp, t_ids, dcfg, "thd").items()}
    else:
        rows = _ours(h, w, t_lp, t_ids, 1.0, dcfg.distillation_loss.log_prob_min_clamp)
    loss, metrics = dl.distillation_ppo_loss(config, dcfg, model_output=_model_output(rows, offsets, logp),
                                             data=data)
    grads = torch.autograd.grad(loss, (h, w))
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("mode", [dict(use_policy_gradient=False, use_task_rewards=False),
                                  dict(use_policy_gradient=False, use_task_rewards=True, distillation_loss_coef=0.3),
                                  dict(use_policy_gradient=True, use_task_rewards=True),
                                  dict(use_policy_gradient=False, use_task_rewards=False, log_prob_min_clamp=-2.0)],
                         ids=["supervised", "supervised+policy", "policy-gradient", "supervised-clamp-2"])
def test_combined_with_the_policy_loss_as_verl_does_fp64(mode, _fp64_kl):
    case = dict(tiv.ALL_CASES[0])
    hidden, weight, labels, data, offsets = tiv._case_inputs(case, torch.float64, seed=7)
    t_lp, t_ids = _teacher(hidden.shape[0], offsets, seed=8)
    data["teacher_logprobs"], data["teacher_ids"] = t_lp, t_ids
    mode = dict(mode)
    dcfg = _distill_config(mode.pop("log_prob_min_clamp", -10.0), **mode)
    want = _combined("verl", case, hidden, weight, labels, data.clone(), offsets, t_lp, t_ids, dcfg)
    got = _combined("ours", case, hidden, weight, labels, data.clone(), offsets, t_lp, t_ids, dcfg)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    wm, gm = tiv._metric_values(want[1]), tiv._metric_values(got[1])
    assert set(wm) == set(gm) and "distillation/overlap_ratio" in gm
    for k in wm:
        assert gm[k] == pytest.approx(wm[k], rel=1e-10, abs=1e-10), k
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_rows_against_verl_as_shipped_float32_kl():
    """verl as shipped: its float32 KL of the float64 inputs, within float32 rounding of ours."""
    case = tiv.ALL_CASES[0]
    hidden, weight, labels, data, offsets = tiv._case_inputs(case, torch.float64, seed=9)
    t_lp, t_ids = _teacher(hidden.shape[0], offsets, seed=10)
    want = fsdp_dl.compute_forward_kl_topk(_student_logits(hidden, weight, 1.0).unsqueeze(0), t_lp, t_ids,
                                           _distill_config(-10.0), "thd")["distillation_losses"].squeeze(0)
    got = _ours(hidden, weight, t_lp, t_ids, 1.0, -10.0)["distillation_losses"]
    assert want.dtype == torch.float32
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=1e-6)

"""verl 0.9.1's distillation training step through ``enable()`` (``verl_distill``), against verl's stock
engine step, in verl's venv (like tests/test_integrations_verl.py)::

    <verl venv>/bin/python -m pytest -q tests/test_integrations_verl_distill.py -p no:cacheprovider

One ``forward_backward_batch`` of verl's ``FSDPEngineWithLMHead`` on the tiny random FSDP2 Qwen2 of
tests/test_integrations_verl.py, with the loss verl's worker installs when distillation is enabled
(``partial(distillation_ppo_loss, config=, distillation_config=)``) and the micro-batch flags verl's
trainer sets (``distillation_use_topk``, ``distillation_only``): stock (materialized logits, verl's
logits processor) and switched give the same loss, metrics, parameter gradients and top-k rows in
``model_output``, for supervised top-k alone, top-k plus the (fused) policy loss, policy-gradient
top-k with and without task rewards, and the single-sample estimator losses (``k3``, ``k1``), packed
and padded, in one micro-batch and in four; and the switched step never allocates a tensor of N*V elements.

Float64 to 1e-10: verl's ``kl_divergence`` casts to float32 (its one float32 step), so the float64
runs take that cast out (``_fp64_kl``, as tests/test_integrations_verl_topk.py does); the float32 runs
are verl as shipped, at 1e-5.
"""
from __future__ import annotations

import functools

import pytest
import torch

verl = pytest.importorskip("verl")
pytest.importorskip("tensordict")
pytest.importorskip("transformers")

import test_integrations_verl as tiv  # noqa: E402  (its verl engine harness)
from verl.trainer.distillation import losses as dl  # noqa: E402
from verl.trainer.distillation.fsdp import losses as fsdp_dl  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig, PolicyLossConfig  # noqa: E402

from grpo_kernels.integrations import verl as gkv  # noqa: E402
from grpo_kernels.integrations.verl_distill import TOPK_KEYS  # noqa: E402

K = 5
VOCAB = tiv.VOCAB
gloo_group = tiv.gloo_group  # the fixture, under its name

#: (id, DistillationLossConfig keywords); the trainer's flags follow from them as ray_trainer sets them
MODES = [
    ("topk-only", dict(loss_mode="forward_kl_topk", use_task_rewards=False, use_policy_gradient=False)),
    ("topk+policy", dict(loss_mode="forward_kl_topk", use_task_rewards=True, use_policy_gradient=False,
                         distillation_loss_coef=0.3)),
    # the tiny model's student log-probs sit near -log(V): a clamp at -2 clamps every one (the values
    # change, the gradient through the rows is 0), so it goes where the rows carry no gradient anyway
    ("topk-pg", dict(loss_mode="forward_kl_topk", use_task_rewards=True, use_policy_gradient=True,
                     log_prob_min_clamp=-2.0)),
    ("topk-pg-no-rewards", dict(loss_mode="forward_kl_topk", use_task_rewards=False, use_policy_gradient=True,
                                log_prob_min_clamp=None)),
    ("k3+policy", dict(loss_mode="k3", use_task_rewards=True, use_policy_gradient=False)),
    ("k1-pg", dict(loss_mode="k1", use_task_rewards=False, use_policy_gradient=True)),
]


@pytest.fixture
def _fp64_kl(monkeypatch):
    """verl's kl_divergence without its float32 cast (the formula is the same)."""
    monkeypatch.setattr(fsdp_dl, "kl_divergence", lambda log_q, log_p: (log_p.exp() * (log_p - log_q)).sum(-1))


def _loss_fn(loss_kw: dict):
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=4, use_kl_loss=True,
                         kl_loss_type="low_var_kl", kl_loss_coef=0.05, entropy_coeff=0.01, clip_ratio_high=0.28,
                         loss_agg_mode="seq-mean-token-sum", policy_loss=PolicyLossConfig(loss_mode="vanilla"))
    dcfg = DistillationConfig(distillation_loss=DistillationLossConfig(topk=K, **loss_kw))
    return functools.partial(dl.distillation_ppo_loss, config=config, distillation_config=dcfg), dcfg


def _distill_batch(dtype, use_remove_padding, dcfg, seed=3, micro=8):
    """tiv._batch plus the teacher's tensors (nested over the packed sequences, as verl's teacher
    workers return them) and the flags ray_trainer._update_actor sets."""
    td = tiv._batch(dtype, use_remove_padding, micro=micro)
    offsets = td["input_ids"].offsets()
    nnz = int(offsets[-1])
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(torch.randn(nnz, VOCAB, generator=g, dtype=torch.float64) * 2.5, -1)
    loss_cfg = dcfg.distillation_loss
    use_topk = loss_cfg.loss_settings.use_topk
    if use_topk:
        lt, ids = teacher.topk(K, dim=-1)
    else:  # the estimators read the teacher's log-prob of the sampled (next) token
        ids = torch.roll(td["input_ids"].values(), -1).unsqueeze(-1)
        lt = teacher.gather(-1, ids)
    nested = torch.nested.nested_tensor_from_jagged
    td["teacher_logprobs"], td["teacher_ids"] = nested(lt.to(dtype), offsets), nested(ids, offsets)
    only = use_topk and not loss_cfg.use_task_rewards and not loss_cfg.use_policy_gradient
    tu.assign_non_tensor(td, distillation_use_topk=use_topk, distillation_only=only, return_model_output=True)
    return td


def _step(eng, data, loss_fn):
    with tiv._MaxNumel() as mode:
        out = eng.forward_backward_batch(data.clone(), loss_fn, forward_only=False)
    grads = {n: p.grad.detach().clone() for n, p in eng.module.named_parameters()}
    eng.module.zero_grad(set_to_none=True)
    return out, grads, mode.max


def _compare(stock, fused, tol, use_topk):
    (s_out, s_grads, _), (f_out, f_grads, _) = stock, fused
    assert f_out["loss"] == pytest.approx(s_out["loss"], rel=tol, abs=tol)
    sm, fm = tiv._metrics_plain(s_out["metrics"]), tiv._metrics_plain(f_out["metrics"])
    assert set(sm) == set(fm) and "distillation/loss" in fm
    if use_topk:
        assert {"distillation/student_mass", "distillation/overlap_ratio"} <= set(fm)
    for k in sm:
        assert fm[k] == pytest.approx(sm[k], rel=tol, abs=tol), k
    for n, g in s_grads.items():
        torch.testing.assert_close(f_grads[n], g, rtol=tol, atol=tol, msg=n)
    s_mo, f_mo = s_out["model_output"], f_out["model_output"]
    assert set(f_mo) == set(s_mo)
    for k in (TOPK_KEYS if use_topk else ()):
        a, b = f_mo[k].values(), s_mo[k].values()
        if k == "overlap_count":
            assert torch.equal(a, b)
        else:  # verl keeps the processor's float32 KL; ours is in the accumulation dtype
            torch.testing.assert_close(a.to(b.dtype), b, rtol=tol, atol=tol, msg=k)


def _run(monkeypatch, dtype, use_remove_padding, loss_kw, micro=8, entropy=True):
    model = tiv._tiny_fsdp_model(dtype)
    eng = tiv._engine(model, monkeypatch, use_remove_padding)
    loss_fn, dcfg = _loss_fn(loss_kw)
    data = _distill_batch(dtype, use_remove_padding, dcfg, micro=micro)
    tu.assign_non_tensor(data, calculate_entropy=entropy)
    n_tokens = int(data["input_ids"].offsets()[-1])
    stock = _step(eng, data, loss_fn)
    try:
        gkv.enable(forward=False, backend="torch", chunk_size=16)
        fused = _step(eng, data, loss_fn)
    finally:
        gkv.disable()
    if micro >= len(data["input_ids"]):  # one micro-batch of all N tokens (else its share of them)
        assert stock[2] >= n_tokens * VOCAB  # the stock step builds the [N, V] logits
        assert fused[2] < n_tokens * VOCAB, (fused[2], n_tokens * VOCAB)
    return stock, fused, dcfg.distillation_loss.loss_settings.use_topk


@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("mode", [m for _, m in MODES], ids=[i for i, _ in MODES])
def test_distillation_step_switched_equals_stock_fp64(gloo_group, monkeypatch, _fp64_kl, mode, use_remove_padding):
    stock, fused, use_topk = _run(monkeypatch, torch.float64, use_remove_padding, mode)
    _compare(stock, fused, 1e-10, use_topk)


@pytest.mark.parametrize("mode", [m for i, m in MODES if i in ("topk-only", "topk+policy", "topk-pg", "k3+policy")],
                         ids=["topk-only", "topk+policy", "topk-pg", "k3+policy"])
def test_distillation_step_switched_equals_stock_fp32_as_shipped(gloo_group, monkeypatch, mode):
    stock, fused, use_topk = _run(monkeypatch, torch.float32, True, mode)
    _compare(stock, fused, 1e-5, use_topk)


@pytest.mark.parametrize("mode", [m for i, m in MODES if i in ("topk-only", "topk+policy", "k3+policy")],
                         ids=["topk-only", "topk+policy", "k3+policy"])
def test_distillation_step_without_entropy_fp64(gloo_group, monkeypatch, _fp64_kl, mode):
    """``calculate_entropy=False`` (the trainer's flag when ``entropy_coeff`` is 0): no entropy in
    ``model_output``; top-k alone and top-k plus the (fused) policy loss run no ``token_logprobs`` sweep."""
    from grpo_kernels.integrations import verl_distill

    if mode["loss_mode"] == "forward_kl_topk":
        monkeypatch.setattr(verl_distill, "token_logprobs", lambda *a, **k: pytest.fail("a token_logprobs sweep ran"))
    stock, fused, use_topk = _run(monkeypatch, torch.float64, True, mode, entropy=False)
    _compare(stock, fused, 1e-10, use_topk)


@pytest.mark.parametrize("mode", [m for i, m in MODES if i in ("topk+policy", "topk-pg")], ids=["topk+policy", "topk-pg"])
def test_distillation_step_over_micro_batches_fp64(gloo_group, monkeypatch, _fp64_kl, mode):
    """Four micro-batches of the eight sequences: the teacher's nested tensors split with the rest and
    verl's per-micro-batch loss scaling and metric lists come out the same."""
    stock, fused, use_topk = _run(monkeypatch, torch.float64, True, mode, micro=2)
    _compare(stock, fused, 1e-10, use_topk)


def test_distillation_step_refuses_ulysses(gloo_group, monkeypatch):
    eng = tiv._engine(tiv._tiny_fsdp_model(torch.float64), monkeypatch)
    eng.use_ulysses_sp = True
    loss_fn, dcfg = _loss_fn(MODES[0][1])
    data = _distill_batch(torch.float64, True, dcfg)
    with gkv.enabled(forward=False, backend="torch"), pytest.raises(NotImplementedError, match="Ulysses"):
        eng.forward_backward_batch(data, loss_fn, forward_only=False)


def test_ppo_loss_with_distillation_flags_keeps_verls_step(gloo_group, monkeypatch):
    """``ppo_loss`` with the trainer's distillation flags is not a configuration verl's step runs (its
    logits processor is then ``ppo_loss``): the switched engine hands it to verl's code, which fails
    as it fails without ``enable()``."""
    from grpo_kernels.integrations import verl_engine

    eng = tiv._engine(tiv._tiny_fsdp_model(torch.float64), monkeypatch)
    loss_fn, dcfg = _loss_fn(MODES[0][1])
    ppo = functools.partial(tiv.losses.ppo_loss, config=loss_fn.keywords["config"])
    data = _distill_batch(torch.float64, True, dcfg)
    with pytest.raises(TypeError) as stock:
        eng.forward_backward_batch(data.clone(), ppo, forward_only=False)
    monkeypatch.setattr(verl_engine, "run_fused_step", lambda *a, **k: pytest.fail("the fused ppo step ran"))
    with gkv.enabled(forward=False, backend="torch"), pytest.raises(TypeError) as switched:
        eng.forward_backward_batch(data.clone(), ppo, forward_only=False)
    assert str(switched.value) == str(stock.value)

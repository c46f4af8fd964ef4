"""FusedDistillationTrainer against TRL 1.16's own DistillationTrainer, on CPU, nothing downloaded.

- ``compute_loss`` (TRL's, which calls the trainer's ``_compute_loss``) on batches built as
  ``_generate_and_score_completions`` returns them: ours against TRL's ``_compute_loss`` with its
  chunked divergence run in float64 (``support.trl_divergence_in_float64``). Float64 models: loss,
  every parameter's gradient and the logged ``entropy`` to 1e-10, for beta 0, 0.5 and 1, with
  temperature != 1, a wider teacher, biased heads, logit scales and softcaps, ``tool_mask``, and
  both normalizers (``num_items_in_batch`` in training, the valid count in eval).
- A few ``trainer.train()`` steps (generation, optimizer), stock against fused, float64 and
  float32: same logged losses and metrics, same final weights, and TRL's chunked divergence never
  runs inside the fused trainer.
- The refusals: no teacher, multimodal batches.
"""
from __future__ import annotations

import collections
import types
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from support import trl_divergence_in_float64  # noqa: E402
import test_integrations_trl as trl_tests  # noqa: E402 - its tokenizer and dataset fixtures, its gradient helpers
from grpo_kernels.integrations import trl_distill  # noqa: E402
from grpo_kernels.integrations.trl import FusedDistillationTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

tokenizer, dataset = trl_tests.tokenizer, trl_tests.dataset  # the offline character tokenizer, the prompts
grads, assert_grads_close = trl_tests.grads, trl_tests.assert_grads_close

B, P, K = 4, 5, 6
V = len(trl_tests.CHARS) + 3


def tiny_llama(hidden, layers, seed, dtype, head_bias=False, **config):
    """A tiny Llama over the test tokenizer's vocabulary; ``config`` adds head attributes (logit
    scale, softcap) that TRL and the fused trainer both read from the config."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False,
    )
    for name, value in config.items():
        setattr(cfg, name, value)
    model = transformers.LlamaForCausalLM(cfg)
    if head_bias:
        model.lm_head = torch.nn.Linear(hidden, V, bias=True)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.8)  # peaked heads: the divergence is far from 0
        if head_bias:
            model.lm_head.bias.normal_(0.0, 0.5)
    return model.to(dtype)


HEADS = {
    "plain": ({}, {}),
    # Cohere-style scale and a softcap on the student, Granite-style logits_scaling on the teacher
    "options": (dict(head_bias=True, logit_scale=1.3, final_logit_softcapping=3.0),
                dict(head_bias=True, logits_scaling=0.8, final_logit_softcapping=4.0)),
}


def make_trainer(tokenizer, dataset, tmp_path, cls=FusedDistillationTrainer, dtype=torch.float64, heads="plain",
                 trainer_kwargs=None, teacher=True, **config):
    student_opts, teacher_opts = HEADS[heads]
    student = tiny_llama(32, 2, 0, dtype, **student_opts)
    teacher_model = tiny_llama(48, 2, 1, dtype, **teacher_opts) if teacher else None  # a wider teacher
    defaults = dict(
        output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, fp16=False,
        max_completion_length=K, per_device_train_batch_size=B, max_steps=2, logging_steps=1,
        save_strategy="no", gradient_checkpointing=False, seed=0, disable_tqdm=True,
    )
    defaults.update(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=student, teacher_model=teacher_model, args=trl.DistillationConfig(**defaults),
                   train_dataset=dataset, processing_class=tokenizer, **(trainer_kwargs or {}))


def make_batch(seed=0, tool_mask=False):
    """A batch as ``_generate_and_score_completions`` returns it: left-padded prompts, right-padded
    completions (16 valid tokens: powers of 2 keep TRL's float32 rounding of 1/n exact)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :1] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, V, (B, K), generator=g)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    completion_mask[0, 3:] = 0
    completion_mask[2, 1:] = 0
    completion_ids[completion_mask == 0] = 0
    completion_ids[0, 2] = 1  # an eos
    assert int(completion_mask.sum()) == 16
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, num_items_in_batch=torch.tensor(32.0))  # spans the generation batch
    if tool_mask:
        tm = torch.ones(B, K, dtype=torch.long)
        tm[1, 1:3] = 0
        tm[3, 2] = 0
        inputs["tool_mask"] = tm
    return inputs


def run(trainer, inputs, stock):
    """(loss, {name: grad}, logged metrics) of TRL's ``compute_loss`` with our ``_compute_loss``, or
    with TRL's own (``stock``)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    if stock:
        trainer._compute_loss = types.MethodType(trl.DistillationTrainer._compute_loss, trainer)
    try:
        loss = trainer.compute_loss(model, inputs)
    finally:
        if stock:
            del trainer._compute_loss
    loss.backward()
    g = grads(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), g, {k: list(v) for k, v in trainer._metrics["train" if model.training else "eval"].items()}


CASES = {
    "plain": dict(temperature=1.0),
    "options": dict(temperature=0.7, heads="options", tool_mask=True),
    "eval": dict(temperature=1.5, heads="options", eval=True),  # num_items_in_batch None: / n_valid
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_compute_loss_equals_trl_float64(tokenizer, dataset, tmp_path, monkeypatch, beta, case):
    opts = dict(CASES[case])
    tool_mask, eval_mode = opts.pop("tool_mask", False), opts.pop("eval", False)
    trainer = make_trainer(tokenizer, dataset, tmp_path, beta=beta, **opts)
    trainer.model.train(not eval_mode)
    trl_divergence_in_float64(monkeypatch)
    inputs = make_batch(seed=int(beta * 10), tool_mask=tool_mask)
    loss, g, metrics = run(trainer, inputs, stock=False)
    loss_t, g_t, metrics_t = run(trainer, inputs, stock=True)
    assert loss.dtype == loss_t.dtype == torch.float64 and loss_t > 0
    assert abs(loss - loss_t) <= 1e-10 * abs(loss_t), (loss.item(), loss_t.item())
    assert_grads_close(g, g_t, 1e-10)
    assert sum(v is not None for v in g.values()) == len(g)  # every student parameter has its gradient
    assert all(p.grad is None for p in trainer.teacher_model.parameters())
    assert sorted(metrics) == sorted(metrics_t) == ["entropy"]
    assert abs(metrics["entropy"][0] - metrics_t["entropy"][0]) <= 1e-10 * metrics_t["entropy"][0]


def test_fused_options_reach_distill_loss(tokenizer, dataset, tmp_path, monkeypatch):
    """fused_backend / fused_chunk_size / fused_batch_invariant and the config's beta and temperature
    are what distill_loss gets; the result still equals the default execution's."""
    trainer = make_trainer(tokenizer, dataset, tmp_path, beta=0.3, temperature=0.9,
                           trainer_kwargs=dict(fused_backend="torch", fused_chunk_size=3, fused_batch_invariant=True))
    seen, original = [], trl_distill.distill_loss

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(trl_distill, "distill_loss", spy)
    inputs = make_batch()
    loss, g, _ = run(trainer, inputs, stock=False)
    assert len(seen) == 1
    kw = seen[0]
    assert (kw["backend"], kw["chunk_size"], kw["batch_invariant"]) == ("torch", 3, True)
    assert (kw["beta"], kw["temperature"]) == (0.3, 0.9)
    trainer._fused_backend, trainer._fused_chunk_size, trainer._fused_batch_invariant = "auto", None, False
    loss2, g2, _ = run(trainer, inputs, stock=False)
    assert abs(loss - loss2) <= 1e-12 * abs(loss2)
    assert_grads_close(g, g2, 1e-12)


# ------------------------------------------------------------------ end to end


def _train(cls, tokenizer, dataset, tmp_path, dtype, **config):
    trainer = make_trainer(tokenizer, dataset, tmp_path, cls=cls, dtype=dtype, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


#: (dtype, config, tolerance of the logged values, of the final weights). float64: in training the
#: normalizer (the generation batch's token count) is no power of 2, and TRL's backward rounds
#: dLoss/dD = 1/n to float32 even in the float64 shim, so its gradients are off by up to 6e-8 relative
#: (grad_norm shows it); plain SGD passes that on unamplified (Adam's m / sqrt(v) would blow it up on
#: near-zero gradient entries): weights within 1e-8 of updates ~1e-2. float32 keeps the default AdamW.
#: bf16=True: TRL's compute_loss runs the loss through _forward_redirection, which calls the model's
#: own forward in place of accelerate's autocast wrapper of it, so both trainers' heads stay float32.
TRAIN = {
    "float64": (torch.float64, dict(beta=0.5, temperature=0.8, gradient_accumulation_steps=2, max_steps=3,
                                    optim="sgd", learning_rate=0.05), 1e-7, 1e-8),
    "float32": (torch.float32, dict(beta=1.0, max_steps=3, gradient_checkpointing=True, learning_rate=1e-3),
                1e-4, 1e-5),
    "bf16_flag": (torch.float32, dict(beta=0.0, temperature=1.2, max_steps=2, bf16=True, learning_rate=1e-3),
                  1e-4, 1e-5),
}


@pytest.mark.parametrize("case", list(TRAIN))
def test_train_end_to_end_matches_stock_trainer(tokenizer, dataset, tmp_path, monkeypatch, case):
    """A few real steps (generation by the student, the teacher's pass, optimizer): same logs and
    weights as trl.DistillationTrainer (float64: its divergence run in float64), and TRL's chunked
    divergence never runs in ours."""
    import trl.trainer.distillation_trainer as trl_dt

    dtype, config, tol, tol_params = TRAIN[case]
    if dtype == torch.float64:
        trl_divergence_in_float64(monkeypatch)
    calls = {"n": 0}
    original = trl_dt._chunked_divergence_loss

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(trl_dt, "_chunked_divergence_loss", counted)
    fused = _train(FusedDistillationTrainer, tokenizer, dataset, tmp_path / "a", dtype, **config)
    assert calls["n"] == 0, "TRL's chunked divergence ran inside FusedDistillationTrainer"
    stock = _train(trl.DistillationTrainer, tokenizer, dataset, tmp_path / "b", dtype, **config)
    assert calls["n"] > 0

    def logs(trainer):
        return [h for h in trainer.state.log_history if "loss" in h]

    lf, ls = logs(fused), logs(stock)
    assert len(lf) == len(ls) == config["max_steps"]
    for a, b in zip(lf, ls):
        assert set(a) == set(b) and "entropy" in b
        for key in set(b) - {"step_time"}:  # step_time is the wall clock
            assert abs(a[key] - b[key]) <= tol * max(abs(b[key]), 1.0), (key, a[key], b[key])
    for (n, p), (_, q) in zip(fused.model.named_parameters(), stock.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=tol_params, atol=tol_params, msg=lambda m, n=n: f"{n}: {m}")
    moved = [(p - q).abs().max().item() for p, q in zip(fused.model.parameters(),
                                                         tiny_llama(32, 2, 0, dtype).parameters())]
    assert max(moved) > 1e-4  # the steps did train


# ------------------------------------------------------------------ refusals


def test_no_teacher_raises(tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError, match="^teacher_model must be a model"):
        make_trainer(tokenizer, dataset, tmp_path, teacher=False)


def test_multimodal_batch_raises(tokenizer, dataset, tmp_path):
    trainer = make_trainer(tokenizer, dataset, tmp_path)
    inputs = make_batch()
    inputs["pixel_values"] = torch.zeros(B, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"multimodal inputs \(pixel_values\).*trl.DistillationTrainer"):
        trainer.compute_loss(trainer.model, inputs)

"""grpo_kernels.integrations.transformers on tiny random models built from configs (nothing downloaded).

The oracle is the model's own logits: ``model(ids, logits_to_keep=K + 1).logits[:, :-1]``
(so the model's head, bias, logit scale and softcapping are applied by transformers itself), fed
to ``grpo_kernels.reference`` with an identity "lm_head" (``logits @ I = logits``), i.e. TRL's
formulas on materialized logits. Float64 models: loss and every parameter's gradient to 1e-10.

CPU by default; ``GRPO_KERNELS_TEST_DEVICE=cuda`` runs the same tests on a GPU.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from grpo_kernels.reference import reference_grpo_loss  # noqa: E402
from grpo_kernels.integrations import transformers as gkt  # noqa: E402

DEVICE = torch.device(os.environ.get("GRPO_KERNELS_TEST_DEVICE", "cpu"))
V = 131
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **COMMON, **kw))


def _llama_biased_head():
    model = _llama(tie_word_embeddings=False)
    head = torch.nn.Linear(32, V, bias=True)
    torch.nn.init.normal_(head.bias, std=0.5)
    model.lm_head = head
    return model


def _qwen2(tied):
    return transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=tied, **COMMON)
    )


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **COMMON))


def _gemma2():
    cfg = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=1.5,
                                    attn_implementation="eager", **COMMON)
    return transformers.Gemma2ForCausalLM(cfg)


def _phi():  # Phi's lm_head has a bias by construction
    model = transformers.PhiForCausalLM(transformers.PhiConfig(**COMMON))
    torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    return model


def _cohere():  # logits * config.logit_scale
    return transformers.CohereForCausalLM(
        transformers.CohereConfig(num_key_value_heads=2, logit_scale=0.3, **COMMON)
    )


def _granite():  # logits / config.logits_scaling
    return transformers.GraniteForCausalLM(
        transformers.GraniteConfig(num_key_value_heads=2, logits_scaling=3.0, **COMMON)
    )


def _granite_biased_head():  # logit scale and a bias: s * (h W^T + b)
    model = _granite()
    model.config.tie_word_embeddings = False
    head = torch.nn.Linear(32, V, bias=True)
    torch.nn.init.normal_(head.bias, std=0.5)
    model.lm_head = head
    return model


BUILDERS = {
    "llama": lambda: _llama(tie_word_embeddings=False),
    "llama_biased_head": _llama_biased_head,
    "qwen2_tied": lambda: _qwen2(True),
    "qwen2_untied": lambda: _qwen2(False),
    "mistral": _mistral,
    "gemma2_softcap": _gemma2,
    "phi_bias": _phi,
    "cohere_logit_scale": _cohere,
    "granite_logits_scaling": _granite,
    "granite_biased_head": _granite_biased_head,
}


def build(name, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    # a peaked head (a few nats of entropy, as a trained LM's) so that ratios and clipping are exercised
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.8)
    return model.to(device=DEVICE, dtype=dtype).eval()


def make_inputs(B=4, P=5, K=6, seed=1, left_pad=True):
    """Left-padded prompts, right-padded completions, one fully masked completion row.

    (Gemma-2 in float64 with eager attention returns NaN hidden states for left-padded rows in
    transformers 5.23, in its own forward too: its tests use unpadded prompts.)
    """
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    if left_pad:
        prompt_mask[1, :2] = 0
        prompt_mask[3, :1] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(3, V, (B, K), generator=g)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[2, :] = 0
    completion_mask[3, 1:] = 0
    completion_ids[completion_mask == 0] = 0
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    return tuple(t.to(DEVICE) for t in (input_ids, attention_mask, completion_ids, completion_mask, advantages))


def inputs_for(name, dtype=torch.float64, **kw):
    return make_inputs(left_pad=not (name == "gemma2_softcap" and dtype == torch.float64), **kw)


def model_logits(model, input_ids, attention_mask, K):
    """The model's own logits for the completion tokens, [B, K, V] (transformers' logits_to_keep)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=K + 1, use_cache=False).logits[:, :-1]


def oracle_loss(model, input_ids, attention_mask, completion_ids, completion_mask, advantages, old, ref,
                isr=None, return_metrics=False, **options):
    K = completion_ids.shape[1]
    logits = model_logits(model, input_ids, attention_mask, K)
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return reference_grpo_loss(logits, eye, completion_ids, advantages, completion_mask, old, ref,
                               importance_sampling_ratio=isr, return_metrics=return_metrics, **options)


def true_logps(model, input_ids, attention_mask, K, temperature=1.0):
    with torch.no_grad():
        logits = model_logits(model, input_ids, attention_mask, K) / temperature
        return torch.log_softmax(logits.double(), -1).gather(-1, input_ids[:, -K:, None]).squeeze(-1)


def grads(model):
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def assert_grads_close(g1, g2, tol):
    assert g1.keys() == g2.keys()
    some = False
    for name in g1:
        a, b = g1[name], g2[name]
        if a is None or b is None:
            assert a is None and b is None, f"{name}: gradient on one side only"
            continue
        some = True
        if b.norm() == 0:
            assert a.norm().item() <= 1e-12, name
        else:
            assert rel(a, b) <= tol, f"{name}: relative error {rel(a, b):.3g}"
    assert some


def run_both(model, inputs, old, ref, isr=None, **options):
    input_ids, attention_mask, completion_ids, completion_mask, advantages = inputs
    model.zero_grad(set_to_none=True)
    loss = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, advantages, old,
                               ref, importance_sampling_ratio=isr, **options)
    loss.backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)
    expected = oracle_loss(model, input_ids, attention_mask, completion_ids, completion_mask, advantages, old, ref,
                           isr, **options)
    expected.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    return loss, expected, g_ours, g_ref


# ------------------------------------------------------------------ structure


@pytest.mark.parametrize("name", list(BUILDERS))
def test_lm_head_params(name):
    model = build(name)
    weight, bias, softcap = gkt.lm_head_params(model)
    assert weight is model.get_output_embeddings().weight
    if name in ("qwen2_tied", "gemma2_softcap", "cohere_logit_scale"):
        assert model.config.tie_word_embeddings
        assert weight is model.get_input_embeddings().weight
    if name in ("llama", "qwen2_untied"):
        assert weight is not model.get_input_embeddings().weight
    assert (bias is not None) == (name in ("phi_bias", "llama_biased_head", "granite_biased_head"))
    assert softcap == (1.5 if name == "gemma2_softcap" else None)
    expected_scale = {"cohere_logit_scale": 0.3, "granite_logits_scaling": 1 / 3.0,
                      "granite_biased_head": 1 / 3.0}.get(name, 1.0)
    assert math.isclose(gkt.logit_scale(model), expected_scale)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_completion_hidden_states_reproduce_the_model_logits(name):
    model = build(name)
    input_ids, attention_mask, completion_ids, *_ = inputs_for(name)
    K = completion_ids.shape[1]
    with torch.no_grad():
        hidden = gkt.completion_hidden_states(model, input_ids, attention_mask, K)
        full = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        assert hidden.shape == (input_ids.shape[0], K, 32)
        L = input_ids.shape[1]
        torch.testing.assert_close(hidden, full[:, L - K - 1 : L - 1], rtol=0, atol=0)
        h, w, b, softcap = gkt.head_operands(model, hidden)
        z = h @ w.T + (0 if b is None else b)
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        torch.testing.assert_close(z, model_logits(model, input_ids, attention_mask, K), rtol=1e-12, atol=1e-12)
    assert gkt.check_lm_head(model, rtol=1e-12, atol=1e-12) < 1e-12


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_token_logprobs_match_log_softmax_of_the_model_logits(name):
    model = build(name)
    input_ids, attention_mask, completion_ids, completion_mask, _ = inputs_for(name)
    K = completion_ids.shape[1]
    T = 0.7
    logp, ent = gkt.model_token_logprobs(model, input_ids, attention_mask, K, temperature=T, return_entropy=True)
    logits = model_logits(model, input_ids, attention_mask, K) / T
    logsm = torch.log_softmax(logits, -1)
    exp_logp = logsm.gather(-1, completion_ids[..., None]).squeeze(-1)
    exp_ent = -(logsm.exp() * logsm).sum(-1)
    m = completion_mask.bool()
    torch.testing.assert_close(logp[m], exp_logp[m], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ent[m], exp_ent[m], rtol=1e-10, atol=1e-12)
    assert (logp[~m] == 0).all() and (ent[~m] == 0).all()  # unscored, as TRL's fused head returns them
    # differentiable through the model: a weighted sum of logps and entropies
    g = torch.Generator().manual_seed(5)
    c1 = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(DEVICE)
    c2 = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(DEVICE)
    model.zero_grad(set_to_none=True)
    ((logp * c1 + ent * c2) * completion_mask).sum().backward()
    g_ours = grads(model)
    model.zero_grad(set_to_none=True)
    logits = model_logits(model, input_ids, attention_mask, K) / T
    logsm = torch.log_softmax(logits, -1)
    exp_logp = logsm.gather(-1, completion_ids[..., None]).squeeze(-1)
    exp_ent = -(logsm.exp() * logsm).sum(-1)
    ((exp_logp * c1 + exp_ent * c2) * completion_mask).sum().backward()
    assert_grads_close(g_ours, grads(model), 1e-10)


# ------------------------------------------------------------------ the loss


LOSS_CONFIGS = {
    "dapo": dict(loss_type="dapo"),
    "grpo_beta_seq": dict(loss_type="grpo", beta=0.05, importance_sampling_level="sequence", epsilon_high=0.28),
    "bnpo_delta": dict(loss_type="bnpo", delta=1.3, temperature=0.8),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8, beta=0.1, use_bias_correction_kl=True),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2, num_items_in_batch=17),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.9, sapo_temperature_neg=1.1),
    "luspo_entropy": dict(loss_type="luspo", importance_sampling_level="sequence", top_entropy_quantile=0.5),
}


def _old_ref(model, inputs, temperature, seed=3, spread=0.3):
    input_ids, attention_mask, completion_ids, completion_mask, _ = inputs
    K = completion_ids.shape[1]
    lp = true_logps(model, input_ids, attention_mask, K, temperature)
    g = torch.Generator().manual_seed(seed)
    old = lp + spread * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ref = lp + spread * torch.randn(lp.shape, generator=g, dtype=torch.float64).to(DEVICE)
    return old, ref


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("config", ["dapo", "grpo_beta_seq", "bnpo_delta"])
def test_model_grpo_loss_float64_every_model(name, config):
    model = build(name)
    inputs = inputs_for(name)
    opts = LOSS_CONFIGS[config]
    old, ref = _old_ref(model, inputs, opts.get("temperature", 1.0))
    loss, expected, g_ours, g_ref = run_both(model, inputs, old, ref, **opts)
    assert rel(loss, expected) <= 1e-10, (loss.item(), expected.item())
    assert_grads_close(g_ours, g_ref, 1e-10)


@pytest.mark.parametrize("config", list(LOSS_CONFIGS))
@pytest.mark.parametrize("name", ["qwen2_tied", "gemma2_softcap", "phi_bias"])
def test_model_grpo_loss_float64_every_loss_type(name, config):
    model = build(name)
    inputs = inputs_for(name, seed=7)
    opts = LOSS_CONFIGS[config]
    old, ref = _old_ref(model, inputs, opts.get("temperature", 1.0), spread=0.5)
    g = torch.Generator().manual_seed(11)
    isr = (torch.rand(inputs[3].shape, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    loss, expected, g_ours, g_ref = run_both(model, inputs, old, ref, isr=isr, **opts)
    assert rel(loss, expected) <= 1e-10, (loss.item(), expected.item())
    assert_grads_close(g_ours, g_ref, 1e-10)


def test_model_grpo_loss_on_policy_and_metrics():
    """old_logps=None (on-policy) and token-level advantages; metrics equal the oracle's."""
    model = build("gemma2_softcap")
    input_ids, attention_mask, completion_ids, completion_mask, _ = inputs_for("gemma2_softcap", seed=4)
    adv = torch.randn(completion_ids.shape, dtype=torch.float64, device=DEVICE)
    ref = true_logps(model, input_ids, attention_mask, completion_ids.shape[1]) + 0.2
    opts = dict(loss_type="grpo", beta=0.02)
    loss, m = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv, None, ref,
                                  return_metrics=True, **opts)
    expected, em = oracle_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv, None, ref,
                               return_metrics=True, **opts)
    assert rel(loss, expected) <= 1e-10
    mask = completion_mask.bool()
    torch.testing.assert_close(m.logps[mask], em["logps"][mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.entropy[mask], em["entropy"][mask], rtol=1e-10, atol=1e-12)
    for key in ("kl_mean", "entropy_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region",
                "seq_clip_ratio_low", "seq_clip_ratio_high"):
        torch.testing.assert_close(getattr(m, key).double(), em[key].double(), rtol=1e-10, atol=1e-12,
                                   equal_nan=True)


@pytest.mark.parametrize("config", ["dapo", "grpo_beta_seq", "bnpo_delta", "cispo"])
def test_model_grpo_loss_off_policy_metrics(config):
    """Off-policy: every GRPOMetrics value equals the oracle's, the per-sequence clip ratios (what TRL's
    clip_ratio/low_min and high_max are taken over) included; NaN for the fully masked row at token level."""
    model = build("llama")
    input_ids, attention_mask, completion_ids, completion_mask, adv = inputs = inputs_for("llama", seed=7)
    opts = LOSS_CONFIGS[config]
    old, ref = _old_ref(model, inputs, opts.get("temperature", 1.0), spread=0.5)
    _, m = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv, old, ref,
                               return_metrics=True, **opts)
    _, em = oracle_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv, old, ref,
                        return_metrics=True, **opts)
    keys = ("kl_mean", "entropy_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "cispo_clip_ratio",
            "seq_clip_ratio_low", "seq_clip_ratio_high")
    for key in keys:
        got, want = getattr(m, key), em.get(key)
        assert (got is None) == (want is None), key
        if got is not None:
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-10, atol=1e-12, equal_nan=True)
    if config == "cispo":
        assert m.seq_clip_ratio_low is None and m.seq_clip_ratio_high is None  # TRL logs them for clipped types
        return
    seq = torch.stack([m.seq_clip_ratio_low, m.seq_clip_ratio_high])
    assert seq.shape == (2, adv.shape[0])
    assert bool((seq.nan_to_num() > 0).any()), "no clipping: the comparison above would prove nothing"
    token_level = opts.get("importance_sampling_level", "token") == "token"
    assert bool(seq[:, 2].isnan().all()) == token_level  # row 2 has no completion tokens


@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "gemma2_softcap", "phi_bias", "cohere_logit_scale"])
def test_model_grpo_loss_float32(name):
    model = build(name, dtype=torch.float32)
    inputs = inputs_for(name, torch.float32, seed=2)
    old, ref = _old_ref(model, inputs, 1.0)
    old, ref = old.float(), ref.float()
    inputs = (*inputs[:4], inputs[4].float())
    loss, expected, g_ours, g_ref = run_both(model, inputs, old, ref, loss_type="grpo", beta=0.04)
    assert loss.dtype == torch.float32
    assert rel(loss, expected) <= 1e-5
    assert_grads_close(g_ours, g_ref, 1e-5)


def test_bf16_autocast_computes_the_head_in_the_autocast_dtype():
    model = build("qwen2_untied", dtype=torch.float32)
    input_ids, attention_mask, completion_ids, completion_mask, adv = make_inputs()
    adv = adv.float()
    exact = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv,
                                loss_type="grpo")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv,
                                   loss_type="grpo")
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.dtype == torch.float32
    assert torch.isfinite(loss) and abs(loss.item() - exact.item()) <= 5e-2 * max(abs(exact.item()), 1e-3) + 1e-3
    # head_dtype overrides autocast: float32 inside autocast gives the exact result back (up to the backbone)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        h = gkt.completion_hidden_states(model, input_ids, attention_mask, completion_ids.shape[1])
        hh, w, b, _ = gkt.head_operands(model, h, head_dtype=torch.float32)
    assert hh.dtype == w.dtype == torch.float32


# ------------------------------------------------------------------ running inside the forward (wrappers)


def test_enable_fused_forward_keeps_plain_calls_and_generate():
    model = build("qwen2_tied")
    input_ids, attention_mask, completion_ids, completion_mask, adv = make_inputs()
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    direct = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv)
    assert gkt.enable_fused_forward(model) is model
    gkt.enable_fused_forward(model)  # idempotent
    assert gkt.is_fused_forward_enabled(model)
    with torch.no_grad():
        after = model(input_ids=input_ids, attention_mask=attention_mask).logits
        out = model.generate(input_ids[:1, -3:], attention_mask=torch.ones(1, 3, dtype=torch.long, device=DEVICE),
                             max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert out.shape == (1, 6)
    calls = []

    def spy(lm, **inputs):
        calls.append(sorted(inputs))
        return gkt.completion_hidden_states(lm, logits_to_keep=2, **inputs)

    h = model(input_ids=input_ids, attention_mask=attention_mask, grpo_kernels_fn=spy)
    assert calls == [["attention_mask", "input_ids"]] and h.shape[:2] == (input_ids.shape[0], 2)
    via_forward = gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv)
    assert rel(via_forward, direct) <= 1e-12


class _Wrapper(torch.nn.Module):
    """A stand-in for DDP/FSDP-style wrappers: holds ``.module`` and forwards every call to it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_wrapped_model_runs_the_loss_inside_the_wrapper_forward():
    model = build("phi_bias")
    inputs = make_inputs()
    old, ref = _old_ref(model, inputs, 1.0)
    _, expected, _, g_ref = run_both(model, inputs, old, ref, loss_type="grpo", beta=0.1)
    wrapped = _Wrapper(model)
    gkt.enable_fused_forward(wrapped)
    assert gkt.unwrap_causal_lm(wrapped) is model
    model.zero_grad(set_to_none=True)
    loss = gkt.model_grpo_loss(wrapped, *inputs, old, ref, loss_type="grpo", beta=0.1)
    loss.backward()
    assert wrapped.calls == 1  # through the wrapper's forward, once
    assert rel(loss, expected) <= 1e-10
    assert_grads_close(grads(model), g_ref, 1e-10)
    logp = gkt.model_token_logprobs(wrapped, inputs[0], inputs[1], inputs[2].shape[1])
    assert wrapped.calls == 2 and logp.shape == inputs[2].shape


def test_ddp_single_process_gloo():
    """A real DistributedDataParallel (world size 1, gloo): the loss runs inside DDP's forward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if DEVICE.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = build("llama")
        inputs = make_inputs()
        old, ref = _old_ref(model, inputs, 1.0)
        _, expected, _, g_ref = run_both(model, inputs, old, ref, loss_type="dapo")
        gkt.enable_fused_forward(model)
        ddp = DistributedDataParallel(model)
        model.zero_grad(set_to_none=True)
        loss = gkt.model_grpo_loss(ddp, *inputs, old, ref, loss_type="dapo")
        loss.backward()
        assert rel(loss, expected) <= 1e-10
        assert_grads_close(grads(model), g_ref, 1e-10)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ errors


def test_errors():
    model = build("llama")
    input_ids, attention_mask, completion_ids, completion_mask, adv = make_inputs()
    L = input_ids.shape[1]
    with pytest.raises(ValueError, match="logits_to_keep"):
        gkt.completion_hidden_states(model, input_ids, attention_mask, L)
    with pytest.raises(ValueError, match="logits_to_keep"):
        gkt.model_token_logprobs(model, input_ids, attention_mask, 0)
    with pytest.raises(TypeError, match="logits_to_keep"):
        gkt.model_token_logprobs(model, input_ids, attention_mask, torch.tensor(3))
    bad = completion_ids.clone()
    bad[0, 0] = (bad[0, 0] + 1) % V
    with pytest.raises(ValueError, match="last K columns"):
        gkt.model_grpo_loss(model, input_ids, attention_mask, bad, completion_mask, adv)
    with pytest.raises(TypeError, match="bias"):
        gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv,
                            bias=torch.zeros(V, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        gkt.model_grpo_loss(model, input_ids, attention_mask, completion_ids, completion_mask, adv, logit_softcap=30.0)
    with pytest.raises(TypeError, match="causal LM"):
        gkt.lm_head_params(torch.nn.Linear(3, 3))


def test_check_lm_head_detects_a_head_it_does_not_model():
    model = build("llama")

    class DoubledHead(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    head = DoubledHead(32, V, bias=False, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
    model.lm_head = head
    with pytest.raises(AssertionError, match="does not model"):
        gkt.check_lm_head(model)


def test_peft_lora_model():
    """A LoRA-wrapped model (PeftModel): the adapters live inside the base model's modules, so the
    unwrapped backbone applies them; gradients reach the adapter weights only (the rest is frozen)."""
    peft = pytest.importorskip("peft")
    model = build("qwen2_untied")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    lora = lora.to(device=DEVICE, dtype=torch.float64)
    inputs = inputs_for("qwen2_untied")
    old, ref = _old_ref(lora, inputs, 1.0)
    for wrapped in (False, True):
        if wrapped:
            gkt.enable_fused_forward(lora)
        lora.zero_grad(set_to_none=True)
        loss = gkt.model_grpo_loss(lora, *inputs, old, ref, loss_type="grpo", beta=0.05)
        loss.backward()
        g_ours = grads(lora)
        lora.zero_grad(set_to_none=True)
        expected = oracle_loss(lora, *inputs, old, ref, loss_type="grpo", beta=0.05)
        expected.backward()
        g_ref = grads(lora)
        assert rel(loss, expected) <= 1e-10
        assert_grads_close(g_ours, g_ref, 1e-10)
        assert any(g is not None for n, g in g_ours.items() if "lora_" in n)

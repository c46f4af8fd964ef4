"""verl 0.9.1's ``calculate_sum_pi_squared`` through grpo_kernels' fused forward, against verl's own
``calculate_sum_pi_squared_from_logits`` (in verl's venv, like tests/test_integrations_verl.py)::

    <verl venv>/bin/python -m pytest -q tests/test_integrations_verl_stats.py -p no:cacheprovider

1. ``linear_cross_entropy`` under ``capture_sum_pi_squared``: verl's function on materialized
   float64 logits (1e-10), every backend in float32 (1e-5).
2. The forward-only pass of verl's ``FSDPEngineWithLMHead`` (``forward_backward_batch(...,
   forward_only=True)`` with ``calculate_sum_pi_squared=True``, as ``ray_trainer._compute_old_log_prob``
   asks): stock (``use_fused_kernels=False``: verl materializes the logits) and grpo_kernels' fused
   forward (``use_fused_kernels=True``, ``impl_backend="grpo_kernels"``, which verl alone refuses) give
   the same ``sum_pi_squared``, ``log_probs`` and ``entropy`` in the same nested layout, and the fused
   pass never allocates N*V elements.
"""
from __future__ import annotations

import pytest
import torch

verl = pytest.importorskip("verl")
pytest.importorskip("tensordict")
transformers = pytest.importorskip("transformers")

from support import require  # noqa: E402
import test_integrations_verl as tiv  # noqa: E402  (its verl engine harness)
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits  # noqa: E402

from grpo_kernels.integrations import verl as gkv  # noqa: E402
from grpo_kernels.integrations import verl_forward  # noqa: E402

V, H = 37, 16
VOCAB, _batch, _engine, _MaxNumel = tiv.VOCAB, tiv._batch, tiv._engine, tiv._MaxNumel
gloo_group = tiv.gloo_group  # the fixture, under its name


def _verl_sum_pi_squared(hidden, weight, temperature):
    return calculate_sum_pi_squared_from_logits((hidden.double() @ weight.double().T) / temperature)


@pytest.mark.parametrize("shape", [(1, 13), (3, 5)], ids=["packed", "dense"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_cross_entropy_captures_verls_sum_pi_squared_fp64(shape, temperature):
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, shape, generator=g)
    plain = gkv.linear_cross_entropy(hidden, weight, labels, temperature, keep_shape=True, backend="torch")
    with torch.no_grad(), verl_forward.capture_sum_pi_squared() as captured:
        logp, ent = gkv.linear_cross_entropy(hidden, weight, labels, temperature, keep_shape=True, backend="torch")
    assert len(captured) == 1 and captured[0].shape == shape
    torch.testing.assert_close(captured[0], _verl_sum_pi_squared(hidden, weight, temperature), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logp, plain[0], rtol=1e-12, atol=1e-12)  # the same log-probs / entropies
    torch.testing.assert_close(ent, plain[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_linear_cross_entropy_sum_pi_squared_every_backend_fp32(backend):
    require(backend)
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(1, 11, H, generator=g) * 2
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (1, 11), generator=g)
    with torch.no_grad(), verl_forward.capture_sum_pi_squared() as captured:
        gkv.linear_cross_entropy(hidden, weight, labels, 0.9, keep_shape=True, backend=backend)
    assert captured[0].dtype == torch.float32
    torch.testing.assert_close(captured[0].double(), _verl_sum_pi_squared(hidden, weight, 0.9), rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_sum_pi_squared_refuses_grad_and_vocab_parallel(gloo_group):
    hidden = torch.randn(4, H, requires_grad=True)
    weight = torch.randn(V, H)
    labels = torch.randint(0, V, (4,))
    with verl_forward.capture_sum_pi_squared(), pytest.raises(NotImplementedError, match="forward-only"):
        gkv.linear_cross_entropy(hidden, weight, labels, backend="torch")
    with torch.no_grad(), verl_forward.capture_sum_pi_squared(), pytest.raises(NotImplementedError,
                                                                               match="vocab-parallel"):
        gkv.linear_cross_entropy(hidden, weight, labels, 1.0, "none", gloo_group, backend="torch")


def _fsdp_model(dtype):
    """verl_engine's tiny FSDP2 Qwen2, of a class of its own: the fused forward patches the class."""
    from torch.distributed.fsdp import fully_shard

    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cls = type(f"Qwen2ForSumPiSquared{str(dtype)[-2:]}", (transformers.Qwen2ForCausalLM,), {})
    torch.manual_seed(0)
    model = cls(cfg).to(dtype)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _nested_values(t):
    return t.values() if t.is_nested else t


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("use_remove_padding", [True, False], ids=["packed", "padded"])
def test_fsdp_forward_only_sum_pi_squared_fused_equals_stock(gloo_group, monkeypatch, dtype, tol, use_remove_padding):
    from verl.models.transformers import monkey_patch

    model = _fsdp_model(dtype)
    eng = _engine(model, monkeypatch, use_remove_padding)
    data = _batch(dtype, use_remove_padding)
    # 0.5: verl's stock forward divides by the temperature as a float32 tensor, its fused forward by the
    # Python float; one that float32 holds exactly keeps the fp64 comparison at 1e-10
    tu.assign_non_tensor(data, calculate_sum_pi_squared=True, compute_loss=False, temperature=0.5)
    n_tokens = int(data["input_ids"].offsets()[-1])
    stock = eng.forward_backward_batch(data.clone(), None, forward_only=True)["model_output"]
    fused_data = data.clone()
    tu.assign_non_tensor(fused_data, use_fused_kernels=True)
    with gkv.enabled(loss=False, backend="torch", chunk_size=16):
        monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="grpo_kernels")
        with _MaxNumel() as mode:
            fused = eng.forward_backward_batch(fused_data, None, forward_only=True)["model_output"]
    with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared"):  # verl alone refuses the pair
        eng.prepare_model_outputs(None, {}, fused_data, None)
    assert mode.max < n_tokens * VOCAB, (mode.max, n_tokens * VOCAB)
    for key in ("sum_pi_squared", "log_probs", "entropy"):
        s, f = stock[key], fused[key]
        assert f.is_nested == s.is_nested and f.shape[0] == s.shape[0], key
        if s.is_nested:
            assert torch.equal(f.offsets(), s.offsets()), key
        fv, sv = _nested_values(f).double(), _nested_values(s).double()
        if key == "log_probs" and not use_remove_padding:
            # verl's own two padded paths label a sequence's last position differently (the stock one
            # with the next sequence's first token, the fused one within the row): no response reads it
            keep = torch.ones_like(fv, dtype=torch.bool)
            keep[s.offsets()[1:] - 1] = False
            fv, sv = fv[keep], sv[keep]
        torch.testing.assert_close(fv, sv, rtol=tol, atol=tol, msg=key)
    values = _nested_values(fused["sum_pi_squared"])
    assert values.numel() == n_tokens and bool(((values > 0) & (values <= 1 + tol)).all())

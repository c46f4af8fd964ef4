"""The op boundary (grpo_kernels/calls.py): every field of a call crosses a custom op by name and
comes back unchanged; the ops' schemas are the calls' PARAMS. And GRPOLoss's per-call overrides:
validated, without re-validating the module's own options."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from grpo_kernels import GRPOLoss, grpo_loss, ops  # noqa: F401  (ops registers the custom ops)
from grpo_kernels.calls import LOSS_INPUT_FIELDS, LogprobsCall, LogprobsGradCall, LossCall
from grpo_kernels.objective import LossInputs
from grpo_kernels.options import (OPTION_OP_PARAMS, ExecutionOptions, GRPOOptions, VocabParallel, option_op_args,
                                  split_options, with_overrides)
from support import make_batch, rel_err

B, T, H, V = 2, 3, 4, 5


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _options():
    """Options away from every default, so a field swapped with another cannot go unnoticed."""
    opts = GRPOOptions(beta=0.25, epsilon_low=0.15, epsilon_high=0.3, delta=2.5, loss_type="grpo", temperature=0.7,
                       logit_softcap=20.0, sapo_temperature_pos=1.5, num_generations=2, scale_rewards="batch",
                       reward_eps=1e-3, top_entropy_quantile=0.5).validate()
    execution = ExecutionOptions(backend="torch", chunk_size=7, deterministic=True, batch_invariant=True).validate()
    return opts, execution, VocabParallel(group_name="g", vocab_start=3, reduce_grad_hidden=False)


def _assert_same(got, want):
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if dataclasses.is_dataclass(b) and not isinstance(b, type):
            _assert_same(a, b)
        elif isinstance(b, torch.Tensor):
            assert a is b, f.name
        else:
            assert a == b and type(a) is type(b), (f.name, a, b)


def test_loss_call_round_trip_by_name():
    inputs = LossInputs(**{name: _t(B, T) for name in LOSS_INPUT_FIELDS})
    opts, execution, vp = _options()
    call = LossCall(hidden=_t(B * T, H), weight=_t(V, H), bias=_t(V), targets=torch.zeros(B * T, dtype=torch.int64),
                    inputs=inputs, options=opts, execution=execution, vocab_parallel=vp, needs=(True, False, True))
    args = call.to_op_args()
    assert len(args) == len(LossCall.PARAMS)
    named = dict(zip(LossCall.NAMES, args))
    assert named["GRPOOptions_beta"] == 0.25 and named["ExecutionOptions_chunk_size"] == 7
    assert named["VocabParallel_vocab_start"] == 3 and named["adv"] is inputs.adv
    _assert_same(LossCall.from_op_args(args), call)


def test_logprobs_calls_round_trip_by_name():
    opts, execution, vp = _options()
    head = dict(hidden=_t(6, H), weight=_t(V, H), bias=None, targets=torch.zeros(6, dtype=torch.int64))
    call = LogprobsCall(**head, options=opts, execution=execution, vocab_parallel=vp, need_entropy=False)
    _assert_same(LogprobsCall.from_op_args(call.to_op_args()), call)
    grad = LogprobsGradCall(**head, lse=_t(6), entropy=_t(6), target_logit=_t(6), grad_logp=_t(6), grad_entropy=None,
                            options=opts, execution=execution, vocab_parallel=vp, needs=(True, True, False))
    _assert_same(LogprobsGradCall.from_op_args(grad.to_op_args()), grad)


@pytest.mark.parametrize("op,call_class", [("grpo_loss", LossCall), ("token_logprobs", LogprobsCall),
                                           ("token_logprobs_backward", LogprobsGradCall)])
def test_op_schema_is_the_call_params(op, call_class):
    schema = getattr(torch.ops.grpo_kernels, op).default._schema
    assert tuple(a.name for a in schema.arguments) == call_class.NAMES


def test_int_option_is_a_float_argument():
    opts = GRPOOptions(beta=1, delta=3).validate()
    named = dict(zip((name for name, _ in OPTION_OP_PARAMS), option_op_args(opts, ExecutionOptions(), VocabParallel())))
    assert type(named["GRPOOptions_beta"]) is float and type(named["GRPOOptions_delta"]) is float


def test_scale_rewards_bool_is_named_once():
    opts, _ = split_options(dict(scale_rewards=False))
    assert opts.scale_rewards == "none"
    assert opts.replace(scale_rewards=True).scale_rewards == "group"
    with pytest.raises(TypeError, match="scale_rewards holds the mode's name"):
        GRPOOptions(scale_rewards=True).validate()


def test_overrides_replace_only_what_is_given():
    opts, execution = split_options(dict(loss_type="bnpo", beta=0.1, chunk_size=4))
    same = with_overrides(opts, execution, dict(bias=None))
    assert same[0] is opts and same[1] is execution
    new_opts, new_exec = with_overrides(opts, execution, dict(beta=0.2, backend="torch"))
    assert new_opts == opts.replace(beta=0.2) and new_exec == execution.replace(backend="torch")
    with pytest.raises(ValueError, match="epsilon_low and epsilon_high must be >= 0"):
        with_overrides(opts, execution, dict(epsilon_low=-1.0))


def test_module_overrides_match_the_function():
    b = make_batch(seed=3)
    args = (b["hidden"], b["weight"], b["targets"], b["advantages"], b["mask"], b["old_logps"], b["ref_logps"])
    module = GRPOLoss(loss_type="grpo", backend="torch")
    got = module(*args, beta=0.05, bias=b["bias"], temperature=0.8)
    want = grpo_loss(*args, loss_type="grpo", backend="torch", beta=0.05, bias=b["bias"], temperature=0.8)
    assert rel_err(got, want) == 0
    with pytest.raises(TypeError, match=r"unknown option\(s\): \['epsilon'\]"):
        module(*args, epsilon=0.2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        module(*args, temperature=0.0)

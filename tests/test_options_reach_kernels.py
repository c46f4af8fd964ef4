"""Every option reaches its kernel, through the public functions, on every backend.

Options travel as objects (``GRPOOptions``, ``ExecutionOptions``) from ``grpo_loss`` /
``token_logprobs`` through the custom op, the plan and the sweep to the row backend. Here
each option is set to a non-default value on the public path and the test looks where it
must arrive: the option objects every backend primitive receives, and the arguments of the
kernel launches themselves (the Triton launcher, the C++/CUDA extension's entry points).
The old rebuild of the options inside the op dropped ``deterministic`` without any test
noticing; this file is what notices.
"""
from __future__ import annotations

import pytest
import torch

from support import backend_params, device_for_tests, require
from grpo_kernels import grpo_loss, token_logprobs
from grpo_kernels.backends import get_backend
from grpo_kernels.options import EXECUTION_FIELDS, LOSS_FIELDS, GRPOOptions

DEVICE = device_for_tests()
B, T, H, V = 2, 4, 8, 19

#: a non-default value for every option, with what it needs to be valid
LOSS_CASES = {
    "beta": (0.03, {}),
    "epsilon_low": (0.15, {}),
    "epsilon_high": (0.31, {}),
    "delta": (1.7, {}),
    "loss_type": ("bnpo", {}),
    "importance_sampling_level": ("sequence", {}),
    "temperature": (0.9, {}),
    "logit_softcap": (25.0, {}),
    "max_completion_length": (7, {"loss_type": "dr_grpo"}),
    "sapo_temperature_pos": (0.8, {"loss_type": "sapo"}),
    "sapo_temperature_neg": (1.3, {"loss_type": "sapo"}),
    "use_bias_correction_kl": (True, {"beta": 0.05}),
    "top_entropy_quantile": (0.6, {}),
    "vespo_k_pos": (2.5, {"loss_type": "vespo"}),
    "vespo_lambda_pos": (3.5, {"loss_type": "vespo"}),
    "vespo_k_neg": (2.5, {"loss_type": "vespo"}),
    "vespo_lambda_neg": (1.5, {"loss_type": "vespo"}),
    "entropy_coef": (0.01, {}),
    "off_policy_mask_threshold": (0.5, {}),
    "policy_loss": ("vanilla", {}),
    "loss_agg_mode": ("seq-mean-token-mean", {}),
    "kl_estimator": ("k1", {"beta": 0.05}),
    "clip_ratio_c": (4.0, {"policy_loss": "vanilla"}),
    "clip_cov_ratio": (0.1, {"policy_loss": "clip_cov"}),
    "clip_cov_lb": (0.5, {"policy_loss": "clip_cov"}),
    "clip_cov_ub": (6.0, {"policy_loss": "clip_cov"}),
    "kl_cov_ratio": (0.1, {"policy_loss": "kl_cov"}),
    "ppo_kl_coef": (0.2, {"policy_loss": "kl_cov"}),
    "dro_beta": (0.1, {"policy_loss": "dro"}),
    "dp_size": (2, {"policy_loss": "vanilla"}),
    "loss_scale_factor": (10.0, {"loss_agg_mode": "seq-mean-token-sum-norm"}),
    "rollout_is": ("sequence", {"policy_loss": "bypass_mode"}),
    "rollout_is_threshold": (3.0, {"policy_loss": "bypass_mode", "rollout_is": "token"}),
    "rollout_is_threshold_lower": (0.5, {"policy_loss": "bypass_mode", "rollout_is": "token"}),
    "rollout_is_batch_normalize": (True, {"policy_loss": "bypass_mode", "rollout_is": "token"}),
    "rollout_rs": ("token_k1", {"policy_loss": "bypass_mode", "rollout_rs_threshold": "1.5"}),
    "rollout_rs_threshold": ("0.5_1.5", {"policy_loss": "bypass_mode", "rollout_rs": "token_k1"}),
    "bypass_loss_type": ("reinforce", {"policy_loss": "bypass_mode"}),
    # the rewards path (grpo_loss(rewards=...)): these run with rewards instead of advantages
    "num_generations": (2, {}),
    "scale_rewards": ("batch", {"num_generations": 1}),
    "reward_eps": (0.01, {"num_generations": 2}),
}
#: options read only with rewards: their cases call grpo_loss(advantages=None, rewards=...)
REWARD_OPTIONS = ("num_generations", "scale_rewards", "reward_eps")
EXECUTION_CASES = {"chunk_size": 3, "deterministic": True, "batch_invariant": True}


def test_every_option_has_a_case():
    assert set(LOSS_CASES) == set(LOSS_FIELDS)
    assert set(EXECUTION_CASES) | {"backend"} == set(EXECUTION_FIELDS)
    for name, (value, _) in LOSS_CASES.items():
        assert getattr(GRPOOptions(), name) != value, name


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    adv = torch.randn(B, generator=g)
    ref = -3 + 0.1 * torch.randn(B, T, generator=g)
    old = -3 + 0.1 * torch.randn(B, T, generator=g)
    return [x.to(DEVICE) for x in (hidden, weight, targets, adv, mask, old, ref)]


def _rewards():
    return torch.tensor([[0.5, 1.0], [2.0, float("nan")]], device=DEVICE)


class Recorder:
    """Wraps one backend's primitives and kernel entry points and records what they get."""

    def __init__(self, monkeypatch, backend_name):
        self.calls = []  # (primitive, options, execution, rows)
        self.launches = []  # kernel-level arguments (dicts)
        self.backend = get_backend(backend_name, torch.device(DEVICE), torch.float32)
        for prim in ("row_stats", "row_grad_", "row_fused_"):
            fn = getattr(self.backend, prim)
            if fn is None:
                continue
            monkeypatch.setattr(self.backend, prim, self._wrap(prim, fn))
        if backend_name == "triton":
            from grpo_kernels.backends.triton import row_kernels

            real = row_kernels._launch

            def launch(plain, tuned, grid, V_, deterministic, args, kwargs):
                self.launches.append(dict(kwargs, deterministic=deterministic))
                return real(plain, tuned, grid, V_, deterministic, args, kwargs)

            monkeypatch.setattr(row_kernels, "_launch", launch)
        if backend_name == "cpp":
            from grpo_kernels.backends import cpp

            ext = cpp.load_extension()

            class Spy:
                def __getattr__(_, name):
                    fn = getattr(ext, name)

                    def spy(*args, **kwargs):
                        if name.startswith("row_"):
                            self.launches.append(dict(kwargs, entry=name))
                        return fn(*args, **kwargs)

                    return spy

            monkeypatch.setattr(cpp, "load_extension", lambda allow_build=True: Spy())

    def _wrap(self, prim, fn):
        def wrapped(logits, targets, *args, **kwargs):
            options, execution = args[-2], args[-1]
            self.calls.append((prim, options, execution, logits.shape[0]))
            return fn(logits, targets, *args, **kwargs)

        return wrapped


def _loss(backend, recorder_options, rewards=False):
    h, w, t, a, m, old, ref = _inputs()
    h.requires_grad_(True)
    w.requires_grad_(True)
    if rewards:
        loss = grpo_loss(h, w, t, None, m, old, ref, backend=backend, rewards=_rewards(), reward_weights=[1.0, 0.5],
                         **recorder_options)
    else:
        loss = grpo_loss(h, w, t, a, m, old, ref, backend=backend, **recorder_options)
    loss.backward()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", sorted(LOSS_CASES))
def test_loss_option_reaches_the_backend(backend, name, monkeypatch):
    require(backend, DEVICE, torch.float32)
    value, extra = LOSS_CASES[name]
    rec = Recorder(monkeypatch, backend)
    _loss(backend, {name: value, **extra}, rewards=name in REWARD_OPTIONS)
    assert rec.calls, "no backend primitive ran"
    for prim, options, execution, _ in rec.calls:
        assert isinstance(options, GRPOOptions)
        assert getattr(options, name) == value, (prim, name)
        for k, v in extra.items():
            assert getattr(options, k) == v, (prim, k)
        assert execution.backend == backend


# kernel-level argument of each option, per backend: (launch key, expected value)
TRITON_ARGS = {
    "beta": ("beta", 0.03), "epsilon_low": ("lo", 1 - 0.15), "epsilon_high": ("hi", 1 + 0.31),
    "delta": ("delta", 1.7), "temperature": ("temperature", 0.9), "logit_softcap": ("softcap", 25.0),
    "use_bias_correction_kl": ("BIAS_KL", True),
    "num_generations": ("G", 2), "scale_rewards": ("SCALE", 1), "reward_eps": ("reward_eps", 0.01),
}
CPP_ARGS = {
    "beta": ("beta", 0.03), "epsilon_low": ("lo", 1 - 0.15), "epsilon_high": ("hi", 1 + 0.31),
    "delta": ("delta", 1.7), "temperature": ("temperature", 0.9), "logit_softcap": ("softcap", 25.0),
    "use_bias_correction_kl": ("bias_correction_kl", True), "sapo_temperature_pos": ("sapo_pos", 0.8),
    "sapo_temperature_neg": ("sapo_neg", 1.3),
    "num_generations": ("num_generations", 2), "scale_rewards": ("scale_mode", 1),
    "reward_eps": ("reward_eps", 0.01),
}


@pytest.mark.parametrize("backend, name", [(b, n) for b, table in (("triton", TRITON_ARGS), ("cpp", CPP_ARGS))
                                           for n in sorted(table)])
def test_loss_option_reaches_the_kernel_launch(backend, name, monkeypatch):
    table = TRITON_ARGS if backend == "triton" else CPP_ARGS
    require(backend, DEVICE, torch.float32)
    value, extra = LOSS_CASES[name]
    rec = Recorder(monkeypatch, backend)
    _loss(backend, {name: value, **extra}, rewards=name in REWARD_OPTIONS)
    key, want = table[name]
    fused = [launch for launch in rec.launches if key in launch]
    assert fused, f"no {backend} launch received {key!r}"
    for launch in fused:
        assert launch[key] == pytest.approx(want), (launch, key)


@pytest.mark.parametrize("backend", backend_params())
def test_execution_options_reach_the_backend(backend, monkeypatch):
    require(backend, DEVICE, torch.float32)
    rec = Recorder(monkeypatch, backend)
    _loss(backend, dict(EXECUTION_CASES))
    assert rec.calls
    for prim, _, execution, rows in rec.calls:
        assert execution.deterministic is True and execution.chunk_size == 3, prim
        assert execution.batch_invariant is True, prim
        assert rows <= 3, "chunk_size did not reach the sweep"
    if backend == "triton":  # deterministic reaches every launch: no autotuned tile
        assert rec.launches and all(launch["deterministic"] is True for launch in rec.launches)


@pytest.mark.parametrize("backend", backend_params())
def test_token_logprobs_options_reach_the_backend(backend, monkeypatch):
    require(backend, DEVICE, torch.float32)
    rec = Recorder(monkeypatch, backend)
    h, w, t = _inputs()[:3]
    h.requires_grad_(True)
    logp, ent = token_logprobs(h, w, t, temperature=0.9, logit_softcap=25.0, backend=backend, chunk_size=3,
                               deterministic=True, batch_invariant=True, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    prims = {c[0] for c in rec.calls}
    assert {"row_stats", "row_grad_"} <= prims
    for prim, options, execution, rows in rec.calls:
        assert (options.temperature, options.logit_softcap) == (0.9, 25.0), prim
        assert execution.deterministic and execution.batch_invariant and execution.backend == backend, prim
        assert rows <= 3, prim
    if backend == "triton":
        assert rec.launches and all(launch["deterministic"] is True for launch in rec.launches)
        assert all(launch["temperature"] == 0.9 and launch["softcap"] == 25.0 for launch in rec.launches)
    if backend == "cpp":
        assert rec.launches and all(launch["temperature"] == 0.9 and launch["softcap"] == 25.0
                                    for launch in rec.launches)

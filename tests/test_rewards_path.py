"""Rewards to loss in one pass: ``grpo_loss(advantages=None, rewards=r, num_generations=G, ...)``.

- On every backend (and every path: the fused one sweep, the sequence-cut and two-sweep paths, the
  entropy sweep, the oracle) the loss, its gradients and the metrics equal those of
  ``grpo_loss(group_advantages(r, G, scale_rewards=, weights=))`` (float64 to 1e-12, float32 to
  1e-5), and ``metrics.advantages`` is ``group_advantages``'s result; NaN rewards (unscored),
  unscorable completions, all-NaN groups, a sequence without a real token, G = 1 and G = B.
- On the fused backends (triton, cpp) the row kernel's epilogue computes the advantages in the same
  launch: the rewards path makes exactly one launch fewer than ``group_advantages(backend=<that
  backend>)`` followed by ``grpo_loss``, and no group-normalize launch at all.
"""
from __future__ import annotations

import pytest
import torch

from support import backend_params, device_for_tests, require, stable_seed
from grpo_kernels import GRPOLoss, grpo_loss
from grpo_kernels import group_advantages
from grpo_kernels.backends import get_backend

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DEVICE = device_for_tests()
B, T, H, V = 8, 4, 8, 23
NAN = float("nan")
WEIGHTS = [1.0, 0.5, 2.0]
#: (G, R (0: rewards [B]), scale_rewards, NaN pattern)
CASES = {
    "G1-vector-group": (1, 0, "group", None),
    "G2-R1-batch-nan": (2, 1, "batch", "some"),
    "G4-R2-group-nan-group": (4, 2, "group", "group"),
    "G4-R3-none-nan": (4, 3, "none", "some"),
    "G8-R2-batch": (8, 2, "batch", None),
    "G4-R2-True-nan-group": (4, 2, True, "group"),
    "G2-R3-False-nan": (2, 3, False, "some"),
}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def make(case, dtype, seed=0, device=DEVICE):
    G, R, mode, nan = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[3] = False  # a sequence without a real token: its advantage reaches no gradient
    rewards = rnd(B) if R == 0 else rnd(B, R)
    flat = rewards.view(B, -1)
    if nan is not None:
        flat[2, 0] = NAN  # one reward function did not score completion 2
        flat[5] = NAN  # completion 5 is unscorable
    if nan == "group":
        flat[G:2 * G] = NAN  # a whole group unscored
    batch = dict(hidden=rnd(B, T, H).to(dtype), weight=(0.5 * rnd(V, H)).to(dtype),
                 bias=(0.2 * rnd(V)).to(dtype), targets=torch.randint(0, V, (B, T), generator=g), mask=mask,
                 old=(-3.1 + 0.2 * rnd(B, T)).to(dtype), ref=(-3.1 + 0.2 * rnd(B, T)).to(dtype),
                 rewards=rewards.to(dtype))
    batch = {k: v.to(device) for k, v in batch.items()}
    weights = None if R == 0 else WEIGHTS[:R]
    return batch, dict(num_generations=G, scale_rewards=mode), weights


def run(batch, advantages=None, rewards=None, reward_weights=None, **options):
    h = batch["hidden"].clone().requires_grad_(True)
    w = batch["weight"].clone().requires_grad_(True)
    b = batch["bias"].clone().requires_grad_(True)
    extra = {} if rewards is None else dict(rewards=rewards, reward_weights=reward_weights)
    loss, metrics = grpo_loss(h, w, batch["targets"], advantages, batch["mask"], batch["old"], batch["ref"], bias=b,
                              return_metrics=True, **extra, **options)
    loss.backward()
    return loss, (h.grad, w.grad, b.grad), metrics


def rel(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all()
    return (x - ref).norm().item() / max(ref.norm().item(), 1e-30)


def check_same(case, dtype, backend, seed=0, **options):
    batch, settings, weights = make(case, dtype, seed)
    adv = group_advantages(batch["rewards"], settings["num_generations"], scale_rewards=settings["scale_rewards"],
                           weights=weights)
    opts = dict(backend=backend, beta=0.04, **settings, **options)
    loss_r, grads_r, m_r = run(batch, rewards=batch["rewards"], reward_weights=weights, **opts)
    loss_a, grads_a, m_a = run(batch, advantages=adv, **opts)
    tol = TOL[dtype]
    assert rel(loss_r, loss_a) < tol, (loss_r.item(), loss_a.item())
    for name, x, y in zip(("hidden", "weight", "bias"), grads_r, grads_a):
        assert x.dtype == dtype
        assert rel(x, y) < tol, f"grad_{name}: {rel(x, y):.3e}"
    assert m_a.advantages is None, "advantages given: metrics.advantages is None"
    assert m_r.advantages.shape == (B,) and m_r.advantages.dtype == adv.dtype
    assert (m_r.advantages - adv).abs().max().item() <= tol * max(1.0, adv.abs().max().item())
    if CASES[case][3] is not None:
        assert m_r.advantages[5].item() == 0.0, "an unscorable completion's advantage is 0"
    for name in ("kl_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "entropy_mean"):
        x, y = getattr(m_r, name), getattr(m_a, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert abs(x.item() - y.item()) <= tol * max(1.0, abs(y.item())), name


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", backend_params() + [pytest.param("reference", id="reference")])
def test_rewards_equal_group_advantages(backend, dtype, case):
    if backend != "reference":
        require(backend, DEVICE, dtype)
    check_same(case, dtype, backend, seed=stable_seed("rewards", case, dtype), chunk_size=5)


#: the other paths: sequence-cut sweep, two sweeps (a sequence longer than a chunk), the entropy sweep,
#: a batch-scope objective, cispo / sapo epilogues
PATH_OPTIONS = {
    "sequence_sweep": dict(importance_sampling_level="sequence"),
    "two_sweeps": dict(importance_sampling_level="sequence", chunk_size=2),
    "entropy_sweep": dict(top_entropy_quantile=0.5),
    "kl_cov": dict(policy_loss="kl_cov", kl_cov_ratio=0.2, beta=0.0),
    "cispo": dict(loss_type="cispo", epsilon_high=1.2),
    "sapo": dict(loss_type="sapo"),
}


@pytest.mark.parametrize("path", list(PATH_OPTIONS))
@pytest.mark.parametrize("backend", backend_params())
def test_rewards_on_every_path(backend, path):
    require(backend, DEVICE, torch.float64)
    opts = dict(PATH_OPTIONS[path])
    if "beta" in opts:  # check_same sets beta
        opts.pop("beta")
        opts["kl_estimator"] = "k3"
    check_same("G4-R2-group-nan-group", torch.float64, backend, seed=stable_seed("path", path), **opts)


def test_grpo_loss_module_takes_rewards():
    batch, settings, weights = make("G4-R3-none-nan", torch.float64)
    module = GRPOLoss(backend="torch", **settings)
    b = batch
    loss = module(b["hidden"], b["weight"], b["targets"], None, b["mask"], b["old"], b["ref"], rewards=b["rewards"],
                  reward_weights=weights)
    adv = group_advantages(b["rewards"], 4, scale_rewards="none", weights=weights)
    expect = module(b["hidden"], b["weight"], b["targets"], adv, b["mask"], b["old"], b["ref"])
    assert rel(loss, expect) < 1e-12


# ----------------------------------------------------------------------------- one launch fewer


class Launches:
    """Counts the kernel launches of one backend: the fused row launches, the other row launches and
    the group-normalize launches (the extension's entry points for cpp; the Triton launcher and the
    backend's group_normalize for triton, whose "group" mode is one launch)."""

    def __init__(self, monkeypatch, name):
        self.log = []
        backend = get_backend(name, torch.device(DEVICE), torch.float32)
        if name == "triton":
            from grpo_kernels.backends.triton import row_kernels

            real = row_kernels._launch

            def launch(plain, tuned, grid, V_, deterministic, args, kwargs):
                self.log.append("row_fused_" if "HAS_REWARDS" in kwargs else "row")
                return real(plain, tuned, grid, V_, deterministic, args, kwargs)

            monkeypatch.setattr(row_kernels, "_launch", launch)
            real_group = backend.group_normalize

            def group_normalize(*args, **kwargs):
                self.log.append("group_normalize")
                return real_group(*args, **kwargs)

            monkeypatch.setattr(backend, "group_normalize", group_normalize)
        else:
            from grpo_kernels.backends import cpp

            ext = cpp.load_extension()
            log = self.log

            class Spy:
                def __getattr__(_, attr):
                    fn = getattr(ext, attr)

                    def spy(*args, **kwargs):
                        if attr.startswith("row_") or attr == "group_normalize":
                            log.append(attr)
                        return fn(*args, **kwargs)

                    return spy

            monkeypatch.setattr(cpp, "load_extension", lambda allow_build=True: Spy())

    def take(self):
        out, self.log[:] = list(self.log), []
        return out


@pytest.mark.parametrize("mode", ["group", "none"])
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_rewards_path_makes_one_launch_fewer(backend, mode, monkeypatch):
    require(backend, DEVICE, torch.float32)
    batch, _, weights = make("G4-R2-group-nan-group", torch.float32)
    settings = dict(num_generations=4, scale_rewards=mode)
    opts = dict(backend=backend, chunk_size=3, **settings)
    counter = Launches(monkeypatch, backend)
    loss_r, grads_r, m_r = run(batch, rewards=batch["rewards"], reward_weights=weights, **opts)
    fused_path = counter.take()
    adv = group_advantages(batch["rewards"], 4, scale_rewards=mode, weights=weights, backend=backend)
    loss_a, grads_a, _ = run(batch, advantages=adv, **opts)
    two_step = counter.take()
    assert two_step.count("group_normalize") == 1
    assert "group_normalize" not in fused_path, "the rewards path launched a separate group normalization"
    assert len(fused_path) == len(two_step) - 1, (fused_path, two_step)
    assert fused_path.count("row_fused_") == two_step.count("row_fused_") >= 2  # several chunks, one launch each
    assert rel(loss_r, loss_a) < 1e-5
    assert all(rel(x, y) < 1e-5 for x, y in zip(grads_r, grads_a))
    assert rel(m_r.advantages, adv) < 1e-6

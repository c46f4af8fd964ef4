"""verl 0.9.1's rollout correction and ``policy_loss="bypass_mode"`` (grpo_kernels.rollout_correction).

- without verl: the option parsing, the scope each option needs (checked by perturbation: a
  token's gradient must not move when what its scope excludes moves), the token-scope
  evaluation on flat token selections, and every fast backend against the float64 oracle;
- against verl itself: ``tests/verl_rollout_correction.py`` runs in a Python with verl 0.9.1
  (``GRPO_KERNELS_VERL_PYTHON``, e.g. ``/work/verl-venv/bin/python``; skipped without it) and
  dumps verl's bypass_mode loss and gradient, IS weights and rejection masks on a grid of cases,
  its whole ppo_loss on a subset and which rejection specs it accepts; ``objective_loss``,
  ``rollout_weights`` and ``grpo_loss(backend="torch")`` must match to float64 1e-12.
"""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from support import backend_params, check_against_oracle, make_batch
from grpo_kernels import epilogue, grpo_loss, objective, rollout_correction, verl_objective
from grpo_kernels.options import GRPOOptions
from grpo_kernels.rollout_correction import Rejection, is_threshold_options, parse_rejection, rollout_weights

HERE = os.path.dirname(os.path.abspath(__file__))
VERL_SCRIPT = os.path.join(HERE, "verl_rollout_correction.py")
VERL_PYTHON_ENV = "GRPO_KERNELS_VERL_PYTHON"
#: optional: the .pt an earlier run of verl_rollout_correction.py wrote (then no verl is needed)
VERL_RESULTS_ENV = "GRPO_KERNELS_VERL_ROLLOUT_RESULTS"
DEVICE = "cpu"


def opts(**kw) -> GRPOOptions:
    return GRPOOptions(policy_loss="bypass_mode", **kw).validate()


# ---------------------------------------------------------------- parsing


def test_parse_rejection_follows_verl():
    assert parse_rejection(None, None) == ()
    assert parse_rejection(None, "0.5") == ()  # a threshold without options is ignored, as in verl
    assert parse_rejection("token_k1", "2.0") == (Rejection("token_k1", 0.5, 2.0),)  # k1: lower = 1/upper
    assert parse_rejection("token_k1", "0.25_4") == (Rejection("token_k1", 0.25, 4.0),)
    # repeats dropped (first kept), one threshold shared, spaces ignored
    assert parse_rejection(" seq_mean_k2 ,seq_max_k3, seq_mean_k2", "0.1") == (
        Rejection("seq_mean_k2", None, 0.1), Rejection("seq_max_k3", None, 0.1))
    assert parse_rejection("token_k1,seq_sum_k3", "0.5_2, 0.3") == (
        Rejection("token_k1", 0.5, 2.0), Rejection("seq_sum_k3", None, 0.3))
    assert [r.level for r in parse_rejection("token_k3,seq_sum_k1", "0.1,0.5_2")] == ["token", "sequence"]


@pytest.mark.parametrize("rs, threshold, exc", [
    ("token_k4", "0.1", ValueError), ("", "0.1", ValueError), (" , ", "0.1", ValueError),
    ("token_k1", None, ValueError), ("token_k1", "", ValueError), ("token_k1", "0.5", ValueError),
    ("token_k1", "2_1", ValueError), ("token_k1", "0", ValueError), ("token_k1", "nan", ValueError),
    ("token_k2", "0.1_0.2", ValueError), ("token_k2", "0", ValueError), ("token_k2", "x", ValueError),
    ("token_k1,token_k2", "1.5,0.1,0.2", ValueError), (3, "0.1", TypeError), ("token_k2", 0.1, TypeError),
])
def test_parse_rejection_rejects(rs, threshold, exc):
    with pytest.raises(exc, match="rollout_rs"):
        parse_rejection(rs, threshold)
    with pytest.raises(exc, match="rollout_rs"):
        GRPOOptions(policy_loss="bypass_mode", rollout_rs=rs, rollout_rs_threshold=threshold).validate()


def test_is_threshold_options():
    assert is_threshold_options(2.0) == {"rollout_is_threshold": 2.0, "rollout_is_threshold_lower": None}
    assert is_threshold_options("1.5") == {"rollout_is_threshold": 1.5, "rollout_is_threshold_lower": None}
    assert is_threshold_options("0.5_2") == {"rollout_is_threshold": 2.0, "rollout_is_threshold_lower": 0.5}
    with pytest.raises(TypeError, match="rollout_is_threshold"):
        is_threshold_options(True)
    with pytest.raises(ValueError, match="rollout_is_threshold"):
        is_threshold_options("a_b")


# ---------------------------------------------------------------- scope

SCOPE_CASES = [
    (dict(), "token"),
    (dict(rollout_is="sequence", rollout_is_batch_normalize=True), "token"),  # ppo_clip applies no IS weights
    (dict(bypass_loss_type="reinforce"), "token"),
    (dict(bypass_loss_type="reinforce", rollout_is="token"), "token"),
    (dict(bypass_loss_type="reinforce", rollout_is="token", rollout_is_threshold_lower=0.5), "token"),
    (dict(bypass_loss_type="reinforce", rollout_is="sequence"), "sequence"),
    (dict(bypass_loss_type="reinforce", rollout_is="token", rollout_is_batch_normalize=True), "batch"),
    (dict(bypass_loss_type="reinforce", rollout_is="sequence", rollout_is_batch_normalize=True), "batch"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25"), "batch"),  # token-mean counts the kept tokens
    (dict(rollout_rs="token_k2", rollout_rs_threshold="0.02", loss_agg_mode="token-sum"), "token"),
    (dict(rollout_rs="seq_max_k3", rollout_rs_threshold="0.05", loss_agg_mode="token-sum"), "sequence"),
    (dict(rollout_rs="token_k3", rollout_rs_threshold="0.02", loss_agg_mode="seq-mean-token-mean"), "batch"),
    (dict(rollout_rs="token_k3", rollout_rs_threshold="0.02", loss_agg_mode="seq-mean-token-sum"), "batch"),
    (dict(bypass_loss_type="reinforce", rollout_is="sequence", rollout_rs="token_k1", rollout_rs_threshold="1.3",
          loss_agg_mode="token-sum"), "sequence"),
]


@pytest.mark.parametrize("kw, expected", SCOPE_CASES, ids=[str(i) for i in range(len(SCOPE_CASES))])
def test_scope(kw, expected):
    o = opts(**kw)
    assert rollout_correction.scope(o) == expected
    assert objective.scope(o) == expected


def _scope_batch(seed=0, B=5, T=6):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    logp = -torch.rand(B, T, generator=g, dtype=f64) * 2 - 0.05
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=f64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[0] = True
    mask[2] = False
    adv = torch.randn(B, 1, generator=g, dtype=f64) + 0.2 * torch.randn(B, T, generator=g, dtype=f64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=f64)
    return logp, old, mask, adv, ref


#: options whose rejection fires on _scope_batch, for every scope
PERTURB_CASES = [kw for kw, _ in SCOPE_CASES] + [
    dict(bypass_loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.2, rollout_rs="token_k1",
         rollout_rs_threshold="0.8_1.3", loss_agg_mode="token-sum", beta=0.1, kl_estimator="k1"),
    dict(rollout_rs="seq_sum_k2,token_k3", rollout_rs_threshold="0.2,0.05", loss_agg_mode="token-sum",
         entropy_coef=0.1),
]


def _grad(logp, old, mask, adv, ref, o):
    lp = logp.clone().requires_grad_(True)
    ent = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1), dtype=logp.dtype)
    loss = objective.objective_loss(lp, ent, objective.LossInputs(mask=mask, adv=adv, old=old, ref=ref), o)
    (g,) = torch.autograd.grad(loss, lp)
    return g


NARROW_CASES = [kw for kw in PERTURB_CASES if rollout_correction.scope(opts(**kw)) != "batch"]


@pytest.mark.parametrize("kw", NARROW_CASES, ids=[str(i) for i in range(len(NARROW_CASES))])
def test_scope_is_wide_enough(kw):
    """Moving what a scope excludes (the other tokens for "token", the other rows for "sequence")
    leaves a token's gradient exactly where it was (batch scope excludes nothing)."""
    o = opts(**kw)
    s = rollout_correction.scope(o)
    logp, old, mask, adv, ref = _scope_batch()
    g0 = _grad(logp, old, mask, adv, ref, o)
    B, T = logp.shape
    gen = torch.Generator().manual_seed(5)
    for i in range(B):
        for j in range(T):
            moved = logp.clone()
            other = torch.ones(B, T, dtype=torch.bool)
            if s == "token":
                other[i, j] = False
            else:
                other[i] = False
            moved = torch.where(other, logp + 0.4 * torch.randn(B, T, generator=gen, dtype=logp.dtype), logp)
            g1 = _grad(moved, old, mask, adv, ref, o)
            keep = ~other
            assert torch.equal(g1[keep], g0[keep]), (s, i, j)
            if s == "sequence":
                break


def test_the_rejection_widens_the_scope_for_real():
    """The negative control of test_scope_is_wide_enough: token-level rejection under token-mean
    moves the other tokens' gradients (the normalizer counts the kept tokens)."""
    o = opts(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25")
    logp, old, mask, adv, ref = _scope_batch()
    g0 = _grad(logp, old, mask, adv, ref, o)
    moved = logp.clone()
    moved[0, 0] = old[0, 0] + 5.0  # rejected now
    g1 = _grad(moved, old, mask, adv, ref, o)
    assert not torch.allclose(g1[1:], g0[1:])


@pytest.mark.parametrize("kw", [kw for kw, s in SCOPE_CASES if s == "token"] + [PERTURB_CASES[-2]])
def test_token_objective_on_a_flat_selection_is_objective_loss(kw):
    """The one-sweep path evaluates a token-scope objective on flat chunks of the real tokens with
    the aggregation as per-token weights (loss.py): the same sum and the same gradient."""
    o = opts(**kw)
    assert rollout_correction.scope(o) == "token"
    logp, old, mask, adv, ref = _scope_batch(seed=3)
    ent = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2), dtype=logp.dtype)
    inputs = objective.LossInputs(mask=mask, adv=adv.expand_as(logp), old=old, ref=ref)
    w = objective.objective_weights(mask, o, logp.dtype)
    rows = mask.reshape(-1)
    flat = lambda t: t.reshape(-1)[rows]  # noqa: E731
    token_inputs = epilogue.TokenInputs(old=flat(old), adv=flat(inputs.adv), weight=flat(w.policy), ref=flat(ref),
                                         kl_weight=flat(w.kl), entropy_weight=flat(w.entropy))
    lp = logp.clone().requires_grad_(True)
    full = objective.objective_loss(lp, ent, inputs, o)
    (g_full,) = torch.autograd.grad(full, lp)
    lp2 = flat(logp).clone().requires_grad_(True)
    parts = [objective.token_objective(lp2[s:s + 3], flat(ent)[s:s + 3], token_inputs.select(slice(s, s + 3)), o)
             for s in range(0, lp2.numel(), 3)]
    total = torch.cat(parts).sum()
    (g_flat,) = torch.autograd.grad(total, lp2)
    assert torch.allclose(total, full, rtol=1e-13, atol=1e-15)
    assert torch.allclose(g_flat, flat(g_full), rtol=1e-13, atol=1e-15)


def test_bypass_on_a_flat_selection_needs_token_scope():
    o = opts(bypass_loss_type="reinforce", rollout_is="sequence")
    x = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="token-scope"):
        verl_objective._bypass(x, x, x, x != 0, o)


# ---------------------------------------------------------------- rollout_weights


def test_rollout_weights_without_correction_is_the_mask_itself():
    logp, old, mask, _, _ = _scope_batch()
    w, eff = rollout_weights(logp, old, mask, GRPOOptions())
    assert w is None and eff is mask
    w, eff = rollout_weights(logp.requires_grad_(True), old, mask, GRPOOptions(rollout_is="token"))
    assert eff is mask and not w.requires_grad
    assert torch.equal(w, torch.where(mask, torch.exp(logp.detach() - old).clamp(max=2.0), 0.0))


def test_rollout_weights_reject_and_keep_the_mask_dtype():
    logp, old, mask, _, _ = _scope_batch()
    o = GRPOOptions(rollout_is="sequence", rollout_is_threshold=1.5, rollout_rs="token_k2", rollout_rs_threshold="0.02")
    for m in (mask, mask.double(), mask.to(torch.int32)):
        w, eff = rollout_weights(logp, old, m, o)
        assert eff.dtype == m.dtype
        reject = 0.5 * (logp - old).square() > 0.02
        assert torch.equal(eff != 0, (m != 0) & ~reject)
        assert 0 < int(((m != 0) & reject).sum()) < int((m != 0).sum())
        seq = torch.exp(torch.where(mask, logp - old, 0.0).sum(-1, keepdim=True)).clamp(max=1.5)
        assert torch.allclose(w, torch.where(mask, seq.expand_as(w), 0.0), rtol=1e-15, atol=0)


def test_bypass_reinforce_is_minus_advantage_logp_weight():
    logp, old, mask, adv, _ = _scope_batch()
    o = opts(bypass_loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.2,
             rollout_is_threshold_lower=0.9, rollout_rs="seq_mean_k1", rollout_rs_threshold="0.9_1.1")
    w, eff = rollout_weights(logp, old, mask, o)
    per_token, aggregated, policy_mask = verl_objective._bypass(logp, old, adv, mask, o)
    assert not aggregated and torch.equal(policy_mask, eff)
    assert torch.equal(per_token, torch.where(eff, -adv * logp * w, 0.0))


# ---------------------------------------------------------------- the fast backends against the oracle

BACKEND_CASES = {
    "ppo_clip": dict(),
    "ppo_clip_token_sum_rs": dict(rollout_rs="token_k1", rollout_rs_threshold="0.8_1.25", loss_agg_mode="token-sum"),
    "ppo_clip_rs_seq_mean": dict(rollout_rs="seq_mean_k3,token_k2", rollout_rs_threshold="0.03,0.05",
                                 loss_agg_mode="seq-mean-token-mean", clip_ratio_c=1.5),
    "pg_token_tis": dict(bypass_loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.2),
    "pg_seq_icepop": dict(bypass_loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=2.0,
                          rollout_is_threshold_lower=0.5, loss_agg_mode="seq-mean-token-sum"),
    "pg_seq_rs_token_sum": dict(bypass_loss_type="reinforce", rollout_is="token", rollout_rs="seq_max_k2",
                                rollout_rs_threshold="0.05", loss_agg_mode="token-sum"),
    "pg_batch_norm": dict(bypass_loss_type="reinforce", rollout_is="sequence", rollout_is_batch_normalize=True,
                          rollout_rs="token_k3", rollout_rs_threshold="0.04", num_items_in_batch=30, dp_size=2),
    "pg_norm_lsf": dict(bypass_loss_type="reinforce", rollout_is="token", rollout_is_batch_normalize=True,
                        loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=4.0, num_sequences_in_batch=5),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", sorted(BACKEND_CASES))
def test_bypass_mode_matches_oracle(backend, case):
    kw = dict(policy_loss="bypass_mode", beta=0.04, kl_estimator="low_var_kl", chunk_size=3, **BACKEND_CASES[case])
    batch = make_batch(B=4, T=6, dtype=torch.float64, device=DEVICE, seed=11, off_policy=0.3, token_advantages=True)
    check_against_oracle(backend, batch, torch.float64, device=DEVICE, **kw)


# ---------------------------------------------------------------- against verl 0.9.1

#: float64 agreement with verl: |ours - verl| <= TOL * max(1, |verl|) (gradients: the largest entry)
TOL = 1e-12
def _verl_python():
    path = os.environ.get(VERL_PYTHON_ENV)
    if not path:
        pytest.skip(f"{VERL_PYTHON_ENV} is not set (a python with verl 0.9.1, e.g. /work/verl-venv/bin/python)")
    if not os.path.exists(path):
        pytest.skip(f"{VERL_PYTHON_ENV}={path} does not exist")
    return path


@pytest.fixture(scope="module")
def verl_results(tmp_path_factory):
    saved = os.environ.get(VERL_RESULTS_ENV)
    if saved:  # a dump made earlier by the same script (e.g. cached by CI)
        return torch.load(saved, weights_only=True)
    python = _verl_python()
    out = tmp_path_factory.mktemp("verl") / "rollout_correction.pt"
    # outside the repository, so that verl's own top-level ``tests`` package cannot shadow ours
    proc = subprocess.run([python, VERL_SCRIPT, str(out)], cwd=str(out.parent), capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{VERL_SCRIPT} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def _options(case: dict, **extra) -> GRPOOptions:
    threshold = case["rollout_rs_threshold"]
    return GRPOOptions(
        policy_loss="bypass_mode", loss_agg_mode=case["loss_agg_mode"], epsilon_low=case["clip_ratio_low"],
        epsilon_high=case["clip_ratio_high"], clip_ratio_c=case["clip_ratio_c"], dp_size=case["dp_size"],
        loss_scale_factor=case["loss_scale_factor"], bypass_loss_type=case["loss_type"],
        rollout_is=case["rollout_is"], rollout_is_batch_normalize=case["rollout_is_batch_normalize"],
        rollout_rs=case["rollout_rs"], rollout_rs_threshold=None if threshold is None else str(threshold),
        **is_threshold_options(case["rollout_is_threshold"]), **extra).validate()


def _inputs(case: dict, **extra) -> objective.LossInputs:
    return objective.LossInputs(mask=case["mask"], adv=case["advantages"], old=case["rollout_logp"],
                                num_items=case["batch_num_tokens"], num_sequences=case["global_batch_size"], **extra)


def _close(ours: torch.Tensor, theirs: torch.Tensor, tol: float) -> bool:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    return bool(torch.isfinite(ours).all()) and (ours - theirs).abs().max().item() <= tol * scale


def _tol(case: dict) -> float:
    return TOL


def test_verl_grid_covers_what_it_claims(verl_results):
    assert verl_results["verl_version"] == "0.9.1"
    cases, results = verl_results["direct"], verl_results["direct_results"]
    assert len(cases) >= 1000
    fired = {}
    for case, res in zip(cases, results):
        valid, kept = case["mask"], res["effective_mask"]
        if case["rollout_rs"] is not None:
            name = f"{case['rollout_rs']}@{case['rollout_rs_threshold']}"
            some = bool((valid & ~kept).any())
            fired[name] = fired.get(name, False) or some
        else:
            assert torch.equal(kept, valid)
    assert fired and all(fired.values()), f"rejection options that never reject in the grid: {fired}"
    clipped = [bool(((r["is_weights"] == c["rollout_is_threshold"] if not isinstance(c["rollout_is_threshold"], str)
                      else r["is_weights"] == 0) & c["mask"]).any())
               for c, r in zip(cases, results) if r["is_weights"] is not None and not c["rollout_is_batch_normalize"]]
    assert any(clipped), "no IS weight is ever truncated / IcePop-masked"


def test_objective_loss_matches_verl_bypass_mode(verl_results):
    bad = []
    for case, res in zip(verl_results["direct"], verl_results["direct_results"]):
        o = _options(case)
        lp = case["logp"].clone().requires_grad_(True)
        loss = objective.objective_loss(lp, None, _inputs(case), o)
        (g,) = torch.autograd.grad(loss, lp)
        tol = _tol(case)
        if not bool(torch.isfinite(res["loss"])):
            # everything rejected: verl divides 0 by a count of 0 (NaN); here the count is clamped at 1
            if not (loss.item() == 0 and not bool(g.any()) and not bool(res["effective_mask"].any())):
                bad.append(f"{case['name']}: verl's loss is {res['loss'].item()}, ours {loss.item()}")
            continue
        if not _close(loss, res["loss"], tol) or not _close(g, res["grad_logp"], tol):
            bad.append(f"{case['name']}: loss {loss.item():.17g} vs verl {res['loss'].item():.17g}, grad max diff "
                       f"{(g - res['grad_logp']).abs().max().item():.3g}")
    assert not bad, f"{len(bad)} of {len(verl_results['direct'])} cases differ:\n" + "\n".join(bad[:20])


def test_rollout_weights_match_verl(verl_results):
    bad = []
    for case, res in zip(verl_results["direct"], verl_results["direct_results"]):
        w, eff = rollout_weights(case["logp"], case["rollout_logp"], case["mask"], _options(case))
        if (w is None) != (res["is_weights"] is None) or not torch.equal(eff, res["effective_mask"]):
            bad.append(f"{case['name']}: weights given {w is not None}/{res['is_weights'] is not None}, "
                       f"mask equal {torch.equal(eff, res['effective_mask'])}")
        elif w is not None and not _close(w, res["is_weights"], TOL):
            bad.append(f"{case['name']}: IS weights max diff {(w - res['is_weights']).abs().max().item():.3g}")
    assert not bad, f"{len(bad)} cases differ:\n" + "\n".join(bad[:20])


def test_grpo_loss_torch_backend_matches_verl(verl_results):
    """grpo_loss recomputes logp from the head: its loss against verl's, and grad_hidden against
    verl's dL/dlogp pulled back through the head's log-softmax."""
    bad = []
    checked = 0
    for i, (case, res) in enumerate(zip(verl_results["direct"], verl_results["direct_results"])):
        if i % 9 or not bool(torch.isfinite(res["loss"])):
            continue
        checked += 1
        o = _options(case)
        kw = {f: getattr(o, f) for f in ("loss_agg_mode", "epsilon_low", "epsilon_high", "clip_ratio_c", "dp_size",
                                          "loss_scale_factor", "bypass_loss_type", "rollout_is", "rollout_is_threshold",
                                          "rollout_is_threshold_lower", "rollout_is_batch_normalize", "rollout_rs",
                                          "rollout_rs_threshold")}
        hidden = case["hidden"].clone().requires_grad_(True)
        loss = grpo_loss(hidden, case["weight"], case["targets"], case["advantages"], case["mask"],
                         case["rollout_logp"], None, policy_loss="bypass_mode", backend="torch", chunk_size=4,
                         num_items_in_batch=case["batch_num_tokens"],
                         num_sequences_in_batch=case["global_batch_size"], **kw)
        (gh,) = torch.autograd.grad(loss, hidden)
        h = case["hidden"].clone().requires_grad_(True)
        logp = torch.log_softmax(h @ case["weight"].T, -1).gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1)
        (expected,) = torch.autograd.grad(logp, h, grad_outputs=res["grad_logp"])
        tol = max(_tol(case), 1e-11)  # the head's own float64 rounding (logits, chunked sums)
        if not _close(loss, res["loss"], tol) or not _close(gh, expected, tol):
            bad.append(f"{case['name']}: loss {loss.item():.17g} vs verl {res['loss'].item():.17g}, grad_hidden "
                       f"max diff {(gh - expected).abs().max().item():.3g}")
    assert checked >= 140
    assert not bad, f"{len(bad)} of {checked} cases differ:\n" + "\n".join(bad[:20])


def test_objective_loss_matches_verl_ppo_loss(verl_results):
    """verl's whole ppo_loss: KL and entropy aggregated over the original mask, the policy term over
    the rejection's effective mask."""
    if not verl_results["full"]:
        pytest.skip("tests/verl_reference.py was not importable in the verl venv: no ppo_loss cases")
    bad = []
    for case, res in zip(verl_results["full"], verl_results["full_results"]):
        rc = case["rc"]
        flat = dict(case, **{k: rc[k] for k in ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize",
                                                 "rollout_rs", "rollout_rs_threshold", "loss_type")})
        o = _options(flat, beta=case["kl_loss_coef"], kl_estimator=case["kl_loss_type"],
                     entropy_coef=case["entropy_coeff"])
        lp = case["logp"].clone().requires_grad_(True)
        ent = case["entropy"].clone().requires_grad_(True)
        loss = objective.objective_loss(lp, ent, _inputs(flat, ref=case["ref_logp"]), o)
        g, ge = torch.autograd.grad(loss, (lp, ent))
        tol = _tol(case)
        if not (_close(loss, res["loss"], tol) and _close(g, res["grad_logp"], tol)
                and _close(ge, res["grad_entropy"], tol)):
            bad.append(f"{case['name']}|kl={case['kl_loss_type']}: loss {loss.item():.17g} vs verl "
                       f"{res['loss'].item():.17g}")
    assert not bad, f"{len(bad)} of {len(verl_results['full'])} cases differ:\n" + "\n".join(bad[:20])


def test_rejection_specs_are_validated_as_verl_validates_them(verl_results):
    bad = []
    for spec in verl_results["specs"]:
        try:
            parse_rejection(spec["rollout_rs"], spec["rollout_rs_threshold"])
            ours = None
        except (TypeError, ValueError) as exc:
            ours = type(exc).__name__
        theirs = spec["verl_error"]
        # verl's k1 with an upper bound of 0 divides by zero (ZeroDivisionError); a ValueError here
        if (ours is None) != (theirs is None) or (theirs == "ValueError" and ours != "ValueError"):
            bad.append(f"{spec['rollout_rs']!r} / {spec['rollout_rs_threshold']!r}: verl {theirs}, ours {ours}")
    assert not bad, "\n".join(bad)

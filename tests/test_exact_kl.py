"""GRPO's exact KL to the reference (``kl_estimator="full"``, ``ref_hidden`` / ``ref_weight`` /
``ref_bias``) against the float64 oracle (``reference.reference_grpo_loss``, the exact KL on
materialized logits): every loss type at both importance-sampling levels in fp64, fp32 and low
precision, every loss path (one sweep fused and not, the sequence-cut sweep, two sweeps, forward
only), verl's objectives, a reference of another hidden width and dtype; no gradient reaches the
reference; ``metrics.kl_mean`` is the exact mean; beta 0 needs no reference; the plan counts the
reference chunk's bytes; determinism and torch.compile.

``backend=`` runs over ``support.BACKENDS`` (skipped where a backend cannot run or has no
divergence row pass) and ``auto`` (on the CPU: the C++ GRPO row pass, fused, with the torch
divergence row pass where the C++ backend has none).
"""
from __future__ import annotations

import pytest
import torch

from support import (BACKENDS, TOLERANCES, as_double, backend_params, make_batch, rel_err, require, run_loss,
                     skip_or_fail, stable_seed, well_conditioned_batch)
from grpo_kernels import GRPOLoss, grpo_loss, loss as loss_module
from grpo_kernels.options import LOSS_TYPES
from grpo_kernels.reference import reference_exact_kl, reference_grpo_loss, reference_logits

B, T, H, H_R, V = 3, 5, 16, 24, 37


def divergence_backend_or_skip(name: str, dtype=torch.float32) -> None:
    """Skip (or fail, where required) unless backend ``name`` runs here and the exact KL's divergence
    row pass is there for it (``auto`` falls back to the torch pass; a named backend must have one)."""
    from grpo_kernels.backends import get_backend

    if name == "auto":
        return
    require(name, "cpu", dtype)
    if get_backend(name, torch.device("cpu"), dtype).divergence_rows_ is None:
        skip_or_fail(name, f"backend {name!r} has no divergence row pass")


def low_precision(backend: str) -> torch.dtype:
    return torch.float16 if backend == "triton" else torch.bfloat16


def make_ref(dtype=torch.float64, seed=0, hidden_size=H_R, vocab=V, b=B, t=T):
    """The reference's head: ref_hidden [B, T, H_r], ref_weight [V, H_r], ref_bias [V], rounded to
    ``dtype`` (so that the oracle sees what the kernel sees); near enough the policy's scale that
    the KL is O(1)."""
    g = torch.Generator().manual_seed(1000 + seed)
    return dict(ref_hidden=(torch.randn(b, t, hidden_size, generator=g, dtype=torch.float64) * 0.6).to(dtype),
                ref_weight=(torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * 0.4).to(dtype),
                ref_bias=(torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3).to(dtype))


def double(ref: dict) -> dict:
    return {k: None if v is None else v.double() for k, v in ref.items()}


def compare(backend, batch, ref, dtype, return_metrics=False, tolerance=None, seed=None, **opts):
    """grpo_loss(kl_estimator="full") with ``backend`` against the float64 oracle: loss, every
    gradient (in the input dtype) and, with ``return_metrics``, kl_mean, within TOLERANCES[dtype]
    (``tolerance``: another dtype's); ``seed``: the default generator seeded before each call."""
    opts = dict(opts, kl_estimator="full")
    if seed is not None:
        torch.manual_seed(seed)
    out, grads = run_loss(grpo_loss, batch, backend=backend, return_metrics=return_metrics, **ref, **opts)
    if seed is not None:
        torch.manual_seed(seed)
    want, want_grads = run_loss(reference_grpo_loss, as_double(batch), return_metrics=return_metrics, **double(ref),
                                **opts)
    tol_loss, tol_grad = TOLERANCES[tolerance or dtype]
    loss, ref_loss = (out[0], want[0]) if return_metrics else (out, want)
    assert rel_err(loss, ref_loss) < tol_loss, (loss.item(), ref_loss.item())
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, want_grads):
        if rg is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        err = rel_err(g, rg)
        assert err < tol_grad, f"grad_{name}: relative error {err:.3e}"
    if return_metrics and want[1]["kl_mean"] is not None:
        assert rel_err(out[1].kl_mean, want[1]["kl_mean"]) < tol_loss
    return out, grads


def options(loss_type, level, **extra):
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.3, temperature=0.9,
                max_completion_length=7, epsilon_high=0.28, chunk_size=4)
    if loss_type == "cispo":
        opts["epsilon_high"] = 1.1
    opts.update(extra)
    return opts


@pytest.mark.parametrize("backend", backend_params(BACKENDS + ["auto"]))
@pytest.mark.parametrize("dtype", ["float64", "float32", "low"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_the_oracle(backend, dtype, level, loss_type):
    dtype = low_precision(backend) if dtype == "low" else getattr(torch, dtype)
    divergence_backend_or_skip(backend, dtype)
    seed = stable_seed("exact kl", loss_type, level)
    ref = make_ref(dtype, seed)
    opts = options(loss_type, level)
    batch = well_conditioned_batch(dtype, seed, dict(opts, kl_estimator="full", **double(ref)), B=B, T=T, H=H, V=V)
    compare(backend, batch, ref, dtype, return_metrics=True, **opts)


#: the loss paths and the pieces around the KL term, each with the path (and fused flag) it must take
CASES = {
    "fused_one_sweep": (dict(loss_type="dapo"), ("one_sweep", True)),
    "softcap_temperature": (dict(loss_type="grpo", logit_softcap=2.0, temperature=0.7), ("one_sweep", True)),
    "chunk_1": (dict(loss_type="bnpo", chunk_size=1), ("one_sweep", True)),
    "chunk_auto": (dict(loss_type="dapo", chunk_size=None), ("one_sweep", True)),
    "is_ratio_num_items": (dict(loss_type="cispo", epsilon_high=1.1, num_items_in_batch=9, is_ratio=True),
                           ("one_sweep", True)),
    "entropy_quantile": (dict(loss_type="dapo", top_entropy_quantile=0.5), ("one_sweep", False)),
    "entropy_bonus": (dict(loss_type="dr_grpo", entropy_coef=0.05), ("one_sweep", False)),
    "sequence_cut": (dict(loss_type="grpo", importance_sampling_level="sequence", chunk_size=None),
                     ("sequence_sweep", False)),
    "sequence_two_sweeps": (dict(loss_type="grpo", importance_sampling_level="sequence", chunk_size=2),
                            ("two_sweeps", False)),
    "off_policy_mask": (dict(loss_type="dapo", off_policy_mask_threshold=0.01, chunk_size=None),
                        ("sequence_sweep", False)),
    "verl_vanilla": (dict(policy_loss="vanilla", loss_agg_mode="token-mean"), ("one_sweep", False)),
    "verl_gspo_seq_mean": (dict(policy_loss="gspo", loss_agg_mode="seq-mean-token-mean", chunk_size=None),
                           ("sequence_sweep", False)),
    "verl_clip_cov": (dict(policy_loss="clip_cov", loss_agg_mode="seq-mean-token-sum", clip_cov_lb=-1.0),
                      ("two_sweeps", False)),
    "verl_token_sum_dp": (dict(policy_loss="gpg", loss_agg_mode="token-sum", dp_size=2), ("one_sweep", False)),
}


@pytest.fixture
def paths(monkeypatch):
    """The (path, fused) each loss call took."""
    seen = []
    for name, fn in list(loss_module._PATHS.items()):
        def spy(r, fn=fn, name=name):
            seen.append((name, r.plan.fused))
            assert r.kl is not None and r.plan.divergence is not None and r.call.options.beta == 0.0
            return fn(r)
        monkeypatch.setitem(loss_module._PATHS, name, spy)
    return seen


@pytest.mark.parametrize("backend", backend_params(BACKENDS + ["auto"]))
@pytest.mark.parametrize("case", list(CASES))
def test_every_path_matches_the_oracle(backend, case, paths):
    divergence_backend_or_skip(backend, torch.float64)
    kw, (path, fused) = CASES[case]
    kw = dict(kw)
    seed = stable_seed("exact kl paths", case)
    batch = make_batch(B=B, T=T, H=H, V=V, seed=seed)
    if kw.pop("is_ratio", False):
        kw["importance_sampling_ratio"] = 0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(seed),
                                                           dtype=torch.float64)
    opts = dict(dict(loss_type="dapo", beta=0.2, max_completion_length=7, chunk_size=3), **kw)
    if "policy_loss" in kw:
        opts["loss_type"] = "dapo"
    # clip_cov draws its excluded tokens from the default generator: the same draws on both sides
    compare(backend, batch, make_ref(seed=seed), torch.float64, return_metrics=True, seed=0, **opts)
    assert paths[0][0] == path
    if backend == "auto" and fused:  # the C++ GRPO row pass runs fused beside the divergence pass
        assert paths[0][1], paths


def test_no_gradient_needed_is_the_oracles_loss(paths):
    batch = make_batch(B=B, T=T, H=H, V=V, seed=7)
    ref = make_ref(seed=7)
    for level in ("token", "sequence"):
        opts = options("grpo", level, kl_estimator="full")
        with torch.no_grad():
            loss = grpo_loss(**_args(batch), backend="torch", **ref, **opts)
            want = reference_grpo_loss(**_args(batch), **ref, **opts)
        assert rel_err(loss, want) < 1e-10
    assert {p for p, _ in paths} == {"forward"}


def _args(batch):
    return {k: batch[k] for k in ("hidden", "weight", "targets", "advantages", "mask", "old_logps", "ref_logps",
                                  "bias")}


@pytest.mark.parametrize("ref_dtype", [torch.float64, torch.bfloat16])
def test_a_teacher_of_another_width_and_dtype(ref_dtype):
    """The reference may be any model with the same vocabulary (a teacher): another hidden width,
    its own dtype (its logits are made in it, then compared in the policy's accumulation dtype: a
    bf16 reference's logits are bf16, so the result is as close to the oracle's as bf16 allows)."""
    dtype = torch.float32
    ref = make_ref(ref_dtype, seed=3, hidden_size=64)
    opts = options("dapo", "token", kl_estimator="full")
    batch = well_conditioned_batch(dtype, 3, dict(opts, **double(ref)), B=B, T=T, H=H, V=V)
    compare("torch", batch, ref, dtype, return_metrics=True, tolerance=ref_dtype if ref_dtype == torch.bfloat16 else None,
            **options("dapo", "token"))


def test_a_reference_without_bias():
    """ref_bias=None (the head's list argument then holds a None: autograd keeps it whole)."""
    batch = make_batch(B=B, T=T, H=H, V=V, seed=37)
    ref = dict(make_ref(seed=37), ref_bias=None)
    compare("torch", batch, ref, torch.float64, return_metrics=True, **options("luspo", "sequence", chunk_size=2))


def test_no_gradient_reaches_the_reference():
    batch = make_batch(B=B, T=T, H=H, V=V, seed=11)
    ref = {k: v.clone().requires_grad_(True) for k, v in make_ref(seed=11).items()}
    layer = torch.nn.Linear(H_R, H_R, dtype=torch.float64)  # a reference "model" with its own parameters
    ref_hidden = layer(ref["ref_hidden"])
    hidden = batch["hidden"].clone().requires_grad_(True)
    loss = grpo_loss(hidden, batch["weight"], batch["targets"], batch["advantages"], batch["mask"],
                     batch["old_logps"], None, bias=batch["bias"], backend="torch", beta=0.5, kl_estimator="full",
                     ref_hidden=ref_hidden, ref_weight=ref["ref_weight"], ref_bias=ref["ref_bias"])
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert all(t.grad is None for t in ref.values())
    assert layer.weight.grad is None and layer.bias.grad is None


def test_kl_mean_is_the_exact_mean():
    """metrics.kl_mean is the masked mean of sum_v p (log p - log q), computed here by hand from
    the materialized logits, not a k3 estimate; and the KL term moves the loss by beta times the
    aggregation of exactly that KL."""
    batch = make_batch(B=B, T=T, H=H, V=V, seed=13)
    ref = make_ref(seed=13)
    kw = dict(backend="torch", temperature=0.8, logit_softcap=4.0, loss_type="bnpo", return_metrics=True)
    loss, m = grpo_loss(**_args(batch), beta=0.25, kl_estimator="full", **ref, **kw)
    loss0, _ = grpo_loss(**_args(batch), beta=0.0, **kw)
    log_p = torch.log_softmax(reference_logits(batch["hidden"], batch["weight"], batch["bias"], 0.8, 4.0), -1)
    log_q = torch.log_softmax(reference_logits(ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"], 0.8, 4.0), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    mask = batch["mask"].double()
    assert torch.allclose(kl, reference_exact_kl(batch["hidden"], batch["weight"], batch["bias"], ref["ref_hidden"],
                                                 ref["ref_weight"], ref["ref_bias"], 0.8, 4.0), rtol=1e-12)
    assert rel_err(m.kl_mean, (kl * mask).sum() / mask.sum()) < 1e-12
    assert rel_err(loss - loss0, 0.25 * (kl * mask).sum() / mask.sum()) < 1e-9  # bnpo: the token mean


def test_beta_zero_needs_no_reference():
    """With beta 0 there is no KL term: "full" needs no reference, and one given is not read (the
    result is bitwise the k3 call's)."""
    batch = make_batch(B=B, T=T, H=H, V=V, seed=17)
    kw = dict(backend="torch", loss_type="grpo", beta=0.0, return_metrics=True)
    k3, m3 = grpo_loss(**_args(batch), **kw)
    bare, m_bare = grpo_loss(**_args(batch), kl_estimator="full", **kw)
    junk = make_ref(seed=17, hidden_size=3)
    given, _ = grpo_loss(**_args(batch), kl_estimator="full", **junk, **kw)
    assert torch.equal(k3, bare) and torch.equal(k3, given)
    assert m3.kl_mean is None and m_bare.kl_mean is None


def test_ref_logps_are_not_read():
    """ref_logps given with the exact KL (a TRL trainer computes them anyway) are checked, not read."""
    batch = make_batch(B=B, T=T, H=H, V=V, seed=19)
    ref = make_ref(seed=19)
    kw = dict(backend="torch", beta=0.1, kl_estimator="full", **ref)
    args = _args(batch)
    with_ref = grpo_loss(**args, **kw)
    without = grpo_loss(**dict(args, ref_logps=None), **kw)
    other = grpo_loss(**dict(args, ref_logps=args["ref_logps"] - 5.0), **kw)
    assert torch.equal(with_ref, without) and torch.equal(with_ref, other)


def test_the_chunk_rule_counts_the_reference_chunk():
    """A chunk holds the policy's logits, the KL gradient's buffer and the reference's logits: the
    plan sizes its rows by those bytes (``plan.exact_kl_bytes``), so the chunks are smaller."""
    from grpo_kernels import plan as planner
    from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel

    n, vocab = 4096, 32768
    h, w = torch.zeros(n, 1), torch.zeros(vocab, 1)
    mask = torch.ones(1, n, dtype=torch.bool)
    opts, ex = GRPOOptions(), ExecutionOptions(backend="torch")
    plain = planner.plan_loss(h, w, mask, opts, ex, VocabParallel(), (True, True, False))
    with_ref = planner.plan_loss(h, w, mask, opts, ex, VocabParallel(), (True, True, False), ref_dtype=torch.bfloat16)
    per_logit = planner.exact_kl_bytes(torch.float32, torch.bfloat16, plain.backend, with_ref.divergence, "cpu")
    assert per_logit == 2 * 4 + 2
    assert with_ref.chunk_rows == planner.chunk_rows(n, vocab, torch.float32, None, None, "cpu",
                                                     bytes_per_logit=per_logit)
    assert with_ref.chunk_rows < plain.chunk_rows and plain.divergence is None


def test_deterministic_runs_are_bitwise_equal():
    batch = make_batch(B=B, T=T, H=H, V=V, seed=23, dtype=torch.float32)
    ref = make_ref(torch.float32, seed=23)
    kw = dict(beta=0.2, kl_estimator="full", deterministic=True, batch_invariant=True, chunk_size=2)
    a, ga = run_loss(grpo_loss, batch, **ref, **kw)
    b, gb = run_loss(grpo_loss, batch, **ref, **kw)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb) if x is not None)


def test_module_takes_the_reference_per_call():
    batch = make_batch(B=B, T=T, H=H, V=V, seed=29)
    ref = make_ref(seed=29)
    module = GRPOLoss(beta=0.1, kl_estimator="full", backend="torch")
    args = _args(batch)
    bias = args.pop("bias")
    got = module(*args.values(), bias=bias, **ref)
    assert torch.equal(got, grpo_loss(**_args(batch), beta=0.1, kl_estimator="full", backend="torch", **ref))


@pytest.mark.parametrize("ref_bias", [True, False])
@pytest.mark.parametrize("return_metrics", [False, True])
def test_compiles_without_graph_break(return_metrics, ref_bias):
    torch._dynamo.reset()
    batch = make_batch(B=B, T=T, H=H, V=V, seed=31)
    ref = make_ref(seed=31)
    if not ref_bias:
        ref["ref_bias"] = None
    kw = dict(beta=0.2, kl_estimator="full", backend="torch", loss_type="grpo", return_metrics=return_metrics)

    def step(hidden, weight, bias, targets, advantages, mask, old, rh, rw, rb):
        out = grpo_loss(hidden, weight, targets, advantages, mask, old, None, bias=bias, ref_hidden=rh,
                        ref_weight=rw, ref_bias=rb, **kw)
        return (out[0], out[1].kl_mean) if return_metrics else (out, out)

    def run(fn):
        hidden = batch["hidden"].clone().requires_grad_(True)
        weight = batch["weight"].clone().requires_grad_(True)
        loss, kl_mean = fn(hidden, weight, batch["bias"], batch["targets"], batch["advantages"], batch["mask"],
                           batch["old_logps"], ref["ref_hidden"], ref["ref_weight"], ref["ref_bias"])
        loss.backward()
        return loss.detach(), kl_mean.detach(), hidden.grad, weight.grad

    eager = run(step)
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        assert rel_err(b, a) < 1e-12


@pytest.mark.parametrize("backend", backend_params())
def test_a_named_backend_without_a_divergence_pass_says_so(backend, monkeypatch):
    """backend= a row backend that has no divergence row pass: BackendUnavailable naming it (``auto``
    falls back to the torch pass instead: test_every_path_matches_the_oracle[auto]). Every backend
    has one today, so each is stripped of it here, as a backend without one would be."""
    from grpo_kernels.backends import BackendUnavailable, get_backend

    require(backend)
    monkeypatch.setattr(get_backend(backend, torch.device("cpu"), torch.float64), "divergence_rows_", None)
    batch = make_batch(B=B, T=T, H=H, V=V, seed=41)
    with pytest.raises(BackendUnavailable, match=f"backend '{backend}' has no divergence row pass"):
        grpo_loss(**_args(batch), backend=backend, beta=0.1, kl_estimator="full", **make_ref(seed=41))

"""``distill_loss``: TRL 1.16's ``_chunked_divergence_loss`` semantics from hidden states.

Against the float64 oracle (``reference.reference_distill_loss``: materialized logits, autograd
gradients of the divergence's definition) for every beta regime and every logit option; against
TRL's own ``_chunked_divergence_loss`` (float64 through a shim of its float32 buffers, and as
shipped in float32); the autograd rules (accumulation, retained and scaled backwards, no double
backward, frozen parts, teacher never differentiated); chunking, determinism and batch
invariance; peak memory. Bad inputs and unusual valid ones: tests/test_distill_inputs.py.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from support import TOLERANCES, rel_err, stable_seed, trl_divergence_in_float64
from grpo_kernels import DistillMetrics, distill_loss
from grpo_kernels.reference import reference_distill_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, H, H_T, V = 3, 4, 8, 6, 11  # the sizes docs/errors.md's messages show
BETAS = [0.0, 0.3, 0.5, 1.0]


def make(dtype=torch.float64, seed=0, B=B, T=T, H=H, H_t=H_T, V=V, bias=True, teacher_bias=True,
         teacher_dtype=None, scale=1.0):
    """Fresh random student and teacher; row 1 fully masked, the rest of the mask random."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    td = teacher_dtype or dtype
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    if B > 1:
        mask[1] = False
    return dict(hidden=(r(B, T, H) * scale).to(dtype), weight=(0.5 * r(V, H)).to(dtype),
                bias=(0.3 * r(V)).to(dtype) if bias else None,
                teacher_hidden=(r(B, T, H_t) * scale).to(td), teacher_weight=(0.5 * r(V, H_t)).to(td),
                teacher_bias=(0.3 * r(V)).to(td) if teacher_bias else None, mask=mask)


def run(fn, d, **kw):
    """(loss, metrics or None, (grad_hidden, grad_weight, grad_bias)) of ``fn`` on leaf copies."""
    leaves = {k: None if d[k] is None else d[k].detach().clone().requires_grad_(True)
              for k in ("hidden", "weight", "bias")}
    out = fn(leaves["hidden"], leaves["weight"], d["teacher_hidden"], d["teacher_weight"], d["mask"],
             bias=leaves["bias"], teacher_bias=d["teacher_bias"], **kw)
    loss, metrics = out if isinstance(out, tuple) else (out, None)
    loss.backward()
    return loss, metrics, tuple(None if v is None else v.grad for v in leaves.values())


def as_double(d):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in d.items()}


def assert_close(got, ref, dtype, what=""):
    tol_loss, tol_grad = TOLERANCES[dtype]
    (loss, _, grads), (ref_loss, _, ref_grads) = got, ref
    assert rel_err(loss, ref_loss) < tol_loss, (what, loss.item(), ref_loss.item())
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if rg is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        assert rel_err(g, rg) < tol_grad, f"{what} grad_{name}: {rel_err(g, rg):.3e}"


OPTION_CASES = {
    "plain": {},
    "temperature": dict(temperature=0.7),
    "softcap_student": dict(logit_softcap=2.0),
    "softcap_teacher": dict(teacher_logit_softcap=1.5),
    "scale_student": dict(logit_scale=1.7),
    "scale_teacher": dict(teacher_logit_scale=0.6),
    "everything": dict(temperature=1.3, logit_softcap=3.0, teacher_logit_softcap=2.5, logit_scale=0.8,
                       teacher_logit_scale=1.4, num_items_in_batch=13),
    "num_items": dict(num_items_in_batch=7),
    "num_items_tensor": dict(num_items_in_batch=torch.tensor(21)),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("beta", BETAS)
def test_float64_matches_the_oracle(beta, case):
    d = make(seed=stable_seed(beta, case))
    kw = dict(OPTION_CASES[case], beta=beta)
    assert_close(run(distill_loss, d, **kw), run(reference_distill_loss, d, **kw), torch.float64, case)


@pytest.mark.parametrize("bias,teacher_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_float64_bias_on_either_side(beta, bias, teacher_bias):
    d = make(seed=stable_seed(beta, bias, teacher_bias), bias=bias, teacher_bias=teacher_bias)
    assert_close(run(distill_loss, d, beta=beta), run(reference_distill_loss, d, beta=beta), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_low_precision_matches_the_oracle(beta, dtype):
    d = make(dtype=dtype, seed=stable_seed(beta, str(dtype)), B=4, T=6, H=32, H_t=48, V=300)
    kw = dict(beta=beta, temperature=0.9, logit_softcap=5.0)
    assert_close(run(distill_loss, d, **kw), run(reference_distill_loss, as_double(d), **kw), dtype)


def test_teacher_dtype_may_differ_from_the_students():
    """A bf16 teacher for an fp32 student: the teacher's logits are made in bf16 (rounded as its
    own head would round them), the divergence in fp32; bf16's tolerance, fp32 gradients."""
    d = make(dtype=torch.float32, teacher_dtype=torch.bfloat16, seed=3, V=64)
    (loss, _, grads), (ref_loss, _, ref_grads) = (run(distill_loss, d, beta=0.5),
                                                  run(reference_distill_loss, as_double(d), beta=0.5))
    tol_loss, tol_grad = TOLERANCES[torch.bfloat16]
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) < tol_loss
    assert all(g.dtype == torch.float32 and rel_err(g, r) < tol_grad for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("beta", BETAS)
def test_metrics_are_the_oracles(beta):
    d = make(seed=stable_seed("metrics", beta))
    _, m, _ = run(distill_loss, d, beta=beta, temperature=0.8, return_metrics=True)
    _, rm, _ = run(reference_distill_loss, d, beta=beta, temperature=0.8, return_metrics=True)
    assert isinstance(m, DistillMetrics)
    for name in ("divergence", "entropy"):
        got = getattr(m, name)
        assert got.shape == (B, T) and not got.requires_grad
        assert torch.allclose(got, rm[name], rtol=1e-10, atol=1e-12), name
        assert (got[~d["mask"]] == 0).all(), name
    assert torch.allclose(m.entropy_sum, rm["entropy_sum"], rtol=1e-10)
    assert m.n_valid.dtype == torch.int64 and int(m.n_valid) == int(d["mask"].sum())


# ---------------------------------------------------------------- against TRL itself


@pytest.fixture
def trl_loss():
    pytest.importorskip("trl")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _chunked_divergence_loss


@pytest.fixture
def trl_float64(monkeypatch, trl_loss):
    """TRL's chunked divergence in float64 (``support.trl_divergence_in_float64``): powers of 2 for n."""
    trl_divergence_in_float64(monkeypatch)
    return trl_loss


def trl_run(trl_loss, d, beta, num_items=None, temperature=1.0, logit_scale=1.0, teacher_logit_scale=1.0,
            logit_softcap=None, teacher_logit_softcap=None):
    leaves = {k: None if d[k] is None else d[k].detach().clone().requires_grad_(True)
              for k in ("hidden", "weight", "bias")}
    loss, entropy_sum, n_valid = trl_loss(
        leaves["hidden"], d["teacher_hidden"], leaves["weight"], d["teacher_weight"], d["mask"], beta,
        num_items_in_batch=num_items, student_lm_head_bias=leaves["bias"], teacher_lm_head_bias=d["teacher_bias"],
        student_logit_scale=logit_scale, teacher_logit_scale=teacher_logit_scale,
        student_final_logit_softcapping=logit_softcap, teacher_final_logit_softcapping=teacher_logit_softcap,
        temperature=temperature)
    loss.backward()
    return loss, (entropy_sum, n_valid), tuple(None if v is None else v.grad for v in leaves.values())


def power_of_two_mask(d, n=8):
    """A mask with exactly ``n`` unmasked positions (row 1 still fully masked)."""
    mask = torch.tensor([[True] * T, [False] * T, [True] * T])
    assert int(mask.sum()) == n
    return dict(d, mask=mask)


TRL_CASES = {
    "plain": {},
    "all_options": dict(temperature=0.8, logit_scale=1.2, teacher_logit_scale=0.7, logit_softcap=2.5,
                        teacher_logit_softcap=3.0),
    "num_items": dict(num_items=16, temperature=1.5),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
@pytest.mark.parametrize("beta", BETAS)
def test_float64_matches_trl(trl_float64, beta, case):
    d = power_of_two_mask(make(seed=stable_seed("trl", beta, case)))
    kw = dict(TRL_CASES[case])
    loss_t, (ent_sum_t, n_t), grads_t = trl_run(trl_float64, d, beta, **kw)
    assert loss_t.dtype == torch.float64
    num_items = kw.pop("num_items", None)
    loss, m, grads = run(distill_loss, d, beta=beta, num_items_in_batch=num_items, return_metrics=True, **kw)
    assert_close((loss, None, grads), (loss_t, None, grads_t), torch.float64, case)
    assert rel_err(m.entropy_sum, ent_sum_t) < 1e-10
    assert int(m.n_valid) == int(n_t)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_float32_matches_trl_as_shipped(trl_loss, beta):
    d = make(dtype=torch.float32, seed=stable_seed("trl32", beta), V=300, H=32, H_t=48)
    kw = dict(temperature=0.9, logit_softcap=4.0, teacher_logit_scale=1.1)
    loss_t, (ent_sum_t, n_t), grads_t = trl_run(trl_loss, d, beta, **kw)
    loss, m, grads = run(distill_loss, d, beta=beta, return_metrics=True, **kw)
    assert_close((loss, None, grads), (loss_t, None, grads_t), torch.float32)
    assert rel_err(m.entropy_sum, ent_sum_t) < 1e-5 and int(m.n_valid) == int(n_t)


# ---------------------------------------------------------------- autograd rules


def test_gradients_accumulate_into_existing_grad():
    d = make(seed=11)
    _, _, ref = run(reference_distill_loss, d, beta=0.5)
    leaves = [d[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    before = [torch.randn_like(x) for x in leaves]
    for x, g in zip(leaves, before):
        x.grad = g.clone()
    distill_loss(leaves[0], leaves[1], d["teacher_hidden"], d["teacher_weight"], d["mask"], bias=leaves[2],
                 teacher_bias=d["teacher_bias"], beta=0.5).backward()
    for x, g, r in zip(leaves, before, ref):
        assert rel_err(x.grad, g + r) < 1e-10


def test_teacher_receives_no_gradient():
    d = make(seed=12)
    teacher = {k: d[k].clone().requires_grad_(True) for k in ("teacher_hidden", "teacher_weight", "teacher_bias")}
    hidden = d["hidden"].clone().requires_grad_(True)
    loss = distill_loss(hidden, d["weight"], teacher["teacher_hidden"], teacher["teacher_weight"], d["mask"],
                        teacher_bias=teacher["teacher_bias"], beta=0.5)
    loss.backward()
    assert hidden.grad is not None
    assert all(t.grad is None for t in teacher.values())


def test_frozen_parts_get_no_gradient_and_no_grad_mode_works():
    d = make(seed=13)
    hidden = d["hidden"].clone().requires_grad_(True)
    loss = distill_loss(hidden, d["weight"], d["teacher_hidden"], d["teacher_weight"], d["mask"], bias=d["bias"],
                        teacher_bias=d["teacher_bias"], beta=1.0)
    loss.backward()
    _, _, ref = run(reference_distill_loss, d, beta=1.0)
    assert rel_err(hidden.grad, ref[0]) < 1e-10 and d["weight"].grad is None
    with torch.no_grad():
        again = distill_loss(hidden, d["weight"], d["teacher_hidden"], d["teacher_weight"], d["mask"],
                             bias=d["bias"], teacher_bias=d["teacher_bias"], beta=1.0)
    assert not again.requires_grad and torch.equal(again, loss.detach())


def test_retained_and_scaled_backwards_and_no_double_backward():
    d = make(seed=14)
    _, _, ref = run(reference_distill_loss, d, beta=0.3)
    w = d["weight"].clone().requires_grad_(True)
    loss = distill_loss(d["hidden"], w, d["teacher_hidden"], d["teacher_weight"], d["mask"], beta=0.3,
                        bias=d["bias"], teacher_bias=d["teacher_bias"])
    loss.backward(retain_graph=True)
    w.grad.zero_()  # must not change what the next retained backward hands out
    (3.0 * loss).backward(retain_graph=True)
    assert rel_err(w.grad, 3.0 * ref[1]) < 1e-10
    (g,) = torch.autograd.grad(loss, w, retain_graph=True)
    assert rel_err(g, ref[1]) < 1e-10 and g.data_ptr() != w.grad.data_ptr()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, w, create_graph=True)


# ---------------------------------------------------------------- chunking, determinism, batch invariance


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunking_does_not_change_results(beta):
    d = make(seed=stable_seed("chunks", beta), B=4, T=5)
    results = [run(distill_loss, d, beta=beta, chunk_size=c, return_metrics=True) for c in (1, 3, None)]
    base = results[-1]
    for loss, m, grads in results[:-1]:
        assert rel_err(loss, base[0]) < 1e-13
        assert rel_err(m.divergence, base[1].divergence) < 1e-13
        for g, bg in zip(grads, base[2]):
            assert rel_err(g, bg) < 1e-13


def test_deterministic_runs_are_bitwise_equal():
    d = make(dtype=torch.float32, seed=15, V=500, H=32, H_t=16)
    a, b = (run(distill_loss, d, beta=0.5, deterministic=True) for _ in range(2))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_all_masked_gives_zero_loss_and_zero_gradients():
    d = dict(make(seed=16), mask=torch.zeros(B, T, dtype=torch.bool))
    for num_items in (None, 5):
        loss, m, grads = run(distill_loss, d, beta=0.5, return_metrics=True, num_items_in_batch=num_items)
        assert loss.item() == 0.0 and int(m.n_valid) == 0 and m.entropy_sum.item() == 0.0
        assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_batch_invariant_rows_are_bitwise_independent_of_the_batch():
    """A token's divergence, entropy and grad_hidden row are the same bits whatever the other rows,
    its position, the padding and chunk_size (the per-row dLoss/dD = 1/num_items is fixed)."""
    d = make(dtype=torch.float32, seed=17, B=6, T=7, H=32, H_t=24, V=300)
    d["mask"][:] = True
    kw = dict(beta=0.5, temperature=0.9, batch_invariant=True, num_items_in_batch=8, return_metrics=True)
    _, m_full, g_full = run(distill_loss, d, **kw)
    # the row (4, 5) alone at another position of a smaller batch, with other rows around it and padding
    small = make(dtype=torch.float32, seed=18, B=2, T=3, H=32, H_t=24, V=300)
    small["mask"][:] = True
    small["mask"][1, 2] = False
    for k in ("hidden", "teacher_hidden"):
        small[k][0, 1] = d[k][4, 5]
    small.update({k: d[k] for k in ("weight", "bias", "teacher_weight", "teacher_bias")})
    _, m_small, g_small = run(distill_loss, small, **dict(kw, chunk_size=2))
    assert torch.equal(m_small.divergence[0, 1], m_full.divergence[4, 5])
    assert torch.equal(m_small.entropy[0, 1], m_full.entropy[4, 5])
    assert torch.equal(g_small[0][0, 1], g_full[0][4, 5])


def test_autocast_leaves_each_head_in_its_own_dtype():
    d = make(dtype=torch.float32, seed=20, V=64)
    plain = run(distill_loss, d, beta=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run(distill_loss, d, beta=0.5)
    assert torch.equal(plain[0], under[0]) and all(torch.equal(a, b) for a, b in zip(plain[2], under[2]))


def test_reference_backend_is_the_oracle():
    d = make(seed=19)
    assert_close(run(distill_loss, d, beta=0.5, backend="reference"), run(reference_distill_loss, d, beta=0.5),
                 torch.float64)


# ---------------------------------------------------------------- memory

_PROBE = """
import torch
torch.set_num_threads(1)
from grpo_kernels import distill_loss
from grpo_kernels.memory import peak_memory_bytes
N, V, H, H_t = 2048, 8192, 64, 96
g = torch.Generator().manual_seed(0)
h = torch.randn(1, N, H, generator=g).requires_grad_(True)
w = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
ht, wt = torch.randn(1, N, H_t, generator=g), torch.randn(V, H_t, generator=g) * 0.1
mask = torch.ones(1, N, dtype=torch.bool)
distill_loss(h[:, :2], w, ht[:, :2], wt, mask[:, :2], beta=0.5).backward()  # warm-up: imports, allocator
h.grad = w.grad = None
print(peak_memory_bytes(lambda: distill_loss(h, w, ht, wt, mask, beta=0.5).backward(), torch.device("cpu")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc (Linux)")
def test_peak_memory_is_one_chunk_of_both_heads_not_n_by_v():
    """N=2048, V=8192 fp32: one head's [N, V] logits are 64 MiB. Under an 8 MiB chunk budget (both
    heads' logits of a chunk) the call's peak beyond its inputs, its gradients included (2 MiB for
    weight, 0.5 MiB for hidden), stays under 24 MiB: the chunk, the slab temporaries (~6 MiB), O(N)."""
    env = dict(os.environ, GRPO_KERNELS_CHUNK_BYTES=str(8 * 2**20),
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.1f} MiB"

"""The divergence row pass on every row backend (``backends.divergence_backend``), by contract:
``distill_loss`` with ``backend=`` each of ``support.BACKENDS`` against the float64 oracle
(``reference.reference_distill_loss``) for every beta regime and logit option, in fp64, fp32 and
bf16; the backend's ``divergence_rows_`` itself (its ``out=`` form writes the same bits as the
in-place one, and leaves the student's logits alone); determinism and batch invariance bitwise.
A backend that cannot run here, or has no divergence row pass, is skipped with its reason (or
fails where ``GRPO_KERNELS_REQUIRE_BACKENDS`` lists it)."""
from __future__ import annotations

import pytest
import torch

from support import backend_params, require, skip_or_fail, stable_seed
from test_distill import BETAS, OPTION_CASES, as_double, assert_close, make, run
from grpo_kernels import distill_loss
from grpo_kernels.divergence import DivergenceSpec, HeadTransform
from grpo_kernels.options import ExecutionOptions
from grpo_kernels.reference import reference_distill_loss


def divergence_row_backend(name: str, dtype=torch.float32):
    """The row backend ``name`` on the CPU, skipped (or failed, when required) where it cannot run
    or has no divergence row pass."""
    from grpo_kernels.backends import get_backend

    require(name, "cpu", dtype)
    backend = get_backend(name, torch.device("cpu"), dtype)
    if backend.divergence_rows_ is None:
        skip_or_fail(name, f"backend {name!r} has no divergence row pass")
    return backend


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ["plain", "temperature", "softcap_student", "everything"])
@pytest.mark.parametrize("beta", BETAS)
def test_float64_matches_the_oracle(backend, beta, case):
    divergence_row_backend(backend, torch.float64)
    d = make(seed=stable_seed("backends", beta, case), V=37)
    kw = dict(OPTION_CASES[case], beta=beta)
    assert_close(run(distill_loss, d, backend=backend, **kw), run(reference_distill_loss, d, **kw), torch.float64,
                 case)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_low_precision_matches_the_oracle(backend, beta, dtype):
    divergence_row_backend(backend, dtype)
    d = make(dtype=dtype, seed=stable_seed("backends", beta, str(dtype)), B=4, T=6, H=32, H_t=48, V=300)
    kw = dict(beta=beta, temperature=0.9, logit_softcap=5.0, teacher_logit_softcap=4.0)
    assert_close(run(distill_loss, d, backend=backend, **kw), run(reference_distill_loss, as_double(d), **kw), dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_metrics_are_the_oracles(backend, beta):
    divergence_row_backend(backend, torch.float64)
    d = make(seed=stable_seed("backend metrics", beta))
    _, m, _ = run(distill_loss, d, beta=beta, backend=backend, return_metrics=True)
    _, rm, _ = run(reference_distill_loss, d, beta=beta, return_metrics=True)
    for name in ("divergence", "entropy"):
        assert torch.allclose(getattr(m, name), rm[name], rtol=1e-10, atol=1e-12), name


def _spec(beta):
    return DivergenceSpec(beta, HeadTransform(1.2, 3.0, 0.8), HeadTransform(0.9, None, 0.8))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_out_form_writes_the_in_place_bits_and_keeps_the_logits(backend, beta):
    """``divergence_rows_(..., out=buf)``: the gradient in ``buf``, the same bits as the in-place
    form, the student's logits untouched (GRPO's exact KL adds it to its own gradient)."""
    rows = divergence_row_backend(backend, torch.float32)
    g = torch.Generator().manual_seed(stable_seed("out", beta))
    zs, zt = torch.randn(5, 300, generator=g) * 3, torch.randn(5, 300, generator=g) * 3
    coef = torch.rand(5, generator=g)
    ex = ExecutionOptions().validate()
    keep = zs.clone()
    out = torch.full_like(zs, float("nan"))  # poisoned: every element must be written
    d1, e1 = rows.divergence_rows_(zs, zt, _spec(beta), coef, ex, out=out)
    assert torch.equal(zs, keep)
    d2, e2 = rows.divergence_rows_(zs, zt, _spec(beta), coef, ex)
    assert torch.equal(out, zs) and torch.equal(d1, d2) and torch.equal(e1, e2)


@pytest.mark.parametrize("backend", backend_params())
def test_rows_without_a_gradient_leave_the_logits_alone(backend):
    rows = divergence_row_backend(backend, torch.float32)
    zs, zt = torch.randn(3, 50), torch.randn(3, 50)
    keep = zs.clone()
    div, ent = rows.divergence_rows_(zs, zt, _spec(0.5), None, ExecutionOptions().validate())
    assert torch.equal(zs, keep) and div.shape == ent.shape == (3,) and (div >= -1e-6).all()


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic_and_batch_invariant_rows_are_bitwise(backend):
    divergence_row_backend(backend, torch.float32)
    d = make(dtype=torch.float32, seed=11, B=6, T=5, H=16, H_t=24, V=200)
    d["mask"][:] = True
    kw = dict(beta=0.5, backend=backend, return_metrics=True)
    a = run(distill_loss, d, deterministic=True, chunk_size=7, **kw)
    b = run(distill_loss, d, deterministic=True, chunk_size=7, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    # num_items_in_batch fixed: a row's gradient then does not depend on the batch's size
    full = run(distill_loss, d, batch_invariant=True, num_items_in_batch=1.0, **kw)
    part = {k: (v[2:4] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 6 else v)
            for k, v in d.items()}
    small = run(distill_loss, part, batch_invariant=True, num_items_in_batch=1.0, **kw)
    assert torch.equal(small[1].divergence, full[1].divergence[2:4])
    assert torch.equal(small[1].entropy, full[1].entropy[2:4])
    assert torch.equal(small[2][0], full[2][0][2:4])


def test_auto_on_the_cpu_keeps_the_faster_torch_divergence_pass():
    """``auto`` on the CPU runs the torch divergence pass (measured faster than the C++ one there:
    backends/cpp.py, ``divergence_auto_devices``), while a named 'cpp' runs its own."""
    import torch as _torch

    from grpo_kernels.backends import divergence_backend

    auto, why = divergence_backend(ExecutionOptions(backend="auto").validate(), _torch.device("cpu"), _torch.float32)
    assert auto.name == "torch", why
    require("cpp", "cpu", _torch.float32)
    named, _ = divergence_backend(ExecutionOptions(backend="cpp").validate(), _torch.device("cpu"), _torch.float32)
    assert named.name == "cpp"


@pytest.mark.parametrize("backend", backend_params())
def test_a_vocabulary_slice_only_reaches_a_vocab_parallel_pass(backend):
    """``vocab=`` is part of every backend's divergence contract: a backend without
    ``divergence_vocab_parallel`` refuses a vocabulary slice instead of treating it as a whole row."""
    rows = divergence_row_backend(backend, torch.float32)
    if rows.divergence_vocab_parallel:
        pytest.skip(f"{backend} takes vocabulary slices (tests/test_distributed.py)")
    zs, zt = torch.randn(2, 20), torch.randn(2, 20)
    with pytest.raises(ValueError, match=f"^backend '{backend}' has no vocab-parallel divergence row pass"):
        rows.divergence_rows_(zs, zt, _spec(0.5), None, ExecutionOptions().validate(), vocab=object())

"""The divergence row passes on a GPU (Triton's kernel, the CUDA kernel of csrc/divergence_sweep.h,
the torch ops): what only a GPU can check. ``distill_loss`` on CUDA tensors against the float64
oracle on the CPU, every beta regime, fp64 / fp32 / bf16 and a bf16 teacher for an fp32 student,
over a small vocabulary and Qwen's (V = 151936); bitwise determinism and batch invariance on the
device. Skips cleanly without CUDA (a failure where GRPO_KERNELS_REQUIRE_BACKENDS lists the backend).

    python -m pytest tests/test_distill_gpu.py -q
"""
from __future__ import annotations

import pytest
import torch

from support import TOLERANCES, backend_params, rel_err, require, stable_seed
from test_distill import as_double, make, run
from grpo_kernels import distill_loss
from grpo_kernels.reference import reference_distill_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

QWEN_V = 151936


def _on_cuda(d):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _check(backend, d, dtype, **kw):
    require(backend, "cuda", dtype)
    loss, m, grads = run(distill_loss, _on_cuda(d), backend=backend, return_metrics=True, **kw)
    ref_loss, rm, ref_grads = run(reference_distill_loss, as_double(d), return_metrics=True, **kw)
    tol_loss, tol_grad = TOLERANCES[dtype]
    assert rel_err(loss, ref_loss) < tol_loss
    assert rel_err(m.divergence, rm["divergence"]) < tol_loss
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == d[name].dtype and g.is_cuda, name
        assert rel_err(g, rg) < tol_grad, f"grad_{name}: {rel_err(g, rg):.2e}"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_small_vocabulary(backend, dtype, beta):
    d = make(dtype=dtype, seed=stable_seed("gpu", beta, str(dtype)), B=4, T=33, H=32, H_t=48, V=1000)
    _check(backend, d, dtype, beta=beta, temperature=0.9, logit_softcap=5.0, teacher_logit_scale=1.2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_qwen_vocabulary_bf16_and_a_mixed_teacher(backend, beta):
    d = make(dtype=torch.bfloat16, seed=stable_seed("qwen", beta), B=2, T=24, H=64, H_t=96, V=QWEN_V)
    _check(backend, d, torch.bfloat16, beta=beta)
    d = make(dtype=torch.float32, teacher_dtype=torch.bfloat16, seed=stable_seed("mixed", beta), B=2, T=8, H=64,
             H_t=96, V=QWEN_V)
    _check(backend, d, torch.bfloat16, beta=beta)


@pytest.mark.parametrize("backend", backend_params())
def test_deterministic_and_batch_invariant_on_the_device(backend):
    require(backend, "cuda", torch.float32)
    d = _on_cuda(make(dtype=torch.float32, seed=7, B=6, T=40, H=64, H_t=96, V=5003))
    d["mask"][:] = True
    kw = dict(beta=0.5, backend=backend, return_metrics=True, num_items_in_batch=1.0)
    a = run(distill_loss, d, deterministic=True, chunk_size=37, **kw)
    b = run(distill_loss, d, deterministic=True, chunk_size=37, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    full = run(distill_loss, d, batch_invariant=True, **kw)
    part = {k: (v[1:3] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == 6 else v)
            for k, v in d.items()}
    small = run(distill_loss, part, batch_invariant=True, **kw)
    assert torch.equal(small[1].divergence, full[1].divergence[1:3])
    assert torch.equal(small[2][0], full[2][0][1:3])

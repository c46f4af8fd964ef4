"""The compiled row pass's CUDA kernels (csrc/row_pass.cu): what only a GPU can check.

On a CUDA machine tests/test_row_pass_contract.py runs the whole row-pass contract for the cpp
backend on CUDA tensors (its ``cpp-cuda`` cases, marked ``gpu``). Here, with the same checks
(the contract's ``check_*`` helpers, test_cpp_backend.py's binding helpers): a bf16 chunk over
Qwen's vocabulary (V = 151936), a chunk of more than 2^31 logits (int64 indexing), the bindings on
CUDA tensors, a non-default stream, the backend names and the device-mix error. Skips cleanly
without CUDA.

    python -m pytest tests/test_cuda_gpu.py -q

The first run JIT-builds the CUDA extension (nvcc + ninja; cached afterwards).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cpp_backend as bindings  # noqa: E402
from support import skip_or_fail  # noqa: E402
import test_row_pass_contract as contract  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"
QWEN_V = 151936


@pytest.fixture(scope="module")
def ext():
    from grpo_kernels.backends import cpp

    reason = cpp.BACKEND.supports(torch.device("cuda"), torch.bfloat16)
    if reason is not None:  # a failure where the backend is required (GRPO_KERNELS_REQUIRE_BACKENDS)
        skip_or_fail("cpp", f"backend 'cuda' unavailable: {reason}")
    module = cpp.load_extension()
    assert module.has_cuda(), "nvcc and CUDA torch are here, yet the loaded extension has no CUDA kernels"
    return module


@pytest.fixture(scope="module")
def backend(ext):
    from grpo_kernels.backends import cpp

    return cpp.BACKEND


@pytest.mark.parametrize("case", ["grpo-beta", "dapo-asym-delta", "sapo-off_policy", "cispo-off_policy"])
def test_qwen_vocab_bf16(backend, case):
    """A bf16 chunk of 48 rows over Qwen's 151936-entry vocabulary: stats, grad, fused."""
    shape = (48, QWEN_V, 0)
    contract.check_row_stats(backend, DEVICE, torch.bfloat16, shape, (1.0, None), seed=11)
    contract.check_row_grad(backend, DEVICE, torch.bfloat16, shape, (0.8, None), True, seed=12)
    contract.check_row_fused(backend, DEVICE, torch.bfloat16, case, shape=shape, seed=13)


@pytest.mark.parametrize("case", ["B8-R2-G4-group-nan", "B8-R3-G2-batch-nan", "B1024-R3-G16-batch-nan",
                                  "B8-R2-G4-group-all-nan-group"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_fused_rewards_to_advantages(backend, dtype, case):
    """The CUDA fused kernel's epilogue computes each row's advantage from the rewards (the batch std
    by block reductions, once per block), over Qwen's vocabulary and over a small one; many rows, so
    that blocks grid-stride."""
    contract.check_row_fused_rewards(backend, DEVICE, dtype, case, n=48, V=QWEN_V, seed=21)
    contract.check_row_fused_rewards(backend, DEVICE, dtype, case, n=3000, V=64, seed=22)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_bindings_match_the_backend(ext, dtype):
    bindings.check_bindings_match_the_backend(ext, DEVICE, dtype)


def test_more_than_2_31_logits(backend):
    """A chunk with n * V > 2^31: rows past the 32-bit offset range are right (int64 indexing)."""
    from grpo_kernels import epilogue

    V = QWEN_V
    n = (2**31) // V + 8
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * V * 2:
        pytest.skip("not enough GPU memory for a > 2^31-element bf16 chunk")
    g = torch.Generator(device=DEVICE).manual_seed(5)
    z = torch.randn(n, V, generator=g, device=DEVICE, dtype=torch.bfloat16) * 2
    t = torch.randint(0, V, (n,), device=DEVICE, generator=g)
    rows = torch.tensor([0, 1, n // 2, n - 9, n - 2, n - 1], device=DEVICE)
    zr, tr = z[rows].cpu(), t[rows].cpu()
    options = contract.row_options(loss_type="dapo", beta=0.04)
    execution = contract.execution_for(backend)
    ref = contract.reference_stats(zr, tr, options)

    st = backend.row_stats(z, t, options, execution)
    for name in ("lse", "entropy", "target_logit"):
        contract.close(getattr(st, name)[rows], getattr(ref, name), 1e-5, name)

    # fused: stats + epilogue + gradient over the whole chunk, checked on the sampled rows
    ti = contract.make_token_inputs(st.logp.double(), torch.float32, DEVICE, 3, off_policy=True, scaled=True)
    fst, epi = backend.row_fused_(z, t, ti, options, execution)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(epi.dlogp).all()) and bool(torch.isfinite(epi.loss).all())
    sub = epilogue.TokenInputs(*(None if x is None else x[rows].cpu() for x in
                                  (ti.old, ti.adv, ti.weight, ti.ref, ti.policy_scale)))
    ref_epi = epilogue.token_epilogue(fst.logp[rows].cpu(), sub, options)
    contract.close(epi.dlogp[rows], ref_epi.dlogp, 1e-5, "dlogp", elementwise=True)
    expect = contract.reference_grad(zr, tr, ref_epi.dlogp, None, options)
    contract.close(z[rows], expect, contract.GRAD_TOL[torch.bfloat16], "grad", scale=ref_epi.dlogp.abs().max().item())


def test_non_default_stream(backend):
    """Work queued on a side stream lands there (the stream comes from Python as an int)."""
    n, V = 64, 32000
    z, t = contract.make_logits(n, V, torch.float32, DEVICE, 21)
    options, execution = contract.row_options(), contract.execution_for(backend)
    ref = contract.reference_stats(z, t, options)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        st = backend.row_stats(z, t, options, execution)
        backend.row_grad_(z, t, st, torch.ones(n, device=DEVICE), None, options, execution)
    side.synchronize()
    contract.close(st.lse, ref.lse, 1e-5, "lse")
    assert bool(torch.isfinite(z).all())  # the gradient, 0 at the -inf logits


def test_auto_and_names(backend):
    from grpo_kernels.backends import cpp, get_backend

    assert get_backend("cuda", torch.device("cuda"), torch.bfloat16) is backend is cpp.BACKEND
    assert get_backend("cpp", torch.device("cuda"), torch.float32) is backend
    assert cpp.prebuilt_available()


def test_bad_device_mix_raises(ext):
    z = torch.randn(4, 10, device=DEVICE)
    t = torch.randint(0, 10, (4,))  # on the CPU
    out = [torch.empty(4, device=DEVICE) for _ in range(3)]
    with pytest.raises(RuntimeError, match="targets"):
        ext.row_stats(z, t, *out, 1.0, None, bindings.stream_of(z))

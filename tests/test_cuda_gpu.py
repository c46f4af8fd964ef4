"""The compiled row pass's CUDA kernels (csrc/row_pass.cu), row by row, against float64 torch.

Same checks as tests/test_cpp_backend.py (imported from it) on CUDA tensors, plus a
bf16 Qwen-vocabulary chunk (V = 151936), a chunk with more than 2^31 logits (int64
indexing), a non-default stream and the error path. Skips cleanly without CUDA.

    python -m pytest tests/test_cuda_gpu.py -q

The first run JIT-builds the CUDA extension (nvcc + ninja; cached afterwards).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_cpp_backend as checks  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"


@pytest.fixture(scope="module")
def ext():
    from grpo_kernels.backends import cuda

    reason = cuda.BACKEND.supports(torch.device("cuda"), torch.bfloat16)
    if reason is not None:
        pytest.skip(f"backend 'cuda' unavailable: {reason}")
    module = cuda.load_extension()
    assert module.has_cuda(), "nvcc and CUDA torch are here, yet the loaded extension has no CUDA kernels"
    return module


@pytest.mark.parametrize("xform", checks.XFORMS, ids=checks.XFORM_IDS)
@pytest.mark.parametrize("shape", checks.SHAPES, ids=checks.SHAPE_IDS)
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=checks.DTYPE_IDS)
def test_row_stats(ext, dtype, shape, xform):
    checks.check_row_stats(ext, DEVICE, dtype, shape, xform)


@pytest.mark.parametrize("with_dentropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("xform", checks.XFORMS, ids=checks.XFORM_IDS)
@pytest.mark.parametrize("shape", checks.SHAPES, ids=checks.SHAPE_IDS)
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=checks.DTYPE_IDS)
def test_row_grad(ext, dtype, shape, xform, with_dentropy):
    checks.check_row_grad(ext, DEVICE, dtype, shape, xform, with_dentropy)


@pytest.mark.parametrize("variant", sorted(checks.TOKEN_VARIANTS))
@pytest.mark.parametrize("case", sorted(checks.OPTION_CASES))
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=checks.DTYPE_IDS)
def test_row_fused_matches_composition(ext, dtype, case, variant):
    checks.check_row_fused(ext, DEVICE, dtype, case, variant)


@pytest.mark.parametrize("xform", checks.XFORMS[1:], ids=checks.XFORM_IDS[1:])
@pytest.mark.parametrize("dtype", checks.DTYPES, ids=checks.DTYPE_IDS)
def test_row_fused_transforms_and_shapes(ext, dtype, xform):
    checks.check_row_fused(ext, DEVICE, dtype, "grpo-beta", "offpolicy", xform=xform, shape=(5, 517, 3))
    checks.check_row_fused(ext, DEVICE, dtype, "dapo-asym-delta", "scaled", xform=xform, shape=(3, 8, 0))


@pytest.mark.parametrize("dtype", checks.DTYPES, ids=checks.DTYPE_IDS)
def test_backend_api(ext, dtype):
    checks.check_backend_api(DEVICE, dtype)


@pytest.mark.parametrize("variant", sorted(checks.TOKEN_VARIANTS))
@pytest.mark.parametrize("case", sorted(checks.OPTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_token_epilogue(ext, dtype, case, variant):
    checks.check_token_epilogue(ext, DEVICE, dtype, case, variant)


@pytest.mark.parametrize("eps", [1e-4, 0.0], ids=["eps1e-4", "eps0"])
@pytest.mark.parametrize("mode", ["group", "batch", "none"])
@pytest.mark.parametrize("case", sorted(checks.GROUP_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_group_normalize(ext, dtype, case, mode, eps):
    checks.check_group_normalize(ext, DEVICE, dtype, case, mode, eps)


@pytest.mark.parametrize("dtype", checks.DTYPES, ids=checks.DTYPE_IDS)
def test_nan_and_neg_inf_rows(ext, dtype):
    checks.check_nan_and_neg_inf_rows(ext, DEVICE, dtype)


def test_group_advantages_api(ext):
    checks.check_group_advantages_api(DEVICE)


@pytest.mark.parametrize("case", ["grpo-beta", "dapo-asym-delta", "sapo", "cispo"])
def test_qwen_vocab_bf16(ext, case):
    """A bf16 chunk of 48 rows over Qwen's 151936-entry vocabulary: stats, grad, fused."""
    shape = (48, 151936, 0)
    checks.check_row_stats(ext, DEVICE, torch.bfloat16, shape, (1.0, None), seed=11)
    checks.check_row_grad(ext, DEVICE, torch.bfloat16, shape, (0.8, None), True, seed=12)
    checks.check_row_fused(ext, DEVICE, torch.bfloat16, case, "offpolicy", shape=shape, seed=13)


def test_more_than_2_31_logits(ext):
    """A chunk with n * V > 2^31: rows past the 32-bit offset range are right (int64 indexing)."""
    V = 151936
    n = (2**31) // V + 8
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * V * 2:
        pytest.skip("not enough GPU memory for a > 2^31-element bf16 chunk")
    g = torch.Generator(device=DEVICE).manual_seed(5)
    z = torch.randn(n, V, generator=g, device=DEVICE, dtype=torch.bfloat16) * 2
    t = torch.randint(0, V, (n,), device=DEVICE, generator=g)
    rows = torch.tensor([0, 1, n // 2, n - 9, n - 2, n - 1], device=DEVICE)
    zr = z[rows].cpu()
    tr = t[rows].cpu()
    ref = checks.reference_stats(zr, tr, 1.0, None)

    st = checks.ext_row_stats(ext, z, t, 1.0, None)
    for name in ("lse", "entropy", "target_logit"):
        checks.assert_close(getattr(st, name)[rows], getattr(ref, name), 1e-5, name)

    # fused: stats + epilogue + gradient over the whole chunk, checked on the sampled rows
    options = checks.GRPOOptions(loss_type="dapo", beta=0.04).validate()
    ti = checks.random_token_inputs(st.logp.double().cpu(), 3, "offpolicy", DEVICE, torch.float32)
    outs = [checks.nan_vec(n, torch.float32, DEVICE) for _ in range(5)]
    ext.row_fused_(z, t, ti.old, ti.adv, ti.weight, ti.ref, ti.policy_scale, *outs, 1.0, None,
                   **checks.option_args(options), stream=checks.stream_of(z))
    torch.cuda.synchronize()
    assert bool(torch.isfinite(outs[4]).all()) and bool(torch.isfinite(outs[3]).all())
    sub = checks.cpu64(checks.TokenInputs(*(None if x is None else x[rows] for x in
                                            (ti.old, ti.adv, ti.weight, ti.ref, ti.policy_scale))))
    ref_epi = checks.token_epilogue(ref.logp, sub, options)
    checks.assert_close(outs[4][rows], ref_epi.dlogp, 1e-4, "dlogp")
    ref_grad = checks.reference_grad(zr, tr, ref.lse, ref.entropy, ref_epi.dlogp, None, 1.0, None)
    checks.assert_close(z[rows], ref_grad, 1e-2, "grad")


def test_non_default_stream(ext):
    """Work queued on a side stream lands there (the stream comes from Python as an int)."""
    from grpo_kernels.backends.cuda import BACKEND

    n, V = 64, 32000
    z = checks.random_logits(n, V, torch.float32, DEVICE, 21)
    t = checks.random_targets(n, V, DEVICE, 21)
    ref = checks.reference_stats(z.cpu(), t.cpu(), 1.0, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        st = BACKEND.row_stats(z, t, 1.0, None)
        BACKEND.row_grad_(z, t, st.lse, st.entropy, torch.ones(n, device=DEVICE), None, 1.0, None)
    side.synchronize()
    checks.assert_close(st.lse, ref.lse, 1e-5, "lse")
    assert bool(torch.isfinite(z).all())


def test_auto_and_names(ext):
    from grpo_kernels.backends import cuda, get_backend

    assert get_backend("cuda", torch.device("cuda"), torch.bfloat16) is cuda.BACKEND
    assert get_backend("cpp", torch.device("cuda"), torch.float32) is cuda.BACKEND
    assert cuda.prebuilt_available()


def test_bad_device_mix_raises(ext):
    z = torch.randn(4, 10, device=DEVICE)
    t = torch.randint(0, 10, (4,))  # on the CPU
    out = [torch.empty(4, device=DEVICE) for _ in range(3)]
    with pytest.raises(RuntimeError, match="targets"):
        ext.row_stats(z, t, *out, 1.0, None, checks.stream_of(z))

"""What is specific to the compiled row pass (csrc/, backend "cpp"), on CPU tensors.

The row-pass numbers of this backend (row_stats, row_grad_, row_fused_ and group_normalize on
every dtype and option case, against float64 torch) are checked by the backend-independent
contract, tests/test_row_pass_contract.py. Here: the extension's bindings (their names, every
preallocated output written, the argument checks), ``supports()``, and how the extension is found:
importing never compiles, ``prebuilt_available()`` never compiles, and ``backend="auto"`` without a
prebuilt extension under ``GRPO_KERNELS_AUTO_BUILD=0`` runs the torch backend without compiling.

The extension is JIT-built once (module-scoped fixture; ~30 s the first time, then loaded from
the on-disk cache). tests/test_cuda_gpu.py runs the binding helpers below on CUDA tensors.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from grpo_kernels.backends.base import RowStats
from grpo_kernels.epilogue import SCALE_MODE_CODES, loss_kind_code
from grpo_kernels.options import ExecutionOptions, GRPOOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_row_pass_contract as contract  # noqa: E402

ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
       torch.float16: torch.float32}
BINDINGS = {"has_cuda", "row_stats", "row_grad_", "row_fused_", "group_normalize", "row_threads"}


# -- direct calls of the bindings, outputs preallocated NaN-filled --------------------------


def nan_vec(n, dtype, device):
    return torch.full((n,), float("nan"), dtype=dtype, device=device)


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def option_args(o: GRPOOptions) -> dict:
    """The binding's keyword arguments for a GRPOOptions (csrc/row_pass.h's EpilogueOptions)."""
    return dict(kind=loss_kind_code(o.loss_type), lo=1.0 - o.epsilon_low, hi=1.0 + o.eps_high,
                delta=o.delta, eps_high=o.eps_high, sapo_pos=o.sapo_temperature_pos,
                sapo_neg=o.sapo_temperature_neg, beta=o.beta, bias_correction_kl=o.use_bias_correction_kl)


def ext_row_stats(ext, z, t, temperature, softcap) -> RowStats:
    out = [nan_vec(z.shape[0], ACC[z.dtype], z.device) for _ in range(3)]
    ext.row_stats(z, t, *out, temperature, softcap, stream_of(z))
    return RowStats(*out)


def ext_row_fused(ext, z, t, ti, options: GRPOOptions):
    """(RowStats, loss, dlogp) of the fused binding, in place on ``z``."""
    outs = [nan_vec(z.shape[0], ACC[z.dtype], z.device) for _ in range(5)]
    ext.row_fused_(z, t, ti.old, ti.adv, ti.weight, ti.ref if options.beta != 0.0 else None, ti.policy_scale,
                   *outs, options.temperature, options.logit_softcap, **option_args(options), stream=stream_of(z))
    return RowStats(*outs[:3]), outs[3], outs[4]


def check_bindings_match_the_backend(ext, device, dtype, seed=0):
    """Each binding, called directly with NaN-filled outputs, writes every element, and gives
    bitwise what the CppRowBackend wrapper gives (the wrapper's argument plumbing: options,
    dtypes, optional inputs)."""
    from grpo_kernels.backends.cpp import BACKEND

    n, V = 6, 1003
    options = GRPOOptions(loss_type="dapo", beta=0.04, delta=1.1, temperature=0.9, logit_softcap=20.0).validate()
    execution = ExecutionOptions(backend="cpp").validate()
    acc = ACC[dtype]
    z, t = contract.make_logits(n, V, dtype, device, seed)
    st = ext_row_stats(ext, z, t, options.temperature, options.logit_softcap)
    assert not any(bool(torch.isnan(x).any()) for x in (st.lse, st.entropy, st.target_logit))
    api = BACKEND.row_stats(z, t, options, execution)
    for name in ("lse", "entropy", "target_logit"):
        assert torch.equal(getattr(st, name), getattr(api, name)), name

    dlogp, dent = (torch.randn(n, generator=contract.gen(seed + k), dtype=torch.float64).to(device=device, dtype=acc)
                   for k in (1, 2))
    direct, wrapped = z.clone(), z.clone()
    ext.row_grad_(direct, t, st.lse, st.entropy, dlogp, dent, options.temperature, options.logit_softcap,
                  stream_of(direct))
    BACKEND.row_grad_(wrapped, t, api, dlogp, dent, options, execution)
    assert torch.equal(direct, wrapped)

    ti = contract.make_token_inputs(st.logp, acc, device, seed, off_policy=True, scaled=True)
    direct, wrapped = z.clone(), z.clone()
    dst, loss, dl = ext_row_fused(ext, direct, t, ti, options)
    wst, epi = BACKEND.row_fused_(wrapped, t, ti, options, execution)
    assert not bool(torch.isnan(loss).any()) and not bool(torch.isnan(dl).any())
    assert torch.equal(loss, epi.loss) and torch.equal(dl, epi.dlogp) and torch.equal(dst.lse, wst.lse)
    assert torch.equal(direct, wrapped)

    r = torch.randn(24, generator=contract.gen(seed + 3), dtype=torch.float64).to(device=device, dtype=acc)
    r[5] = float("nan")
    for mode, mode_id in SCALE_MODE_CODES.items():
        out = nan_vec(24, acc, device)
        ext.group_normalize(r, out, 4, mode_id, 1e-4, stream=stream_of(r))
        assert not bool(torch.isnan(out).any())
        assert torch.equal(out, BACKEND.group_normalize(r, 4, mode, 1e-4)), mode


# -- CPU tests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    from grpo_kernels.backends import cpp

    reason = cpp.BACKEND.supports(torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(f"backend 'cpp' unavailable: {reason}")
    return cpp.load_extension()


def test_bindings(ext):
    names = {n for n in dir(ext) if not n.startswith("_")}
    assert BINDINGS <= names
    assert "token_epilogue" not in names  # the standalone epilogue binding is gone
    assert ext.has_cuda() in (True, False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_bindings_match_the_backend(ext, dtype):
    check_bindings_match_the_backend(ext, "cpu", dtype)


def test_bad_inputs_raise(ext):
    z = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    out = [torch.empty(4) for _ in range(3)]
    with pytest.raises(RuntimeError, match="dtype"):
        ext.row_stats(z.to(torch.int32), t, *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="2-D"):
        ext.row_stats(z[0], t, *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.row_stats(torch.randn(10, 4).t(), t, *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="overlap"):
        ext.row_stats(torch.randn(50).as_strided((4, 10), (5, 1)), t, *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="targets"):
        ext.row_stats(z, t.int(), *out, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="lse"):
        ext.row_stats(z, t, torch.empty(4, dtype=torch.float64), out[1], out[2], 1.0, None, 0)
    with pytest.raises(RuntimeError, match="target_logit"):
        ext.row_stats(z, t, out[0], out[1], torch.empty(3), 1.0, None, 0)
    with pytest.raises(RuntimeError, match="temperature"):
        ext.row_stats(z, t, *out, 0.0, None, 0)
    with pytest.raises(RuntimeError, match="softcap"):
        ext.row_stats(z, t, *out, 1.0, -1.0, 0)
    with pytest.raises(RuntimeError, match="dlogp"):
        ext.row_grad_(z, t, out[0], out[1], torch.empty(5), None, 1.0, None, 0)
    with pytest.raises(RuntimeError, match="dentropy"):
        ext.row_grad_(z, t, out[0], out[1], torch.empty(4), torch.empty(4, dtype=torch.float64), 1.0, None, 0)
    fused = dict(kind=0, lo=0.8, hi=1.2, delta=None, eps_high=0.2, sapo_pos=1.0, sapo_neg=1.05, beta=0.1,
                 bias_correction_kl=False)
    five = [torch.empty(4) for _ in range(5)]
    with pytest.raises(RuntimeError, match="ref"):
        ext.row_fused_(z, t, None, torch.randn(4), torch.rand(4), None, None, *five, 1.0, None, **fused)
    with pytest.raises(RuntimeError, match="loss kind"):
        ext.row_fused_(z, t, None, torch.randn(4), torch.rand(4), torch.randn(4), None, *five, 1.0, None,
                       **dict(fused, kind=7))
    with pytest.raises(RuntimeError, match="adv"):
        ext.row_fused_(z, t, None, torch.randn(3), torch.rand(4), torch.randn(4), None, *five, 1.0, None, **fused)
    with pytest.raises(RuntimeError, match="multiple"):
        ext.group_normalize(torch.randn(6), torch.empty(6), 4, 0, 1e-4)
    with pytest.raises(RuntimeError, match="scale mode"):
        ext.group_normalize(torch.randn(8), torch.empty(8), 4, 5, 1e-4)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.group_normalize(torch.randn(8).bfloat16(), torch.empty(8).bfloat16(), 4, 0, 1e-4)


def test_supports_and_prebuilt(ext):
    from grpo_kernels.backends import cpp, get_backend

    assert cpp.BACKEND.name == "cpp"
    assert get_backend("cpp", torch.device("cpu"), torch.float32) is cpp.BACKEND
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert cpp.BACKEND.supports(torch.device("cpu"), dt) is None
    assert "not supported" in cpp.BACKEND.supports(torch.device("cpu"), torch.int32)
    assert "not supported" in cpp.BACKEND.supports(torch.device("meta"), torch.float32)
    assert cpp.BACKEND.temp_bytes_per_elem == 0 and cpp.BACKEND.deterministic
    assert cpp.prebuilt_available()  # loaded (and cached on disk) by the fixture
    if not torch.cuda.is_available():
        assert cpp.BACKEND.supports(torch.device("cuda"), torch.float32) == "CUDA is not available"


_NEVER_COMPILES = textwrap.dedent(
    """
    import sys
    import torch
    import grpo_kernels
    from grpo_kernels.backends import choose_backend_by_name, cpp, get_backend
    assert cpp._ext is None, "importing loaded the extension"
    prebuilt = cpp.prebuilt_available()
    assert prebuilt or cpp._ext is None
    backend, why = choose_backend_by_name("auto", torch.device("cpu"), torch.float32)
    assert get_backend("auto", torch.device("cpu"), torch.float32) is backend
    print(prebuilt, backend.name, why, sep="|")
    """
)


def test_import_prebuilt_available_and_auto_without_build_never_compile(tmp_path):
    """With an empty build cache and GRPO_KERNELS_AUTO_BUILD=0: importing builds nothing,
    prebuilt_available() builds nothing, and auto runs the torch backend (no prebuilt extension)
    or the prebuilt one (an installed grpo_kernels._C), without compiling either way."""
    from grpo_kernels.backends.cpp import _prebuilt_module_exists

    cache = tmp_path / "cache"
    env = dict(os.environ, GRPO_KERNELS_BUILD_DIR=str(cache), GRPO_KERNELS_AUTO_BUILD="0")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _NEVER_COMPILES], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    prebuilt, name, why = res.stdout.strip().splitlines()[-1].split("|")
    if _prebuilt_module_exists():
        assert (prebuilt, name) == ("True", "cpp"), res.stdout
    else:
        assert (prebuilt, name) == ("False", "torch"), res.stdout
        assert "GRPO_KERNELS_AUTO_BUILD=0" in why, why
    assert "building" not in res.stderr, res.stderr
    assert not cache.exists(), f"something was built: {sorted(cache.rglob('*'))}"


def test_parity_suite_lists_cpp():
    from support import BACKENDS

    assert "cpp" in BACKENDS

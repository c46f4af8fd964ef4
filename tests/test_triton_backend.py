"""What is specific to the Triton backend (grpo_kernels/backends/triton).

The row-pass numbers of this backend (row_stats, row_grad_, row_fused_, group_normalize against
float64 torch, every dtype and option case) are checked by the backend-independent contract,
tests/test_row_pass_contract.py, with the default launch (interpreter: a 128 tile; GPU:
autotuned). Here: ``supports()``; the vocabulary tiles (small fixed tiles, ``GRPO_KERNELS_TRITON_BLOCK_V``)
through the contract's checks; when autotuning is on (``use_autotune(deterministic)``: never under
the interpreter, ``GRPO_KERNELS_TRITON_AUTOTUNE=0``, a fixed tile or a deterministic run) and the
autotuner's config pruning; group_normalize looping over groups longer than its tile. The compiled (sm_90) kernels building
without a GPU: tests/test_triton_compile.py. GPU only (marked ``gpu``, skipped without CUDA):
autotuned and fixed configs agree, deterministic runs are bitwise equal, a chunk whose element
offsets pass 2^31.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py when CUDA is absent):

    python -m pytest tests/test_triton_backend.py -q

Every output allocated through ``common.empty`` starts NaN-filled (the ``poison`` fixture).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from grpo_kernels.advantages import normalize_groups  # noqa: E402
from grpo_kernels.backends import get_backend  # noqa: E402
from grpo_kernels.backends.triton import BACKEND as TRITON  # noqa: E402
from grpo_kernels.backends.triton import common, advantages_kernel, objective_kernel, row_kernels  # noqa: E402
from grpo_kernels.options import ExecutionOptions  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_row_pass_contract as contract  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
pytestmark = [
    pytest.mark.skipif(
        TRITON.supports(torch.device(DEVICE), torch.float32) is not None,
        reason=f"triton backend unavailable: {TRITON.supports(torch.device(DEVICE), torch.float32)}",
    ),
    # numpy's warnings for IEEE results the torch reference produces as well, raised by the
    # interpreter's numpy ops
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Kernel outputs start as NaN: any element a kernel does not write fails the comparison."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,), float("nan"),
                          dtype=dtype, device=device)

    monkeypatch.setattr(common, "empty", nan_empty)


@pytest.fixture
def plain_env(monkeypatch):
    for var in ("GRPO_KERNELS_TRITON_AUTOTUNE", "GRPO_KERNELS_TRITON_BLOCK_V"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


# ----------------------------------------------------------------------------- backend plumbing


def test_dispatch_and_supports():
    dev = torch.device(DEVICE)
    assert get_backend("triton", dev, torch.float32) is TRITON
    assert TRITON.name == "triton" and TRITON.temp_bytes_per_elem == 0 and TRITON.deterministic
    for dt in (torch.float32, torch.float64, torch.float16):
        assert TRITON.supports(dev, dt) is None
    assert "not supported" in TRITON.supports(dev, torch.int64)
    assert "not supported" in TRITON.supports(torch.device("meta"), torch.float32)
    if not CUDA:
        assert "bfloat16" in TRITON.supports(torch.device("cpu"), torch.bfloat16)
        assert TRITON.supports(torch.device("cuda"), torch.float32) == "CUDA is not available"
    else:
        assert TRITON.supports(dev, torch.bfloat16) is None
    assert not hasattr(objective_kernel, "token_epilogue_kernel")  # the standalone epilogue is gone


# ----------------------------------------------------------------------------- tiles


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["fp64", "fp32", "fp16"])
def test_fixed_tiles(plain_env, block, dtype):
    """A fixed vocabulary tile (V = 150 spans several tiles, the last one partial; rows padded):
    the contract's checks of row_stats, row_grad_ and row_fused_."""
    plain_env.setenv("GRPO_KERNELS_TRITON_BLOCK_V", str(block))
    assert common.env_block_v() == block and not common.use_autotune(False)
    shape = (5, 150, 2)
    contract.check_row_stats(TRITON, DEVICE, dtype, shape, (1.3, 5.0), seed=block)
    contract.check_row_grad(TRITON, DEVICE, dtype, shape, (0.7, None), True, seed=block + 1)
    contract.check_row_fused(TRITON, DEVICE, dtype, "bnpo-delta-beta-scale", shape=(8, 150, 2), seed=block + 2)


def test_tile_settings(plain_env):
    if not common.INTERPRET:
        pytest.skip("the interpreter's fixed tile")
    assert common.fixed_row_config(300) == (common.INTERPRET_BLOCK_V, {})
    assert common.fixed_row_config(20) == (32, {})  # a small vocabulary: the next power of 2
    plain_env.setenv("GRPO_KERNELS_TRITON_BLOCK_V", "64")
    assert common.fixed_row_config(300) == (64, {})
    for bad in ("100", "8", "abc"):
        plain_env.setenv("GRPO_KERNELS_TRITON_BLOCK_V", bad)
        with pytest.raises(ValueError):
            common.env_block_v()


# ----------------------------------------------------------------------------- autotuning


def test_use_autotune(plain_env):
    plain_env.setattr(common, "INTERPRET", False)  # as compiled on a GPU
    assert common.use_autotune(False) is True
    assert common.use_autotune(True) is False  # deterministic: the tile decides the reduction order
    plain_env.setenv("GRPO_KERNELS_TRITON_AUTOTUNE", "0")
    assert common.use_autotune(False) is False
    plain_env.delenv("GRPO_KERNELS_TRITON_AUTOTUNE")
    plain_env.setenv("GRPO_KERNELS_TRITON_BLOCK_V", "256")
    assert common.use_autotune(False) is False
    plain_env.delenv("GRPO_KERNELS_TRITON_BLOCK_V")
    plain_env.setattr(common, "INTERPRET", True)
    assert common.use_autotune(False) is False and common.use_autotune(True) is False


class _FakeTuned:
    """Stands in for an autotuned kernel: records its launches, runs nothing."""

    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(self.name)


def test_deterministic_execution_never_autotunes(plain_env):
    """Deterministic runs (deterministic=True, or torch.use_deterministic_algorithms) launch the
    plain kernels with the fixed tile; others the autotuned ones (here, as on a GPU)."""
    calls = []
    for name in ("row_stats_tuned", "row_grad_tuned", "row_fused_tuned"):
        plain_env.setattr(row_kernels, name, _FakeTuned(calls, name))
    plain_env.setattr(common, "INTERPRET", False)
    plain_env.setattr(common, "fixed_row_config", lambda V: (64, {}))  # the interpreter's launch
    z, t = contract.make_logits(6, 150, torch.float32, DEVICE, seed=3)
    options = contract.row_options((0.9, None), beta=0.04)
    ti = contract.make_token_inputs(contract.reference_stats(z, t, options).logp, torch.float32, DEVICE, 3, True, True)

    def run(execution):
        st = TRITON.row_stats(z, t, options, execution)
        TRITON.row_grad_(z.clone(), t, st, st.lse, None, options, execution)
        TRITON.row_fused_(z.clone(), t, ti, options, execution)

    run(ExecutionOptions(deterministic=True).validate())
    assert calls == []
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        run(ExecutionOptions().validate())
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls == []
    run(ExecutionOptions().validate())
    assert calls == ["row_stats_tuned", "row_grad_tuned", "row_fused_tuned"]
    # and the fixed-tile launches were right
    contract.check_row_fused(TRITON, DEVICE, torch.float32, "grpo-beta", shape=(6, 150, 0),
                             execution=ExecutionOptions(deterministic=True).validate())


def test_autotune_prunes_tiles_for_small_vocabularies():
    keep = lambda V: sorted({c.kwargs["BLOCK_V"] for c in row_kernels._prune_row_configs(  # noqa: E731
        row_kernels.ROW_CONFIGS, {"V": V})})
    assert keep(300) == [1024]
    assert keep(5000) == [1024, 2048, 4096, 8192]
    assert max(keep(151936)) == 8192
    assert row_kernels._prune_row_configs(row_kernels.ROW_CONFIGS[1:2], {"V": 10}) == row_kernels.ROW_CONFIGS[1:2]


# ----------------------------------------------------------------------------- group_normalize


def test_group_normalize_loops_over_long_groups(monkeypatch):
    """Groups and batches longer than the kernels' largest tile (MAX_BLOCK lowered to 16)."""
    monkeypatch.setattr(advantages_kernel, "MAX_BLOCK", 16)
    g = torch.Generator().manual_seed(3)
    r = torch.randn(120, generator=g) * 2 + 1
    r[[1, 50, 51]] = float("nan")
    r[80:120] = 0.5  # a group of equal rewards
    r = r.to(DEVICE)
    for mode in ("group", "batch", "none"):
        out = TRITON.group_normalize(r, 40, mode, 1e-4)
        contract.close(out, normalize_groups(r.double().cpu(), 40, mode, 1e-4), 1e-5, mode)


# ----------------------------------------------------------------------------- GPU only


@gpu
def test_gpu_autotuned_and_fixed_configs_agree(plain_env):
    shape = (64, 50_000, 0)
    tuned = ExecutionOptions().validate()
    contract.check_row_stats(TRITON, DEVICE, torch.bfloat16, shape, (1.0, None), seed=61, execution=tuned)
    contract.check_row_fused(TRITON, DEVICE, torch.bfloat16, "dapo-beta", shape=shape, seed=62,
                             execution=tuned)  # autotuned in place: restore_value
    plain_env.setenv("GRPO_KERNELS_TRITON_AUTOTUNE", "0")
    contract.check_row_stats(TRITON, DEVICE, torch.bfloat16, shape, (1.0, None), seed=61, execution=tuned)
    contract.check_row_grad(TRITON, DEVICE, torch.bfloat16, shape, (0.9, 30.0), True, seed=63, execution=tuned)


@gpu
def test_gpu_deterministic_runs_are_bitwise_equal(plain_env):
    z, t = contract.make_logits(32, 40_000, torch.bfloat16, DEVICE, seed=71)
    options = contract.row_options(beta=0.04)
    execution = ExecutionOptions(deterministic=True).validate()
    ti = contract.make_token_inputs(contract.reference_stats(z, t, options).logp, torch.float32, DEVICE, 72, True,
                                    False)
    outs = []
    for _ in range(2):
        zk = z.clone()
        st, epi = TRITON.row_fused_(zk, t, ti, options, execution)
        outs.append((zk, st.lse, epi.loss))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@gpu
def test_gpu_int64_row_offsets():
    """A chunk of more than 2^31 elements: the last rows start past int32 element offsets."""
    V = 2**17
    n = 2**31 // V + 3
    need = n * V * 2 * 2.5  # the chunk, and its copy while the in-place kernel autotunes
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    z = torch.empty(n, V, dtype=torch.bfloat16, device="cuda")
    z.normal_(0, 2, generator=torch.Generator(device="cuda").manual_seed(0))
    tg = torch.randint(0, V, (n,), device="cuda")
    tail = slice(n - 3, n)
    options, execution = contract.row_options(), ExecutionOptions().validate()
    st = TRITON.row_stats(z, tg, options, execution)
    ref = contract.reference_stats(z[tail], tg[tail], options)
    contract.check_stats(contract.RowStats(st.lse[tail], st.entropy[tail], st.target_logit[tail]), ref,
                         torch.bfloat16, "cuda")
    zt = z[tail].clone()
    dlogp = torch.randn(n, device="cuda", dtype=torch.float32)
    TRITON.row_grad_(z, tg, st, dlogp, None, options, execution)
    expect = contract.reference_grad(zt, tg[tail], dlogp[tail], None, options)
    contract.close(z[tail], expect, contract.GRAD_TOL[torch.bfloat16], "grad", scale=dlogp[tail].abs().max().item())


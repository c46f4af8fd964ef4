"""grad_weight across row chunks: fp32 accumulator or the weight's own dtype (plan.grad_weight_dtype)."""
from __future__ import annotations

import pytest
import torch

from support import (
    TOLERANCES, as_double, backend_params, device_for_tests, rel_err, require, run_loss, well_conditioned_batch,
)
from grpo_kernels import grpo_loss, plan
from grpo_kernels.reference import reference_grpo_loss

DEVICE = device_for_tests()
OPTS = dict(loss_type="dapo", beta=0.04, temperature=0.9, chunk_size=2)  # B*T=15 rows: 8 chunks


def _low(backend):
    return torch.float16 if (backend == "triton" and DEVICE == "cpu") else torch.bfloat16


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["fp32", "native", "auto"])
def test_every_accumulation_mode_matches_the_oracle(backend, mode, monkeypatch):
    dtype = _low(backend)
    require(backend, DEVICE, dtype)
    monkeypatch.setenv("GRPO_KERNELS_GRAD_WEIGHT_ACCUM", mode)
    batch = well_conditioned_batch(dtype, 41, OPTS, device=DEVICE)
    _, grads = run_loss(grpo_loss, batch, backend=backend, **OPTS)
    _, ref_grads = run_loss(reference_grpo_loss, as_double(batch), **OPTS)
    assert grads[1].dtype == dtype
    assert rel_err(grads[1], ref_grads[1]) < TOLERANCES[dtype][1]


def test_native_accumulation_rounds_once_per_chunk_not_per_row(monkeypatch):
    # 8 chunks summed in bf16: within a few bf16 ulps of the fp32-accumulated result
    batch = well_conditioned_batch(torch.bfloat16, 43, OPTS)
    monkeypatch.setenv("GRPO_KERNELS_GRAD_WEIGHT_ACCUM", "fp32")
    _, (_, gw32, _) = run_loss(grpo_loss, batch, backend="torch", **OPTS)
    monkeypatch.setenv("GRPO_KERNELS_GRAD_WEIGHT_ACCUM", "native")
    _, (_, gwn, _) = run_loss(grpo_loss, batch, backend="torch", **OPTS)
    assert not torch.equal(gw32, gwn)  # the two modes really ran different code
    assert rel_err(gwn, gw32) < 8 * torch.finfo(torch.bfloat16).eps


def test_auto_rule():
    big = torch.empty(151936, 4096, dtype=torch.bfloat16, device="meta")
    small = torch.empty(4096, 64, dtype=torch.bfloat16, device="meta")
    assert plan.grad_weight_dtype(big, n_chunks=4) == torch.bfloat16  # 2.4 GB accumulator: native
    assert plan.grad_weight_dtype(small, n_chunks=4) == torch.float32
    assert plan.grad_weight_dtype(small, n_chunks=1) == torch.bfloat16  # one GEMM: nothing to accumulate
    assert plan.grad_weight_dtype(small.float(), n_chunks=4) == torch.float32  # fp32 weight: already fp32


def test_bad_mode_is_named(monkeypatch):
    monkeypatch.setenv("GRPO_KERNELS_GRAD_WEIGHT_ACCUM", "fp16")
    small = torch.empty(64, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="GRPO_KERNELS_GRAD_WEIGHT_ACCUM"):
        plan.grad_weight_dtype(small, n_chunks=4)

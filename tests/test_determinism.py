"""Determinism: repeated runs give bitwise-identical loss and gradients on every backend.

None of the row passes uses atomics (each row is reduced by one program / thread in a
fixed order), scatters write unique indices only, and the matmuls go through torch
(MKL / cuBLAS: deterministic for a fixed configuration, i.e. the same shapes, thread
count and library versions). What can change the bits between two runs is the chunking
(grad_weight is accumulated chunk by chunk), which ``grpo_kernels.plan`` derives from the
shapes, dtype and options alone, and an autotuned Triton tile: ``deterministic=True`` (or
``torch.use_deterministic_algorithms(True)``) turns autotuning off and refuses a backend
that does not declare a fixed reduction order.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from support import backend_params, device_for_tests, require
from grpo_kernels import grpo_loss, token_logprobs
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel
from grpo_kernels.plan import chunk_rows, plan_call

DEVICE = device_for_tests()
REPEATS = 3


def _low(backend):
    return torch.float16 if (backend == "triton" and DEVICE == "cpu") else torch.bfloat16


def _inputs(dtype, seed=0, B=4, T=9, H=32, V=301, bias=True):
    g = torch.Generator().manual_seed(seed)
    d = dict(
        hidden=torch.randn(B, T, H, generator=g).to(dtype),
        weight=(0.3 * torch.randn(V, H, generator=g)).to(dtype),
        bias=(0.1 * torch.randn(V, generator=g)).to(dtype) if bias else None,
        targets=torch.randint(0, V, (B, T), generator=g),
        mask=torch.rand(B, T, generator=g) > 0.2,
        advantages=torch.randn(B, generator=g),
        old_logps=-6 + 0.3 * torch.randn(B, T, generator=g),
        ref_logps=-6 + 0.3 * torch.randn(B, T, generator=g),
    )
    d["mask"][1] = False
    return {k: None if v is None else v.to(DEVICE) for k, v in d.items()}


def _size(backend):
    # the Triton interpreter runs every program in Python: a smaller problem there
    return dict(T=4, V=67) if (backend == "triton" and DEVICE == "cpu") else {}


def _run(inp, **opts):
    h = inp["hidden"].clone().requires_grad_(True)
    w = inp["weight"].clone().requires_grad_(True)
    b = None if inp["bias"] is None else inp["bias"].clone().requires_grad_(True)
    loss = grpo_loss(h, w, inp["targets"], inp["advantages"], inp["mask"], inp["old_logps"], inp["ref_logps"],
                     bias=b, **opts)
    loss.backward()
    return [loss.detach(), h.grad, w.grad] + ([] if b is None else [b.grad])


def _assert_bitwise(runs):
    first = runs[0]
    for other in runs[1:]:
        for a, b in zip(first, other):
            assert a.dtype == b.dtype and a.shape == b.shape
            # bitwise, NaN-aware: compare the raw bits
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), \
                f"max difference {(a.double() - b.double()).abs().max().item()}"


CASES = {
    "dapo_token": dict(loss_type="dapo", beta=0.04),
    "grpo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04),
    "cispo_entropy_mask": dict(loss_type="cispo", epsilon_high=2.0, top_entropy_quantile=0.5),
    "sapo_softcap": dict(loss_type="sapo", logit_softcap=5.0, temperature=0.7),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float32", "low", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_repeated_runs_are_bitwise_identical(backend, dtype, case, deterministic):
    dtype = _low(backend) if dtype == "low" else getattr(torch, dtype)
    require(backend, DEVICE, dtype)
    inp = _inputs(dtype, **_size(backend))
    opts = dict(CASES[case], backend=backend, chunk_size=None, deterministic=deterministic)
    runs = [_run(inp, **opts) for _ in range(REPEATS)]
    _assert_bitwise(runs)
    if deterministic:  # the pinned chunking is the default one: same bits as without the flag
        _assert_bitwise([runs[0], _run(inp, **dict(opts, deterministic=False))])


@pytest.mark.parametrize("backend", backend_params())
def test_token_logprobs_bitwise_identical(backend):
    require(backend, DEVICE, torch.float32)
    inp = _inputs(torch.float32, **_size(backend))

    def once():
        h = inp["hidden"].clone().requires_grad_(True)
        w = inp["weight"].clone().requires_grad_(True)
        logp, ent = token_logprobs(h, w, inp["targets"], bias=inp["bias"], return_entropy=True, backend=backend,
                                   temperature=0.8)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return [logp.detach(), ent.detach(), h.grad, w.grad]

    _assert_bitwise([once() for _ in range(REPEATS)])


@pytest.mark.parametrize("backend", backend_params())
def test_torch_deterministic_mode_runs_and_is_bitwise_identical(backend):
    """Under torch.use_deterministic_algorithms(True) no op of ours raises (none is on
    torch's list of nondeterministic ops) and repeated runs agree bitwise."""
    require(backend, DEVICE, torch.float32)
    inp = _inputs(torch.float32, **_size(backend))
    old_cfg = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if DEVICE == "cuda" and old_cfg is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(inp, loss_type="bnpo", importance_sampling_level=lvl, beta=0.04, backend=backend,
                     top_entropy_quantile=0.7)
                for lvl in ("token", "token", "sequence", "sequence")]
    finally:
        torch.use_deterministic_algorithms(prev)
        if old_cfg is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    _assert_bitwise(runs[:2])
    _assert_bitwise(runs[2:])


def test_chunking_changes_the_bits_so_the_plan_fixes_it():
    """Why the chunk size must be fixed: a different chunking sums grad_weight in another
    order (close, but not the same bits)."""
    inp = _inputs(torch.float32, B=8, T=16)
    a = _run(inp, backend="torch", chunk_size=3)
    b = _run(inp, backend="torch", chunk_size=64)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-6)
    # so the plan's chunking is a function of the shapes, dtype and options alone: the same
    # every call, with or without deterministic mode (nothing run-time dependent enters it)
    h, w = inp["hidden"].reshape(-1, inp["hidden"].shape[-1]), inp["weight"]
    plans = [
        plan_call(h, w, GRPOOptions(), ExecutionOptions(backend="torch", deterministic=det), VocabParallel(),
                  need_grads=(True, True, False), loss=True)
        for det in (True, True, False)
    ]
    assert plans[0].bounds == plans[1].bounds == plans[2].bounds
    assert plans[0].chunk_rows == chunk_rows(h.shape[0], w.shape[0], h.dtype, plans[0].backend, None)


def test_deterministic_refuses_a_backend_without_a_fixed_order(monkeypatch):
    from grpo_kernels.backends import torch_chunked

    monkeypatch.setattr(torch_chunked.BACKEND, "deterministic", False, raising=False)
    inp = _inputs(torch.float32)
    with pytest.raises(ValueError, match="does not guarantee bitwise-reproducible results"):
        _run(inp, backend="torch", deterministic=True)
    _run(inp, backend="torch")  # without the flag it still runs


_SCRIPT = textwrap.dedent("""
    import hashlib, sys, torch
    sys.path.insert(0, "tests")
    from test_determinism import _inputs, _run
    torch.set_num_threads(2)
    inp = _inputs(torch.float32)
    out = _run(inp, loss_type="dapo", beta=0.04, backend=sys.argv[1], deterministic=True)
    print(hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in out)).hexdigest())
""")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bitwise_identical_across_processes(backend):
    """Two fresh processes (same machine, same thread count) produce the same bits."""
    require(backend, DEVICE, torch.float32)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    digests = [
        subprocess.run([sys.executable, "-c", _SCRIPT, backend], cwd=root, env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout.strip().splitlines()[-1]
        for _ in range(2)
    ]
    assert digests[0] == digests[1]

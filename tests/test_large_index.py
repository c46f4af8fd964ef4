"""Large shapes: nothing may index with int32 where N*V or V*H can pass 2^31.

On the CPU (no memory needed): the chunked vocabulary pass and the whole fused loss run
on the ``meta`` device at N = 16384, V = 151936 (N*V = 2.49e9 > 2^31) with the whole batch
in one chunk, so every shape computation, view and index op of the torch path sees the
full sizes; the chunk offsets computed in Python stay Python ints (no silent int32 tensor
arithmetic); the public API accepts meta tensors (value checks are skipped for them).

On a GPU (skipped without CUDA): the real thing at N*V > 2^31 in bf16, every backend, one
chunk of 2.49e9 logits and the default chunking, rows past element 2^31 compared with a
float64 recomputation of those rows (log-probs and grad_hidden).

What the compiled kernels must cover themselves (a meta run cannot see inside them): the
row offset ``row * stride`` of a chunk in int64 (Triton: ``row.to(tl.int64) * stride``;
CUDA/C++: ``int64_t``), column indices up to V in int32 at most within a row, and grid
sizes (rows in grid x, never in grid y/z, whose limit is 65535).
"""
from __future__ import annotations

import pytest
import torch

from support import backend_params, require
from grpo_kernels import grpo_loss, plan, sweep, token_logprobs
from grpo_kernels.backends.torch_chunked import BACKEND as TORCH
from grpo_kernels.calls import LossCall
from grpo_kernels.loss import grpo_loss_forward
from grpo_kernels.epilogue import TokenInputs
from grpo_kernels.objective import LossInputs
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel

N, V, H = 16384, 151936, 64
B, T = 16, 1024
assert N * V > 2**31 and B * T == N


@pytest.fixture
def meta_nonzero(monkeypatch):
    """nonzero() on meta tensors: assume every element is nonzero (every token unmasked)."""
    import torch.fx.experimental._config as fx_config

    # raising=False: some torch 2.13.0 CPU wheels lack this flag (CI's does) and handle meta
    # nonzero() without it; where it exists it must be on
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True, raising=False)


@pytest.fixture
def recorded_chunks(monkeypatch):
    seen = []
    original = sweep.sweep

    def spy(p, hidden, *args, **kwargs):
        seen.extend((hidden.shape[0], p.chunk_rows, s, e) for s, e in p.bounds)
        return original(p, hidden, *args, **kwargs)

    monkeypatch.setattr(sweep, "sweep", spy)
    return seen


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _assert_python_ints(seen, n):
    assert seen, "no chunk was recorded"
    for total, rows, s, e in seen:
        assert all(type(x) is int for x in (total, rows, s, e)), (type(total), type(rows), type(s), type(e))
    assert seen[-1][3] == n


def test_chunk_offsets_are_python_ints_past_2_31():
    n, vocab = 2**33 + 5, 2**18
    rows = plan.chunk_rows(n, vocab, torch.bfloat16, TORCH, None)
    assert type(rows) is int and rows >= 1
    per_row = vocab * (2 + TORCH.temp_bytes("cpu"))
    assert rows * per_row <= max(plan.DEFAULT_CHUNK_BYTES, per_row)
    step = 2**31 + 1
    chunks = plan.uniform_chunks(n, step)
    assert [s for s, _ in chunks] == [k * step for k in range(len(chunks))]
    assert chunks[-1][1] == n and len(chunks) == -(-n // step)
    assert all(type(s) is int and type(e) is int for s, e in chunks)
    assert type(plan.chunk_rows(n, vocab, torch.float32, TORCH, 2**40)) is int


def _plan(h, w, chunk, **kw):
    return plan.plan_call(h, w, GRPOOptions(temperature=0.7, logit_softcap=30.0, beta=0.04),
                          ExecutionOptions(backend="torch", chunk_size=chunk), VocabParallel(), **kw)


@pytest.mark.parametrize("chunk", [None, N], ids=["default_chunks", "one_chunk_of_2.5e9_logits"])
def test_vocab_pass_on_meta_past_2_31(chunk, recorded_chunks, meta_nonzero):
    h, w, b = _meta(N, H), _meta(V, H), _meta(V)
    tgt = _meta(N, dtype=torch.int64)
    needs = (True, True, True)
    st = sweep.forward_stats(_plan(h, w, chunk), h, w, b, tgt)
    assert st.lse.shape == st.entropy.shape == st.target_logit.shape == (N,)
    assert st.lse.dtype == torch.float32
    gh, gw, gb = sweep.backward_grads(_plan(h, w, chunk, need_grads=needs), h, w, b, tgt, st, st.lse, st.entropy,
                                      needs)
    assert gh.shape == (N, H) and gw.shape == (V, H) and gb.shape == (V,)
    assert gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    ti = TokenInputs(old=_meta(N, dtype=torch.float32), adv=_meta(N, dtype=torch.float32),
                     weight=_meta(N, dtype=torch.float32), ref=_meta(N, dtype=torch.float32))
    p = _plan(h, w, chunk, need_grads=needs, loss=True)
    assert p.path == "one_sweep"
    gh, gw, _ = sweep.sweep(p, h, w, b, lambda s, e, z: sweep.fused_(p, z, tgt[s:e], ti.select(slice(s, e))), needs)
    assert gh.shape == (N, H) and gw.shape == (V, H)
    _assert_python_ints(recorded_chunks, N)
    if chunk == N:
        assert {(r[1]) for r in recorded_chunks} == {N}  # truly one chunk of N*V > 2^31 elements


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_loss_on_meta_past_2_31(level, recorded_chunks, meta_nonzero):
    f32 = lambda *s: _meta(*s, dtype=torch.float32)  # noqa: E731
    opts = GRPOOptions(importance_sampling_level=level, beta=0.04, top_entropy_quantile=0.5,
                       loss_type="grpo").validate()
    inputs = LossInputs(mask=_meta(B, T, dtype=torch.bool), adv=f32(B, T), old=f32(B, T), ref=f32(B, T),
                        is_ratio=f32(B, T))
    loss, logp, ent, gh, gw, gb, *_ = grpo_loss_forward(LossCall(
        hidden=_meta(N, H), weight=_meta(V, H), bias=_meta(V), targets=_meta(N, dtype=torch.int64), inputs=inputs,
        options=opts, execution=ExecutionOptions(backend="torch", chunk_size=N), vocab_parallel=VocabParallel(),
        needs=(True, True, True)))
    assert loss.shape == () and logp.shape == ent.shape == (N,)
    assert gh.shape == (N, H) and gw.shape == (V, H) and gb.shape == (V,)
    _assert_python_ints(recorded_chunks, N)


def test_public_api_accepts_meta_tensors():
    """Structural checks run on meta tensors; value checks (which would need the data) are
    skipped; the custom op's fake implementation gives the shapes."""
    h = _meta(B, T, H).requires_grad_(True)
    w = _meta(V, H).requires_grad_(True)
    tgt = _meta(B, T, dtype=torch.int64)
    mask = _meta(B, T, dtype=torch.bool)
    adv = _meta(B, dtype=torch.float32)
    loss = grpo_loss(h, w, tgt, adv, mask, _meta(B, T, dtype=torch.float32), None, backend="torch")
    assert loss.shape == () and loss.device.type == "meta"
    logp = token_logprobs(_meta(B, T, H), _meta(V, H), tgt, backend="torch")
    assert logp.shape == (B, T) and logp.dtype == torch.float32
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs(_meta(B, T, H), _meta(V, H), _meta(B, T + 1, dtype=torch.int64))


# ----------------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (N*V > 2^31 for real)")


def _rows_to_check():
    # first and last rows, and rows around element 2^31 of a one-chunk buffer
    r = 2**31 // V
    return torch.tensor([0, 1, r - 1, r, r + 1, N // 2, N - 2, N - 1])


def _gpu_inputs(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = (torch.randn(N, H, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    targets[-1] = V - 1
    return hidden, weight, targets


def _rows64(hidden, weight, targets, rows, temperature):
    z = (hidden[rows].double() @ weight.double().T) / temperature  # only these rows: [8, V]
    logp = torch.log_softmax(z, -1)
    return logp.gather(1, targets[rows, None]).squeeze(1), torch.softmax(z, -1)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("chunk", [None, N], ids=["default_chunks", "one_chunk"])
def test_gpu_logprobs_past_2_31(backend, chunk):
    require(backend, "cuda", torch.bfloat16)
    hidden, weight, targets = _gpu_inputs()
    rows = _rows_to_check().cuda()
    torch.cuda.reset_peak_memory_stats()
    logp = token_logprobs(hidden, weight, targets, temperature=0.9, backend=backend, chunk_size=chunk)
    assert logp.shape == (N,) and torch.isfinite(logp).all()
    if chunk == N:  # the one chunk of N*V > 2^31 logits really existed
        assert torch.cuda.max_memory_allocated() >= N * V * 2
    want, _ = _rows64(hidden, weight, targets, rows, 0.9)
    # bf16 logits: each logit carries a 2^-8 relative rounding
    torch.testing.assert_close(logp[rows].double(), want, rtol=0, atol=2e-2)
    del logp
    torch.cuda.empty_cache()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("chunk", [None, N], ids=["default_chunks", "one_chunk"])
def test_gpu_loss_grad_rows_past_2_31(backend, chunk):
    require(backend, "cuda", torch.bfloat16)
    hidden, weight, targets = _gpu_inputs(seed=1)
    rows = _rows_to_check().cuda()
    adv = torch.randn(B, device="cuda")
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    h = hidden.view(B, T, H).clone().requires_grad_(True)
    # on-policy dapo: dL/dlogp_t = -A_t / N for every token (ratio 1, inside the clip range)
    torch.cuda.reset_peak_memory_stats()
    loss = grpo_loss(h, weight, targets.view(B, T), adv, mask, backend=backend, chunk_size=chunk,
                     temperature=0.9)
    loss.backward()
    gh = h.grad.view(N, H)
    assert torch.isfinite(gh).all()
    if chunk == N:
        assert torch.cuda.max_memory_allocated() >= N * V * 2
    _, p = _rows64(hidden, weight, targets, rows, 0.9)
    onehot = torch.zeros_like(p).scatter_(1, targets[rows, None], 1.0)
    dlogp = -adv.repeat_interleave(T)[rows].double() / N
    want = (dlogp[:, None] * (onehot - p) / 0.9) @ weight.double()
    err = (gh[rows].double() - want).norm(dim=1) / want.norm(dim=1)
    assert (err < 3e-2).all(), err
    del loss, gh, h
    torch.cuda.empty_cache()

"""The benchmark cases: grpo_kernels' backends, the peers (bench/peers.py) and the matmul floor.

A case's ``build(inputs, device)`` does the untimed setup (imports, extension loading,
compiled-module creation) and returns the callable that is timed; it raises
``peers.Unavailable`` with a reason when the case cannot run here.

Kinds: ``loss`` (forward + backward of the GRPO loss, grads for hidden and weight),
``logprobs`` (the reference-model pass: per-token log-probs under no_grad) and ``floor``
(the three matmuls any exact method needs: logits = h @ W.T, grad_h = G @ W,
grad_W = G.T @ h, in the inputs' dtype through cuBLAS / MKL; "floor" over all N positions,
"floor:real" over the real (unpadded) tokens only, which is what padding-skipping methods need).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from bench import peers
from bench.peers import Unavailable
from bench.shapes import Inputs

OURS_BACKENDS = ("triton", "cpp", "torch")


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # loss | logprobs | floor
    group: str  # ours | peer | floor
    label: str
    build: Callable[[Inputs, torch.device], Callable[[], object]]
    tier: int = 0  # run order on the GPU: tier 0 first on every shape, then tier 1, then 2


def _check_backend(name: str, device: torch.device, dtype: torch.dtype, allow_build: bool) -> None:
    if name == "triton" and device.type == "cpu":
        raise Unavailable("triton needs CUDA here (the TRITON_INTERPRET=1 interpreter is far too slow for these shapes)")
    from grpo_kernels.backends import BackendUnavailable, get_backend

    try:
        get_backend(name, device, dtype)
    except BackendUnavailable as exc:
        raise Unavailable(str(exc)) from None
    except Exception as exc:  # a backend module being rewritten, for instance
        raise Unavailable(f"backend {name!r} failed to load: {type(exc).__name__}: {exc}") from None
    if name == "cpp":
        from grpo_kernels.backends import cuda as cpp

        if not allow_build and not cpp.prebuilt_available():
            raise Unavailable("cpp extension not prebuilt (this mode does not JIT-build it)")
        try:
            cpp.load_extension()
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            raise Unavailable(f"cpp extension failed to build/load: {type(exc).__name__}: "
                              f"{(msg[-1] if msg else '')[:200]}") from None


def _allow_build() -> bool:
    return os.environ.get("GRPO_BENCH_NO_BUILD") != "1"


def ours_loss(backend: str):
    def build(inp: Inputs, device: torch.device):
        _check_backend(backend, device, inp.hidden.dtype, _allow_build())
        from grpo_kernels import grpo_loss

        def run():
            loss = grpo_loss(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, backend=backend)
            loss.backward()
            return loss

        return run

    return build


@contextlib.contextmanager
def _sequence_level_recompute():
    """The sequence-level path as it was before one-sweep chunks: stats sweep, then a
    gradient sweep that recomputes the logits (what a sequence longer than a chunk gets)."""
    from grpo_kernels import vocab_pass

    real = vocab_pass.sequence_chunks
    vocab_pass.sequence_chunks = lambda lengths, max_rows: None
    try:
        yield
    finally:
        vocab_pass.sequence_chunks = real


def ours_level_loss(backend: str, level: str, recompute: bool = False):
    """grpo_loss with token- or sequence-level (GSPO) importance sampling, slightly off-policy
    (a sequence's coefficient then depends on all its tokens)."""

    def build(inp: Inputs, device: torch.device):
        _check_backend(backend, device, inp.hidden.dtype, _allow_build())
        from grpo_kernels import grpo_loss, token_logprobs

        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(3)
            old = token_logprobs(inp.hidden, inp.weight, inp.targets, backend=backend).float()
            old += 0.05 * torch.randn(old.shape, device=device, generator=g)
        context = _sequence_level_recompute if recompute else contextlib.nullcontext

        def run():
            with context():
                loss = grpo_loss(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, old_logps=old,
                                 importance_sampling_level=level, backend=backend)
            loss.backward()
            return loss

        return run

    return build


def ours_logprobs(backend: str):
    """token_logprobs on the masked-in tokens, scattered back to [B, T] (what a trainer does)."""

    def build(inp: Inputs, device: torch.device):
        _check_backend(backend, device, inp.hidden.dtype, _allow_build())
        from grpo_kernels import token_logprobs

        mask = inp.mask

        def run():
            with torch.no_grad():
                lp = token_logprobs(inp.hidden[mask], inp.weight, inp.targets[mask], backend=backend)
                return lp.new_zeros(mask.shape).masked_scatter(mask, lp)

        return run

    return build


def floor(real_only: bool):
    def build(inp: Inputs, device: torch.device):
        H = inp.hidden.shape[-1]
        h = (inp.hidden[inp.mask] if real_only else inp.hidden.reshape(-1, H)).detach().contiguous()
        w = inp.weight.detach()

        def run():
            z = h @ w.T  # logits [n, V]; reused as G (dL/dlogits): the values do not matter
            gh = z @ w
            gw = z.T @ h
            return gh, gw

        return run

    return build


CASES: List[Case] = [
    Case("floor", "floor", "floor", "3 matmuls (all N rows)", floor(False)),
    Case("floor:real", "floor", "floor", "3 matmuls (real tokens)", floor(True)),
    *[Case(f"ours:{b}", "loss", "ours", f"grpo_kernels backend={b}", ours_loss(b)) for b in OURS_BACKENDS],
    Case("ref:eager", "loss", "peer", "reference (materialized, eager)",
         lambda i, d: peers.build_reference_loss(i, d, compiled=False)),
    Case("trl:selective", "loss", "peer", "TRL selective_log_softmax (full logits) + dapo",
         peers.build_trl_selective_loss),
    Case("trl:chunked", "loss", "peer", "TRL 1.16 ChunkedLogProbFunction + dapo", peers.build_trl_chunked_loss),
    Case("ref:compile", "loss", "peer", "reference (materialized, torch.compile)",
         lambda i, d: peers.build_reference_loss(i, d, compiled=True), tier=1),
    Case("liger", "loss", "peer", "Liger LigerFusedLinearGRPOLoss (compiled loss math)", peers.build_liger_loss),
    *[Case(f"ours:{b}", "logprobs", "ours", f"grpo_kernels token_logprobs backend={b}", ours_logprobs(b), tier=1)
      for b in OURS_BACKENDS],
    Case("ref:eager", "logprobs", "peer", "reference (materialized; also computes entropy)",
         peers.build_reference_logprobs, tier=1),
    Case("trl:chunked", "logprobs", "peer", "TRL 1.16 ChunkedLogProbFunction (no entropy)",
         peers.build_trl_chunked_logprobs, tier=1),
    Case("trl:selective", "logprobs", "peer", "TRL selective_log_softmax (full logits)",
         peers.build_trl_selective_logprobs, tier=1),
]
# the cpp extension may need a JIT build: its cases run last on the GPU, once the build is done
CASES = [Case(c.id, c.kind, c.group, c.label, c.build, 2) if c.id == "ours:cpp" else c for c in CASES]
BY_KEY: Dict[str, Case] = {f"{c.kind}/{c.id}": c for c in CASES}
# peers every time is compared to, in table-column order
RATIO_PEERS = ("ref:eager", "ref:compile", "liger", "trl:chunked", "trl:selective")


# Sequence-level importance sampling (GSPO) against token level, same backend, same run:
# its own pytest-benchmark module (bench/test_bench_sequence_level.py), not in the report
LEVEL_CASES: List[Case] = [
    c for b in ("triton", "cpp", "torch") for c in (
        Case(f"ours:{b}:token", "loss", "ours", f"backend={b}, token-level IS", ours_level_loss(b, "token")),
        Case(f"ours:{b}:sequence", "loss", "ours", f"backend={b}, sequence-level IS, one sweep",
             ours_level_loss(b, "sequence")),
        Case(f"ours:{b}:sequence-recompute", "loss", "ours", f"backend={b}, sequence-level IS, recomputing sweep",
             ours_level_loss(b, "sequence", recompute=True)),
    )
]
LEVEL_BY_KEY: Dict[str, Case] = {f"{c.kind}/{c.id}": c for c in LEVEL_CASES}


def select(kinds=None, ids=None) -> List[Case]:
    return [c for c in CASES if (not kinds or c.kind in kinds) and (not ids or c.id in ids)]

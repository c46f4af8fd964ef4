"""What the benchmarks run: the shapes and their inputs, and every case (grpo_kernels' backends,
the peers, the three-matmul floor and the sequence-level group).

A shape is one prompt-group batch: ``B = groups * G`` completions of ``T`` tokens each
(N = B * T positions), right-padded with about 20% padding (completion lengths spread
evenly over [0.6 T, T]), an lm_head of ``V x H`` and one dtype. Advantages are
group-normalized random rewards; the policy is on-policy (old_logps = None), beta = 0,
loss_type "dapo": TRL 1.16's defaults.

A case's ``build(inputs, device)`` does the untimed setup (imports, extension loading,
compiled-module creation) and returns the callable that is timed; it raises ``Unavailable``
with a reason when the case cannot run here. Kinds:

- ``loss``: forward + backward of the GRPO loss (grads for hidden and weight);
- ``logprobs``: the reference-model pass, per-token log-probs under no_grad;
- ``floor``: the three matmuls any exact method needs (logits = h @ W.T, grad_h = G @ W,
  grad_W = G.T @ h) in the inputs' dtype through cuBLAS / MKL; ``floor`` over all N
  positions, ``floor:real`` over the real (unpadded) tokens only, which is what
  padding-skipping methods need;
- ``level``: grpo_loss with token- vs sequence-level (GSPO) importance sampling, same backend.

The peers: the materialized oracle ``grpo_kernels.reference`` (eager, and under
``torch.compile``); Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (its defaults: compiled loss
math, one row per chunk); TRL 1.16's default path, ``trl.kernels.ChunkedLogProbFunction``
called as the trainer's fused lm_head does (only the masked-in tokens on Triton devices, every
position elsewhere, the entropy output on for the policy and off for the reference pass), then
the dapo objective; TRL's older materialized path: full logits,
``trl.trainer.utils.selective_log_softmax`` (and ``entropy_from_logits`` under no_grad for the
policy), then the dapo objective. Loss cases return the loss; log-prob cases return logps
[B, T] (0 at padding).

``before:*`` cases are ``ours:*`` run against another checkout's grpo_kernels
(``bench/report.py --compare-with PATH``, ``pytest bench --bench-before PATH``).
Everything this package touches beyond grpo_kernels' public API is in the marked section below.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

# ------------------------------------------------------------------ shapes and inputs

GENERATIONS = 4  # G: completions per prompt
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    V: int
    dtype: str  # "float32" | "bfloat16" | ...
    pad: float = 0.2

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def name(self) -> str:
        return f"N{self.N}-H{self.H}-V{self.V}-{_SHORT[self.dtype]}"


# CPU: a few minutes on 2 cores. GPU: bf16, one run under 8 minutes on an H100.
CPU_SET: List[Shape] = [Shape(B, 256, 1024, 32768, "float32") for B in (4, 16)]
QUICK_SET: List[Shape] = CPU_SET[:1]
GPU_SET: List[Shape] = [
    Shape(N // 1024, 1024, H, V, "bfloat16")
    for H in (2048, 4096)
    for V in (32768, 151936)
    for N in (4096, 8192, 16384)
]
# the chunk sweep's (bench/report.py --sweep-chunks): the CPU set plus a large vocabulary, where
# one row of logits is 4.6x larger and a byte budget buys 4.6x fewer rows
CHUNK_SET: List[Shape] = CPU_SET + [Shape(4, 256, 256, 151936, "float32")]
SETS: Dict[str, List[Shape]] = {"quick": QUICK_SET, "cpu": CPU_SET, "gpu": GPU_SET, "chunks": CHUNK_SET}
SHAPES: Dict[str, Shape] = {s.name: s for shapes in SETS.values() for s in shapes}


def default_set(device: torch.device, quick: bool = False) -> str:
    return "quick" if quick else ("gpu" if device.type == "cuda" else "cpu")


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    targets: torch.Tensor  # [B, T] int64
    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, T] bool, right padding

    def zero_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    @property
    def grad_bytes(self) -> int:
        """Bytes of grad_hidden + grad_weight in the inputs' dtype."""
        return (self.hidden.numel() + self.weight.numel()) * self.hidden.element_size()

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())


def completion_mask(B: int, T: int, pad: float, device) -> torch.Tensor:
    """[B, T] bool: row lengths spread evenly over [(1 - 2 pad) T, T], shuffled (mean (1 - pad) T)."""
    lo = max(1, round((1 - 2 * pad) * T))
    lengths = torch.linspace(lo, T, B).round().long() if B > 1 else torch.tensor([round((1 - pad) * T)])
    lengths = lengths[torch.randperm(B, generator=torch.Generator().manual_seed(1))]
    return (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(device)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = shape.torch_dtype
    B, T, H, V = shape.B, shape.T, shape.H, shape.V
    hidden = torch.randn(B, T, H, device=device, dtype=dt, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dt, generator=g).mul_(H ** -0.5 * 2)
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    rewards = torch.randn(B // GENERATIONS if B >= GENERATIONS else 1, min(B, GENERATIONS), device=device,
                          generator=g)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
    adv = torch.nan_to_num(adv)[:B].float()
    mask = completion_mask(B, T, shape.pad, device)
    return Inputs(hidden.requires_grad_(), weight.requires_grad_(), targets, adv, mask)


_inputs: Dict[tuple, Inputs] = {}


def inputs_for(shape: Shape, device: torch.device) -> Inputs:
    """The inputs of one shape, kept until another shape is asked for (so that the jobs that
    bench/report.py runs one after another in one process share them)."""
    key = (shape, str(device))
    if key not in _inputs:
        _inputs.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _inputs[key] = make_inputs(shape, device)
    return _inputs[key]


# ------------------------------------------------------------------ cases


class Unavailable(RuntimeError):
    """This case cannot run here; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # loss | logprobs | floor | level
    group: str  # ours | before | floor | peer
    label: str
    build: Callable[[Inputs, torch.device], Callable[[], object]]
    tier: int = 0  # run order on the GPU: tier 0 first on every shape, then tier 1, then 2
    needs: str = ""  # a module that must be installed (checked before any process starts)
    backend: str = ""  # grpo_kernels' backend, for ours / before
    devices: Tuple[str, ...] = ()  # the device types it runs on (empty: every one)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.id}"


def check_value(kind: str, out, inp: Inputs) -> Optional[float]:
    """A number every correct implementation agrees on: ||grad_hidden|| for losses, the masked
    sum of logps for log-prob passes."""
    if kind in ("loss", "level", "chunk"):
        g = inp.hidden.grad
        return None if g is None else float(g.double().norm())
    if kind == "logprobs":
        return float((out.double() * inp.mask).sum())
    return None


def cheap_skip_reason(case: Case, device: torch.device) -> Optional[str]:
    """Why ``case`` cannot run on ``device``, where that is cheap to tell (no process started)."""
    if case.backend == "triton" and device.type == "cpu":
        return "triton needs CUDA here (the TRITON_INTERPRET=1 interpreter is far too slow for these shapes)"
    if case.needs and importlib.util.find_spec(case.needs) is None:
        return f"{case.needs} is not installed"
    return None


# ============================================================================================
# grpo_kernels INTERNALS: the only place bench/ reaches past the public API (grpo_loss,
# token_logprobs, reference, memory). Stable names: grpo_kernels.backends.get_backend /
# BackendUnavailable / REGISTRY, the cpp backend module's load_extension / prebuilt_available (found
# through REGISTRY["cpp"]: its module was renamed backends/cuda.py -> backends/cpp.py, and a before:*
# checkout may have either).
# sequence_chunks (grpo_kernels.plan, formerly vocab_pass) may move: the case using it then skips.
# ============================================================================================

ALLOW_BUILD = True  # whether the cpp extension may be JIT-built (bench/conftest.py: --bench-no-build)


def backend_unavailable(name: str, device: torch.device, dtype: torch.dtype,
                        build: Optional[bool] = None) -> Optional[str]:
    """None when grpo_kernels' backend ``name`` runs on (device, dtype) here, else the reason.
    For ``cpp``, the extension is loaded, and JIT-built if need be when ``build`` (default
    ``ALLOW_BUILD``)."""
    try:
        import importlib

        from grpo_kernels.backends import REGISTRY, BackendUnavailable, get_backend

        get_backend(name, device, dtype)
        if name == "cpp":
            cpp = importlib.import_module(REGISTRY["cpp"])

            if not (ALLOW_BUILD if build is None else build) and not cpp.prebuilt_available():
                return "cpp extension not prebuilt (this mode does not JIT-build it)"
            cpp.load_extension()
    except BackendUnavailable as exc:
        return str(exc)
    except Exception as exc:  # a failing compiler, or a backend module being rewritten
        msg = str(exc).strip().splitlines()
        return f"backend {name!r} failed to load: {type(exc).__name__}: {(msg[-1] if msg else '')[:200]}"
    return None


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend ``backend="auto"`` picks here."""
    try:
        from grpo_kernels.backends import get_backend

        return get_backend("auto", device, dtype).name
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def recomputing_sequence_sweep():
    """A context manager for the sequence-level path as it was before one-sweep chunks: stats
    sweep, then a gradient sweep that recomputes the logits (what a sequence longer than a chunk
    gets). Raises ``Unavailable`` at once when the internal it patches has moved."""
    for name in ("grpo_kernels.plan", "grpo_kernels.vocab_pass"):  # where sequence_chunks lives, was
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        real = getattr(module, "sequence_chunks", None)
        if real is not None:
            break
    else:
        raise Unavailable("grpo_kernels' sequence_chunks moved: update bench/cases.py")

    @contextlib.contextmanager
    def patched():
        module.sequence_chunks = lambda lengths, max_rows: None
        try:
            yield
        finally:
            module.sequence_chunks = real

    return patched


# ============================================================================================


def use_grpo_kernels_from(checkout: str) -> None:
    """Import grpo_kernels from ``checkout`` (a source tree) in this process, for ``before:*``."""
    checkout = os.path.abspath(checkout)
    loaded = sys.modules.get("grpo_kernels")
    if loaded is not None and not os.path.abspath(loaded.__file__).startswith(checkout + os.sep):
        raise RuntimeError(f"grpo_kernels already imported from {loaded.__file__}, not {checkout}")
    sys.path.insert(0, checkout)
    import grpo_kernels

    if not os.path.abspath(grpo_kernels.__file__).startswith(checkout + os.sep):
        raise RuntimeError(f"grpo_kernels comes from {grpo_kernels.__file__}, not {checkout}")


def _backend_or_skip(backend: str, inp: Inputs, device: torch.device) -> None:
    reason = backend_unavailable(backend, device, inp.hidden.dtype)
    if reason is not None:
        raise Unavailable(reason)


WORKLOAD = dict(loss_type="dapo", beta=0.0)  # TRL 1.16's defaults, passed to grpo_loss and the reference
EPS = 0.2  # TRL's epsilon (low = high), grpo_kernels' default


def with_backward(loss_fn: Callable[[], torch.Tensor]):
    """A loss case's timed call: the loss, then its backward."""

    def run():
        loss = loss_fn()
        loss.backward()
        return loss

    return run


def ours_loss(backend: str, **execution):
    """grpo_loss forward + backward; ``execution``: extra execution options (batch_invariant)."""

    def build(inp: Inputs, device: torch.device):
        _backend_or_skip(backend, inp, device)
        from grpo_kernels import grpo_loss

        return with_backward(lambda: grpo_loss(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask,
                                               backend=backend, **WORKLOAD, **execution))

    return build


def ours_level_loss(backend: str, level: str, recompute: bool = False):
    """grpo_loss with token- or sequence-level (GSPO) importance sampling, slightly off-policy
    (a sequence's coefficient then depends on all its tokens)."""

    def build(inp: Inputs, device: torch.device):
        _backend_or_skip(backend, inp, device)
        from grpo_kernels import grpo_loss, token_logprobs

        with torch.no_grad():
            g = torch.Generator(device=device).manual_seed(3)
            old = token_logprobs(inp.hidden, inp.weight, inp.targets, backend=backend).float()
            old += 0.05 * torch.randn(old.shape, device=device, generator=g)
        context = recomputing_sequence_sweep() if recompute else contextlib.nullcontext

        def loss():
            with context():
                return grpo_loss(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask, old_logps=old,
                                 importance_sampling_level=level, backend=backend, **WORKLOAD)

        return with_backward(loss)

    return build


def ours_logprobs(backend: str, **execution):
    """token_logprobs on the masked-in tokens, scattered back to [B, T] (what a trainer does)."""

    def build(inp: Inputs, device: torch.device):
        _backend_or_skip(backend, inp, device)
        from grpo_kernels import token_logprobs

        mask = inp.mask

        def run():
            with torch.no_grad():
                lp = token_logprobs(inp.hidden[mask], inp.weight, inp.targets[mask], backend=backend, **execution)
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


# ------------------------------------------------------------------ peers


def dapo_from_logps(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """TRL's dapo objective on per-token logps [B, T], on-policy (old = logps.detach()), beta = 0."""
    m = mask.to(logps.dtype)
    ratio = torch.exp(logps - logps.detach())
    adv = advantages.unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def dapo_loss(logps_fn: Callable[[], torch.Tensor], inp: Inputs):
    """A loss case from a function computing per-token logps [B, T]: dapo, then backward."""
    return with_backward(lambda: dapo_from_logps(logps_fn(), inp.mask, inp.advantages))


def _import(what: str, module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a dependency failing at import time
        raise Unavailable(f"{what} not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


def build_reference_loss(inp: Inputs, device: torch.device, compiled: bool = False):
    from grpo_kernels.reference import reference_grpo_loss

    def loss_fn(hidden, weight, targets, advantages, mask):
        return reference_grpo_loss(hidden, weight, targets, advantages, mask, **WORKLOAD)

    fn = torch.compile(loss_fn) if compiled else loss_fn
    return with_backward(lambda: fn(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask))


def build_reference_logprobs(inp: Inputs, device: torch.device):
    from grpo_kernels.reference import reference_token_logprobs

    def run():
        with torch.no_grad():
            logps, _ = reference_token_logprobs(inp.hidden, inp.weight, inp.targets)
            return logps.masked_fill(~inp.mask, 0.0)

    return run


def build_liger_loss(inp: Inputs, device: torch.device, compiled: bool = True):
    grpo = _import("liger-kernel", "liger_kernel.chunked_loss")
    module = grpo.LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=EPS, epsilon_high=EPS, temperature=1.0,
        compiled=compiled,
    )
    mask = inp.mask.long()  # TRL hands Liger its integer completion mask

    def loss():
        out = module(inp.hidden, inp.weight, inp.targets, mask, inp.advantages)
        return out[0] if isinstance(out, tuple) else out

    return with_backward(loss)


class _Placeholder(type(torch)):  # a module whose every attribute is an empty class
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


def _placeholder_datasets_if_missing() -> None:
    """``trl.trainer.utils`` imports ``datasets`` at module level, and TRL's chunked kernel imports
    that module in its backward; the offline GPU machine has no ``datasets`` (nor pyarrow). Neither
    path uses it, so a placeholder module lets TRL import there. Never used when it is installed."""
    if "datasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return
    root = _Placeholder("datasets")
    root.__path__ = []  # a package, so ``datasets.fingerprint`` etc. resolve too
    sys.modules["datasets"] = root
    for sub in ("fingerprint", "utils", "features"):
        sys.modules[f"datasets.{sub}"] = _Placeholder(f"datasets.{sub}")
        setattr(root, sub, sys.modules[f"datasets.{sub}"])


def _trl(module: str):
    _placeholder_datasets_if_missing()
    return _import("trl", module)


def trl_chunked_logps(inp: Inputs, device: torch.device, outputs) -> Callable[[], torch.Tensor]:
    """The per-token part of TRL's fused lm_head forward (``add_fused_lm_head``)."""
    fn = _trl("trl.kernels.chunked_logprob").ChunkedLogProbFunction
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except Exception:
        chunk = 32768  # TRL 1.16's value
    compact = device.type in ("cuda", "xpu")  # TRL scores only valid positions on Triton devices
    mask, H = inp.mask, inp.hidden.shape[-1]

    def logps():
        if compact:
            hs, ts = inp.hidden[mask], inp.targets[mask]
        else:
            hs, ts = inp.hidden.reshape(-1, H), inp.targets.clamp(min=0).reshape(-1)
        lp = fn.apply(hs, inp.weight, None, ts, 1.0, int(chunk), None, 1.0, outputs)[0]
        if compact:
            return lp.new_zeros(mask.shape).masked_scatter(mask, lp)
        return lp.view(mask.shape).masked_fill(~mask, 0)

    return logps


def build_trl_chunked_loss(inp: Inputs, device: torch.device):
    logps = trl_chunked_logps(inp, device, ("log_probs", "entropy"))
    return dapo_loss(logps, inp)


def build_trl_chunked_logprobs(inp: Inputs, device: torch.device):
    logps = trl_chunked_logps(inp, device, ("log_probs",))
    return torch.no_grad()(logps)


def build_trl_selective_loss(inp: Inputs, device: torch.device):
    utils = _trl("trl.trainer.utils")

    def logps():
        logits = inp.hidden @ inp.weight.T  # temperature 1
        logps = utils.selective_log_softmax(logits, inp.targets)
        with torch.no_grad():
            utils.entropy_from_logits(logits)  # the trainer's entropy metric
        return logps

    return dapo_loss(logps, inp)


def build_trl_selective_logprobs(inp: Inputs, device: torch.device):
    select = _trl("trl.trainer.utils").selective_log_softmax

    @torch.no_grad()
    def run():
        return select(inp.hidden @ inp.weight.T, inp.targets).masked_fill(~inp.mask, 0.0)

    return run


# ------------------------------------------------------------------ the registry

OURS_BACKENDS = ("triton", "cpp", "torch")
# the cpp extension may need a JIT build: its cases run last on the GPU, once the build is done
_TIER = {"cpp": 2}


def _ours(kind: str, builder, label: str, tier: int = 0) -> List[Case]:
    return [Case(f"ours:{b}", kind, "ours", f"{label} backend={b}", builder(b), max(tier, _TIER.get(b, 0)),
                 backend=b) for b in OURS_BACKENDS]


CASES: List[Case] = [
    Case("floor", "floor", "floor", "3 matmuls (all N rows)", floor(False)),
    Case("floor:real", "floor", "floor", "3 matmuls (real tokens)", floor(True)),
    *_ours("loss", ours_loss, "grpo_kernels"),
    Case("ref:eager", "loss", "peer", "reference (materialized, eager)", build_reference_loss),
    Case("trl:selective", "loss", "peer", "TRL selective_log_softmax (full logits) + dapo",
         build_trl_selective_loss, needs="trl"),
    Case("trl:chunked", "loss", "peer", "TRL 1.16 ChunkedLogProbFunction + dapo", build_trl_chunked_loss,
         needs="trl"),
    Case("ref:compile", "loss", "peer", "reference (materialized, torch.compile)",
         lambda i, d: build_reference_loss(i, d, compiled=True), tier=1),
    Case("liger", "loss", "peer", "Liger LigerFusedLinearGRPOLoss (compiled loss math)", build_liger_loss,
         needs="liger_kernel"),
    # eager: Liger's leanest CPU configuration (issue 16's memory bar); on the GPU its per-row
    # chunk loop is far too slow for the 8-minute budget
    Case("liger:eager", "loss", "peer", "Liger LigerFusedLinearGRPOLoss, compiled=False",
         lambda i, d: build_liger_loss(i, d, compiled=False), tier=1, needs="liger_kernel", devices=("cpu",)),
    *_ours("logprobs", ours_logprobs, "grpo_kernels token_logprobs", tier=1),
    Case("ref:eager", "logprobs", "peer", "reference (materialized; also computes entropy)",
         build_reference_logprobs, tier=1),
    Case("trl:chunked", "logprobs", "peer", "TRL 1.16 ChunkedLogProbFunction (no entropy)",
         build_trl_chunked_logprobs, tier=1, needs="trl"),
    Case("trl:selective", "logprobs", "peer", "TRL selective_log_softmax (full logits)",
         build_trl_selective_logprobs, tier=1, needs="trl"),
    # batch_invariant=True (matmuls in 256-row tiles, fixed kernel tiles): its cost against the default
    *[Case(f"ours:{b}:invariant", kind, "ours", f"{label} backend={b}, batch_invariant=True",
           builder(b, batch_invariant=True), max(1, _TIER.get(b, 0)), backend=b)
      for kind, builder, label in (("loss", ours_loss, "grpo_kernels"),
                                   ("logprobs", ours_logprobs, "grpo_kernels token_logprobs"))
      for b in OURS_BACKENDS],
    # Sequence-level importance sampling (GSPO) against token level, same backend, same run.
    # Token level is one fused sweep (6NHV flops). Sequence level is one sweep too when every
    # sequence fits in a chunk ("sequence"); "sequence-recompute" forces the stats sweep plus
    # recomputing gradient sweep (8NHV) that a sequence longer than a chunk gets.
    *[Case(f"ours:{b}:{name}", "level", "ours", f"backend={b}, {label}", ours_level_loss(b, *args),
           _TIER.get(b, 0), backend=b)
      for b in OURS_BACKENDS for name, label, args in (
          ("token", "token-level IS", ("token",)),
          ("sequence", "sequence-level IS, one sweep", ("sequence",)),
          ("sequence-recompute", "sequence-level IS, recomputing sweep", ("sequence", True)))],
]
# the same as ours:*, with grpo_kernels imported from another checkout
BEFORE: List[Case] = [Case("before:" + c.id[len("ours:"):], c.kind, "before", c.label + " (before)", c.build,
                           c.tier, backend=c.backend)
                      for c in CASES if c.group == "ours" and not c.id.endswith(":invariant")]  # a new option
BY_KEY: Dict[str, Case] = {c.key: c for c in CASES + BEFORE}
# peers every time is compared to, in table-column order
RATIO_PEERS = ("ref:eager", "ref:compile", "liger", "liger:eager", "trl:chunked", "trl:selective")
#: the cases the memory of every row is compared to, in table-column order
MEMORY_PEERS = ("ref:eager", "liger", "liger:eager")
REPORT_KINDS = ("loss", "logprobs", "floor")  # bench/report.py's default; "level" on request


# ------------------------------------------------------------------ the chunk-size sweep
# kind "chunk" (bench/report.py --sweep-chunks): the GRPO loss (forward + backward) of our
# backends at a grid of chunk sizes, each point either a row count (``ours:cpp:rows=256``, the
# execution option chunk_size) or a byte budget (``ours:torch:bytes=64MiB``, the variable
# GRPO_KERNELS_CHUNK_BYTES, set around each call); ``ours:cpp:default`` is plan.py's rule as it
# stands. Liger eager (``liger:eager``, compiled=False) and the three-matmul floor over the real
# tokens (``floor:real``) run in the same sweep as the bars: memory at or below Liger's, time at
# or below the default's. The ids are parsed, so any grid point can be asked for by name.

CHUNK_BACKENDS = ("cpp", "torch")
CHUNK_ROWS = (128, 256, 512, 1024, 2048)  # the default grid (bench/report.py --chunk-rows)
CHUNK_BYTES = ("32MiB", "128MiB")  # (bench/report.py --chunk-bytes)


def malloc_trim() -> None:
    """Hand freed heap pages back to the kernel (glibc), so that a peak-RSS figure starts clean."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def with_chunk_bytes(run: Callable[[], object], budget: Optional[str]) -> Callable[[], object]:
    """``run`` with GRPO_KERNELS_CHUNK_BYTES=budget during the call (read when a call is planned);
    ``budget`` None: with the variable unset (plan.py's rule)."""

    def call():
        old = os.environ.pop("GRPO_KERNELS_CHUNK_BYTES", None)
        if budget is not None:
            os.environ["GRPO_KERNELS_CHUNK_BYTES"] = budget
        try:
            return run()
        finally:
            os.environ.pop("GRPO_KERNELS_CHUNK_BYTES", None)
            if old is not None:
                os.environ["GRPO_KERNELS_CHUNK_BYTES"] = old

    return call


def chunk_case(case_id: str) -> Optional[Case]:
    """The chunk-sweep case of an id (``ours:BACKEND:rows=R``, ``ours:BACKEND:bytes=SIZE``,
    ``ours:BACKEND:default``, ``liger:eager``), None for an id that is none of these."""
    if case_id == "liger:eager":
        return dataclasses.replace(BY_KEY["loss/liger:eager"], kind="chunk", tier=0, devices=())
    parts = case_id.split(":")
    if len(parts) != 3 or parts[0] != "ours" or parts[1] not in OURS_BACKENDS:
        return None
    backend, point = parts[1], parts[2]
    if point == "default":
        return Case(case_id, "chunk", "ours", f"grpo_kernels backend={backend}, plan.py's chunk rule",
                    ours_loss(backend), backend=backend)
    name, _, value = point.partition("=")
    if name == "rows" and value.isdigit() and int(value) > 0:
        return Case(case_id, "chunk", "ours", f"grpo_kernels backend={backend}, chunk_size={value}",
                    ours_loss(backend, chunk_size=int(value)), backend=backend)
    if name == "bytes" and value:
        def build(inp: Inputs, device: torch.device, backend=backend, value=value):
            return with_chunk_bytes(ours_loss(backend)(inp, device), value)

        return Case(case_id, "chunk", "ours", f"grpo_kernels backend={backend}, GRPO_KERNELS_CHUNK_BYTES={value}",
                    build, backend=backend)
    return None


def chunk_grid(backends=CHUNK_BACKENDS, rows=CHUNK_ROWS, budgets=CHUNK_BYTES) -> List[Case]:
    """The sweep's cases: per backend the default, every row count and every byte budget; then
    Liger eager and the floor over the real tokens."""
    ids = [f"ours:{b}:{p}" for b in backends
           for p in ["default"] + [f"rows={r}" for r in rows] + [f"bytes={s}" for s in budgets]]
    return [chunk_case(i) for i in ids + ["liger:eager"]] + [BY_KEY["floor/floor:real"]]


def select(kinds=None, ids=None, before: bool = False, device_type: Optional[str] = None) -> List[Case]:
    """The cases of these kinds and ids (every one when None); ``before``: the before:* ones;
    ``device_type``: only those that run there. Kind ``chunk`` is the chunk sweep's: its ids are
    parsed (``chunk_case``), the default grid without ids."""
    pool = BEFORE if before else CASES
    out = [c for c in pool if (not kinds or c.kind in kinds) and (not ids or c.id in ids)
           and (device_type is None or not c.devices or device_type in c.devices)]
    if kinds and "chunk" in kinds and not before:
        out += [c for c in (chunk_case(i) for i in ids) if c is not None] if ids else chunk_grid()[:-1]
    return out

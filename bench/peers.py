"""Adapters for the peers: each ``build_*`` returns a zero-argument callable running one
forward (+ backward for losses) on ``Inputs``, or raises ``Unavailable`` with the reason.

- the materialized oracle ``grpo_kernels.reference`` (eager, and under ``torch.compile``);
- Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (its defaults: compiled loss math, one row per chunk);
- TRL 1.16's default path: ``trl.kernels.ChunkedLogProbFunction`` called as the trainer's fused
  lm_head does (only the masked-in tokens on Triton devices, every position elsewhere, the
  entropy output on for the policy and off for the reference pass), then the dapo objective;
- TRL's older materialized path: full logits, ``trl.trainer.utils.selective_log_softmax`` (and
  ``entropy_from_logits`` under no_grad for the policy), then the dapo objective.

Loss-case callables return the loss; log-prob-case callables return logps [B, T] (0 at padding).
"""
from __future__ import annotations

from typing import Callable

import torch

from bench.shapes import Inputs

EPS = 0.2  # TRL's epsilon (low = high)


class Unavailable(RuntimeError):
    """This case cannot run here; the message is the reason shown in the report."""


def dapo_from_logps(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """TRL's dapo objective on per-token logps [B, T], on-policy (old = logps.detach()), beta = 0."""
    m = mask.to(logps.dtype)
    ratio = torch.exp(logps - logps.detach())
    adv = advantages.unsqueeze(1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def _import(what: str, stmt: Callable[[], object]):
    try:
        return stmt()
    except Exception as exc:  # ImportError, or a dependency failing at import time
        raise Unavailable(f"{what} not importable: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


# ------------------------------------------------------------------ the oracle


def build_reference_loss(inp: Inputs, device: torch.device, compiled: bool = False):
    from grpo_kernels.options import GRPOOptions
    from grpo_kernels.reference import reference_grpo_loss

    opts = GRPOOptions().validate()

    def loss_fn(hidden, weight, targets, advantages, mask):
        return reference_grpo_loss(hidden, weight, targets, advantages, mask, options=opts)

    fn = torch.compile(loss_fn) if compiled else loss_fn

    def run():
        loss = fn(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.mask)
        loss.backward()
        return loss

    return run


def build_reference_logprobs(inp: Inputs, device: torch.device):
    from grpo_kernels.reference import reference_token_logprobs

    def run():
        with torch.no_grad():
            logps, _ = reference_token_logprobs(inp.hidden, inp.weight, inp.targets)
            return logps.masked_fill(~inp.mask, 0.0)

    return run


# ------------------------------------------------------------------ Liger-Kernel


def build_liger_loss(inp: Inputs, device: torch.device):
    grpo = _import("liger-kernel", lambda: __import__("liger_kernel.chunked_loss", fromlist=["x"]))
    module = grpo.LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, loss_type="dapo", epsilon_low=EPS, epsilon_high=EPS, temperature=1.0,
    )
    mask = inp.mask.long()  # TRL hands Liger its integer completion mask

    def run():
        out = module(inp.hidden, inp.weight, inp.targets, mask, inp.advantages)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss

    return run


# ------------------------------------------------------------------ TRL 1.16


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
    import importlib.util
    import sys

    if "datasets" in sys.modules or importlib.util.find_spec("datasets") is not None:
        return
    root = _Placeholder("datasets")
    root.__path__ = []  # a package, so ``datasets.fingerprint`` etc. resolve too
    sys.modules["datasets"] = root
    for sub in ("fingerprint", "utils", "features"):
        sys.modules[f"datasets.{sub}"] = _Placeholder(f"datasets.{sub}")
        setattr(root, sub, sys.modules[f"datasets.{sub}"])


def _trl_chunked():
    _placeholder_datasets_if_missing()
    mod = _import("trl.kernels", lambda: __import__("trl.kernels.chunked_logprob", fromlist=["x"]))
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except Exception:
        chunk = 32768  # TRL 1.16's value
    return mod.ChunkedLogProbFunction, int(chunk)


def _trl_logps(fn, chunk: int, inp: Inputs, device: torch.device, outputs) -> torch.Tensor:
    """The per-token part of TRL's fused lm_head forward (``add_fused_lm_head``)."""
    compact = device.type in ("cuda", "xpu")  # TRL scores only valid positions on Triton devices
    mask, H = inp.mask, inp.hidden.shape[-1]
    if compact:
        hs, ts = inp.hidden[mask], inp.targets[mask]
    else:
        hs, ts = inp.hidden.reshape(-1, H), inp.targets.clamp(min=0).reshape(-1)
    logps = fn.apply(hs, inp.weight, None, ts, 1.0, chunk, None, 1.0, outputs)[0]
    if compact:
        return logps.new_zeros(mask.shape).masked_scatter(mask, logps)
    return logps.view(mask.shape).masked_fill(~mask, 0)


def build_trl_chunked_loss(inp: Inputs, device: torch.device):
    fn, chunk = _trl_chunked()

    def run():
        logps = _trl_logps(fn, chunk, inp, device, ("log_probs", "entropy"))
        loss = dapo_from_logps(logps, inp.mask, inp.advantages)
        loss.backward()
        return loss

    return run


def build_trl_chunked_logprobs(inp: Inputs, device: torch.device):
    fn, chunk = _trl_chunked()

    def run():
        with torch.no_grad():
            return _trl_logps(fn, chunk, inp, device, ("log_probs",))

    return run


def _trl_selective():
    _placeholder_datasets_if_missing()
    utils = _import("trl.trainer.utils", lambda: __import__("trl.trainer.utils", fromlist=["x"]))
    return utils.selective_log_softmax, utils.entropy_from_logits


def build_trl_selective_loss(inp: Inputs, device: torch.device, temperature: float = 1.0):
    select, entropy_from_logits = _trl_selective()

    def run():
        logits = (inp.hidden @ inp.weight.T) / temperature
        logps = select(logits, inp.targets)
        with torch.no_grad():
            entropy_from_logits(logits)  # the trainer's entropy metric
        loss = dapo_from_logps(logps, inp.mask, inp.advantages)
        loss.backward()
        return loss

    return run


def build_trl_selective_logprobs(inp: Inputs, device: torch.device, temperature: float = 1.0):
    select, _ = _trl_selective()

    def run():
        with torch.no_grad():
            logits = (inp.hidden @ inp.weight.T) / temperature
            return select(logits, inp.targets).masked_fill(~inp.mask, 0.0)

    return run

"""What the transformers, TRL and verl adapters share: reaching the causal LM inside its wrappers,
running a function inside the wrapped model's forward, reading DeepSpeed ZeRO-3 parameters, and
keeping autocast away from the kernels.

Imports only torch (the wrappers it peels are recognised by their attributes, not their classes).
"""
from __future__ import annotations

import contextlib
import functools
import types
from typing import Callable, Optional

import torch

__all__ = [
    "FORWARD_KEYWORD",
    "unwrap_causal_lm",
    "enable_fused_forward",
    "is_fused_forward_enabled",
    "run_in_forward",
    "zero3_gathered",
    "no_autocast",
]

#: the keyword ``enable_fused_forward`` adds to the model's forward
FORWARD_KEYWORD = "grpo_kernels_fn"
_PATCHED = "_grpo_kernels_forward_patched"


def unwrap_causal_lm(model):
    """The transformers ``PreTrainedModel`` inside ``model``.

    Peels PEFT (``get_base_model()``: LoRA-style adapters live inside the model's own modules,
    so the unwrapped model still applies them), ``torch.compile`` (``_orig_mod``) and
    ``.module`` wrappers (DDP, FSDP1, DeepSpeed engines, ``nn.DataParallel``).
    """
    m = model
    for _ in range(16):
        if hasattr(type(m), "get_base_model"):  # PEFT (a class attribute: PeftModel forwards getattr)
            m = m.get_base_model()
        elif hasattr(m, "_orig_mod") and isinstance(getattr(m, "_orig_mod"), torch.nn.Module):
            m = m._orig_mod
        elif hasattr(type(m), "get_output_embeddings") and hasattr(m, "config"):
            return m
        elif isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        else:
            break
    raise TypeError(
        f"expected a transformers causal LM (a PreTrainedModel with an lm_head), possibly wrapped by PEFT, "
        f"DDP/FSDP/DeepSpeed or torch.compile; got {type(model).__name__}"
    )


# ------------------------------------------------------------------ running inside the model's forward


def enable_fused_forward(model):
    """Let ``model(..., grpo_kernels_fn=fn, **inputs)`` run ``fn(causal_lm, **inputs)`` as its forward.

    Wrapped models (DDP, FSDP, DeepSpeed, ``accelerate``): the loss should run *inside* the wrapped
    model's forward, so that the wrapper's hooks (gradient synchronisation, parameter gathering,
    autocast) apply. This patches the forward of the causal LM inside ``model`` (instance attribute,
    like TRL's fused head; call it before wrapping with DDP/FSDP/DeepSpeed or after: wrappers call the
    inner module, so the patch is reached either way). Without the keyword the forward is the previous
    one, so ``generate`` and plain calls are unchanged. Idempotent; returns ``model``.
    """
    lm = unwrap_causal_lm(model)
    if getattr(lm, _PATCHED, False):
        return model
    previous = lm.forward

    @functools.wraps(type(lm).forward)  # keep the signature: generate() validates kwargs against it
    def forward(self, *args, grpo_kernels_fn: Optional[Callable] = None, **kwargs):
        if grpo_kernels_fn is None:
            return previous(*args, **kwargs)
        if args:
            raise TypeError("pass the model inputs by keyword when using grpo_kernels_fn")
        return grpo_kernels_fn(self, **kwargs)

    lm.forward = types.MethodType(forward, lm)
    setattr(lm, _PATCHED, True)
    return model


def is_fused_forward_enabled(model) -> bool:
    """Whether ``enable_fused_forward`` was applied to the causal LM inside ``model``."""
    try:
        return bool(getattr(unwrap_causal_lm(model), _PATCHED, False))
    except TypeError:
        return False


def run_in_forward(model, fn: Callable, **inputs):
    """``fn(causal_lm, **inputs)``, inside ``model``'s forward when ``enable_fused_forward`` was applied
    (so wrappers' hooks run), else directly on the unwrapped causal LM. Returns what ``fn`` returns."""
    if is_fused_forward_enabled(model):
        return model(**inputs, **{FORWARD_KEYWORD: fn})
    return fn(unwrap_causal_lm(model), **inputs)


# ------------------------------------------------------------------ reading the head's parameters


@contextlib.contextmanager
def zero3_gathered(*params: Optional[torch.Tensor]):
    """Gather DeepSpeed ZeRO-3 partitioned parameters for a direct read (no-op otherwise; None skipped)."""
    partitioned = {id(p): p for p in params if p is not None and hasattr(p, "ds_id")}
    if partitioned:
        from deepspeed import zero
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        todo = [p for p in partitioned.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
        if todo:
            with zero.GatheredParameters(todo, modifier_rank=None):
                yield
            return
    yield


@contextlib.contextmanager
def no_autocast(device_type: str):
    """Our kernels manage their own precision (fp32 accumulation): autocast must not recast their matmuls."""
    try:
        ctx = torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        ctx = contextlib.nullcontext()
    with ctx:
        yield

"""The MoE router auxiliary (load-balancing) loss of a transformers causal LM, without its head.

A Mixture-of-Experts causal LM adds ``router_aux_loss_coef * aux_loss`` to its loss, where
``aux_loss = load_balancing_loss_func(outputs.router_logits, num_experts, num_experts_per_tok,
attention_mask)`` is computed from the base model's router logits. The fused paths run only the base
model, so they recompute it here from the same router logits with the family's own function.
"""
from __future__ import annotations

import inspect
import re
import sys
from typing import Optional

import torch

from grpo_kernels.integrations.common import unwrap_causal_lm

__all__ = ["router_aux_loss", "router_aux_loss_unsupported"]

# the call the causal LMs of transformers' MoE families make in their forward (whitespace removed)
_AUX_CALL = "load_balancing_loss_func(outputs.router_logits,self.num_experts,self.num_experts_per_tok,attention_mask"
_AUX_PARAMS = ("gate_logits", "num_experts", "top_k", "attention_mask")
_AUX_FORMS = {}  # (class, its module's load_balancing_loss_func) -> None or why not


def _aux_loss_function(lm):
    """(the family's ``load_balancing_loss_func``, None) or (None, why not)."""
    cls = type(lm)
    module = sys.modules.get(cls.__module__)
    fn = getattr(module, "load_balancing_loss_func", None)
    if fn is None:
        return None, f"{cls.__module__} defines no load_balancing_loss_func"
    key = (cls, fn)
    if key not in _AUX_FORMS:
        try:
            params = tuple(inspect.signature(fn).parameters)
            source = re.sub(r"\s", "", inspect.getsource(cls.forward))
        except (TypeError, ValueError, OSError) as exc:
            _AUX_FORMS[key] = f"cannot inspect {cls.__name__}.forward ({exc})"
        else:
            standard = params == _AUX_PARAMS and source.count(_AUX_CALL) == 1
            _AUX_FORMS[key] = None if standard else (
                f"{cls.__name__}.forward computes its aux loss differently from "
                "load_balancing_loss_func(router_logits, num_experts, num_experts_per_tok, attention_mask)")
    if _AUX_FORMS[key] is not None:
        return None, _AUX_FORMS[key]
    if not all(isinstance(getattr(lm, name, None), int) for name in ("num_experts", "num_experts_per_tok")):
        return None, f"{type(lm).__name__} has no int num_experts / num_experts_per_tok"
    return fn, None


def router_aux_loss_unsupported(model) -> Optional[str]:
    """Why ``router_aux_loss`` cannot reproduce ``model``'s own ``aux_loss``, or None when it can.

    Supported: the causal LMs whose forward computes ``load_balancing_loss_func(outputs.router_logits,
    self.num_experts, self.num_experts_per_tok, attention_mask)`` with their module's Switch-Transformer
    ``load_balancing_loss_func`` (Mixtral, Qwen2/3-MoE, OLMoE, DBRX, GPT-OSS, Granite-MoE, ... in transformers 5).
    """
    return _aux_loss_function(unwrap_causal_lm(model))[1]


def router_aux_loss(model, router_logits, attention_mask: Optional[torch.Tensor]):
    """The MoE load-balancing loss ``model(..., output_router_logits=True).aux_loss`` from the base
    model's ``router_logits`` (``completion_hidden_states(..., output_router_logits=True,
    return_backbone_output=True)``), without the head: the same function on the same arguments."""
    lm = unwrap_causal_lm(model)
    fn, why = _aux_loss_function(lm)
    if fn is None:
        raise NotImplementedError(why)
    return fn(router_logits, lm.num_experts, lm.num_experts_per_tok, attention_mask)

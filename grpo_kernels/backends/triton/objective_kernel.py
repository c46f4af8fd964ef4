"""The GRPO per-token epilogue in Triton: ``epilogue.token_epilogue``, operation for operation.

``grpo_token_epilogue`` is a ``@triton.jit`` device function, called once per row by the
fused row kernel (``row_kernels.row_fused_kernel``) between its two sweeps.
Loss family, delta, KL and the optional inputs are compile-time flags; the numbers
(clip bounds, delta, beta, SAPO temperatures) are runtime scalars already in ACC.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from grpo_kernels.backends.triton.common import tl_acc
from grpo_kernels.epilogue import LOSS_KIND_CODES, accumulation_dtype, exp_cap, loss_kind_code, required_ref

# the LOSS constexpr's values: the contract's loss-kind codes (csrc/row_pass.h's LossKind)
CLIPPED = tl.constexpr(LOSS_KIND_CODES["clipped"])
CISPO = tl.constexpr(LOSS_KIND_CODES["cispo"])
SAPO = tl.constexpr(LOSS_KIND_CODES["sapo"])


@triton.jit
def _exp_sat(x, cap):
    # epilogue.exp_sat: exp(clamp(x, max=cap)); NaN stays NaN (x > cap is False)
    return tl.exp(tl.where(x > cap, cap, x))


@triton.jit
def _scale(x, s):
    # epilogue.scale: x * s, exactly 0 where s == 0
    return tl.where(s == 0, 0.0, x * s)


@triton.jit
def grpo_token_epilogue(
    logp, old, A, weight, ref, scale,
    lo, hi, delta, eh, beta, tau_pos, tau_neg, cap,
    LOSS: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_KL: tl.constexpr, BIAS_KL: tl.constexpr,
):
    """(weight * loss_t, dL/dlogp) of one token (or a block of tokens), all in ACC.

    ``old`` is ``logp`` itself on-policy; ``ref`` / ``scale`` are ignored unless HAS_KL /
    HAS_SCALE. ``lo, hi`` = 1 - eps_low, 1 + eps_high; ``eh`` = eps_high (cispo's clamp);
    ``cap`` = the exp saturation point of ACC.
    """
    w = _exp_sat(logp - old, cap)
    if LOSS == CISPO:
        clamped = tl.where(w > eh, eh, w)
        loss = -clamped * A * logp
        dlogp = -clamped * A
    elif LOSS == SAPO:
        tau = tl.where(A > 0, tau_pos, tau_neg)
        sig = tl.sigmoid(tau * (w - 1.0))
        loss = -sig * 4.0 / tau * A
        dlogp = -4.0 * sig * (1.0 - sig) * A * w
    else:  # grpo / bnpo / dr_grpo / dapo / luspo
        w2 = tl.where(w < lo, lo, tl.where(w > hi, hi, w))  # clamp(w, lo, hi), NaN kept
        dw2 = ((w >= lo) & (w <= hi)).to(w.dtype)
        if HAS_DELTA:
            w1 = tl.where(w > delta, delta, w)  # clamp(w, max=delta)
        else:
            w1 = w
        a = w1 * A
        b = w2 * A
        # torch.minimum (NaN-propagating) and its backward: ties split the gradient evenly
        tie = (a == b).to(w.dtype)
        wa = (a < b).to(w.dtype) + 0.5 * tie
        wb = (a > b).to(w.dtype) + 0.5 * tie
        loss = -tl.where((a < b) | (a != a), a, b)
        if HAS_DELTA:
            dw1 = (w <= delta).to(w.dtype)
            dlogp = -(wa * dw1 + wb * dw2) * A * w
        else:  # dw1 = 1
            dlogp = -(wa + wb * dw2) * A * w
    if HAS_SCALE:
        loss = _scale(loss, scale)
        dlogp = _scale(dlogp, scale)
    if HAS_KL:
        e = _exp_sat(ref - logp, cap)
        kl = e - (ref - logp) - 1.0
        dkl = 1.0 - e
        if BIAS_KL:
            dkl = -(ref - logp) * w  # = (dkl + kl) * w without cancelling a saturated e
            kl = kl * w
        loss = loss + beta * kl
        dlogp = dlogp + beta * dkl
    return _scale(loss, weight), _scale(dlogp, weight)


# ----------------------------------------------------------------------------- host side


def _default_dtype_round(x: float) -> float:
    # TRL / objective: torch.where(A > 0, tau_pos, tau_neg) is a tensor of the default dtype
    return torch.tensor(float(x), dtype=torch.get_default_dtype()).item()


def epilogue_params(options, dtype: torch.dtype) -> dict:
    """Runtime scalars and constexpr flags of ``grpo_token_epilogue`` for ``options``."""
    kind = loss_kind_code(options.loss_type)
    eh = float(options.eps_high)
    has_delta = kind == CLIPPED.value and options.delta is not None
    return dict(
        lo=1.0 - float(options.epsilon_low), hi=1.0 + eh,
        delta=float(options.delta) if has_delta else 0.0, eh=eh, beta=float(options.beta),
        tau_pos=_default_dtype_round(options.sapo_temperature_pos),
        tau_neg=_default_dtype_round(options.sapo_temperature_neg),
        CAP=exp_cap(accumulation_dtype(dtype)), ACC=tl_acc(dtype), LOSS=kind, HAS_DELTA=has_delta,
        HAS_KL=options.beta != 0.0, BIAS_KL=bool(options.use_bias_correction_kl),
    )


def token_vectors(token_inputs, shape, dtype: torch.dtype, device, beta: float):
    """(old, adv, weight, ref, policy_scale) as contiguous flat ``dtype`` vectors (None kept)."""
    ref = required_ref(token_inputs.ref, beta)

    def vec(x: Optional[torch.Tensor]):
        if x is None:
            return None
        x = torch.as_tensor(x).detach().to(device=device, dtype=dtype)
        return torch.broadcast_to(x, shape).reshape(-1).contiguous()

    return (
        vec(token_inputs.old), vec(token_inputs.adv), vec(token_inputs.weight),
        vec(ref), vec(token_inputs.policy_scale),
    )

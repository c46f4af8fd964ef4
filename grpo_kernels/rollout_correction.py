"""verl 0.9.1's rollout correction: importance-sampling (IS) weights and rejection sampling (RS)
of the rollout policy against the current one, and ``policy_loss="bypass_mode"`` built on them.

The facts follow verl's ``compute_rollout_correction_and_rejection_mask``
(verl/trainer/ppo/rollout_corr_helper.py) and ``compute_policy_loss_bypass_mode``
(verl/trainer/ppo/core_algos.py); the code is this library's own. Everything is computed from
the log-ratio ``lr = logp.detach() - rollout_logp`` (detached: the weights and masks change the
measure, not the objective) over verl's response mask, which verl's ``ppo_loss`` binarizes
(``mask != 0``); token counts are therefore exact integers.

IS weights (``rollout_is``; ``rollout_is_threshold`` = upper ``U``, ``rollout_is_threshold_lower``
= ``L``, verl's ``"L_U"`` string spec split in two):

- "token":    ``raw_t = exp(clamp(lr_t, -20, 20)) * m_t``
- "sequence": ``raw_t = exp(clamp(sum_s m_s lr_s, -20, 20)) * m_t`` (one weight per sequence)
- truncation (TIS, ``L`` None): ``w = min(raw, U)``; IcePop (``L`` given): ``w = raw`` where
  ``L <= raw <= U``, else 0
- ``rollout_is_batch_normalize``: ``w / mean`` with ``mean`` the mean of w over the batch's valid
  tokens ("token") or over its non-empty sequences ("sequence"), left as is when ``mean <= 1e-8``.
  (verl takes that mean over every data-parallel rank under torch.distributed; here it is the
  call's own batch.)

Rejection (``rollout_rs``: comma-separated options, each must pass; ``rollout_rs_threshold``: one
spec for all or one per distinct option): with ``lr`` clamped to [-20, 20],
``k1 = -lr``, ``k2 = lr^2 / 2``, ``k3 = exp(lr) - 1 - lr`` per token;

- ``token_kX``: keep a token when its kX passes;
- ``seq_sum_kX`` / ``seq_mean_kX`` / ``seq_max_kX``: keep a whole sequence when the masked sum /
  mean / max (0 for an empty row) of kX over it passes;
- k1 passes when ``log(lower) <= k1 <= log(upper)`` (spec ``"lower_upper"``, or ``"upper"`` with
  ``lower = 1 / upper``), k2 / k3 when ``kX <= upper`` (spec ``"upper"``).

The effective mask is ``mask`` where every option keeps the token, 0 elsewhere.

bypass_mode (verl's ``old_log_prob`` *is* the rollout's log-prob; ``old_logps`` here):

- ``bypass_loss_type="ppo_clip"``: verl's dual-clip PPO (``policy_loss="vanilla"``) with the ratio
  against the rollout policy, on the effective mask, and **no** IS weights (the clipped ratio is the
  correction);
- ``bypass_loss_type="reinforce"``: ``-A * logp * w`` (``-A * logp`` without ``rollout_is``), on the
  effective mask.

The policy term is aggregated (``loss_agg_mode``) over the effective mask; KL and entropy keep the
original mask, as verl's ``ppo_loss`` does.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

#: verl's exp safety bound on log-ratios (rollout_corr_helper.SAFETY_BOUND)
SAFETY_BOUND = 20.0
#: verl 0.9.1's ``SUPPORTED_ROLLOUT_RS_OPTIONS``
ROLLOUT_RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                      "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
TOKEN_RS_OPTIONS = ("token_k1", "token_k2", "token_k3")


@dataclass(frozen=True)
class Rejection:
    """One rejection criterion: ``option`` (a ROLLOUT_RS_OPTIONS name) and its bounds; ``lower`` /
    ``upper`` are ratio bounds for k1 options (compared as logs), ``upper`` a divergence bound else."""

    option: str
    lower: Optional[float]
    upper: float

    @property
    def level(self) -> str:
        return "token" if self.option in TOKEN_RS_OPTIONS else "sequence"


# ---------------------------------------------------------------- option parsing


def _number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"rollout_rs_threshold {text.strip()!r} for option {option!r} is not a number") from None


@functools.lru_cache(maxsize=256)
def _parse(rollout_rs: str, rollout_rs_threshold: str) -> Tuple[Rejection, ...]:
    names = []
    for part in rollout_rs.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in ROLLOUT_RS_OPTIONS:
            raise ValueError(f"rollout_rs option {name!r} is not one of verl's {ROLLOUT_RS_OPTIONS}")
        if name not in names:  # verl drops repeats, keeping the first
            names.append(name)
    if not names:
        raise ValueError(f"rollout_rs must name at least one option, got {rollout_rs!r}")
    specs = [part.strip() for part in rollout_rs_threshold.split(",") if part.strip()]
    if not specs:
        raise ValueError(f"rollout_rs_threshold must hold at least one threshold, got {rollout_rs_threshold!r}")
    if len(specs) not in (1, len(names)):
        raise ValueError(f"rollout_rs_threshold must hold one threshold for all options or one per option "
                         f"({len(names)}: {names}), got {len(specs)}")
    if len(specs) == 1:
        specs = specs * len(names)
    out = []
    for name, spec in zip(names, specs):
        if name.endswith("k1"):
            if "_" in spec:
                lo_text, up_text = spec.split("_", 1)
                lower, upper = _number(lo_text, name), _number(up_text, name)
            else:
                upper = _number(spec, name)
                lower = 1.0 / upper if upper > 0 else upper
            if not (0 < lower <= upper):  # also rejects NaN (verl would keep nothing)
                raise ValueError(f"rollout_rs_threshold for option {name!r} must have 0 < lower <= upper "
                                 f"(ratio bounds 'lower_upper', or 'upper' for lower = 1/upper), got {spec!r}")
            out.append(Rejection(name, lower, upper))
        else:
            if "_" in spec:
                raise ValueError(f"rollout_rs_threshold for option {name!r} must be a single upper bound "
                                 f"(only the *_k1 options take 'lower_upper'), got {spec!r}")
            upper = _number(spec, name)
            if not upper > 0:
                raise ValueError(f"rollout_rs_threshold for option {name!r} must be > 0, got {spec!r}")
            out.append(Rejection(name, None, upper))
    return tuple(out)


def parse_rejection(rollout_rs: Optional[str], rollout_rs_threshold: Optional[str]) -> Tuple[Rejection, ...]:
    """The rejection criteria of ``rollout_rs`` / ``rollout_rs_threshold`` (verl's option string and
    threshold spec, both strings: verl's numeric threshold is ``str(value)``), validated as verl
    validates them; () when ``rollout_rs`` is None (a threshold without options is ignored, as in
    verl). Raises TypeError / ValueError naming the argument."""
    if rollout_rs is not None and not isinstance(rollout_rs, str):
        raise TypeError(f"rollout_rs must be a string of verl's rejection options (comma-separated) or None, "
                        f"got {type(rollout_rs).__name__}")
    if rollout_rs_threshold is not None and not isinstance(rollout_rs_threshold, str):
        raise TypeError(f"rollout_rs_threshold must be a string (verl's spec, e.g. '2.0' or '0.5_2.0,0.1'; "
                        f"write a number as str(value)) or None, got {type(rollout_rs_threshold).__name__}")
    if rollout_rs is None:
        return ()
    if rollout_rs_threshold is None:
        raise ValueError(f"rollout_rs_threshold is required with rollout_rs={rollout_rs!r}")
    return _parse(rollout_rs, rollout_rs_threshold)


def is_threshold_options(spec) -> dict:
    """verl's ``rollout_is_threshold`` (a number, or a string ``"upper"`` / ``"lower_upper"``) as this
    library's options ``rollout_is_threshold`` / ``rollout_is_threshold_lower``."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a number or verl's string spec, got {type(spec).__name__}")
    lower = None
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if "_" in text:
                lo_text, up_text = text.split("_", 1)
                lower, upper = float(lo_text), float(up_text)
            else:
                upper = float(text)
        except ValueError:
            raise ValueError(f"rollout_is_threshold {spec!r} is not a number or 'lower_upper'") from None
    else:
        upper = float(spec)
    return {"rollout_is_threshold": upper, "rollout_is_threshold_lower": lower}


# ---------------------------------------------------------------- weights and masks


def _count(x: torch.Tensor) -> torch.Tensor:
    """A token count as a divisor: verl adds 1e-8 to an integer count in float32, which leaves any
    count >= 1 exact; an empty count divides a zero sum (0 either way)."""
    return x.clamp(min=1.0)


def _masked_sum(x: torch.Tensor, keep: torch.Tensor, dim=None) -> torch.Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    v = torch.where(keep, x, zero)
    return v.sum() if dim is None else v.sum(dim)


def _is_weights(lr: torch.Tensor, keep: torch.Tensor, options) -> torch.Tensor:
    """Detached IS weights, the shape of ``lr`` ([B, T], or [n] for token level)."""
    m = keep.to(lr.dtype)
    if options.rollout_is == "token":
        raw = torch.exp(lr.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    else:
        seq = _masked_sum(lr, keep, -1).unsqueeze(-1)
        raw = torch.exp(seq.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    raw = raw * m
    lower, upper = options.rollout_is_threshold_lower, options.rollout_is_threshold
    if lower is None:
        w = raw.clamp(max=upper)
    else:
        w = torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    if options.rollout_is_batch_normalize:
        if options.rollout_is == "token":
            mean = _masked_sum(w, keep) / _count(m.sum())
        else:
            lengths = m.sum(-1)
            seq_w = _masked_sum(w, keep, -1) / _count(lengths)
            seq_mask = (lengths > 0).to(w.dtype)
            mean = (seq_w * seq_mask).sum() / seq_mask.sum().clamp(min=1e-8)
        w = torch.where(mean > 1e-8, w / mean, w)
    return w


def _sequence_stat(values: torch.Tensor, keep: torch.Tensor, how: str) -> torch.Tensor:
    if how == "sum":
        return _masked_sum(values, keep, -1)
    if how == "mean":
        return _masked_sum(values, keep, -1) / _count(keep.to(values.dtype).sum(-1))
    neg = torch.full((), -math.inf, dtype=values.dtype, device=values.device)
    top = torch.where(keep, values, neg).amax(-1)
    return torch.where(top == neg, torch.zeros_like(top), top)


def _rejection_keep(lr: torch.Tensor, keep: torch.Tensor, rejections) -> Optional[torch.Tensor]:
    """bool keep-mask of the rejection criteria, the shape of ``lr`` (None: no criterion)."""
    if not rejections:
        return None
    safe = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    per_token = {"k1": None, "k2": None, "k3": None}
    out = torch.ones_like(keep)
    for r in rejections:
        k = r.option[-2:]
        if per_token[k] is None:
            per_token[k] = -safe if k == "k1" else (0.5 * safe.square() if k == "k2" else torch.exp(safe) - 1.0 - safe)
        stat = per_token[k]
        if r.level == "sequence":
            stat = _sequence_stat(stat, keep, r.option.split("_")[1]).unsqueeze(-1)
        if k == "k1":
            ok = (stat >= math.log(r.lower)) & (stat <= math.log(r.upper))
        else:
            ok = stat <= r.upper
        out = out & ok
    return out


def correction(lr, mask, options, with_weights: bool):
    """(IS weights [B, T] or None, the rejection's keep mask or None, the effective mask) for the
    detached log ratio ``lr`` = logp - rollout_logp [B, T] over ``mask``; the weights only with
    ``with_weights`` and ``rollout_is`` set."""
    keep = mask != 0
    w = _is_weights(lr, keep, options) if (with_weights and options.rollout_is is not None) else None
    rs_keep = _rejection_keep(lr, keep, parse_rejection(options.rollout_rs, options.rollout_rs_threshold))
    if rs_keep is None:
        return w, None, mask
    effective = mask & rs_keep if mask.dtype == torch.bool else torch.where(rs_keep, mask, torch.zeros_like(mask))
    return w, rs_keep, effective


def rollout_weights(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, options):
    """(IS weights [B, T] or None without ``rollout_is``, effective mask) of ``logp`` against the
    rollout's ``rollout_logp`` over ``mask`` [B, T], detached: verl's
    ``compute_rollout_correction_and_rejection_mask(logp, rollout_logp, mask, ...)``. In verl's
    decoupled (non-bypass) flow ``logp`` is the old policy's (``old_log_prob``): pass the weights
    as ``importance_sampling_ratio`` and the mask as ``mask``. The effective mask is ``mask`` itself
    (the same object) without ``rollout_rs``, else ``mask`` zeroed where rejected (its dtype)."""
    with torch.no_grad():
        lr = logp.detach().to(torch.promote_types(logp.dtype, rollout_logp.dtype)) - rollout_logp
        w, _, effective = correction(lr, mask, options, with_weights=True)
    return w, effective


def uses_weights(options) -> bool:
    """Whether bypass_mode's loss is weighted by IS weights (the reinforce loss with ``rollout_is``)."""
    return options.bypass_loss_type == "reinforce" and options.rollout_is is not None


def scope(options) -> str:
    """What a token's dL/dlogp depends on under ``policy_loss="bypass_mode"`` (objective.scope):
    "batch" for batch-normalized IS weights or any rejection when the aggregation normalizer counts
    the (rejection-dependent) mask over the batch (every loss_agg_mode but token-sum); else
    "sequence" for sequence-level IS weights or rejection; else "token". ppo_clip applies no IS
    weights, so ``rollout_is`` does not widen it."""
    widest = "token"
    if uses_weights(options):
        if options.rollout_is_batch_normalize:
            return "batch"
        if options.rollout_is == "sequence":
            widest = "sequence"
    rejections = parse_rejection(options.rollout_rs, options.rollout_rs_threshold)
    if rejections:
        if options.agg_mode != "token-sum":
            return "batch"
        if any(r.level == "sequence" for r in rejections):
            widest = "sequence"
    return widest



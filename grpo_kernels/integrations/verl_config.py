"""verl 0.9.1's actor config -> ``grpo_loss`` options, and the settings ``enable()`` installed.

``config_to_options`` reads verl's ``ActorConfig`` (a dataclass, an OmegaConf node or a plain dict)
through ``config_get``; ``SETTINGS`` holds the execution defaults and switches of
``grpo_kernels.integrations.verl.enable`` that the forward backend and the fused loss read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from grpo_kernels.options import LOSS_AGG_MODES, POLICY_LOSSES
from grpo_kernels.rollout_correction import is_threshold_options

__all__ = ["KL_LOSS_TYPES", "SETTINGS", "VerlSettings", "config_get", "config_to_options", "scalar_temperature"]

#: verl's ``kl_loss_type`` -> ``grpo_loss``'s ``kl_estimator`` (verl's k3 is the clamped low_var_kl;
#: its k2 is its own "+" form). "full", which verl itself refuses (its ``kl_penalty`` raises
#: NotImplementedError: it would need both distributions over the vocabulary), is the exact KL here,
#: from the reference's hidden states and head (``fused_ppo_loss``'s ``REF_HEAD_KEYS``)
KL_LOSS_TYPES = {
    "kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "low_var_kl", "k3": "low_var_kl",
    "kl+": "k1+", "k1+": "k1+", "abs+": "abs+", "mse+": "k2", "k2+": "k2", "low_var_kl+": "low_var_kl+",
    "k3+": "low_var_kl+", "full": "full",
}


@dataclass
class VerlSettings:
    """What ``enable()`` installed in this process: ``token_logprobs`` / ``grpo_loss``'s default
    ``backend`` and ``chunk_size``, and which of the two switches is on."""

    backend: str = "auto"
    chunk_size: Optional[int] = None
    forward: bool = False
    loss: bool = False


SETTINGS = VerlSettings()


def config_get(cfg, key, default=None):
    """``cfg[key]`` for a dict, ``cfg.get(key, default)`` for a config with ``get``, else the attribute."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    getter = getattr(cfg, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - a config whose get() takes no default
            pass
    return getattr(cfg, key, default)


def config_to_options(actor_config) -> dict:
    """verl's ``ActorConfig`` (dataclass, OmegaConf or dict) -> ``grpo_loss`` keywords for ``ppo_loss``'s
    objective. The per-batch values (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``rollout_is_weights``, temperature) are not config: ``fused_ppo_loss`` takes them from ``data``.
    ``entropy_coef`` is ``entropy_coeff``; verl only adds the entropy term when the engine computed
    entropies (``calculate_entropy``), which ``fused_ppo_loss`` applies. ``kl_loss_type="full"`` maps to
    ``kl_estimator="full"`` (``fused_ppo_loss`` then needs the reference's head). Raises
    ``NotImplementedError`` for an option ``grpo_loss`` cannot express."""
    c = actor_config
    pl = config_get(c, "policy_loss")
    mode = config_get(pl, "loss_mode", "vanilla") or "vanilla"
    if mode not in POLICY_LOSSES:
        raise NotImplementedError(f"verl policy_loss.loss_mode={mode!r} is not supported by grpo_kernels "
                                  f"(supported: {', '.join(POLICY_LOSSES)})")
    agg = config_get(c, "loss_agg_mode", "token-mean")
    if agg not in LOSS_AGG_MODES:
        raise NotImplementedError(f"verl loss_agg_mode={agg!r} is not supported (supported: {', '.join(LOSS_AGG_MODES)})")
    clip = config_get(c, "clip_ratio", 0.2)
    lo, hi = config_get(c, "clip_ratio_low"), config_get(c, "clip_ratio_high")
    opts = dict(
        policy_loss=mode,
        loss_agg_mode=agg,
        epsilon_low=float(clip if lo is None else lo),
        epsilon_high=float(clip if hi is None else hi),
        clip_ratio_c=float(config_get(c, "clip_ratio_c", 3.0)),
        entropy_coef=float(config_get(c, "entropy_coeff", 0.0) or 0.0),
        sapo_temperature_pos=float(config_get(c, "tau_pos", 1.0)),
        sapo_temperature_neg=float(config_get(c, "tau_neg", 1.05)),
    )
    lsf = config_get(c, "loss_scale_factor")
    if lsf is not None:
        opts["loss_scale_factor"] = float(lsf)
    if config_get(c, "use_kl_loss", False):
        kl_type = config_get(c, "kl_loss_type", "low_var_kl")
        if kl_type not in KL_LOSS_TYPES:
            raise NotImplementedError(
                f"verl kl_loss_type={kl_type!r} is not supported (verl itself raises NotImplementedError for it); "
                f"supported: {', '.join(KL_LOSS_TYPES)}")
        opts["beta"] = float(config_get(c, "kl_loss_coef", 0.001))
        opts["kl_estimator"] = KL_LOSS_TYPES[kl_type]
    if mode == "clip_cov":
        opts["clip_cov_ratio"] = float(_default(config_get(pl, "clip_cov_ratio"), 0.0002))
        opts["clip_cov_lb"] = float(_default(config_get(pl, "clip_cov_lb"), 1.0))
        opts["clip_cov_ub"] = float(_default(config_get(pl, "clip_cov_ub"), 5.0))
    elif mode == "kl_cov":
        opts["kl_cov_ratio"] = float(_default(config_get(pl, "kl_cov_ratio"), 0.0002))
        opts["ppo_kl_coef"] = float(_default(config_get(pl, "ppo_kl_coef"), 1.0))  # verl's fallback when None is 1.0
    elif mode == "dro":
        beta = config_get(pl, "dro_beta")
        if beta is None:
            raise NotImplementedError("policy_loss.loss_mode='dro' needs policy_loss.dro_beta (verl fails without it)")
        opts["dro_beta"] = float(beta)
    elif mode == "bypass_mode":
        opts.update(_rollout_correction_options(config_get(pl, "rollout_correction")))
    return opts


def _default(value, default):
    return default if value is None else value


def _rollout_correction_options(rc) -> dict:
    if rc is None:
        raise NotImplementedError("policy_loss.loss_mode='bypass_mode' needs policy_loss.rollout_correction")
    out = dict(
        bypass_loss_type=config_get(rc, "loss_type", "ppo_clip"),
        rollout_is=config_get(rc, "rollout_is", None),
        **is_threshold_options(config_get(rc, "rollout_is_threshold", 2.0)),
        rollout_is_batch_normalize=bool(config_get(rc, "rollout_is_batch_normalize", False)),
    )
    rs = config_get(rc, "rollout_rs", None)
    if rs is not None:
        out["rollout_rs"] = str(rs)
    rs_threshold = config_get(rc, "rollout_rs_threshold", None)
    if rs_threshold is not None:
        out["rollout_rs_threshold"] = str(rs_threshold)
    return out


def scalar_temperature(value) -> float:
    """verl's temperature (a float, or a per-sample tensor holding one value) as a float; 1.0 when absent."""
    if value is None:
        return 1.0
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if flat.numel() == 0:
            return 1.0
        if not bool((flat == flat[0]).all()):
            raise NotImplementedError("the fused verl loss takes one temperature per micro-batch, got per-sample values")
        return float(flat[0])
    return float(value)

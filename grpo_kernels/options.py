"""The loss options, validated once (``GRPOOptions.validate``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
IS_LEVELS = ("token", "sequence")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpp", "reference")


def _finite_number(name: str, value, *, positive: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class GRPOOptions:
    """Every keyword option of ``grpo_loss`` (DESIGN.md section 1)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    logit_softcap: Optional[float] = None
    max_completion_length: Optional[int] = None
    num_items_in_batch: Optional[float] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    use_bias_correction_kl: bool = False
    top_entropy_quantile: float = 1.0
    backend: str = "auto"
    chunk_size: Optional[int] = None
    #: bitwise-reproducible runs: chunking fixed in Python, only backends that declare a
    #: fixed reduction order (see the README, "Determinism"). Also on when
    #: ``torch.are_deterministic_algorithms_enabled()``.
    deterministic: bool = False

    @property
    def eps_high(self) -> float:
        """epsilon_high with its default (epsilon_low) applied."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    def replace(self, **changes) -> "GRPOOptions":
        return replace(self, **changes).validate()

    def validate(self) -> "GRPOOptions":
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        _finite_number("beta", self.beta)
        _finite_number("epsilon_low", self.epsilon_low)
        _finite_number("epsilon_high", self.epsilon_high, allow_none=True)
        _finite_number("delta", self.delta, positive=True, allow_none=True)
        _finite_number("temperature", self.temperature, positive=True)
        _finite_number("logit_softcap", self.logit_softcap, positive=True, allow_none=True)
        _finite_number("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        _finite_number("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        _finite_number("top_entropy_quantile", self.top_entropy_quantile)
        if self.epsilon_low < 0 or self.eps_high < 0:
            raise ValueError("epsilon_low and epsilon_high must be >= 0")
        if self.loss_type in CLIPPED_LOSS_TYPES and self.epsilon_low >= 1:
            raise ValueError(f"epsilon_low must be < 1 for loss_type={self.loss_type!r}, got {self.epsilon_low}")
        if self.loss_type == "cispo" and self.eps_high <= 0:
            raise ValueError("epsilon_high must be > 0 for loss_type='cispo' (it is the ratio's upper clamp)")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError("use_bias_correction_kl must be a bool")
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(self.deterministic).__name__}")
        if self.loss_type == "dr_grpo":
            if self.max_completion_length is None:
                raise ValueError("max_completion_length is required for loss_type='dr_grpo'")
        if self.max_completion_length is not None:
            if isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int):
                raise TypeError("max_completion_length must be an int")
            if self.max_completion_length <= 0:
                raise ValueError(f"max_completion_length must be > 0, got {self.max_completion_length}")
        if self.num_items_in_batch is not None:
            _finite_number("num_items_in_batch", self.num_items_in_batch)
            if self.num_items_in_batch < 0:
                raise ValueError(f"num_items_in_batch must be >= 0, got {self.num_items_in_batch}")
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
                raise TypeError("chunk_size must be an int or None")
            if self.chunk_size <= 0:
                raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}")
        return self


OPTION_NAMES = tuple(f.name for f in fields(GRPOOptions))

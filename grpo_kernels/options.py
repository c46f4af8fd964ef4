"""The options of a call, as three frozen dataclasses validated once.

- ``GRPOOptions``: the loss semantics (TRL 1.16 ``GRPOConfig`` names): what is computed.
- ``ExecutionOptions``: how it is computed (backend, chunk rows, determinism); never changes
  the result beyond rounding (bitwise under ``deterministic``).
- ``VocabParallel``: this rank's slice of a vocabulary-parallel lm_head (the collective).

These objects travel from the public functions to the kernels. ``OPTION_OP_PARAMS`` lists their
fields once as custom-op arguments, and ``option_op_args`` / ``options_from_op_args`` flatten them
to and from those arguments by name (``grpo_kernels.calls``, where the ops' schemas come from);
per-batch values (``num_items_in_batch``, the importance-sampling ratio) are call arguments.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields, replace
from typing import Optional

from grpo_kernels import checks

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: the loss types whose per-token coefficient needs only the token (the fused kernels' epilogue)
TOKEN_LOSS_TYPES = tuple(lt for lt in LOSS_TYPES if lt != "vespo")
#: policy losses by verl 0.9.1's names (``policy_loss.loss_mode``); None: the loss_type's own
POLICY_LOSSES = ("vanilla", "gspo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dppo_tv", "dppo_kl", "dro", "cispo",
                 "sapo", "bypass_mode")
#: verl 0.9.1's ``loss_agg_mode``; None: the loss_type's normalizer (TRL)
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
#: KL estimators: "k3" is TRL's (unclamped); k1, abs, k2 and low_var_kl (k3 clamped, verl's "k3") are
#: verl's, and "+" is its straight-through form (k2's gradient under the estimator's value); "full" is
#: the exact KL(pi_theta || pi_ref) over the vocabulary from the reference's hidden states and head
#: (``grpo_loss(ref_hidden=, ref_weight=)``), computed by the divergence row pass, not from log-probs
KL_ESTIMATORS = ("k3", "k1", "abs", "k2", "low_var_kl", "k3+", "k1+", "abs+", "low_var_kl+", "full")
BYPASS_LOSS_TYPES = ("ppo_clip", "reinforce")
IS_LEVELS = ("token", "sequence")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpp", "reference")


def _choice(name: str, value, allowed, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}{' or None' if allow_none else ''}, got {value!r}")


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


class _Options:
    """Shared behaviour of the option dataclasses: ``replace`` re-validates."""

    def replace(self, **changes):
        return replace(self, **_scale_mode_named(changes)).validate()


def _scale_mode_named(kwargs: dict) -> dict:
    """GRPOConfig's ``scale_rewards`` True / False as the mode's name ("group" / "none"): the op
    schema holds a str."""
    if isinstance(kwargs.get("scale_rewards"), bool):
        return {**kwargs, "scale_rewards": checks.scale_mode(kwargs["scale_rewards"])}
    return kwargs


@dataclass(frozen=True)
class GRPOOptions(_Options):
    """The loss semantics: every keyword of ``grpo_loss`` that changes the result."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: Optional[float] = None
    delta: Optional[float] = None
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    temperature: float = 1.0
    logit_softcap: Optional[float] = None
    max_completion_length: Optional[int] = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    use_bias_correction_kl: bool = False
    top_entropy_quantile: float = 1.0
    # TRL 1.16: VESPO's gamma weights, the entropy bonus, DeepSeek-V3.2's off-policy sequence mask
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_coef: float = 0.0
    off_policy_mask_threshold: Optional[float] = None
    # the objective's pieces by verl's names (grpo_kernels.integrations.verl maps verl's config)
    policy_loss: Optional[str] = None
    loss_agg_mode: Optional[str] = None
    kl_estimator: str = "k3"
    clip_ratio_c: float = 3.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 0.0002
    ppo_kl_coef: float = 0.1
    dro_beta: Optional[float] = None
    dp_size: int = 1
    loss_scale_factor: Optional[float] = None
    # bypass_mode's rollout correction (verl's rollout_correction config; old_logps are the rollout's)
    rollout_is: Optional[str] = None
    rollout_is_threshold: float = 2.0
    rollout_is_threshold_lower: Optional[float] = None
    rollout_is_batch_normalize: bool = False
    rollout_rs: Optional[str] = None
    rollout_rs_threshold: Optional[str] = None
    bypass_loss_type: str = "ppo_clip"
    # rewards -> advantages inside the loss (``grpo_loss(..., rewards=...)``): TRL 1.16's GRPOConfig
    # ``num_generations`` and ``scale_rewards`` ("group" | "batch" | "none"; True -> "group", False ->
    # "none"), and the eps added to the std (TRL: 1e-4); unused when advantages are given
    num_generations: Optional[int] = None
    scale_rewards: str = "group"
    reward_eps: float = 1e-4

    @property
    def eps_high(self) -> float:
        """epsilon_high with its default (epsilon_low) applied."""
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def verl_style(self) -> bool:
        """Whether the objective is composed from verl's pieces (``policy_loss`` or ``loss_agg_mode``
        set): aggregation, KL and entropy then follow ``loss_agg_mode`` (default token-mean)."""
        return self.policy_loss is not None or self.loss_agg_mode is not None

    @property
    def exact_kl(self) -> bool:
        """Whether the KL term is the exact one over the vocabulary (``kl_estimator="full"``, beta != 0):
        the call then reads the reference's hidden states and head instead of ``ref_logps``."""
        return self.kl_estimator == "full" and self.beta != 0.0

    def without_exact_kl(self) -> "GRPOOptions":
        """These options with the exact KL term off (beta 0, k3) when ``exact_kl``: what the GRPO row pass
        and the objective on log-probs compute while the divergence row pass adds the exact KL (the KL's
        aggregation weights depend on the mask alone, so the two terms separate); else ``self``."""
        return replace(self, beta=0.0, kl_estimator="k3") if self.exact_kl else self

    @property
    def agg_mode(self) -> Optional[str]:
        """verl's aggregation of the call; None: the TRL loss_type's normalizer."""
        return self.loss_agg_mode if self.loss_agg_mode is not None else ("token-mean" if self.verl_style else None)

    def validate(self) -> "GRPOOptions":
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )
        checks.finite_number("beta", self.beta)
        checks.finite_number("epsilon_low", self.epsilon_low)
        checks.finite_number("epsilon_high", self.epsilon_high, allow_none=True)
        checks.finite_number("delta", self.delta, positive=True, allow_none=True)
        checks.finite_number("temperature", self.temperature, positive=True)
        checks.finite_number("logit_softcap", self.logit_softcap, positive=True, allow_none=True)
        checks.finite_number("sapo_temperature_pos", self.sapo_temperature_pos, positive=True)
        checks.finite_number("sapo_temperature_neg", self.sapo_temperature_neg, positive=True)
        checks.finite_number("top_entropy_quantile", self.top_entropy_quantile)
        if self.epsilon_low < 0 or self.eps_high < 0:
            raise ValueError("epsilon_low and epsilon_high must be >= 0")
        if self.loss_type in CLIPPED_LOSS_TYPES and self.epsilon_low >= 1 and not self.verl_style:
            raise ValueError(f"epsilon_low must be < 1 for loss_type={self.loss_type!r}, got {self.epsilon_low}")
        if self.loss_type == "cispo" and self.eps_high <= 0:
            raise ValueError("epsilon_high must be > 0 for loss_type='cispo' (it is the ratio's upper clamp)")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise TypeError("use_bias_correction_kl must be a bool")
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("max_completion_length is required for loss_type='dr_grpo'")
        if self.max_completion_length is not None:
            if isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int):
                raise TypeError("max_completion_length must be an int")
            if self.max_completion_length <= 0:
                raise ValueError(f"max_completion_length must be > 0, got {self.max_completion_length}")
        return self._validate_additions()

    def _validate_rewards(self) -> None:
        if self.num_generations is not None:
            checks.check_int("num_generations", self.num_generations, 1)
        if isinstance(self.scale_rewards, bool):
            raise TypeError("GRPOOptions.scale_rewards holds the mode's name; True / False (GRPOConfig's) are "
                            "named by split_options and GRPOOptions.replace")
        checks.scale_mode(self.scale_rewards)
        checks.check_real("reward_eps", self.reward_eps, 0.0)

    def _validate_additions(self) -> "GRPOOptions":
        self._validate_rewards()
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef",
                     "clip_ratio_c", "clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef"):
            checks.finite_number(name, getattr(self, name))
        checks.finite_number("rollout_is_threshold", self.rollout_is_threshold, positive=True)
        for name in ("off_policy_mask_threshold", "dro_beta", "rollout_is_threshold_lower"):
            checks.finite_number(name, getattr(self, name), allow_none=True)
        checks.finite_number("loss_scale_factor", self.loss_scale_factor, positive=True, allow_none=True)
        _choice("policy_loss", self.policy_loss, POLICY_LOSSES, allow_none=True)
        _choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES, allow_none=True)
        _choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        if self.kl_estimator == "full" and self.use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl=True does not combine with kl_estimator='full': the correction "
                             "reweights k3's one sampled action, the exact KL sums over every action")
        _choice("rollout_is", self.rollout_is, IS_LEVELS, allow_none=True)
        _choice("bypass_loss_type", self.bypass_loss_type, BYPASS_LOSS_TYPES)
        _bool("rollout_is_batch_normalize", self.rollout_is_batch_normalize)
        if isinstance(self.dp_size, bool) or not isinstance(self.dp_size, int):
            raise TypeError(f"dp_size must be an int, got {type(self.dp_size).__name__}")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        dual_clip = self.policy_loss == "vanilla" or (self.policy_loss == "bypass_mode"
                                                       and self.bypass_loss_type == "ppo_clip")
        if dual_clip and self.clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 for dual-clip PPO (policy_loss={self.policy_loss!r}), "
                             f"got {self.clip_ratio_c}")
        if self.policy_loss == "clip_cov" and self.clip_cov_ratio <= 0:
            raise ValueError(f"clip_cov_ratio must be > 0, got {self.clip_cov_ratio}")
        if self.policy_loss == "kl_cov" and self.kl_cov_ratio <= 0:
            raise ValueError(f"kl_cov_ratio must be > 0, got {self.kl_cov_ratio}")
        if self.policy_loss == "dro" and (self.dro_beta is None or self.dro_beta <= 0):
            raise ValueError(f"dro_beta must be a positive number for policy_loss='dro', got {self.dro_beta}")
        lower = self.rollout_is_threshold_lower
        if lower is not None and not 0 < lower <= self.rollout_is_threshold:
            raise ValueError(f"rollout_is_threshold_lower must be in (0, rollout_is_threshold], got {lower}")
        if self.rollout_rs is not None or self.rollout_rs_threshold is not None:
            from grpo_kernels import rollout_correction

            rollout_correction.parse_rejection(self.rollout_rs, self.rollout_rs_threshold)
        if self.verl_style and self.importance_sampling_level != "token":
            raise ValueError("importance_sampling_level='sequence' is TRL's (GSPO); with verl's policy_loss use "
                             "policy_loss='gspo'")
        if self.verl_style and (self.loss_type != "dapo" or self.top_entropy_quantile != 1.0 or self.delta is not None
                                or self.off_policy_mask_threshold is not None or self.use_bias_correction_kl):
            raise ValueError("policy_loss/loss_agg_mode (verl's objective) do not combine with TRL's loss_type, "
                             "top_entropy_quantile, delta, off_policy_mask_threshold or use_bias_correction_kl: "
                             "leave those at their defaults")
        return self


@dataclass(frozen=True)
class ExecutionOptions(_Options):
    """How a call runs: same result (bitwise under ``deterministic``) whatever is chosen."""

    #: auto | torch | triton | cpp | cuda | reference (``grpo_kernels.backends``)
    backend: str = "auto"
    #: rows per chunk; None: as many as fit the chunk byte budget (``grpo_kernels.plan``)
    chunk_size: Optional[int] = None
    #: bitwise-reproducible runs: only backends with a fixed reduction order, no autotuning
    #: (docs/design.md, "Determinism"). Also on under ``torch.use_deterministic_algorithms``.
    deterministic: bool = False
    #: each token's log-prob, entropy and grad_hidden row bitwise independent of the other rows,
    #: the batch size, the row's position, padding and chunk_size: matmuls in fixed-row tiles
    #: (``sweep.BATCH_INVARIANT_ROWS``) and fixed kernel tiles (docs/design.md, "Batch invariance")
    batch_invariant: bool = False

    def validate(self) -> "ExecutionOptions":
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.chunk_size is not None:
            if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
                raise TypeError("chunk_size must be an int or None")
            if self.chunk_size <= 0:
                raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}")
        _bool("deterministic", self.deterministic)
        _bool("batch_invariant", self.batch_invariant)
        return self

    @property
    def is_deterministic(self) -> bool:
        """``deterministic``, or torch's global deterministic mode."""
        import torch

        return self.deterministic or torch.are_deterministic_algorithms_enabled()

    @property
    def fixed_tiles(self) -> bool:
        """No autotuning: the kernel's tile (hence its reduction order) is a function of the
        shapes alone, as determinism and batch invariance need."""
        return self.is_deterministic or self.batch_invariant


@dataclass(frozen=True)
class VocabParallel(_Options):
    """Vocabulary parallelism: this rank holds lm_head rows ``[vocab_start, vocab_start + V_local)``.

    ``group_name`` names a registered process group (``grpo_kernels.collective.group_name``); None:
    no vocabulary parallelism. ``vocab_start=None`` on every rank: slices in rank order.
    """

    group_name: Optional[str] = None
    vocab_start: Optional[int] = None
    reduce_grad_hidden: bool = True

    def validate(self) -> "VocabParallel":
        # vocab_start is checked collectively (every rank raises alike, grpo_kernels.plan)
        _bool("reduce_grad_hidden", self.reduce_grad_hidden)
        return self

    @property
    def enabled(self) -> bool:
        return self.group_name is not None


OPTION_CLASSES = (GRPOOptions, ExecutionOptions, VocabParallel)
# field lists computed once here: dataclasses.fields() is not traceable by torch.compile
LOSS_FIELDS = tuple(f.name for f in fields(GRPOOptions))
EXECUTION_FIELDS = tuple(f.name for f in fields(ExecutionOptions))
VOCAB_PARALLEL_FIELDS = tuple(f.name for f in fields(VocabParallel))
#: keyword options of grpo_loss / GRPOLoss: the loss semantics and the execution settings
OPTION_NAMES = LOSS_FIELDS + EXECUTION_FIELDS
#: (class, field name, type) of every option, in the custom ops' argument order
OP_FIELDS = tuple((cls, f.name, typing.get_type_hints(cls)[f.name]) for cls in OPTION_CLASSES for f in fields(cls))
#: (op argument name, type) of every option: ``GRPOOptions_beta: float``, ... (``OP_FIELDS``' order)
OPTION_OP_PARAMS = tuple((f"{cls.__name__}_{name}", kind) for cls, name, kind in OP_FIELDS)
_FLOAT_OP_ARGS = frozenset(f"{cls.__name__}_{name}" for cls, name, kind in OP_FIELDS
                           if kind in (float, Optional[float]))


def split_options(kwargs: dict):
    """(GRPOOptions, ExecutionOptions) from keyword options, validated; TypeError on unknown names."""
    unknown = [k for k in kwargs if k not in OPTION_NAMES]
    if unknown:
        raise TypeError(f"unknown option(s): {sorted(unknown)}")
    loss = _scale_mode_named({k: kwargs[k] for k in LOSS_FIELDS if k in kwargs})
    execution = {k: kwargs[k] for k in EXECUTION_FIELDS if k in kwargs}
    return GRPOOptions(**loss).validate(), ExecutionOptions(**execution).validate()


def with_overrides(options: GRPOOptions, execution: ExecutionOptions, overrides: dict):
    """(options, execution) with the option names among ``overrides`` replaced (and validated);
    the other items of ``overrides`` are left to the caller."""
    loss = {k: v for k, v in overrides.items() if k in LOSS_FIELDS}
    run = {k: v for k, v in overrides.items() if k in EXECUTION_FIELDS}
    return (options.replace(**loss) if loss else options), (execution.replace(**run) if run else execution)


def option_op_args(options: GRPOOptions, execution: ExecutionOptions, vocab_parallel: VocabParallel) -> tuple:
    """The option objects as the custom ops' arguments, in ``OPTION_OP_PARAMS`` order."""
    values = tuple(getattr(options, n) for n in LOSS_FIELDS) + tuple(getattr(execution, n) for n in EXECUTION_FIELDS) \
        + tuple(getattr(vocab_parallel, n) for n in VOCAB_PARALLEL_FIELDS)
    # an int beta or delta is a float to the op schema
    return tuple(float(v) if v is not None and name in _FLOAT_OP_ARGS else v
                 for (name, _), v in zip(OPTION_OP_PARAMS, values))


def options_from_op_args(named) -> dict:
    """Inverse of ``option_op_args``: ``named`` maps op argument names to values; returns
    ``dict(options=GRPOOptions, execution=ExecutionOptions, vocab_parallel=VocabParallel)`` (already
    validated by the caller)."""
    return dict(options=GRPOOptions(**{n: named[f"GRPOOptions_{n}"] for n in LOSS_FIELDS}),
                **execution_from_op_args(named))


#: (op argument name, type) of the execution settings and vocab parallelism alone: the ops that
#: take no GRPO options (``grpo_kernels::distill_loss``)
EXECUTION_OP_PARAMS = tuple(p for p in OPTION_OP_PARAMS if not p[0].startswith("GRPOOptions_"))


def execution_op_args(execution: ExecutionOptions, vocab_parallel: VocabParallel) -> tuple:
    """The execution settings and vocab parallelism as op arguments, in ``EXECUTION_OP_PARAMS`` order."""
    return tuple(getattr(execution, n) for n in EXECUTION_FIELDS) + \
        tuple(getattr(vocab_parallel, n) for n in VOCAB_PARALLEL_FIELDS)


def execution_from_op_args(named) -> dict:
    """Inverse of ``execution_op_args``: ``dict(execution=..., vocab_parallel=...)``."""
    return dict(execution=ExecutionOptions(**{n: named[f"ExecutionOptions_{n}"] for n in EXECUTION_FIELDS}),
                vocab_parallel=VocabParallel(**{n: named[f"VocabParallel_{n}"] for n in VOCAB_PARALLEL_FIELDS}))

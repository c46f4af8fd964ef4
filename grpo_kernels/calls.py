"""One call of a fused custom op, by name: what crosses the op boundary (``grpo_kernels.ops``).

A ``torch.library`` custom op (what keeps ``torch.compile(fullgraph=True)`` free of graph
breaks) takes flat arguments only: tensors, numbers, strings, lists. A call's objects (its
tensors, the per-call ``objective.LossInputs``, the three option objects) are therefore
flattened into the op's arguments on one side and rebuilt on the other. The classes here are
the only place that does it, by name:

- ``PARAMS``: the op's arguments as (name, type) pairs; ``grpo_kernels.ops`` defines each op's
  schema from them;
- ``to_op_args()``: the call as those arguments, in that order (the caller's side);
- ``from_op_args(args)``: the call back from them, each value looked up by its name (the op's
  side: its implementation, fake implementation and autograd).

So ``grpo_loss(beta=...)`` -> ``GRPOOptions.beta`` -> ``LossCall.options`` -> the op argument
``GRPOOptions_beta`` (``options.option_op_args``) -> ``LossCall.options.beta`` again
(``options.options_from_op_args``) inside the op, where ``loss.grpo_loss_forward`` runs the call.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Tuple

from torch import Tensor

from grpo_kernels import objective
from grpo_kernels.divergence import DivergenceSpec, HeadTransform
from grpo_kernels.options import (EXECUTION_OP_PARAMS, OPTION_OP_PARAMS, ExecutionOptions, GRPOOptions, VocabParallel,
                                  execution_from_op_args, execution_op_args, option_op_args, options_from_op_args)

Params = Tuple[Tuple[str, object], ...]

#: the lm_head pass every op starts with: hidden [n, H], weight [V, H], bias [V], targets [n] int64
HEAD_PARAMS: Params = (("hidden", Tensor), ("weight", Tensor), ("bias", Optional[Tensor]), ("targets", Tensor))
#: the reference's head for the exact KL (``kl_estimator="full"``): ref_hidden [n, H_r], ref_weight
#: [V, H_r], ref_bias [V], in the reference's own float dtype; None when the KL is not the exact one.
#: One op argument, a list of the three (a custom op takes at most 64 arguments)
REF_HEAD_FIELDS = ("ref_hidden", "ref_weight", "ref_bias")
REF_HEAD_PARAMS: Params = (("ref_head", List[Optional[Tensor]]),)
#: the per-call tensors of ``objective.LossInputs`` the loss op takes, in field order: a field added
#: there reaches the op with no other change (``entropy_mask`` is derived inside the op)
LOSS_INPUT_FIELDS = tuple(f.name for f in dataclasses.fields(objective.LossInputs)
                          if f.name not in objective.DERIVED_INPUTS)
LOSS_INPUT_PARAMS: Params = tuple((n, Tensor if n == "mask" else Optional[Tensor]) for n in LOSS_INPUT_FIELDS)
#: the row statistics and upstream gradients the log-prob backward takes, all [n]
LOGPROBS_GRAD_PARAMS: Params = (("lse", Tensor), ("entropy", Tensor), ("target_logit", Tensor),
                                ("grad_logp", Tensor), ("grad_entropy", Optional[Tensor]))


def _names(params: Params) -> Tuple[str, ...]:
    return tuple(name for name, _ in params)


@dataclass(frozen=True)
class LossCall:
    """A ``grpo_kernels::grpo_loss`` call. hidden [B*T, H], weight [V, H] (this rank's rows under
    vocab parallelism), bias [V] or None, targets [B*T] int64 (global ids), ``inputs`` the per-call
    tensors ([B, T]; ``adv`` and ``is_ratio`` may be [B, 1]; padding positions hold 0), the options,
    ``needs``: the gradients wanted for (hidden, weight, bias), and the reference's head of the exact
    KL (``REF_HEAD_PARAMS``; never differentiated)."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    targets: Tensor
    inputs: objective.LossInputs
    options: GRPOOptions
    execution: ExecutionOptions
    vocab_parallel: VocabParallel
    needs: Tuple[bool, bool, bool]
    ref_hidden: Optional[Tensor] = None
    ref_weight: Optional[Tensor] = None
    ref_bias: Optional[Tensor] = None

    PARAMS: ClassVar[Params] = (HEAD_PARAMS + REF_HEAD_PARAMS + LOSS_INPUT_PARAMS + OPTION_OP_PARAMS
                                + (("needs", List[bool]),))
    NAMES: ClassVar[Tuple[str, ...]] = _names(PARAMS)

    def to_op_args(self) -> tuple:
        return (self.hidden, self.weight, self.bias, self.targets, [getattr(self, n) for n in REF_HEAD_FIELDS],
                *(getattr(self.inputs, name) for name in LOSS_INPUT_FIELDS),
                *option_op_args(self.options, self.execution, self.vocab_parallel), list(self.needs))

    @classmethod
    def from_op_args(cls, args: Sequence) -> "LossCall":
        a = dict(zip(cls.NAMES, args))
        return cls(hidden=a["hidden"], weight=a["weight"], bias=a["bias"], targets=a["targets"],
                   inputs=objective.LossInputs(**{name: a[name] for name in LOSS_INPUT_FIELDS}),
                   **options_from_op_args(a), needs=tuple(a["needs"]),
                   **dict(zip(REF_HEAD_FIELDS, a["ref_head"])))


@dataclass(frozen=True)
class LogprobsCall:
    """A ``grpo_kernels::token_logprobs`` call: hidden [n, H], weight [V, H], bias [V] or None,
    targets [n] int64; without ``need_entropy`` the entropies are not computed. Also the call of
    ``grpo_kernels::token_statistics`` (the same sweep's arguments, forward only, never vocab
    parallel): one class, so the two ops cannot drift apart in what they take."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    targets: Tensor
    options: GRPOOptions
    execution: ExecutionOptions
    vocab_parallel: VocabParallel
    need_entropy: bool

    PARAMS: ClassVar[Params] = HEAD_PARAMS + OPTION_OP_PARAMS + (("need_entropy", bool),)
    NAMES: ClassVar[Tuple[str, ...]] = _names(PARAMS)

    def to_op_args(self) -> tuple:
        return (self.hidden, self.weight, self.bias, self.targets,
                *option_op_args(self.options, self.execution, self.vocab_parallel), self.need_entropy)

    @classmethod
    def from_op_args(cls, args: Sequence) -> "LogprobsCall":
        a = dict(zip(cls.NAMES, args))
        return cls(hidden=a["hidden"], weight=a["weight"], bias=a["bias"], targets=a["targets"],
                   **options_from_op_args(a), need_entropy=a["need_entropy"])


@dataclass(frozen=True)
class LogprobsGradCall:
    """A ``grpo_kernels::token_logprobs_backward`` call: the forward's head and options, its row
    statistics (lse, entropy, target_logit, [n]) and the upstream gradients of logp and entropy
    ([n]; ``grad_entropy`` None: the entropy reached no loss), and the gradients wanted."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    targets: Tensor
    lse: Tensor
    entropy: Tensor
    target_logit: Tensor
    grad_logp: Tensor
    grad_entropy: Optional[Tensor]
    options: GRPOOptions
    execution: ExecutionOptions
    vocab_parallel: VocabParallel
    needs: Tuple[bool, bool, bool]

    PARAMS: ClassVar[Params] = HEAD_PARAMS + LOGPROBS_GRAD_PARAMS + OPTION_OP_PARAMS + (("needs", List[bool]),)
    NAMES: ClassVar[Tuple[str, ...]] = _names(PARAMS)

    def to_op_args(self) -> tuple:
        return (self.hidden, self.weight, self.bias, self.targets, self.lse, self.entropy, self.target_logit,
                self.grad_logp, self.grad_entropy,
                *option_op_args(self.options, self.execution, self.vocab_parallel), list(self.needs))

    @classmethod
    def from_op_args(cls, args: Sequence) -> "LogprobsGradCall":
        a = dict(zip(cls.NAMES, args))
        return cls(**{name: a[name] for name in _names(HEAD_PARAMS + LOGPROBS_GRAD_PARAMS)},
                   **options_from_op_args(a), needs=tuple(a["needs"]))


#: the top-k distillation rows' teacher side and clamp: ids [n, K] int64 in [0, V), log-probs [n, K]
#: in the accumulation dtype, the clamp's floor (None: no clamp)
TOPK_PARAMS: Params = (("teacher_topk_ids", Tensor), ("teacher_topk_logps", Tensor),
                       ("log_prob_min_clamp", Optional[float]))


@dataclass(frozen=True)
class TopKCall:
    """A ``grpo_kernels::topk_forward_kl`` call: the student's head (hidden [n, H], weight [V, H],
    bias [V] or None), the teacher's top-k ids [n, K] int64 and log-probs [n, K] (accumulation
    dtype), the clamp's floor, and the options (only ``temperature`` / ``logit_softcap`` and the
    execution settings matter; the full objects cross the boundary as for ``LogprobsCall``)."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    teacher_topk_ids: Tensor
    teacher_topk_logps: Tensor
    log_prob_min_clamp: Optional[float]
    options: GRPOOptions
    execution: ExecutionOptions
    vocab_parallel: VocabParallel

    PARAMS: ClassVar[Params] = HEAD_PARAMS[:3] + TOPK_PARAMS + OPTION_OP_PARAMS
    NAMES: ClassVar[Tuple[str, ...]] = _names(PARAMS)
    TENSORS: ClassVar[Tuple[str, ...]] = _names(HEAD_PARAMS[:3] + TOPK_PARAMS)

    def to_op_args(self) -> tuple:
        return (*(getattr(self, name) for name in self.TENSORS),
                *option_op_args(self.options, self.execution, self.vocab_parallel))

    @classmethod
    def from_named(cls, a: dict) -> "TopKCall":
        """The call from a mapping of op argument names to values (``from_op_args``' lookup)."""
        return cls(**{name: a[name] for name in cls.TENSORS}, **options_from_op_args(a))

    @classmethod
    def from_op_args(cls, args: Sequence) -> "TopKCall":
        return cls.from_named(dict(zip(cls.NAMES, args)))


@dataclass(frozen=True)
class TopKGradCall:
    """A ``grpo_kernels::topk_forward_kl_backward`` call: the forward's call, the upstream gradient
    of its ``losses`` ([n], accumulation dtype) and the gradients wanted for (hidden, weight, bias)."""

    forward: TopKCall
    grad_losses: Tensor
    needs: Tuple[bool, bool, bool]

    PARAMS: ClassVar[Params] = TopKCall.PARAMS + (("grad_losses", Tensor), ("needs", List[bool]))
    NAMES: ClassVar[Tuple[str, ...]] = _names(PARAMS)

    def to_op_args(self) -> tuple:
        return (*self.forward.to_op_args(), self.grad_losses, list(self.needs))

    @classmethod
    def from_op_args(cls, args: Sequence) -> "TopKGradCall":
        a = dict(zip(cls.NAMES, args))
        return cls(forward=TopKCall.from_named(a), grad_losses=a["grad_losses"], needs=tuple(a["needs"]))


#: the divergence (``divergence.DivergenceSpec``) as op arguments
DIVERGENCE_PARAMS: Params = (("beta", float), ("temperature", float), ("logit_scale", float),
                             ("logit_softcap", Optional[float]), ("teacher_logit_scale", float),
                             ("teacher_logit_softcap", Optional[float]))


#: the distillation op's tensors: both heads, the kept positions [N] bool, the divisor or None
DISTILL_TENSOR_PARAMS: Params = (("hidden", Tensor), ("weight", Tensor), ("bias", Optional[Tensor]),
                                 ("teacher_hidden", Tensor), ("teacher_weight", Tensor),
                                 ("teacher_bias", Optional[Tensor]), ("keep", Tensor), ("num_items", Optional[Tensor]))


@dataclass(frozen=True)
class DistillCall:
    """A ``grpo_kernels::distill_loss`` call. hidden [N, H], weight [V, H], bias [V] or None: the
    student; teacher_hidden [N, H_t], teacher_weight [V, H_t], teacher_bias [V] or None: the
    teacher (V: this rank's rows under vocab parallelism, alike for both heads); ``keep`` [N]
    bool, the positions that count; ``num_items`` a float64 [] divisor or None (the count of
    ``keep``, at least 1); the divergence, the execution settings, and ``needs``: the gradients
    wanted for (hidden, weight, bias)."""

    hidden: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    teacher_hidden: Tensor
    teacher_weight: Tensor
    teacher_bias: Optional[Tensor]
    keep: Tensor
    num_items: Optional[Tensor]
    spec: DivergenceSpec
    execution: ExecutionOptions
    vocab_parallel: VocabParallel
    needs: Tuple[bool, bool, bool]

    TENSORS: ClassVar[Tuple[str, ...]] = _names(DISTILL_TENSOR_PARAMS)
    PARAMS: ClassVar[Params] = DISTILL_TENSOR_PARAMS + DIVERGENCE_PARAMS + EXECUTION_OP_PARAMS + (("needs", List[bool]),)
    NAMES: ClassVar[Tuple[str, ...]] = _names(PARAMS)

    def to_op_args(self) -> tuple:
        s, t = self.spec.student, self.spec.teacher
        spec = (float(self.spec.beta), float(s.temperature), float(s.scale), s.softcap, float(t.scale), t.softcap)
        return (*(getattr(self, name) for name in self.TENSORS), *spec,
                *execution_op_args(self.execution, self.vocab_parallel), list(self.needs))

    @classmethod
    def from_op_args(cls, args: Sequence) -> "DistillCall":
        a = dict(zip(cls.NAMES, args))
        temperature = a["temperature"]
        spec = DivergenceSpec(a["beta"], HeadTransform(a["logit_scale"], a["logit_softcap"], temperature),
                              HeadTransform(a["teacher_logit_scale"], a["teacher_logit_softcap"], temperature))
        return cls(**{name: a[name] for name in cls.TENSORS}, spec=spec, **execution_from_op_args(a),
                   needs=tuple(a["needs"]))

"""One place that plans a call: backend, chunk rows, path, grad_weight accumulation, collective.

Everything a vocabulary pass decides is decided here, once per call, from the call's shapes,
its options (``GRPOOptions``, ``ExecutionOptions``, ``VocabParallel``) and nothing else that
changes from run to run, so a deterministic run makes the same plan every time. The sweep
(``grpo_kernels.sweep``) and the loss (``grpo_kernels.loss``) then only carry the plan out.

Paths of the loss, by what a token's gradient coefficient dL/dlogp depends on (flops are the
three matmuls of the head; docs/design.md, "Flops by path"):

- ``forward``: no gradient wanted: one statistics sweep (2NHV).
- ``one_sweep``: a token-scope objective (``objective.scope``): the coefficient follows from the
  token's own log-prob, so statistics, epilogue and gradient run in one fused sweep (6NHV).
- ``sequence_sweep``: a sequence-scope objective (sequence-level importance sampling, vespo,
  gspo, geo_mean, the off-policy mask) with every sequence inside one chunk: chunks are cut at
  sequence boundaries and each chunk's coefficients come from its own statistics while its
  logits are still in the buffer (6NHV).
- ``two_sweeps``: a sequence longer than a chunk, or a batch-scope objective (clip_cov, kl_cov,
  bypass_mode's rejection sampling): a statistics sweep, the coefficients of all rows, then a
  gradient sweep that recomputes the logits (8NHV).

``top_entropy_quantile < 1`` needs every token's entropy before any coefficient: one
statistics sweep more (``entropy_sweep``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from grpo_kernels import collective, env, objective
from grpo_kernels.backends import choose_backend, divergence_backend
from grpo_kernels.backends.base import RowBackend
from grpo_kernels.epilogue import accumulation_dtype
from grpo_kernels.options import ExecutionOptions, GRPOOptions, VocabParallel

_MiB = 2**20


@dataclass(frozen=True)
class ChunkRule:
    """How many rows of hidden one chunk takes, for one device type (and dtype).

    A chunk's bytes are ``rows * V * (element size + the backend's temporaries per element)``.
    ``target_bytes`` buys the rows a chunk aims at; a chunk has at least ``min_rows`` rows even
    when that budget buys fewer (below that the GEMMs lose efficiency: each chunk's grad_weight
    term is a rank-``rows`` update that reads and writes all of [V, H], so a thin chunk is
    memory-bound), and never more than ``max_bytes``, ``min_rows`` included. ``balance``: the
    rows are spread evenly over the chunks that count needs (3280 rows at most 1280 a chunk:
    3 x 1094, not 2 x 1280 + 720), which lowers the peak and keeps the last GEMM as wide as the
    others.
    """

    target_bytes: int
    min_rows: int = 1
    max_bytes: Optional[int] = None  # None: target_bytes
    balance: bool = False

    def rows(self, n: int, per_row: int) -> int:
        cap = max(1, (self.max_bytes or self.target_bytes) // per_row)
        rows = min(cap, max(self.min_rows, self.target_bytes // per_row), n)
        if self.balance and rows < n:
            chunks = -(-n // rows)
            rows = -(-n // chunks)
        return max(1, rows)


#: byte cap of one chunk on the CPU (and any device without a rule), and what the chunks of
#: GRPO_KERNELS_CHUNK_BYTES-less CPU calls were sized by until 2026-12-01
DEFAULT_CHUNK_BYTES = 256 * _MiB
#: on CUDA every extra chunk costs one more read-modify-write of grad_weight (1.2 GB at
#: V=151936, H=4096 bf16, ~0.75 ms on an H100), so chunks are larger there. Measured on an
#: H100 at N=8192, H=4096, V=151936 (bench/RESULTS.md): 320 MiB 41.7 ms / 681 MiB beyond
#: inputs+grads, 384 MiB 39.4 ms / 809 MiB, 512 MiB 39.5 ms / 1064 MiB.
CUDA_CHUNK_BYTES = 384 * _MiB

#: The rule per device type, ``(type, dtype)`` before ``(type, None)``; any other device takes
#: the CPU's. CUDA: the byte budget alone, as measured above (no GPU data for another rule yet).
#: CPU: aim at 160 MiB of chunk, at least 256 rows, never over 256 MiB, rows balanced over the
#: chunks. Measured 2026-12-01 on the 2-core CPU (bench/RESULTS.md, "Chunk sizing from
#: measurement"; `python bench/report.py --sweep-chunks`), loss forward + backward, peak RSS
#: beyond the inputs (grads included) in a fresh process per case, fp32, cpp:
#:   N=4096 (3280 real), H=1024, V=32768: 2048 rows (the old 256 MiB budget) 405 MiB, 1024 rows
#:     281, 820 rows 256, 512 rows 217; Liger eager 325 MiB. The rule: 3 x 1094 rows; paired
#:     whole-process runs against the old budget: CPU time 1.00x (0.996-1.012), peak -115 MiB;
#:     4 x 820 rows (a 128 MiB target) cost 1.02x CPU time. The torch backend works in slabs of
#:     rows on the CPU (no per-logit temporaries for the rule), so it makes cpp's plan.
#:   N=1024 (820 real), H=1024, V=32768: one chunk either way, 237 MiB; Liger eager 334.
#:   N=1024, H=256, V=151936: 441 rows 405 MiB, 256 rows 298, 205 rows 269, 128 rows 224;
#:     Liger eager 349. The rule: 3 x 274 rows.
#: Below ~256 rows a chunk's grad_weight update (rank-rows, reading and writing all of [V, H])
#: turns memory-bound: 55 rows (32 MiB at V=151936) took 3.89 s against 3.02 s for 441 rows.
CHUNK_RULES = {
    ("cuda", None): ChunkRule(target_bytes=CUDA_CHUNK_BYTES),
    ("cpu", None): ChunkRule(target_bytes=160 * _MiB, min_rows=256, max_bytes=DEFAULT_CHUNK_BYTES, balance=True),
}

PATHS = ("forward", "one_sweep", "sequence_sweep", "two_sweeps")


def chunk_rule(device=None, dtype: Optional[torch.dtype] = None) -> ChunkRule:
    """The chunk rule of ``device`` (default the CPU) for ``dtype``; under GRPO_KERNELS_CHUNK_BYTES
    that plain byte budget (no minimum row count, no cap beyond it, no balancing)."""
    override = env.chunk_bytes()
    if override is not None:
        return ChunkRule(target_bytes=override)
    kind = torch.device(device).type if device is not None else "cpu"
    for key in ((kind, dtype), (kind, None), ("cpu", dtype), ("cpu", None)):
        if key in CHUNK_RULES:
            return CHUNK_RULES[key]
    raise KeyError(kind)  # unreachable while CHUNK_RULES has ("cpu", None)


def chunk_budget(device=None, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes one chunk may use on ``device``: the rule's cap (GRPO_KERNELS_CHUNK_BYTES under it)."""
    rule = chunk_rule(device, dtype)
    return rule.max_bytes or rule.target_bytes


def chunk_rows(n: int, vocab: int, dtype: torch.dtype, backend: Optional[RowBackend], chunk_size: Optional[int],
               device=None, bytes_per_logit: Optional[int] = None) -> int:
    """Rows per chunk: ``chunk_size`` if given; else, under GRPO_KERNELS_CHUNK_BYTES, as many as
    fit that many bytes; else the device's ``ChunkRule``. A row costs ``vocab`` times
    ``bytes_per_logit``: by default a logit of ``dtype`` plus ``backend``'s temporaries (a
    distillation chunk passes both heads' logits and its own row pass's temporaries)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n, 1)))
    if bytes_per_logit is None:
        temps = backend.temp_bytes(device if device is not None else "cpu")
        bytes_per_logit = dtype.itemsize + temps
    return chunk_rule(device, dtype).rows(max(n, 1), max(1, vocab * bytes_per_logit))


def grad_weight_dtype(weight: torch.Tensor, n_chunks: int) -> torch.dtype:
    """The dtype grad_weight is summed in across chunks.

    Only a half-precision weight seen by more than one chunk needs an fp32 [V, H]
    accumulator. Each chunk's GEMM sums its rows in fp32 inside cuBLAS/MKL either way; without
    the accumulator the chunks' sums are added in the weight's dtype (one rounding per chunk
    instead of one in all). ``auto`` keeps the accumulator while it costs at most half a chunk
    budget, so memory beyond inputs and grads stays O(chunk): at V=151936, H=4096 it would be
    2.4 GB. GRPO_KERNELS_GRAD_WEIGHT_ACCUM=fp32|native|auto overrides the rule.
    """
    acc = accumulation_dtype(weight.dtype)
    if acc == weight.dtype or n_chunks <= 1:
        return weight.dtype
    mode = env.grad_weight_accum()
    if mode == "auto":
        mode = "fp32" if weight.numel() * 4 <= chunk_budget(weight.device) // 2 else "native"
    return acc if mode == "fp32" else weight.dtype


def uniform_chunks(n: int, rows: int) -> List[Tuple[int, int]]:
    return [(start, min(n, start + rows)) for start in range(0, n, rows)]


def sequence_chunks(lengths: Sequence[int], max_rows: int) -> Optional[List[Tuple[int, int]]]:
    """Row ranges ``[start, end)`` that each hold whole sequences and at most ``max_rows``
    rows, packed greedily in order; ``None`` when one sequence alone has more rows.

    ``lengths`` are the (unmasked) row counts of consecutive sequences; empty ones are
    absorbed by their neighbours.
    """
    bounds, start, end = [], 0, 0
    for length in lengths:
        if length > max_rows:
            return None
        if end + length - start > max_rows:
            bounds.append((start, end))
            start = end
        end += length
    if end > start:
        bounds.append((start, end))
    return bounds


@dataclass(frozen=True)
class Plan:
    """What one call does, decided before any vocabulary work."""

    backend: RowBackend
    options: GRPOOptions
    execution: ExecutionOptions
    rows: int  # real (unmasked) rows of hidden the sweep covers
    chunk_rows: int
    bounds: Tuple[Tuple[int, int], ...]  # the chunks [start, end) of those rows
    path: str  # one of PATHS
    entropy_sweep: bool  # a statistics-only sweep before the gradient sweep
    grad_weight_dtype: Optional[torch.dtype]  # None: no grad_weight wanted
    vocab: Optional[collective.VocabGroup]  # None: the whole vocabulary is local
    #: whether the backend's fused row kernel runs: it has one, its epilogue computes the objective
    #: (``objective.kernel_epilogue``), and no vocab parallelism (whose statistics must be combined
    #: over the ranks before the epilogue)
    fused: bool
    need_entropy: bool = True  # False: the log-prob-only statistics (token_logprobs without entropy)
    #: a loss from rewards whose advantages the fused kernel's epilogue computes (one-sweep path);
    #: False with rewards: computed once in torch before the sweep
    rewards_in_kernel: bool = False
    #: whether the loss's dL/dentropy reaches the row gradient (the entropy bonus is on)
    entropy_grad: bool = False
    #: the row backend of the exact KL's divergence row pass (``kl_estimator="full"``; None: no exact KL)
    divergence: Optional[RowBackend] = None

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r} (one of {PATHS})")


def _vocab_group(vp: VocabParallel, hidden, weight, tokens: int, rows: int) -> Optional[collective.VocabGroup]:
    if not vp.enabled:
        return None
    return collective.exchange(vp.group_name, vp.vocab_start, weight.shape[0], tokens, hidden.shape[1],
                               hidden.shape[0], rows, vp.reduce_grad_hidden, hidden.device)


def plan_loss(hidden: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, options: GRPOOptions,
              execution: ExecutionOptions, vocab_parallel: VocabParallel, needs: Tuple[bool, bool, bool], *,
              rewards: bool = False, ref_dtype: Optional[torch.dtype] = None) -> Plan:
    """The plan of a loss call over ``hidden`` [n, H], the real (unmasked) rows of mask [B, T];
    ``rewards``: the advantages come from rewards (``grpo_loss(rewards=...)``); ``ref_dtype``: the
    reference head's dtype when the exact KL runs in the sweep (``options`` then without its KL term:
    ``GRPOOptions.without_exact_kl``)."""
    B, T = mask.shape
    lengths = None
    if any(needs) and objective.scope(options) == "sequence":
        # a meta mask (shape checks) has no values: every position counts, as in nonzero()
        lengths = [T] * B if mask.is_meta else (mask != 0).sum(-1).tolist()
    return plan_call(hidden, weight, options, execution, vocab_parallel, need_grads=needs, sequence_lengths=lengths,
                     loss=True, tokens=B * T, rewards=rewards, ref_dtype=ref_dtype)


def _path(loss: bool, want_grads: bool, options: GRPOOptions, sequence_lengths, rows: int):
    """(path, chunk bounds or None for uniform chunks): module docstring."""
    if not want_grads:
        return "forward", None
    if not loss:
        return "two_sweeps", None
    scope = objective.scope(options)
    if scope == "token":
        return "one_sweep", None
    if scope == "sequence":
        bounds = sequence_chunks(sequence_lengths, rows)
        return ("two_sweeps", None) if bounds is None else ("sequence_sweep", bounds)
    return "two_sweeps", None  # the coefficients need every log-prob of the call


def plan_call(hidden: torch.Tensor, weight: torch.Tensor, options: GRPOOptions, execution: ExecutionOptions,
              vocab_parallel: VocabParallel, *, need_grads: Tuple[bool, bool, bool] = (False, False, False),
              sequence_lengths: Optional[Sequence[int]] = None, loss: bool = False,
              tokens: Optional[int] = None, need_entropy: bool = True, rewards: bool = False,
              ref_dtype: Optional[torch.dtype] = None) -> Plan:
    """The plan of one pass over ``hidden`` [n, H] (the real rows) and ``weight`` [V(_local), H].

    ``loss``: a loss call (paths as in the module docstring); otherwise a log-prob pass:
    ``forward`` without gradients, ``two_sweeps`` (the recomputing backward) with.
    ``sequence_lengths``: the real rows per sequence, for sequence-level importance sampling.
    ``tokens``: the call's tokens, padding included (default n), which the ranks of a
    vocab-parallel call must agree on, as on the n real rows. ``need_entropy=False``: a
    log-prob pass whose entropies nobody reads (the backends skip the entropy's sum).
    ``rewards``: a loss whose advantages come from rewards. ``ref_dtype``: the exact KL's reference
    head runs in each chunk too (``exact_kl_bytes``).
    """
    n = hidden.shape[0]
    backend, _ = choose_backend(execution, hidden.device, hidden.dtype)
    divergence = None
    per_logit = None
    if ref_dtype is not None:
        # under vocab parallelism its row sums are combined over the ranks: a pass that takes vocab=
        divergence, _ = divergence_backend(execution, hidden.device, hidden.dtype, vocab_parallel.enabled)
        per_logit = exact_kl_bytes(hidden.dtype, ref_dtype, backend, divergence, hidden.device)
    rows = chunk_rows(n, weight.shape[0], hidden.dtype, backend, execution.chunk_size, hidden.device,
                      bytes_per_logit=per_logit)
    vocab = _vocab_group(vocab_parallel, hidden, weight, n if tokens is None else tokens, rows)
    if vocab is not None:
        rows = vocab.chunk_rows  # the statistics are collective per chunk: one chunking for all
    want = any(need_grads)
    path, bounds = _path(loss, want, options, sequence_lengths, rows)
    if bounds is None:
        bounds = uniform_chunks(n, rows)
    fused = backend.row_fused_ is not None and vocab is None and objective.kernel_epilogue(options)
    return Plan(
        backend=backend, options=options, execution=execution, rows=n, chunk_rows=rows, bounds=tuple(bounds),
        path=path, entropy_sweep=loss and want and options.top_entropy_quantile < 1.0 and path != "two_sweeps",
        grad_weight_dtype=grad_weight_dtype(weight, len(bounds)) if need_grads[1] else None, vocab=vocab,
        fused=fused, need_entropy=need_entropy or loss, rewards_in_kernel=rewards and fused and path == "one_sweep",
        entropy_grad=loss and options.entropy_coef != 0.0, divergence=divergence,
    )


def exact_kl_bytes(dtype: torch.dtype, ref_dtype: torch.dtype, backend: RowBackend, divergence: RowBackend,
                   device) -> int:
    """Bytes per logit of a chunk that also holds the exact KL's work: the policy's logits, the KL
    gradient's buffer (the policy's dtype, alive across the GRPO row pass), and the larger of the
    reference's logits with the divergence pass's temporaries and the GRPO row pass's temporaries
    (the two passes run one after the other)."""
    return 2 * dtype.itemsize + max(ref_dtype.itemsize + divergence.divergence_temp_bytes(device),
                                    backend.temp_bytes(device))

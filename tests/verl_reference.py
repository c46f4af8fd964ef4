"""Reference values for the actor loss from verl 0.9.1's own code (not a test module).

This file is NOT collected by pytest (its name does not match ``test_*.py``) and it imports verl at
the top, so it only imports in a virtual environment that has verl (see ``.ci/verl_env.sh``; verl
pins transformers<5.11 and installs a top-level ``tests`` package, so it never goes into the dev
venv). It calls verl's real ``verl.workers.utils.losses.ppo_loss(config, model_output, data)`` in
float64 and returns the loss and its gradients with respect to the model outputs.

Usage (in the verl venv)::

    python tests/verl_reference.py OUT.pt [--seed N]

writes ``{"verl_version", "torch_version", "seed", "cases": [...], "results": [...]}`` with
``torch.save``; the dev venv loads it with ``torch.load(OUT, weights_only=True)`` (only tensors,
numbers, strings, None, lists and dicts inside) and compares without verl installed.

A case (``verl_ppo_loss_reference``'s argument) is a dict of plain values:

* tensors, all ``[B, T]`` float64 except ``mask`` (bool) and the optional length vectors:
  ``logp`` (current policy log-probs of the response tokens), ``entropy`` (or None: then
  ``model_output`` has no "entropy" and ppo_loss adds no entropy term), ``old_logp``, ``ref_logp``
  (or None), ``advantages``, ``mask`` (the response/loss mask), ``rollout_is_weights`` (or None),
  optional ``prompt_lens`` / ``response_lens`` (int64 ``[B]``; default 1 and "last valid token + 1")
* ActorConfig fields by verl's names: ``loss_agg_mode``, ``clip_ratio``, ``clip_ratio_low``,
  ``clip_ratio_high`` (None = fall back to clip_ratio), ``clip_ratio_c``, ``entropy_coeff``,
  ``use_kl_loss``, ``kl_loss_coef``, ``kl_loss_type``, ``tau_pos``, ``tau_neg``,
  ``loss_scale_factor``; ``policy_loss``: a dict of PolicyLossConfig fields (``loss_mode``,
  ``clip_cov_ratio``, ``clip_cov_lb``, ``clip_cov_ub``, ``kl_cov_ratio``, ``ppo_kl_coef``,
  ``dro_beta``, ``rollout_correction``: a dict of RolloutCorrectionConfig fields ``rollout_is``,
  ``rollout_is_threshold``, ``rollout_is_batch_normalize``, ``rollout_rs``,
  ``rollout_rs_threshold``, ``loss_type``). A key left out takes verl's dataclass default.
* the global-batch normalizers that the engine puts on ``data``: ``dp_size``, ``batch_num_tokens``,
  ``global_batch_size`` (int or None; ``loss_scale_factor`` above is the fourth)
* ``seed``: clip_cov's only random draw, ``torch.randperm(n_candidates)`` on the default CPU
  generator (core_algos.py:1823), happens after ``torch.manual_seed(seed)``; nothing else inside
  ppo_loss draws random numbers. The candidates are ``torch.nonzero(cand)`` (row-major order) of
  ``cand = (cov < clip_cov_ub) & (cov > clip_cov_lb) & mask``; the first ``clip_num`` of the
  permutation are zeroed. The global RNG state is restored afterwards (``torch.random.fork_rng``).

How ``data`` is laid out (as the FSDP engine hands it to ppo_loss after ``left_right_2_no_padding``):
``prompts`` [B, P] and ``responses`` [B, T] token ids and ``attention_mask`` [B, P + T] (left-padded
prompt of ``prompt_lens[i]`` tokens, right-padded response of ``response_lens[i]`` tokens) as plain
tensors, ``response_mask``, ``old_log_probs``, ``advantages``, ``ref_log_prob``,
``rollout_is_weights`` as padded [B, T] tensors, and ``dp_size``, ``batch_num_tokens``,
``global_batch_size`` as NonTensorData. ``model_output["log_probs"]`` / ``["entropy"]`` are jagged
nested tensors over the whole packed sequence (prompt + response, ``sum(P_i + L_i)`` values): the
value at packed position ``start_i + P_i - 1 + t`` is the log-prob of response token t (the model's
output at the previous position); ``no_padding_2_padding`` (verl/workers/utils/padding.py:97) cuts
``values[end_i - L_i - 1 : end_i - 1]`` and right-pads it with zeros to T. So verl sees 0 (not
``logp``) at response positions ``t >= response_lens[i]``; those are masked (``mask`` must be False
there) and get a zero gradient. The gradients returned here are with respect to the padded
``logp`` / ``entropy`` leaves, through that layout.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys

import torch
from tensordict import TensorDict

import verl
from verl.trainer.config import RolloutCorrectionConfig
from verl.trainer.ppo import core_algos
from verl.trainer.ppo import rollout_corr_helper  # noqa: F401  (bypass_mode imports it lazily)
from verl.utils import tensordict_utils as tu
from verl.workers.config import ActorConfig, PolicyLossConfig
from verl.workers.utils import losses

VERL_VERSION = "0.9.1"

LOSS_MODES = tuple(sorted(core_algos.POLICY_LOSS_REGISTRY))
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_BASE = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
KL_TYPES = KL_BASE + tuple(k + "+" for k in KL_BASE)

_ACTOR_KEYS = (
    "loss_agg_mode",
    "clip_ratio",
    "clip_ratio_low",
    "clip_ratio_high",
    "clip_ratio_c",
    "entropy_coeff",
    "use_kl_loss",
    "kl_loss_coef",
    "kl_loss_type",
    "tau_pos",
    "tau_neg",
    "loss_scale_factor",
)
_TENSOR_KEYS = (
    "logp",
    "entropy",
    "old_logp",
    "ref_logp",
    "advantages",
    "mask",
    "rollout_is_weights",
    "prompt_lens",
    "response_lens",
)


def check_verl_version() -> None:
    if verl.__version__ != VERL_VERSION:
        raise RuntimeError(f"verl_reference.py is written against verl {VERL_VERSION}, found {verl.__version__}")


def build_actor_config(case: dict) -> ActorConfig:
    """verl's ActorConfig for a case (strategy="fsdp", rollout_n=1, micro batch 1: what its
    __post_init__ asserts; they play no part in the loss)."""
    pl = dict(case.get("policy_loss") or {})
    rc = pl.pop("rollout_correction", None)
    if rc is not None:
        pl["rollout_correction"] = RolloutCorrectionConfig(**rc)
    kwargs = {k: case[k] for k in _ACTOR_KEYS if k in case}
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(**pl),
        **kwargs,
    )


def _lengths(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    mask = case["mask"].bool()
    B, T = mask.shape
    prompt_lens = case.get("prompt_lens")
    if prompt_lens is None:
        prompt_lens = torch.ones(B, dtype=torch.long)
    response_lens = case.get("response_lens")
    if response_lens is None:
        pos = torch.arange(1, T + 1).expand(B, T)
        response_lens = torch.where(mask, pos, 0).amax(dim=1).clamp(min=1)
    prompt_lens = prompt_lens.long()
    response_lens = response_lens.long()
    assert bool((prompt_lens >= 1).all()), "verl's no_padding_2_padding needs prompt_len > 0"
    assert bool((response_lens <= T).all()) and bool((response_lens >= 0).all())
    beyond = torch.arange(T).expand(B, T) >= response_lens[:, None]
    assert not bool((mask & beyond).any()), "mask must be False past response_lens"
    return prompt_lens, response_lens


def _packed(x: torch.Tensor, prompt_lens: torch.Tensor, response_lens: torch.Tensor) -> torch.Tensor:
    """[B, T] response values -> jagged nested [B, P_i + L_i] packed-sequence model output."""
    pieces = []
    for i in range(x.shape[0]):
        p, r = int(prompt_lens[i]), int(response_lens[i])
        pieces += [x.new_zeros(p - 1), x[i, :r], x.new_zeros(1)]
    values = torch.cat(pieces)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (prompt_lens + response_lens).cumsum(0)])
    return torch.nested.nested_tensor_from_jagged(values, offsets)


def build_data(case: dict) -> TensorDict:
    """The TensorDict ``data`` that ppo_loss reads (see the module docstring)."""
    mask = case["mask"].bool()
    B, T = mask.shape
    prompt_lens, response_lens = _lengths(case)
    P = int(prompt_lens.max())
    pos_p = torch.arange(P).expand(B, P)
    pos_r = torch.arange(T).expand(B, T)
    prompt_attn = pos_p >= (P - prompt_lens)[:, None]  # left padding
    resp_attn = pos_r < response_lens[:, None]  # right padding
    tensors = {
        "prompts": torch.where(prompt_attn, 7, 0).long(),
        "responses": torch.where(resp_attn, 11, 0).long(),
        "attention_mask": torch.cat([prompt_attn, resp_attn], dim=1).long(),
        "response_mask": mask.long(),
        "old_log_probs": case["old_logp"].double(),
        "advantages": case["advantages"].double(),
    }
    if case.get("ref_logp") is not None:
        tensors["ref_log_prob"] = case["ref_logp"].double()
    if case.get("rollout_is_weights") is not None:
        tensors["rollout_is_weights"] = case["rollout_is_weights"].double()
    data = TensorDict(tensors, batch_size=[B])
    tu.assign_non_tensor(
        data,
        dp_size=int(case.get("dp_size", 1)),
        batch_num_tokens=case.get("batch_num_tokens"),
        global_batch_size=case.get("global_batch_size"),
    )
    return data


def _metric_float(v):
    if isinstance(v, losses.Metric):
        return float(v.aggregate())
    if isinstance(v, torch.Tensor):
        return float(v.detach().item())
    if isinstance(v, (int, float)):
        return float(v)
    return None


def verl_ppo_loss_reference(case: dict) -> dict:
    """verl's ppo_loss for one case, in float64.

    Returns {"loss": 0-d tensor, "grad_logp": [B, T], "grad_entropy": [B, T] or None,
    "pg_loss", "entropy_loss", "kl_loss": floats or None (the components ppo_loss reports),
    "metrics": {name: float}}.
    """
    config = build_actor_config(case)
    data = build_data(case)
    prompt_lens, response_lens = _lengths(case)
    logp = case["logp"].detach().double().clone().requires_grad_(True)
    leaves = [logp]
    model_output = {"log_probs": _packed(logp, prompt_lens, response_lens)}
    entropy = None
    if case.get("entropy") is not None:
        entropy = case["entropy"].detach().double().clone().requires_grad_(True)
        leaves.append(entropy)
        model_output["entropy"] = _packed(entropy, prompt_lens, response_lens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(case.get("seed", 0)))
        loss, metrics = losses.ppo_loss(config, model_output, data)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    scalar = {k: _metric_float(v) for k, v in metrics.items()}
    return {
        "loss": loss.detach().double().reshape(()),
        "grad_logp": grads[0].detach(),
        "grad_entropy": grads[1].detach() if entropy is not None else None,
        "pg_loss": scalar.get("actor/pg_loss"),
        "entropy_loss": scalar.get("actor/entropy_loss"),
        "kl_loss": scalar.get("kl_loss"),
        "metrics": {k: v for k, v in scalar.items() if v is not None},
    }


# --------------------------------------------------------------------------------------------
# the grid


def _rc(**kw) -> dict:
    return {"loss_mode": "bypass_mode", "rollout_correction": kw}


# (name, ActorConfig overrides, PolicyLossConfig overrides). Every registered loss mode appears;
# the "_active" variants pick parameters that make the mode's special branch fire on tiny cases
# (verl's defaults clip ~0.02% of tokens: one token or none in a 6x7 batch).
MODE_CONFIGS = (
    ("vanilla", {}, {"loss_mode": "vanilla"}),
    (
        "vanilla_asym_dualclip",
        {"clip_ratio_low": 0.1, "clip_ratio_high": 0.28, "clip_ratio_c": 1.5},
        {"loss_mode": "vanilla"},
    ),
    ("vanilla_clip_ratio_only", {"clip_ratio": 0.3, "clip_ratio_low": None, "clip_ratio_high": None}, {}),
    ("gspo", {}, {"loss_mode": "gspo"}),
    ("gspo_small", {"clip_ratio_low": 3e-2, "clip_ratio_high": 4e-2}, {"loss_mode": "gspo"}),
    ("gpg", {}, {"loss_mode": "gpg"}),
    ("clip_cov", {}, {"loss_mode": "clip_cov"}),
    (
        "clip_cov_active",
        {},
        {"loss_mode": "clip_cov", "clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0},
    ),
    ("kl_cov", {}, {"loss_mode": "kl_cov"}),
    ("kl_cov_active", {}, {"loss_mode": "kl_cov", "kl_cov_ratio": 0.2, "ppo_kl_coef": 1.0}),
    ("geo_mean", {}, {"loss_mode": "geo_mean"}),
    ("geo_mean_asym", {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3}, {"loss_mode": "geo_mean"}),
    ("dppo_tv", {}, {"loss_mode": "dppo_tv"}),
    (
        "dppo_tv_tight",
        {"clip_ratio_low": 0.05, "clip_ratio_high": 0.03, "clip_ratio_c": 1.2},
        {"loss_mode": "dppo_tv"},
    ),
    ("dppo_kl", {}, {"loss_mode": "dppo_kl"}),
    (
        "dppo_kl_tight",
        {"clip_ratio_low": 0.02, "clip_ratio_high": 0.01, "clip_ratio_c": 1.2},
        {"loss_mode": "dppo_kl"},
    ),
    ("dro", {}, {"loss_mode": "dro", "dro_beta": 0.5}),
    ("cispo", {}, {"loss_mode": "cispo"}),
    ("cispo_asym", {"clip_ratio_low": 1.0, "clip_ratio_high": 0.1}, {"loss_mode": "cispo"}),
    ("sapo", {}, {"loss_mode": "sapo"}),
    ("sapo_tau", {"tau_pos": 2.0, "tau_neg": 4.0}, {"loss_mode": "sapo"}),
    # bypass_mode: old_logp plays the rollout policy; RolloutCorrectionConfig's own defaults are
    # rollout_is="sequence", rollout_is_threshold=2.0, loss_type="ppo_clip"
    ("bypass_defaults", {}, {"loss_mode": "bypass_mode"}),
    ("bypass_ppo_noIS", {}, _rc(rollout_is=None)),
    ("bypass_pg_plain", {}, _rc(loss_type="reinforce", rollout_is=None)),
    ("bypass_pg_tok_tis", {}, _rc(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.3)),
    ("bypass_pg_tok_tis_str", {}, _rc(loss_type="reinforce", rollout_is="token", rollout_is_threshold="1.2")),
    (
        "bypass_pg_tok_icepop",
        {},
        _rc(loss_type="reinforce", rollout_is="token", rollout_is_threshold="0.8_1.3"),
    ),
    ("bypass_pg_seq_tis", {}, _rc(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=1.5)),
    (
        "bypass_pg_seq_icepop",
        {},
        _rc(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold="0.5_2.0"),
    ),
    (
        "bypass_pg_tok_bn",
        {},
        _rc(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.3, rollout_is_batch_normalize=True),
    ),
    (
        "bypass_pg_seq_bn",
        {},
        _rc(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold=5.0, rollout_is_batch_normalize=True),
    ),
    (
        "bypass_ppo_tok_icepop_bn",
        {},
        _rc(rollout_is="token", rollout_is_threshold="0.7_1.4", rollout_is_batch_normalize=True),
    ),
    ("bypass_rs_token_k1", {}, _rc(loss_type="reinforce", rollout_is="token", rollout_rs="token_k1",
                                   rollout_rs_threshold="0.7_1.5")),
    ("bypass_rs_token_k1_float", {}, _rc(rollout_is=None, rollout_rs="token_k1", rollout_rs_threshold=1.4)),
    ("bypass_rs_token_k2", {}, _rc(loss_type="reinforce", rollout_is=None, rollout_rs="token_k2",
                                   rollout_rs_threshold=0.05)),
    ("bypass_rs_token_k3", {}, _rc(rollout_is="token", rollout_rs="token_k3", rollout_rs_threshold=0.05)),
    ("bypass_rs_seq_sum_k1", {}, _rc(loss_type="reinforce", rollout_is="sequence", rollout_rs="seq_sum_k1",
                                     rollout_rs_threshold="0.4_2.5")),
    ("bypass_rs_seq_sum_k2", {}, _rc(rollout_is=None, rollout_rs="seq_sum_k2", rollout_rs_threshold=0.3)),
    ("bypass_rs_seq_sum_k3", {}, _rc(loss_type="reinforce", rollout_is="token", rollout_rs="seq_sum_k3",
                                     rollout_rs_threshold="0.3")),
    ("bypass_rs_seq_mean_k1", {}, _rc(rollout_is="sequence", rollout_rs="seq_mean_k1", rollout_rs_threshold=1.15)),
    ("bypass_rs_seq_mean_k2", {}, _rc(loss_type="reinforce", rollout_is=None, rollout_rs="seq_mean_k2",
                                      rollout_rs_threshold=0.04)),
    ("bypass_rs_seq_mean_k3", {}, _rc(rollout_is="token", rollout_rs="seq_mean_k3", rollout_rs_threshold=0.04)),
    ("bypass_rs_seq_max_k2", {}, _rc(loss_type="reinforce", rollout_is="token", rollout_rs="seq_max_k2",
                                     rollout_rs_threshold=0.15)),
    ("bypass_rs_seq_max_k3", {}, _rc(rollout_is=None, rollout_rs="seq_max_k3", rollout_rs_threshold=0.15)),
    (
        "bypass_rs_chain",
        {},
        _rc(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5,
            rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.6_1.6,0.05"),
    ),
    (
        "bypass_rs_chain_shared",
        {},
        _rc(rollout_is="sequence", rollout_rs="seq_mean_k2, seq_max_k3,seq_mean_k2", rollout_rs_threshold=0.2),
    ),
)

# ppo_loss's entropy term: entropy given (or not) and entropy_coeff
ENTROPY_OPTIONS = (("none", None), ("coeff0", 0.0), ("small", 1e-3), ("big", 0.3))
KL_OPTIONS = ("off",) + KL_TYPES  # "off": use_kl_loss=False (and no ref_log_prob in data)
KL_COEFS = (0.001, 0.7)
IS_WEIGHTS_OPTIONS = (False, True)
# (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor); "tok" / "rows" are filled in
# from the case's mask: the local valid token count / row count (what the engine computes with one
# process and one micro-batch), "2tok+1" etc. simulate a bigger global batch over dp ranks
NORMALIZERS = (
    ("local", (1, None, None, None)),
    ("engine1", (1, "tok", "rows", None)),
    ("dp2", (2, "2tok+1", "2rows", None)),
    ("lsf", (1, None, None, 3)),
    ("dp3_lsf", (3, "3tok", "3rows+1", 10)),
)


def _pairwise_rows(axes: dict[str, tuple], full: tuple[str, ...], rng: random.Random) -> list[dict]:
    """The full product of the ``full`` axes; every other axis gets values greedily so that every
    pair of values of any two axes appears at least once (rows are added for leftovers)."""
    names = list(axes)
    rest = [n for n in names if n not in full]
    uncovered = set()
    for a, b in itertools.combinations(names, 2):
        for i in range(len(axes[a])):
            for j in range(len(axes[b])):
                uncovered.add((a, i, b, j))

    def cover(row):
        for a, b in itertools.combinations(names, 2):
            uncovered.discard((a, row[a], b, row[b]))

    rows = []
    for combo in itertools.product(*(range(len(axes[n])) for n in full)):
        row = dict(zip(full, combo))
        for n in rest:
            best, best_gain = [], -1
            for v in range(len(axes[n])):
                gain = sum(
                    1
                    for m, mv in row.items()
                    if ((m, mv, n, v) if names.index(m) < names.index(n) else (n, v, m, mv)) in uncovered
                )
                if gain > best_gain:
                    best, best_gain = [v], gain
                elif gain == best_gain:
                    best.append(v)
            row[n] = rng.choice(best)
        cover(row)
        rows.append(row)
    while uncovered:
        a, i, b, j = min(uncovered)
        row = {n: rng.randrange(len(axes[n])) for n in names}
        row[a], row[b] = i, j
        cover(row)
        rows.append(row)
    return [{n: axes[n][row[n]] for n in names} for row in rows]


def _tensors(gen: torch.Generator, B: int, T: int) -> dict:
    f64 = torch.float64
    response_lens = torch.randint(1, T + 1, (B,), generator=gen)
    response_lens[0] = T  # at least one full-length row
    prompt_lens = torch.randint(1, 4, (B,), generator=gen)
    pos = torch.arange(T).expand(B, T)
    mask = pos < response_lens[:, None]
    holes = torch.rand(B, T, generator=gen) < 0.15
    holes[0] = False
    mask = mask & ~holes
    dead = 1 + int(torch.randint(0, B - 1, (1,), generator=gen))  # one fully masked row (never row 0)
    mask[dead] = False
    logp = -(torch.rand(B, T, generator=gen, dtype=f64) * 2.5 + 0.02)
    old_logp = (logp + 0.25 * torch.randn(B, T, generator=gen, dtype=f64)).clamp(max=-1e-3)
    ref_logp = (logp + 0.4 * torch.randn(B, T, generator=gen, dtype=f64)).clamp(max=-1e-3)
    adv = torch.randn(B, 1, generator=gen, dtype=f64).expand(B, T).clone()
    adv[int(torch.randint(0, B, (1,), generator=gen))] = 0.0
    token_noise = torch.rand((), generator=gen) < 0.5
    if token_noise:
        adv = adv + 0.3 * torch.randn(B, T, generator=gen, dtype=f64)
    entropy = torch.rand(B, T, generator=gen, dtype=f64) * 2.0
    isw = torch.exp(0.3 * torch.randn(B, T, generator=gen, dtype=f64)).clamp(max=2.0)
    # past response_lens verl sees 0 for log-probs/entropy and padded zeros in the data tensors
    valid = pos < response_lens[:, None]
    z = torch.zeros((), dtype=f64)
    return {
        "logp": torch.where(valid, logp, z),
        "entropy": torch.where(valid, entropy, z),
        "old_logp": torch.where(valid, old_logp, z),
        "ref_logp": torch.where(valid, ref_logp, z),
        "advantages": torch.where(valid, adv, z),
        "mask": mask,
        "rollout_is_weights": torch.where(valid, isw, z),
        "prompt_lens": prompt_lens.long(),
        "response_lens": response_lens.long(),
    }


def _normalizer_value(spec, tok: int, rows: int):
    if spec is None or isinstance(spec, int):
        return spec
    table = {"tok": tok, "rows": rows, "2tok+1": 2 * tok + 1, "2rows": 2 * rows, "3tok": 3 * tok, "3rows+1": 3 * rows + 1}
    return table[spec]


def all_cases(seed: int = 0, B: int = 6, T: int = 7):
    """Yield small random cases: the full product loss-mode config x loss_agg_mode x KL option,
    with entropy option, kl_loss_coef, rollout_is_weights and the normalizers assigned so that
    every pair of values of any two axes appears. Deterministic in ``seed``."""
    axes = {
        "mode": MODE_CONFIGS,
        "agg": AGG_MODES,
        "kl": KL_OPTIONS,
        "entropy": ENTROPY_OPTIONS,
        "kl_coef": KL_COEFS,
        "isw": IS_WEIGHTS_OPTIONS,
        "norm": NORMALIZERS,
    }
    rows = _pairwise_rows(axes, ("mode", "agg", "kl"), random.Random(seed))
    for idx, row in enumerate(rows):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        t = _tensors(gen, B, T)
        mode_name, actor_kw, pl_kw = row["mode"]
        ent_name, ent_coeff = row["entropy"]
        norm_name, (dp, bnt, gbs, lsf) = row["norm"]
        tok, nrows = int(t["mask"].sum()), B
        case = {
            "name": f"{idx}:{mode_name}|{row['agg']}|kl={row['kl']}|ent={ent_name}|isw={int(row['isw'])}|{norm_name}",
            "logp": t["logp"],
            "entropy": None if ent_coeff is None else t["entropy"],
            "old_logp": t["old_logp"],
            "ref_logp": None if row["kl"] == "off" else t["ref_logp"],
            "advantages": t["advantages"],
            "mask": t["mask"],
            "rollout_is_weights": t["rollout_is_weights"] if row["isw"] else None,
            "prompt_lens": t["prompt_lens"],
            "response_lens": t["response_lens"],
            "loss_agg_mode": row["agg"],
            "entropy_coeff": 0.0 if ent_coeff is None else ent_coeff,
            "use_kl_loss": row["kl"] != "off",
            "kl_loss_type": "low_var_kl" if row["kl"] == "off" else row["kl"],
            "kl_loss_coef": row["kl_coef"],
            "loss_scale_factor": lsf,
            "dp_size": dp,
            "batch_num_tokens": _normalizer_value(bnt, tok, nrows),
            "global_batch_size": _normalizer_value(gbs, tok, nrows),
            "policy_loss": {"loss_mode": "vanilla", **_copy(pl_kw)},
            "seed": idx,
            **actor_kw,
        }
        yield case


def _copy(d: dict) -> dict:
    return {k: (_copy(v) if isinstance(v, dict) else v) for k, v in d.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .pt file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_verl_version()
    cases, results = [], []
    nonfinite = 0
    for case in all_cases(args.seed):
        res = verl_ppo_loss_reference(case)
        if not math.isfinite(float(res["loss"])):
            nonfinite += 1
        cases.append(case)
        results.append(res)
    torch.save(
        {
            "verl_version": str(verl.__version__),
            "torch_version": str(torch.__version__),
            "seed": args.seed,
            "loss_modes": list(LOSS_MODES),
            "cases": cases,
            "results": results,
        },
        args.out,
    )
    covered = sorted({c["policy_loss"]["loss_mode"] for c in cases})
    missing = sorted(set(LOSS_MODES) - set(covered))
    print(f"{len(cases)} cases, {nonfinite} with a non-finite loss, loss modes {covered} -> {args.out}")
    if missing:
        print(f"loss modes registered by verl but not in the grid: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

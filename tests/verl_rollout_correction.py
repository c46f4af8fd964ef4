"""verl 0.9.1's rollout correction and bypass_mode loss on a grid of small cases (not a test module).

Runs only where verl is installed (its own venv: verl pins transformers<5.11 and ships a top-level
``tests`` package). ``tests/test_rollout_correction.py`` runs it through ``GRPO_KERNELS_VERL_PYTHON``
and compares ``grpo_kernels.rollout_correction`` / ``objective.objective_loss`` / ``grpo_loss`` with
what it writes::

    python tests/verl_rollout_correction.py OUT.pt

``OUT.pt`` (``torch.load(..., weights_only=True)``: tensors, numbers, strings, None, lists, dicts):

- ``direct``: verl's ``compute_policy_loss_bypass_mode`` (the policy term alone, float64, bool
  response mask as ``ppo_loss`` hands it over) for every rollout_is x threshold form x
  batch_normalize x rollout_rs option x bypass loss_type x loss_agg_mode, with the loss, its
  gradient with respect to ``logp``, and ``compute_rollout_correction_and_rejection_mask``'s IS
  weights and modified mask;
- ``full``: verl's whole ``ppo_loss`` (KL and entropy terms included) for a subset, through
  ``tests/verl_reference.py`` when that file is importable (empty otherwise);
- ``specs``: (rollout_rs, rollout_rs_threshold) pairs and whether verl's rejection accepts them.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import verl
from verl.trainer.config import RolloutCorrectionConfig
from verl.trainer.ppo import core_algos, rollout_corr_helper
from verl.workers.config import ActorConfig, PolicyLossConfig

VERL_VERSION = "0.9.1"
B, T, H, V = 6, 7, 8, 13
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOSS_TYPES = ("ppo_clip", "reinforce")
#: (rollout_is, rollout_is_threshold as verl takes it): truncation (float or float string) and IcePop
IS_CONFIGS = (
    (None, 2.0),
    ("token", 1.3),
    ("token", "0.8_1.3"),
    ("sequence", 1.5),
    ("sequence", "0.5_2.0"),
)
#: (rollout_rs, rollout_rs_threshold as verl takes it) with thresholds that reject part of the grid's
#: tokens / sequences; every option of SUPPORTED_ROLLOUT_RS_OPTIONS, both k1 forms, numeric specs,
#: a chain with one threshold each and a chain (with a repeat) sharing one threshold
RS_CONFIGS = (
    (None, None),
    ("token_k1", "0.75_1.3"),
    ("token_k1", 1.35),
    ("token_k2", 0.03),
    ("token_k3", "0.03"),
    ("seq_sum_k1", "0.5_2.0"),
    ("seq_sum_k2", 0.15),
    ("seq_sum_k3", "0.15"),
    ("seq_mean_k1", "1.1"),
    ("seq_mean_k2", 0.03),
    ("seq_mean_k3", "0.03"),
    ("seq_max_k2", 0.08),
    ("seq_max_k3", "0.08"),
    ("token_k1,seq_mean_k3", "0.7_1.5,0.04"),
    ("seq_mean_k2, seq_max_k3,seq_mean_k2", "0.1"),
)
#: (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor): "tok" / "rows" are the case's
#: valid-token count / row count
NORMALIZERS = ((1, None, None, None), (2, "2tok+1", "2rows+1", 5.0))
#: bypass_mode's options against which verl's rejection is checked (accept or raise)
SPECS = (
    ("token_k1", "0.5_2.0"), ("token_k1", "2.0"), ("token_k1", "0.5"), ("token_k1", "2_0.5"), ("token_k1", "0_2"),
    ("token_k1", "-1_2"), ("token_k1", "a_2"), ("token_k1", "inf"), ("token_k1", "0.5_inf"), ("token_k1", ""),
    ("token_k1", " , "), ("token_k2", "0.5_2.0"), ("token_k2", "0"), ("token_k2", "-0.1"), ("token_k2", "x"),
    ("token_k2", "inf"), ("token_k2", "1e-3"), ("token_k3", " 0.2 "), ("seq_sum_k1", "0.1_10"),
    ("seq_mean_k2", "0.1,0.2"), ("token_k1,seq_mean_k3", "0.5_2,0.1"), ("token_k1,seq_mean_k3", "0.5_2"),
    ("token_k1,seq_mean_k3", "0.5_2,0.1,0.3"), ("token_k1,token_k1", "0.5_2,0.1"), ("token_k1,token_k1", "0.5_2"),
    ("token_k4", "0.1"), ("seq_max_k1", "0.5_2"), ("", "0.1"), (" , ", "0.1"), ("token_k2,", "0.1"),
    ("Token_k2", "0.1"), ("token_k2 ,seq_sum_k2", " 0.1 , 0.2 "),
)


def check_verl_version() -> None:
    if verl.__version__ != VERL_VERSION:
        raise RuntimeError(f"verl_rollout_correction.py is written against verl {VERL_VERSION}, "
                           f"found {verl.__version__}")


def make_tensors(seed: int) -> dict:
    """Random float64 inputs: a tiny lm head (so grpo_loss can recompute logp), the rollout's
    log-probs near logp, [B, T] advantages, a bool mask with holes and one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    hidden = 0.8 * torch.randn(B, T, H, generator=g, dtype=f64)
    weight = 0.6 * torch.randn(V, H, generator=g, dtype=f64)
    targets = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).expand(B, T) < lengths[:, None]
    mask &= ~(torch.rand(B, T, generator=g) < 0.15)
    mask[0] = True
    mask[int(torch.randint(1, B, (1,), generator=g))] = False
    rollout = logp + 0.25 * torch.randn(B, T, generator=g, dtype=f64)
    adv = torch.randn(B, 1, generator=g, dtype=f64) + 0.3 * torch.randn(B, T, generator=g, dtype=f64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=f64)
    entropy = 2.0 * torch.rand(B, T, generator=g, dtype=f64)
    return dict(hidden=hidden, weight=weight, targets=targets, logp=logp, rollout_logp=rollout, advantages=adv,
                mask=mask, ref_logp=ref, entropy=entropy)


def _normalizers(spec, mask: torch.Tensor) -> dict:
    dp, bnt, gbs, lsf = spec
    tok, rows = int(mask.sum()), mask.shape[0]
    table = {"2tok+1": 2 * tok + 1, "2rows+1": 2 * rows + 1}
    return dict(dp_size=dp, batch_num_tokens=table.get(bnt, bnt), global_batch_size=table.get(gbs, gbs),
                loss_scale_factor=lsf)


def rollout_correction(case: dict) -> dict:
    return dict(rollout_is=case["rollout_is"], rollout_is_threshold=case["rollout_is_threshold"],
                rollout_is_batch_normalize=case["rollout_is_batch_normalize"], rollout_rs=case["rollout_rs"],
                rollout_rs_threshold=case["rollout_rs_threshold"], loss_type=case["loss_type"], bypass_mode=True)


def actor_config(case: dict) -> ActorConfig:
    config = ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=case["clip_ratio_low"], clip_ratio_high=case["clip_ratio_high"],
        clip_ratio_c=case["clip_ratio_c"], loss_agg_mode=case["loss_agg_mode"],
        loss_scale_factor=case["loss_scale_factor"],
        policy_loss=PolicyLossConfig(loss_mode="bypass_mode",
                                     rollout_correction=RolloutCorrectionConfig(**rollout_correction(case))),
    )
    config.global_batch_info.update(dp_size=case["dp_size"], batch_num_tokens=case["batch_num_tokens"],
                                    global_batch_size=case["global_batch_size"],
                                    loss_scale_factor=case["loss_scale_factor"])
    return config


def direct_cases():
    idx = 0
    for is_level, is_threshold in IS_CONFIGS:
        for batch_normalize in ((False,) if is_level is None else (False, True)):
            for rs, rs_threshold in RS_CONFIGS:
                for loss_type in LOSS_TYPES:
                    for agg in AGG_MODES:
                        t = make_tensors(1000 + idx)
                        case = dict(
                            name=f"{idx}:is={is_level}@{is_threshold}|bn={int(batch_normalize)}|rs={rs}@{rs_threshold}"
                                 f"|{loss_type}|{agg}",
                            rollout_is=is_level, rollout_is_threshold=is_threshold,
                            rollout_is_batch_normalize=batch_normalize, rollout_rs=rs,
                            rollout_rs_threshold=rs_threshold, loss_type=loss_type, loss_agg_mode=agg,
                            clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=(3.0, 1.5)[idx % 2],
                            **_normalizers(NORMALIZERS[(idx // 2) % len(NORMALIZERS)], t["mask"]), **t,
                        )
                        yield case
                        idx += 1


def run_direct(case: dict) -> dict:
    config = actor_config(case)
    logp = case["logp"].clone().requires_grad_(True)
    loss, _ = core_algos.compute_policy_loss_bypass_mode(
        old_log_prob=case["rollout_logp"], log_prob=logp, advantages=case["advantages"],
        response_mask=case["mask"], loss_agg_mode=case["loss_agg_mode"], config=config)
    (grad,) = torch.autograd.grad(loss, logp, allow_unused=True)
    weights, modified, _ = rollout_corr_helper.compute_rollout_correction_and_rejection_mask(
        old_log_prob=case["logp"], rollout_log_prob=case["rollout_logp"], response_mask=case["mask"],
        rollout_is=case["rollout_is"], rollout_is_threshold=case["rollout_is_threshold"],
        rollout_is_batch_normalize=case["rollout_is_batch_normalize"], rollout_rs=case["rollout_rs"],
        rollout_rs_threshold=case["rollout_rs_threshold"])
    return dict(loss=loss.detach().reshape(()), grad_logp=torch.zeros_like(logp) if grad is None else grad,
                is_weights=None if weights is None else weights.batch["rollout_is_weights"].clone(),
                effective_mask=modified.clone())


def full_cases(direct: list):
    """A subset of the direct grid with verl's whole ppo_loss: KL (low_var_kl or k1) and entropy."""
    for i, case in enumerate(direct):
        if i % 9:
            continue
        full = {k: case[k] for k in ("name", "logp", "rollout_logp", "advantages", "mask", "ref_logp", "entropy",
                                      "loss_agg_mode", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c",
                                      "loss_scale_factor", "dp_size", "batch_num_tokens", "global_batch_size")}
        full.update(entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.1,
                    kl_loss_type=("low_var_kl", "k1")[(i // 9) % 2], rc=rollout_correction(case))
        yield full


def run_full(case: dict, reference) -> dict:
    ref_case = {
        "logp": case["logp"], "entropy": case["entropy"], "old_logp": case["rollout_logp"],
        "ref_logp": case["ref_logp"], "advantages": case["advantages"], "mask": case["mask"],
        "rollout_is_weights": None,
        **{k: case[k] for k in ("loss_agg_mode", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c",
                                "loss_scale_factor", "entropy_coeff", "use_kl_loss", "kl_loss_coef", "kl_loss_type",
                                "dp_size", "batch_num_tokens", "global_batch_size")},
        "policy_loss": {"loss_mode": "bypass_mode", "rollout_correction": dict(case["rc"])},
    }
    res = reference.verl_ppo_loss_reference(ref_case)
    return dict(loss=res["loss"], grad_logp=res["grad_logp"], grad_entropy=res["grad_entropy"])


def run_specs() -> list:
    lr = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = []
    for rs, threshold in SPECS:
        try:
            rollout_corr_helper.compute_rollout_rejection_mask(lr, mask, rollout_rs=rs, rollout_rs_threshold=threshold)
            error = None
        except Exception as exc:  # noqa: BLE001 -- which exception verl raises is the datum
            error = type(exc).__name__
        out.append(dict(rollout_rs=rs, rollout_rs_threshold=threshold, verl_error=error))
    return out


def _import_reference():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import verl_reference
    except ImportError as exc:
        print(f"tests/verl_reference.py not importable ({exc}): no full ppo_loss cases", file=sys.stderr)
        return None
    return verl_reference if hasattr(verl_reference, "verl_ppo_loss_reference") else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .pt file to write")
    args = parser.parse_args(argv)
    check_verl_version()
    direct = list(direct_cases())
    direct_results = [run_direct(c) for c in direct]
    reference = _import_reference()
    full = list(full_cases(direct)) if reference is not None else []
    full_results = [run_full(c, reference) for c in full]
    torch.save(dict(verl_version=verl.__version__, torch_version=str(torch.__version__), direct=direct,
                    direct_results=direct_results, full=full, full_results=full_results, specs=run_specs()),
               args.out)
    print(f"{len(direct)} direct cases, {len(full)} full ppo_loss cases, {len(SPECS)} specs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

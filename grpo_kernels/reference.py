"""The oracle: plain torch, materialized logits, TRL 1.16 ``GRPOTrainer._compute_loss`` line by line.

verl's objectives (``policy_loss`` / ``loss_agg_mode`` set) are the one exception: their oracle is
``objective.objective_loss`` on the materialized log-probs, itself tested against verl 0.9.1's
``ppo_loss`` (tests/test_integrations_verl.py, with tests/verl_reference.py).

Runs in whatever dtype it is given (tests use float64). Deliberately naive and
independent of ``objective.py``: it is what every fast path is tested against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from grpo_kernels.options import GRPOOptions


def reference_logits(hidden, weight, bias=None, temperature=1.0, logit_softcap=None):
    """[..., V] logits: lm_head, then Gemma-2 softcapping, then temperature."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    return logits / temperature


def reference_token_logprobs(hidden, weight, targets, bias=None, temperature=1.0, logit_softcap=None):
    """(logps, entropy), each shaped like ``targets``, from materialized logits."""
    logits = reference_logits(hidden, weight, bias, temperature, logit_softcap)
    # logits - logsumexp, as TRL's selective_log_softmax does for fp32/fp64, not
    # torch.log_softmax: on the CPU log_softmax sums exp() in one vectorized sequential chain,
    # whose rounding error grows with V (float64: 1744 ulp-units of 2^-53 at V=63k, 5584 at
    # V=300k, for near-constant softcapped logits), while logsumexp's cascade sum stays within
    # ~16 (the kernels are as close). The oracle must be the most accurate thing in the test.
    logsm = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    logps = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = logsm.exp()
    entropy = -(probs * logsm).sum(-1)
    return logps, entropy



def reference_token_statistics(hidden, weight, targets, bias=None, temperature=1.0, logit_softcap=None):
    """(logps, entropy, sum_pi_squared), each shaped like ``targets``, from materialized logits:
    ``sum_pi_squared = sum_v softmax(u)_v ** 2``, as ``exp(2 * log_softmax(u))`` summed."""
    logits = reference_logits(hidden, weight, bias, temperature, logit_softcap)
    logsm = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    logps = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logps, entropy, (2.0 * logsm).exp().sum(-1)


def reference_topk_forward_kl(hidden, weight, ids, teacher_logps, bias=None, temperature=1.0, logit_softcap=None,
                              log_prob_min_clamp=None):
    """(losses, student_mass, teacher_mass) of verl's top-k forward KL (``topk_distill``) from
    materialized logits: ids / teacher_logps [..., K]."""
    logits = reference_logits(hidden, weight, bias, temperature, logit_softcap)
    ls = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).gather(-1, ids)
    student_mass, teacher_mass = ls.exp().sum(-1), teacher_logps.exp().sum(-1)
    if log_prob_min_clamp is not None:
        ls, teacher_logps = ls.clamp_min(log_prob_min_clamp), teacher_logps.clamp_min(log_prob_min_clamp)
    return (teacher_logps.exp() * (teacher_logps - ls)).sum(-1), student_mass, teacher_mass

def _high_entropy_mask(entropies, mask, threshold):
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    masked_entropies = entropies * mask.float()
    return (masked_entropies >= entropy_threshold) & mask.bool()


def reference_grpo_loss(
    hidden,
    weight,
    targets,
    advantages,
    mask,
    old_logps=None,
    ref_logps=None,
    *,
    bias=None,
    importance_sampling_ratio=None,
    sampling_logps=None,
    num_items_in_batch=None,
    num_sequences_in_batch=None,
    options: Optional[GRPOOptions] = None,
    return_metrics: bool = False,
    ref_hidden=None,
    ref_weight=None,
    ref_bias=None,
    **option_overrides,
):
    """TRL's loss from hidden states. Same arguments as ``grpo_kernels.grpo_loss``; the loss
    options as a ``GRPOOptions`` and/or keywords (execution settings are accepted and ignored).
    ``kl_estimator="full"``: the exact KL from the reference's materialized logits (``ref_hidden``
    [B, T, H_r], ``ref_weight`` [V, H_r], ``ref_bias``; ``reference_exact_kl``) in place of k3."""
    for name in ("backend", "chunk_size", "deterministic", "batch_invariant"):
        option_overrides.pop(name, None)
    o = (options or GRPOOptions()).replace(**option_overrides) if option_overrides else (options or GRPOOptions())
    eps_low, eps_high = o.epsilon_low, o.eps_high
    mask = mask.to(hidden.dtype)
    per_token_logps, entropies = reference_token_logprobs(
        hidden, weight, targets, bias, o.temperature, o.logit_softcap
    )
    exact_kl = o.kl_estimator == "full" and o.beta != 0.0
    if exact_kl:
        exact = reference_exact_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, o.temperature,
                                   o.logit_softcap)
    if o.verl_style:
        from grpo_kernels import objective

        inputs = objective.LossInputs(
            mask=mask, adv=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages, old=old_logps,
            ref=ref_logps, is_ratio=importance_sampling_ratio, num_items=num_items_in_batch,
            num_sequences=num_sequences_in_batch)
        loss = objective.objective_loss(per_token_logps, entropies, inputs, o.without_exact_kl())
        kl_mean = None
        if exact_kl:  # verl's aggregation of the KL term: loss_agg_mode's weights, mask-only
            kl_weights = objective.objective_weights(mask, o, hidden.dtype, num_items_in_batch,
                                                     num_sequences_in_batch).kl
            loss = loss + o.beta * (exact * kl_weights).sum()
            kl_mean = (exact.detach() * mask).sum() / mask.sum().clamp(min=1.0)
        if not return_metrics:
            return loss
        m = mask.sum().clamp(min=1.0)
        return loss, {"logps": per_token_logps.detach(), "entropy": entropies.detach(),
                      "entropy_mean": (entropies.detach() * mask).sum() / m, "kl_mean": kl_mean,
                      "kl": exact.detach() if exact_kl else None}

    if o.top_entropy_quantile < 1.0:
        entropy_mask = _high_entropy_mask(entropies.detach(), mask, 1 - o.top_entropy_quantile)
    else:
        entropy_mask = None

    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_per_token_logps = per_token_logps.detach() if old_logps is None else old_logps
    if o.off_policy_mask_threshold is not None:
        sampling = old_per_token_logps if sampling_logps is None else sampling_logps
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= o.off_policy_mask_threshold)).to(mask.dtype)

    log_ratio = per_token_logps - old_per_token_logps
    if o.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)

    if exact_kl:
        per_token_kl = exact
    elif o.beta != 0.0:
        per_token_kl = torch.exp(ref_logps - per_token_logps) - (ref_logps - per_token_logps) - 1
        if o.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    if o.loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif o.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if o.delta is not None:
            coef_1 = torch.clamp(coef_1, max=o.delta)
        per_token_loss1 = coef_1 * advantages
        per_token_loss2 = coef_2 * advantages
        per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    elif o.loss_type == "sapo":
        temperatures = torch.where(advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        soft_coef_1 = torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures
        per_token_loss = -soft_coef_1 * advantages
    elif o.loss_type == "vespo":
        with torch.no_grad():  # TRL's get_gamma_weights
            lower_clamp = math.log(1e-8)
            seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
            if importance_sampling_ratio is not None:
                log_is = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
                seq_log_ratio = seq_log_ratio + torch.sum(log_is, dim=-1, keepdim=True)
            log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
            w_seq = torch.exp(log_w_seq)
            nonneg = advantages >= 0
            k_seq = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg)
            lambda_seq = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).clamp(min=1e-4)
            phi_seq = torch.exp(lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq)
            phi_seq = phi_seq.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * advantages * per_token_logps
    else:
        raise ValueError(o.loss_type)

    if o.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and o.loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if o.beta != 0.0:
        per_token_loss = per_token_loss + o.beta * per_token_kl

    if o.loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif o.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif o.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * o.max_completion_length)
    elif o.loss_type in ["cispo", "dapo", "vespo"]:
        n = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).to(hidden.dtype)
        loss = (per_token_loss * mask).sum() / n.clamp(min=1.0)
    else:  # luspo
        loss = (per_token_loss * mask).sum(-1).mean()
    if o.entropy_coef != 0.0:  # TRL's entropy bonus: a mean over the effective mask
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - o.entropy_coef * (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)

    if not return_metrics:
        return loss

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    metrics = {
        "logps": per_token_logps.detach(),
        "entropy": entropies.detach(),
        "entropy_mean": global_masked_mean(entropies.detach()),
        "kl_mean": global_masked_mean(per_token_kl.detach()) if o.beta != 0.0 else None,
        "kl": per_token_kl.detach() if exact_kl else None,  # the exact KL per token
    }
    if o.loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
        metrics["clip_ratio_low"] = global_masked_mean(is_low.to(hidden.dtype))
        metrics["clip_ratio_high"] = global_masked_mean(is_high.to(hidden.dtype))
        metrics["clip_ratio_region"] = global_masked_mean((is_low | is_high).to(hidden.dtype))
        for key, x in (("seq_clip_ratio_low", is_low), ("seq_clip_ratio_high", is_high)):  # TRL's masked_seq_mean
            x = x.to(hidden.dtype)
            metrics[key] = x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)
    elif o.loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > eps_high) & (advantages > 0)).to(hidden.dtype))
    return loss, metrics


def reference_exact_kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, temperature=1.0, logit_softcap=None):
    """[..., ] per-token KL(pi_theta || pi_ref) = sum_v p_v (log p_v - log q_v) over the materialized
    vocabulary, both heads' logits softcapped and divided by the temperature (the policy's), the
    reference's in its own dtype, then in the policy's; differentiable in the policy only."""
    logits = reference_logits(hidden, weight, bias, temperature, logit_softcap)
    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    with torch.no_grad():
        ref_logits = reference_logits(ref_hidden, ref_weight, ref_bias, temperature, logit_softcap).to(log_p.dtype)
        log_q = ref_logits - torch.logsumexp(ref_logits, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# ---------------------------------------------------------------- distillation (TRL 1.16's DistillationTrainer)


def _distill_logits(hidden, weight, bias, scale, softcap, temperature):
    """One head's [..., V] logits as TRL's chunked divergence transforms them: scale, softcap, temperature."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def reference_distill_loss(hidden, weight, teacher_hidden, teacher_weight, mask, *, beta=1.0, temperature=1.0,
                           bias=None, teacher_bias=None, logit_scale=1.0, teacher_logit_scale=1.0,
                           logit_softcap=None, teacher_logit_softcap=None, num_items_in_batch=None,
                           return_metrics=False):
    """TRL's ``_chunked_divergence_loss`` on materialized [B, T, V] logits, by the definitions:
    the generalized JSD ``beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = (1 - beta) p + beta q``
    (p the student's distribution, q the teacher's), KL(q || p) at beta 0 and KL(p || q) at 1;
    the masked sum over ``mask != 0`` / ``num_items_in_batch`` (None: the count, clamped at 1).
    Gradients (autograd) reach the student only; runs in the inputs' dtype (tests: float64).
    ``return_metrics``: also a dict of ``divergence``, ``entropy`` [B, T] (0 where masked),
    ``entropy_sum`` and ``n_valid``."""
    log_p = _distill_logits(hidden, weight, bias, logit_scale, logit_softcap, temperature)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    with torch.no_grad():
        log_q = _distill_logits(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale,
                                teacher_logit_softcap, temperature).to(log_p.dtype)
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0.0:
        divergence = (q * (log_q - log_p)).sum(-1)
    elif beta == 1.0:
        divergence = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.log((1 - beta) * p + beta * q)
        divergence = beta * (q * (log_q - log_m)).sum(-1) + (1 - beta) * (p * (log_p - log_m)).sum(-1)
    valid = mask != 0
    n_valid = valid.sum()
    loss = torch.where(valid, divergence, torch.zeros_like(divergence)).sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        loss = loss / torch.as_tensor(num_items_in_batch).to(loss.dtype)
    if not return_metrics:
        return loss
    entropy = torch.where(valid, -(p * log_p).sum(-1), torch.zeros_like(divergence)).detach()
    return loss, {"divergence": torch.where(valid, divergence, torch.zeros_like(divergence)).detach(),
                  "entropy": entropy, "entropy_sum": entropy.sum(), "n_valid": n_valid}

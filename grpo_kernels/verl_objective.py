"""verl 0.9.1's policy terms (``policy_loss``): the per-token loss matrices of ``get_policy_loss_fn``.

``verl_policy`` is the one entry point; the composable objective (``grpo_kernels.objective``)
aggregates what it returns with ``loss_agg_mode``'s weights and adds the KL and entropy terms.
``verl_count`` and ``masked_mean`` are verl's own counting conventions (its ``+ 1e-8``), which the
aggregation weights share.
"""
from __future__ import annotations

import torch

from grpo_kernels.options import GRPOOptions


def verl_count(mask: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """verl's ``mask.sum(dim) + 1e-8`` for its bool masks: an integer count plus a Python float is
    float32 there, so the 1e-8 vanishes for any count >= 1 (exactly the count, below 2**24 tokens)
    and stays only for an empty row. Hence the count clamped at 1e-8, in the mask's float dtype:
    the same for a bool and a 0/1 float mask."""
    m = mask if mask.is_floating_point() else mask.to(torch.float64)
    count = m.sum() if dim is None else m.sum(dim, keepdim=keepdim)
    return count.clamp(min=1e-8)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """verl's ``masked_mean``: sum(x * mask) / (sum(mask) + 1e-8)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / verl_count(mask).to(x.dtype) if dim is None else \
        (x * m).sum(dim) / verl_count(mask, dim).to(x.dtype)


def _ratio20(logp, old):
    lr = torch.clamp(logp - old, min=-20.0, max=20.0)
    return torch.exp(lr)


def verl_policy(logp, old, adv, mask, is_ratio, options: GRPOOptions):
    """verl 0.9.1's ``get_policy_loss_fn(policy_loss)`` per-token loss matrix (rollout IS weights
    applied), or for geo_mean the aggregated scalar. Returns (loss, aggregated, effective mask)."""
    pl = options.policy_loss
    lo, hi = options.epsilon_low, options.eps_high
    A = adv
    scale = is_ratio

    def scaled(x):
        return x if scale is None else x * scale

    if pl == "vanilla":
        return scaled(_dual_clip(logp, old, A, lo, hi, options.clip_ratio_c)), False, mask
    if pl in ("dppo_tv", "dppo_kl"):
        ratio = _ratio20(logp, old)
        truncated = torch.clamp(ratio, max=options.clip_ratio_c).detach()
        prob, old_prob = torch.exp(logp), torch.exp(old)
        if pl == "dppo_tv":
            valid_pos = (prob - old_prob) <= hi
            valid_neg = (prob - old_prob) >= -lo
        else:
            bkl = old_prob * (old - logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            valid_pos = (bkl <= hi) | (prob <= old_prob)
            valid_neg = (bkl <= lo) | (prob >= old_prob)
        valid = torch.where(A > 0, valid_pos, valid_neg).detach().to(logp.dtype)
        return scaled(-A * truncated * logp * valid), False, mask
    if pl == "gspo":
        m = mask.to(logp.dtype)
        seq = ((logp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
        log_sir = torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0)
        sir = torch.exp(log_sir)
        pg = torch.maximum(-A * sir, -A * torch.clamp(sir, 1 - lo, 1 + hi))
        return scaled(pg), False, mask
    if pl == "sapo":
        ratio = _ratio20(logp, old)
        # verl makes its taus tensors of the advantages' dtype (TRL leaves Python floats to torch.where,
        # i.e. float32): 1.05 differs by 4e-8 between the two
        tau = torch.where(A > 0, torch.as_tensor(options.sapo_temperature_pos, dtype=A.dtype, device=A.device),
                          torch.as_tensor(options.sapo_temperature_neg, dtype=A.dtype, device=A.device))
        return scaled(-(torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)) * A), False, mask
    if pl == "gpg":
        return scaled(-logp * A), False, mask
    if pl == "dro":
        lr = logp - old
        return scaled(-(logp * A - 0.5 * options.dro_beta * lr.square())), False, mask
    if pl == "cispo":
        clipped = torch.clamp(_ratio20(logp, old), 1 - lo, 1 + hi).detach()
        return scaled(-clipped * A * logp), False, mask
    if pl == "clip_cov":
        return scaled(_clip_cov(logp, old, A, mask, options)), False, mask
    if pl == "kl_cov":
        return scaled(_kl_cov(logp, old, A, mask, options)), False, mask
    if pl == "geo_mean":
        return _geo_mean(logp, old, A, mask, is_ratio, lo, hi), True, mask
    if pl == "bypass_mode":
        return _bypass(logp, old, A, mask, options)
    raise ValueError(f"unknown policy_loss {pl!r}")


def _bypass(logp, old, A, mask, options):
    """verl's ``compute_policy_loss_bypass_mode``: (per-token loss [B, T], False, effective mask).

    ``old`` holds the rollout's log-probs; the IS weights and the rejection mask come from
    ``rollout_correction.correction`` on the detached log ratio. The loss is 0 at rejected tokens
    already (so a token-scope evaluation, aggregated with the original mask's weights, gets the same
    sum); on flat [n] inputs (a token-scope selection) only token-local work is done.
    """
    from grpo_kernels import rollout_correction

    if logp.dim() == 1 and rollout_correction.scope(options) != "token":
        raise RuntimeError(f"bypass_mode on a flat token selection needs a token-scope objective, "
                           f"got scope {rollout_correction.scope(options)!r}")
    w, rs_keep, effective = rollout_correction.correction(logp.detach() - old, mask, options,
                                                          with_weights=rollout_correction.uses_weights(options))
    if options.bypass_loss_type == "ppo_clip":  # the ratio to the rollout policy is its own IS correction
        per_token = _dual_clip(logp, old, A, options.epsilon_low, options.eps_high, options.clip_ratio_c)
    else:  # reinforce
        per_token = -A * logp if w is None else -A * logp * w
    if rs_keep is not None:
        per_token = torch.where(rs_keep, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    return per_token, False, effective


def _dual_clip(logp, old, A, lo, hi, c):
    ratio = _ratio20(logp, old)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - lo, 1 + hi)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-A * c, clip1)
    return torch.where(A < 0, clip2, clip1)


def _clip_cov(logp, old, A, mask, options):
    """Clip-Cov: PPO-clip with a random ``clip_cov_ratio`` share of the tokens whose covariance of
    advantage and log-prob lies in (lb, ub) excluded. The share is drawn with ``torch.randperm`` on
    the default CPU generator, as verl draws it: seed it to reproduce a call."""
    lo, hi = options.epsilon_low, options.eps_high
    ratio = torch.exp(logp - old)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - lo, 1 + hi)
    valid = mask > 0
    clip_by_origin = (pg2 > pg1) & valid
    A_full = A.expand_as(logp)
    cov = (A_full - masked_mean(A_full, mask)) * (logp.detach() - masked_mean(logp.detach(), mask))
    cov = cov.masked_fill(~valid | clip_by_origin, -torch.inf)
    clip_num = max(int(options.clip_cov_ratio * float(mask.sum())), 1)
    idx = torch.nonzero((cov < options.clip_cov_ub) & (cov > options.clip_cov_lb) & valid)
    corr = torch.ones_like(logp)
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[: min(clip_num, len(idx))]]
        corr[idx[:, 0], idx[:, 1]] = 0
    return torch.maximum(pg1, pg2) * corr


def _kl_cov(logp, old, A, mask, options):
    """KL-Cov: policy gradient with a |log ratio| penalty on the ``kl_cov_ratio`` share of tokens of
    largest covariance of advantage and log-prob."""
    lr = logp - old
    ratio = torch.exp(lr)
    A_full = A.expand_as(logp)
    pg = -A_full * ratio
    pg_kl = -A_full * ratio + options.ppo_kl_coef * lr.abs()
    valid = mask > 0
    flat_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
    adv_v = A_full[valid].detach().reshape(-1).cpu()
    lp_v = logp[valid].detach().reshape(-1).cpu()
    if min(options.kl_cov_ratio, len(adv_v)) != 0:
        cov = (adv_v - adv_v.mean()) * (lp_v - lp_v.mean())
        top = torch.topk(cov, max(1, int(len(cov) * options.kl_cov_ratio)), largest=True).indices
        if len(top) != 0:
            pick = torch.zeros(logp.numel(), dtype=torch.bool, device=logp.device)
            pick[flat_idx[top.to(flat_idx.device)]] = True
            pg = torch.where(pick.view_as(logp), pg_kl, pg)
    return pg


def _geo_mean(logp, old, A, mask, is_ratio, lo, hi):
    """GMPO: -mean over sequences of adv_seq * exp(mean_t sign(A) min(sign(A) r_t, sign(A) clip(r_t)))."""
    m = mask.to(logp.dtype)
    nk = logp - old
    sgn = torch.sign(A)
    nk_min = sgn * torch.min(sgn * nk, sgn * torch.clamp(nk, -lo, hi))
    length = verl_count(mask, -1).to(logp.dtype)
    ratio = torch.exp((nk_min * m).sum(-1) / length)
    adv = (A.expand_as(logp) * m).sum(-1) / length
    pg = -adv * ratio
    if is_ratio is not None:
        pg = pg * torch.exp((torch.log(is_ratio.expand_as(logp) + 1e-10) * m).sum(-1) / length)
    return torch.mean(pg)

"""Invalid inputs: each gets a TypeError/ValueError naming the argument (the README table).

Also the inputs that are *valid* although unusual: junk at padding positions, non-contiguous
and expanded (stride-0) tensors, integer targets of every width, empty token_logprobs
inputs. Those must give exactly what the plain inputs give.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from support import backend_params, device_for_tests, require
from grpo_kernels import GRPOLoss, grpo_loss, token_logprobs
from grpo_kernels.backends import BackendUnavailable

DEVICE = device_for_tests()
B, T, H, V = 3, 4, 8, 11


def batch(dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False
    mask[2, 0] = True
    adv = torch.randn(B, generator=g)
    old = -3 + 0.2 * torch.randn(B, T, generator=g)
    ref = -3 + 0.2 * torch.randn(B, T, generator=g)
    d = dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, mask=mask, old_logps=old,
             ref_logps=ref)
    return {k: v.to(device) for k, v in d.items()}


def call(b, **kw):
    args = dict(b)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return grpo_loss(args["hidden"], args["weight"], args["targets"], args["advantages"], args["mask"],
                     args["old_logps"], args["ref_logps"], **kw)


def meta_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


NAN, INF = float("nan"), float("inf")
#: the exact KL's options
FULL = dict(kl_estimator="full", beta=0.1)


def ref_head(b, **overrides):
    """A reference head for the exact KL: another hidden width (6) and dtype (bf16) than the policy's."""
    g = torch.Generator().manual_seed(1)
    head = dict(ref_hidden=torch.randn(B, T, 6, generator=g).to(torch.bfloat16),
                ref_weight=torch.randn(V, 6, generator=g).to(torch.bfloat16),
                ref_bias=torch.randn(V, generator=g).to(torch.bfloat16))
    head = {k: v.to(b["hidden"].device) for k, v in head.items()}
    head.update(overrides)
    return head


def with_value(x, value, index=(0, 0)):
    x = x.clone()
    x[index] = value
    return x


# (case id, overrides of call(), expected exception, regex the message must match)
BAD = [
    # hidden
    ("hidden_not_tensor", lambda b: dict(hidden=b["hidden"].tolist()), TypeError, r"hidden must be a torch\.Tensor"),
    ("hidden_2d", lambda b: dict(hidden=b["hidden"][0]), ValueError, r"hidden must be 3-D"),
    ("hidden_4d", lambda b: dict(hidden=b["hidden"][None]), ValueError, r"hidden must be 3-D"),
    ("hidden_int", lambda b: dict(hidden=b["hidden"].long()), TypeError, r"hidden must be a floating tensor"),
    ("hidden_complex", lambda b: dict(hidden=b["hidden"].to(torch.complex64)), TypeError,
     r"hidden must be a floating tensor"),
    ("hidden_sparse", lambda b: dict(hidden=b["hidden"].cpu().to_sparse()), TypeError,
     r"hidden must be a dense \(strided\) tensor"),
    ("hidden_no_tokens", lambda b: dict(hidden=b["hidden"][:0]), ValueError, r"hidden must have at least one token"),
    ("hidden_zero_T", lambda b: dict(hidden=b["hidden"][:, :0]), ValueError, r"hidden must have at least one token"),
    ("hidden_H0", lambda b: dict(hidden=b["hidden"][..., :0], weight=b["weight"][:, :0]), ValueError,
     r"empty hidden size \(H = 0\)"),
    ("hidden_nan", lambda b: dict(hidden=with_value(b["hidden"], NAN, (0, 0, 0))), ValueError,
     r"hidden contains NaN or inf"),
    ("hidden_inf_in_padding_row", lambda b: dict(hidden=with_value(b["hidden"], INF, (2, 3, 0))), ValueError,
     r"hidden contains NaN or inf"),
    # weight
    ("weight_1d", lambda b: dict(weight=b["weight"][0]), ValueError, r"weight must be 2-D"),
    ("weight_int", lambda b: dict(weight=b["weight"].long()), TypeError, r"weight must be a floating tensor"),
    ("weight_dtype_mismatch", lambda b: dict(weight=b["weight"].double()), TypeError,
     r"weight dtype torch\.float64 must match hidden dtype"),
    ("weight_H_mismatch", lambda b: dict(weight=b["weight"][:, :-1]), ValueError, r"weight must be \[V, H\]"),
    ("weight_transposed", lambda b: dict(weight=b["weight"].t()), ValueError, r"weight must be \[V, H\]"),
    ("weight_V0", lambda b: dict(weight=b["weight"][:0]), ValueError, r"empty vocabulary \(V = 0\)"),
    ("weight_other_device", lambda b: dict(weight=meta_like(b["weight"])), ValueError,
     r"weight is on meta but hidden is on"),
    ("weight_nan", lambda b: dict(weight=with_value(b["weight"], NAN)), ValueError, r"weight contains NaN or inf"),
    ("weight_inf", lambda b: dict(weight=with_value(b["weight"], -INF)), ValueError, r"weight contains NaN or inf"),
    # bias
    ("bias_2d", lambda b: dict(bias=torch.zeros(1, V, device=DEVICE)), ValueError, r"bias must be 1-D"),
    ("bias_wrong_V", lambda b: dict(bias=torch.zeros(V + 1, device=DEVICE)), ValueError,
     r"bias must have shape \(11,\) \(\[V\]\)"),
    ("bias_dtype", lambda b: dict(bias=torch.zeros(V, dtype=torch.float64, device=DEVICE)), TypeError,
     r"bias dtype torch\.float64 must match"),
    ("bias_int", lambda b: dict(bias=torch.zeros(V, dtype=torch.int64, device=DEVICE)), TypeError,
     r"bias must be a floating tensor"),
    ("bias_other_device", lambda b: dict(bias=torch.zeros(V, device="meta")), ValueError, r"bias is on meta"),
    ("bias_inf", lambda b: dict(bias=with_value(torch.zeros(V, device=DEVICE), INF, (3,))), ValueError,
     r"bias contains NaN or inf"),
    # mask
    ("mask_1d", lambda b: dict(mask=b["mask"].reshape(-1)), ValueError, r"mask must be 2-D"),
    ("mask_shape", lambda b: dict(mask=b["mask"][:, :-1]), ValueError, r"mask must have shape \(3, 4\)"),
    ("mask_complex", lambda b: dict(mask=b["mask"].to(torch.complex64)), TypeError, r"mask must be bool or real"),
    ("mask_negative", lambda b: dict(mask=with_value(b["mask"].float(), -1.0)), ValueError, r"mask must be >= 0"),
    ("mask_nan", lambda b: dict(mask=with_value(b["mask"].float(), NAN)), ValueError, r"mask contains NaN or inf"),
    ("mask_other_device", lambda b: dict(mask=meta_like(b["mask"])), ValueError, r"mask is on meta"),
    ("mask_not_tensor", lambda b: dict(mask=b["mask"].tolist()), TypeError, r"mask must be a torch\.Tensor"),
    # targets
    ("targets_float", lambda b: dict(targets=b["targets"].float()), TypeError,
     r"targets must be an integer tensor of token ids"),
    ("targets_bool", lambda b: dict(targets=b["targets"] > 3), TypeError, r"targets must be an integer tensor"),
    ("targets_shape", lambda b: dict(targets=b["targets"][:, :-1]), ValueError, r"targets must have shape \(3, 4\)"),
    ("targets_3d", lambda b: dict(targets=b["targets"][..., None]), ValueError, r"targets must be 2-D"),
    ("targets_too_large", lambda b: dict(targets=with_value(b["targets"], V)), ValueError,
     r"targets holds token ids outside \[0, 11\) at unmasked positions"),
    ("targets_negative", lambda b: dict(targets=with_value(b["targets"], -100)), ValueError,
     r"targets holds token ids outside \[0, 11\)"),
    ("targets_other_device", lambda b: dict(targets=meta_like(b["targets"])), ValueError, r"targets is on meta"),
    # advantages
    ("advantages_int", lambda b: dict(advantages=b["advantages"].long()), TypeError,
     r"advantages must be a floating tensor"),
    ("advantages_wrong_B", lambda b: dict(advantages=torch.zeros(B + 1, device=DEVICE)), ValueError,
     r"advantages must have shape \(3,\), \(3, 1\) or \(3, 4\)"),
    ("advantages_wrong_T", lambda b: dict(advantages=torch.zeros(B, T + 1, device=DEVICE)), ValueError,
     r"advantages must have shape"),
    ("advantages_3d", lambda b: dict(advantages=torch.zeros(B, T, 1, device=DEVICE)), ValueError,
     r"advantages must be 1-D or 2-D"),
    ("advantages_nan", lambda b: dict(advantages=with_value(b["advantages"], NAN, (0,))), ValueError,
     r"advantages contains NaN or inf"),
    ("advantages_inf_padding_row", lambda b: dict(advantages=with_value(torch.zeros(B, T, device=DEVICE), INF,
                                                                          (2, 3))), ValueError,
     r"advantages contains NaN or inf"),
    ("advantages_other_device", lambda b: dict(advantages=meta_like(b["advantages"])), ValueError,
     r"advantages is on meta"),
    # rewards instead of advantages (grpo_loss(advantages=None, rewards=..., num_generations=G))
    ("advantages_and_rewards", lambda b: dict(rewards=torch.zeros(B, device=DEVICE), num_generations=1), ValueError,
     r"grpo_loss takes exactly one of advantages and rewards \(with num_generations\), got both"),
    ("neither_advantages_nor_rewards", lambda b: dict(advantages=None), ValueError,
     r"grpo_loss takes exactly one of advantages and rewards \(with num_generations\), got neither"),
    ("rewards_not_tensor", lambda b: dict(advantages=None, rewards=[1.0, 2.0, 3.0], num_generations=1), TypeError,
     r"rewards must be a torch\.Tensor, got list"),
    ("rewards_int", lambda b: dict(advantages=None, rewards=torch.zeros(B, dtype=torch.int64, device=DEVICE),
                                   num_generations=1), TypeError, r"rewards must be a floating tensor"),
    ("rewards_3d", lambda b: dict(advantages=None, rewards=torch.zeros(B, 2, 1, device=DEVICE), num_generations=1),
     ValueError, r"rewards must be 1-D or 2-D, got shape \(3, 2, 1\)"),
    ("rewards_wrong_B", lambda b: dict(advantages=None, rewards=torch.zeros(B + 1, device=DEVICE), num_generations=1),
     ValueError, r"rewards must have one row per sequence of hidden \(\[3\] or \[3, R\]\), got shape \(4,\)"),
    ("rewards_inf", lambda b: dict(advantages=None, rewards=with_value(torch.zeros(B, device=DEVICE), INF, (1,)),
                                   num_generations=1), ValueError, r"rewards contains inf"),
    ("rewards_other_device", lambda b: dict(advantages=None, rewards=torch.zeros(B, device="meta"), num_generations=1),
     ValueError, r"rewards is on meta"),
    ("rewards_without_num_generations", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE)),
     ValueError, r"num_generations is required with rewards"),
    ("num_generations_not_dividing", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE),
                                                    num_generations=2), ValueError,
     r"num_generations \(2\) must divide the batch size of rewards \(3\)"),
    ("num_generations_zero", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE),
                                            num_generations=0), ValueError, r"num_generations must be >= 1, got 0"),
    ("num_generations_float", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE),
                                             num_generations=1.5), TypeError, r"num_generations must be an int, got float"),
    ("scale_rewards_unknown", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE), num_generations=1,
                                             scale_rewards="std"), ValueError,
     r"scale_rewards must be one of \('group', 'batch', 'none'\) \(or True/False\), got 'std'"),
    ("scale_rewards_not_str", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE), num_generations=1,
                                             scale_rewards=1), TypeError, r"scale_rewards must be one of .*got int"),
    ("reward_eps_negative", lambda b: dict(advantages=None, rewards=torch.zeros(B, device=DEVICE), num_generations=1,
                                           reward_eps=-1e-4), ValueError, r"reward_eps must be >= 0"),
    ("reward_weights_wrong_R", lambda b: dict(advantages=None, rewards=torch.zeros(B, 2, device=DEVICE),
                                              num_generations=1, reward_weights=[1.0]), ValueError,
     r"reward_weights must have one entry per reward function: rewards has K=2"),
    ("reward_weights_not_numbers", lambda b: dict(advantages=None, rewards=torch.zeros(B, 2, device=DEVICE),
                                                  num_generations=1, reward_weights=["a", "b"]), TypeError,
     r"reward_weights must be a sequence of real numbers"),
    ("reward_weights_2d", lambda b: dict(advantages=None, rewards=torch.zeros(B, 2, device=DEVICE), num_generations=1,
                                         reward_weights=torch.ones(1, 2, device=DEVICE)), ValueError,
     r"reward_weights must be 1-D"),
    ("reward_weights_nan", lambda b: dict(advantages=None, rewards=torch.zeros(B, 2, device=DEVICE), num_generations=1,
                                          reward_weights=[NAN, 1.0]), ValueError, r"reward_weights must be finite"),
    ("reward_weights_without_rewards", lambda b: dict(reward_weights=[1.0]), ValueError,
     r"reward_weights is given without rewards"),
    # old / ref logps
    ("old_logps_shape", lambda b: dict(old_logps=b["old_logps"][:, :-1]), ValueError,
     r"old_logps must have shape \(3, 4\)"),
    ("old_logps_1d", lambda b: dict(old_logps=b["old_logps"].reshape(-1)), ValueError, r"old_logps must be 2-D"),
    ("old_logps_int", lambda b: dict(old_logps=b["old_logps"].long()), TypeError,
     r"old_logps must be a floating tensor"),
    ("old_logps_nan", lambda b: dict(old_logps=with_value(b["old_logps"], NAN)), ValueError,
     r"old_logps contains NaN or inf at unmasked positions"),
    ("old_logps_other_device", lambda b: dict(old_logps=meta_like(b["old_logps"])), ValueError,
     r"old_logps is on meta"),
    ("ref_logps_inf", lambda b: dict(ref_logps=with_value(b["ref_logps"], -INF), beta=0.1), ValueError,
     r"ref_logps contains NaN or inf at unmasked positions"),
    ("ref_logps_shape", lambda b: dict(ref_logps=b["ref_logps"].t()), ValueError, r"ref_logps must have shape"),
    ("ref_logps_missing", lambda b: dict(ref_logps=None, beta=0.04), ValueError,
     r"ref_logps is required when beta != 0"),
    # importance sampling ratio
    ("is_ratio_shape", lambda b: dict(importance_sampling_ratio=torch.ones(B, T + 1, device=DEVICE)), ValueError,
     r"importance_sampling_ratio must have shape"),
    ("is_ratio_3d", lambda b: dict(importance_sampling_ratio=torch.ones(B, T, 1, device=DEVICE)), ValueError,
     r"importance_sampling_ratio must be 1-D or 2-D"),
    ("is_ratio_negative", lambda b: dict(importance_sampling_ratio=-torch.ones(B, T, device=DEVICE)), ValueError,
     r"importance_sampling_ratio must be >= 0"),
    ("is_ratio_nan", lambda b: dict(importance_sampling_ratio=with_value(torch.ones(B, T, device=DEVICE), NAN)),
     ValueError, r"importance_sampling_ratio contains NaN or inf"),
    ("is_ratio_int", lambda b: dict(importance_sampling_ratio=torch.ones(B, T, dtype=torch.int64, device=DEVICE)),
     TypeError, r"importance_sampling_ratio must be a floating tensor"),
    ("is_ratio_other_device", lambda b: dict(importance_sampling_ratio=torch.ones(B, T, device="meta")),
     ValueError, r"importance_sampling_ratio is on meta"),
    # options
    ("unknown_option", lambda b: dict(epsilon=0.2), TypeError, r"unknown option\(s\): \['epsilon'\]"),
    ("loss_type", lambda b: dict(loss_type="ppo"), ValueError, r"loss_type must be one of"),
    ("loss_type_none", lambda b: dict(loss_type=None), ValueError, r"loss_type must be one of"),
    ("is_level", lambda b: dict(importance_sampling_level="seq"), ValueError,
     r"importance_sampling_level must be one of"),
    ("backend_name", lambda b: dict(backend="cudnn"), ValueError, r"backend must be one of"),
    ("dr_grpo_without_max_len", lambda b: dict(loss_type="dr_grpo"), ValueError,
     r"max_completion_length is required for loss_type='dr_grpo'"),
    ("max_len_zero", lambda b: dict(loss_type="dr_grpo", max_completion_length=0), ValueError,
     r"max_completion_length must be > 0"),
    ("max_len_float", lambda b: dict(loss_type="dr_grpo", max_completion_length=4.0), TypeError,
     r"max_completion_length must be an int"),
    ("max_len_bool", lambda b: dict(max_completion_length=True), TypeError, r"max_completion_length must be an int"),
    ("chunk_size_zero", lambda b: dict(chunk_size=0), ValueError, r"chunk_size must be > 0"),
    ("chunk_size_negative", lambda b: dict(chunk_size=-4), ValueError, r"chunk_size must be > 0"),
    ("chunk_size_float", lambda b: dict(chunk_size=2.5), TypeError, r"chunk_size must be an int"),
    ("chunk_size_bool", lambda b: dict(chunk_size=True), TypeError, r"chunk_size must be an int"),
    ("temperature_zero", lambda b: dict(temperature=0.0), ValueError, r"temperature must be > 0"),
    ("temperature_negative", lambda b: dict(temperature=-1.0), ValueError, r"temperature must be > 0"),
    ("temperature_nan", lambda b: dict(temperature=NAN), ValueError, r"temperature must be finite"),
    ("temperature_inf", lambda b: dict(temperature=INF), ValueError, r"temperature must be finite"),
    ("temperature_str", lambda b: dict(temperature="1.0"), TypeError, r"temperature must be a number"),
    ("temperature_tensor", lambda b: dict(temperature=torch.tensor(1.0)), TypeError, r"temperature must be a number"),
    ("softcap_zero", lambda b: dict(logit_softcap=0.0), ValueError, r"logit_softcap must be > 0"),
    ("beta_nan", lambda b: dict(beta=NAN), ValueError, r"beta must be finite"),
    ("beta_str", lambda b: dict(beta="0.1"), TypeError, r"beta must be a number"),
    ("epsilon_low_negative", lambda b: dict(epsilon_low=-0.1), ValueError, r"epsilon_low and epsilon_high must be >= 0"),
    ("epsilon_high_negative", lambda b: dict(epsilon_high=-0.1), ValueError,
     r"epsilon_low and epsilon_high must be >= 0"),
    ("epsilon_low_ge_1", lambda b: dict(loss_type="grpo", epsilon_low=1.0), ValueError,
     r"epsilon_low must be < 1 for loss_type='grpo'"),
    ("cispo_epsilon_high_zero", lambda b: dict(loss_type="cispo", epsilon_low=0.0, epsilon_high=0.0), ValueError,
     r"epsilon_high must be > 0 for loss_type='cispo'"),
    ("delta_zero", lambda b: dict(delta=0.0), ValueError, r"delta must be > 0"),
    ("top_entropy_quantile_zero", lambda b: dict(top_entropy_quantile=0.0), ValueError,
     r"top_entropy_quantile must be in \(0, 1\]"),
    ("top_entropy_quantile_gt1", lambda b: dict(top_entropy_quantile=1.5), ValueError,
     r"top_entropy_quantile must be in \(0, 1\]"),
    ("sapo_temperature_zero", lambda b: dict(loss_type="sapo", sapo_temperature_neg=0.0), ValueError,
     r"sapo_temperature_neg must be > 0"),
    ("num_items_negative", lambda b: dict(num_items_in_batch=-1), ValueError, r"num_items_in_batch must be >= 0"),
    ("num_items_nan", lambda b: dict(num_items_in_batch=NAN), ValueError, r"num_items_in_batch must be finite"),
    ("num_items_vector", lambda b: dict(num_items_in_batch=torch.tensor([3, 4])), ValueError,
     r"num_items_in_batch must be a scalar"),
    ("bias_correction_not_bool", lambda b: dict(use_bias_correction_kl=1), TypeError,
     r"use_bias_correction_kl must be a bool"),
    ("deterministic_not_bool", lambda b: dict(deterministic="yes"), TypeError, r"deterministic must be a bool"),
    ("return_metrics_not_bool", lambda b: dict(return_metrics="yes"), TypeError, r"return_metrics must be a bool"),
    # TRL 1.16's additions
    ("vespo_k_nan", lambda b: dict(loss_type="vespo", vespo_k_pos=NAN), ValueError, r"vespo_k_pos must be finite"),
    ("entropy_coef_str", lambda b: dict(entropy_coef="0.01"), TypeError, r"entropy_coef must be a number"),
    ("off_policy_threshold_inf", lambda b: dict(off_policy_mask_threshold=INF), ValueError,
     r"off_policy_mask_threshold must be finite"),
    ("sampling_logps_without_threshold", lambda b: dict(sampling_logps=b["old_logps"]), ValueError,
     r"sampling_logps is given but off_policy_mask_threshold is None"),
    ("sampling_logps_shape", lambda b: dict(off_policy_mask_threshold=0.1, sampling_logps=b["old_logps"][:, :2]),
     ValueError, r"sampling_logps must have shape"),
    ("sampling_logps_inf", lambda b: dict(off_policy_mask_threshold=0.1, sampling_logps=with_value(b["old_logps"], INF)),
     ValueError, r"sampling_logps contains inf at an unmasked position"),
    ("sampling_logps_int", lambda b: dict(off_policy_mask_threshold=0.1, sampling_logps=b["targets"]), TypeError,
     r"sampling_logps must be a floating tensor"),
    # verl's pieces
    ("policy_loss_name", lambda b: dict(policy_loss="ppo"), ValueError, r"policy_loss must be one of"),
    ("loss_agg_mode_name", lambda b: dict(loss_agg_mode="mean"), ValueError, r"loss_agg_mode must be one of"),
    ("kl_estimator_name", lambda b: dict(kl_estimator="k4"), ValueError, r"kl_estimator must be one of"),
    ("clip_ratio_c_le_1", lambda b: dict(policy_loss="vanilla", clip_ratio_c=1.0), ValueError,
     r"clip_ratio_c must be > 1 for dual-clip PPO"),
    ("dro_without_beta", lambda b: dict(policy_loss="dro"), ValueError, r"dro_beta must be a positive number"),
    ("bypass_clip_ratio_c_le_1", lambda b: dict(policy_loss="bypass_mode", clip_ratio_c=0.5), ValueError,
     r"clip_ratio_c must be > 1 for dual-clip PPO \(policy_loss='bypass_mode'\)"),
    ("clip_cov_ratio_zero", lambda b: dict(policy_loss="clip_cov", clip_cov_ratio=0.0), ValueError,
     r"clip_cov_ratio must be > 0"),
    ("kl_cov_ratio_zero", lambda b: dict(policy_loss="kl_cov", kl_cov_ratio=0.0), ValueError,
     r"kl_cov_ratio must be > 0"),
    ("dp_size_zero", lambda b: dict(policy_loss="vanilla", dp_size=0), ValueError, r"dp_size must be >= 1"),
    ("dp_size_float", lambda b: dict(policy_loss="vanilla", dp_size=2.0), TypeError, r"dp_size must be an int"),
    ("loss_scale_factor_zero", lambda b: dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=0.0),
     ValueError, r"loss_scale_factor must be > 0"),
    ("verl_with_trl_loss_type", lambda b: dict(policy_loss="vanilla", loss_type="grpo"), ValueError,
     r"policy_loss/loss_agg_mode \(verl's objective\) do not combine with TRL's"),
    ("verl_with_sequence_level", lambda b: dict(policy_loss="vanilla", importance_sampling_level="sequence"),
     ValueError, r"importance_sampling_level='sequence' is TRL's"),
    ("num_sequences_negative", lambda b: dict(num_sequences_in_batch=-2), ValueError,
     r"num_sequences_in_batch must be >= 0"),
    # the exact KL to the reference (kl_estimator="full"): ref_hidden [B, T, H_r], ref_weight [V, H_r], ref_bias [V]
    ("ref_hidden_with_k3", lambda b: dict(beta=0.1, **ref_head(b)), ValueError,
     r"ref_hidden is read only with kl_estimator='full' \(the exact KL to the reference\), got kl_estimator='k3'"),
    ("ref_bias_with_k3", lambda b: dict(ref_bias=ref_head(b)["ref_bias"]), ValueError,
     r"ref_bias is read only with kl_estimator='full'"),
    ("full_without_ref_hidden", lambda b: dict(ref_weight=ref_head(b)["ref_weight"], **FULL), ValueError,
     r"ref_hidden is required with kl_estimator='full' and beta != 0"),
    ("full_without_ref_weight", lambda b: dict(ref_hidden=ref_head(b)["ref_hidden"], **FULL), ValueError,
     r"ref_weight is required with kl_estimator='full' and beta != 0"),
    ("full_with_bias_correction", lambda b: dict(use_bias_correction_kl=True, **FULL), ValueError,
     r"use_bias_correction_kl=True does not combine with kl_estimator='full'"),
    ("ref_hidden_2d", lambda b: dict(**ref_head(b, ref_hidden=ref_head(b)["ref_hidden"][0]), **FULL), ValueError,
     r"ref_hidden must be 3-D"),
    ("ref_hidden_int", lambda b: dict(**ref_head(b, ref_hidden=ref_head(b)["ref_hidden"].long()), **FULL), TypeError,
     r"ref_hidden must be a floating tensor"),
    ("ref_hidden_tokens", lambda b: dict(**ref_head(b, ref_hidden=ref_head(b)["ref_hidden"][:, :2]), **FULL),
     ValueError, r"ref_hidden must be \[B, T, H_r\] with \[B, T\] = \(3, 4\) \(hidden's\), got \(3, 2, 6\)"),
    ("ref_hidden_nan", lambda b: dict(**ref_head(b, ref_hidden=with_value(ref_head(b)["ref_hidden"], NAN, (2, 3, 0))),
                                      **FULL), ValueError, r"ref_hidden contains NaN or inf"),
    ("ref_weight_vocab", lambda b: dict(**ref_head(b, ref_weight=ref_head(b)["ref_weight"][:-1]), **FULL),
     ValueError, r"ref_weight has V = 10 rows but weight has V = 11: the policy and the reference must share one "
                 r"vocabulary"),
    ("ref_weight_width", lambda b: dict(**ref_head(b, ref_weight=ref_head(b)["ref_weight"][:, :5]), **FULL),
     ValueError, r"ref_weight must be \[V, H_r\] with H_r = ref_hidden.shape\[-1\] = 6 > 0, got \(11, 5\)"),
    ("ref_weight_dtype", lambda b: dict(**ref_head(b, ref_weight=ref_head(b)["ref_weight"].double()), **FULL),
     TypeError, r"ref_weight dtype torch.float64 must match ref_hidden dtype torch.bfloat16"),
    ("ref_bias_shape", lambda b: dict(**ref_head(b, ref_bias=ref_head(b)["ref_bias"][:3]), **FULL), ValueError,
     r"ref_bias must have shape \(11,\) \(\[V\]\)"),
    ("ref_bias_dtype", lambda b: dict(**ref_head(b, ref_bias=ref_head(b)["ref_bias"].float()), **FULL), TypeError,
     r"ref_bias dtype torch.float32 must match ref_hidden dtype torch.bfloat16"),
    # bypass_mode's rollout correction (verl's rollout_correction config)
    ("rollout_is_level", lambda b: dict(policy_loss="bypass_mode", rollout_is="seq"), ValueError,
     r"rollout_is must be one of \('token', 'sequence'\) or None"),
    ("rollout_is_threshold_zero", lambda b: dict(policy_loss="bypass_mode", rollout_is="token", rollout_is_threshold=0.0),
     ValueError, r"rollout_is_threshold must be > 0"),
    ("rollout_is_threshold_lower_above_upper",
     lambda b: dict(policy_loss="bypass_mode", rollout_is="token", rollout_is_threshold_lower=3.0), ValueError,
     r"rollout_is_threshold_lower must be in \(0, rollout_is_threshold\]"),
    ("rollout_is_threshold_verl_string",
     lambda b: dict(policy_loss="bypass_mode", rollout_is="token", rollout_is_threshold="0.5_2.0"), TypeError,
     r"rollout_is_threshold must be a number"),
    ("rollout_is_batch_normalize_not_bool", lambda b: dict(policy_loss="bypass_mode", rollout_is_batch_normalize=1),
     TypeError, r"rollout_is_batch_normalize must be a bool"),
    ("bypass_loss_type_name", lambda b: dict(policy_loss="bypass_mode", bypass_loss_type="ppo"), ValueError,
     r"bypass_loss_type must be one of"),
    ("rollout_rs_unknown_option",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k4", rollout_rs_threshold="0.1"), ValueError,
     r"rollout_rs option 'token_k4' is not one of verl's"),
    ("rollout_rs_no_option", lambda b: dict(policy_loss="bypass_mode", rollout_rs=" , ", rollout_rs_threshold="0.1"),
     ValueError, r"rollout_rs must name at least one option"),
    ("rollout_rs_not_str",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs=["token_k1"], rollout_rs_threshold="0.1"), TypeError,
     r"rollout_rs must be a string of verl's rejection options"),
    ("rollout_rs_without_threshold", lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k1"), ValueError,
     r"rollout_rs_threshold is required with rollout_rs='token_k1'"),
    ("rollout_rs_threshold_float",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k2", rollout_rs_threshold=0.1), TypeError,
     r"rollout_rs_threshold must be a string"),
    ("rollout_rs_threshold_empty",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k2", rollout_rs_threshold=" , "), ValueError,
     r"rollout_rs_threshold must hold at least one threshold"),
    ("rollout_rs_threshold_count",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.5_2,0.1,0.2"),
     ValueError, r"rollout_rs_threshold must hold one threshold for all options or one per option"),
    ("rollout_rs_threshold_not_number",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k2", rollout_rs_threshold="abc"), ValueError,
     r"rollout_rs_threshold 'abc' for option 'token_k2' is not a number"),
    ("rollout_rs_threshold_k1_bounds",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k1", rollout_rs_threshold="0.5"), ValueError,
     r"rollout_rs_threshold for option 'token_k1' must have 0 < lower <= upper"),
    ("rollout_rs_threshold_two_bounds",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"), ValueError,
     r"rollout_rs_threshold for option 'token_k2' must be a single upper bound"),
    ("rollout_rs_threshold_zero",
     lambda b: dict(policy_loss="bypass_mode", rollout_rs="seq_max_k3", rollout_rs_threshold="0"), ValueError,
     r"rollout_rs_threshold for option 'seq_max_k3' must be > 0"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_naming_the_argument(case):
    _, make, exc, pattern = case
    b = batch()
    with pytest.raises(exc, match=pattern):
        call(b, **make(b))


def test_every_option_value_error_is_raised_before_any_tensor_work():
    # options are validated first: a bad option with bad tensors reports the option
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(None, None, None, None, None, loss_type="ppo")


def test_unavailable_backend_is_a_runtime_error_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    b = batch()
    with pytest.raises(BackendUnavailable, match="backend 'cuda' needs CUDA tensors"):
        call(b, backend="cuda")
    assert issubclass(BackendUnavailable, RuntimeError)


def test_grpo_loss_module_validates_at_construction():
    with pytest.raises(TypeError, match=r"unknown option\(s\): \['lr'\]"):
        GRPOLoss(lr=1e-3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        GRPOLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length is required"):
        GRPOLoss(loss_type="dr_grpo")
    module = GRPOLoss(loss_type="bnpo")
    b = batch()
    with pytest.raises(ValueError, match="ref_logps is required"):
        module(b["hidden"], b["weight"], b["targets"], b["advantages"], b["mask"], b["old_logps"], None, beta=0.1)


# ------------------------------------------------------------------ token_logprobs

TL_BAD = [
    ("hidden_0d", lambda b: dict(hidden=torch.tensor(1.0, device=DEVICE)), ValueError,
     r"hidden must have at least one dimension"),
    ("hidden_int", lambda b: dict(hidden=b["hidden"].long()), TypeError, r"hidden must be a floating tensor"),
    ("hidden_nan", lambda b: dict(hidden=with_value(b["hidden"], NAN, (1, 1, 1))), ValueError,
     r"hidden contains NaN or inf"),
    ("H0", lambda b: dict(hidden=b["hidden"][..., :0], weight=b["weight"][:, :0]), ValueError, r"H = 0"),
    ("weight_H_mismatch", lambda b: dict(weight=b["weight"][:, 1:]), ValueError, r"weight must be \[V, H\]"),
    ("weight_other_device", lambda b: dict(weight=meta_like(b["weight"])), ValueError, r"weight is on meta"),
    ("targets_shape", lambda b: dict(targets=b["targets"][:, :1]), ValueError,
     r"targets must have shape \(3, 4\) \(hidden's leading dimensions\)"),
    ("targets_out_of_range", lambda b: dict(targets=with_value(b["targets"], -100, (2, 3))), ValueError,
     r"targets holds token ids outside \[0, 11\) \(min -100"),
    ("targets_float", lambda b: dict(targets=b["targets"].double()), TypeError, r"targets must be an integer"),
    ("temperature_zero", lambda b: dict(temperature=0), ValueError, r"temperature must be > 0"),
    ("chunk_size_zero", lambda b: dict(chunk_size=0), ValueError, r"chunk_size must be > 0"),
    ("backend_name", lambda b: dict(backend="jax"), ValueError, r"backend must be one of"),
    ("return_entropy_not_bool", lambda b: dict(return_entropy=None), TypeError, r"return_entropy must be a bool"),
]


@pytest.mark.parametrize("case", TL_BAD, ids=[c[0] for c in TL_BAD])
def test_token_logprobs_bad_input(case):
    _, make, exc, pattern = case
    b = batch()
    args = dict(hidden=b["hidden"], weight=b["weight"], targets=b["targets"])
    kw = make(b)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    with pytest.raises(exc, match=pattern):
        token_logprobs(args["hidden"], args["weight"], args["targets"], **kw)


def test_token_logprobs_of_no_tokens_is_empty():
    b = batch()
    logp, ent = token_logprobs(b["hidden"][:0], b["weight"], b["targets"][:0], return_entropy=True, backend="torch")
    assert logp.shape == (0, T) and ent.shape == (0, T)


# ------------------------------------------------------------------ valid but unusual inputs


def _grads(b, **kw):
    h = b["hidden"].detach().clone().requires_grad_(True) if b["hidden"].is_leaf else b["hidden"]
    w = b["weight"].detach().clone().requires_grad_(True) if b["weight"].is_leaf else b["weight"]
    loss = grpo_loss(h, w, b["targets"], b["advantages"], b["mask"], b["old_logps"], b["ref_logps"], **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


OPTS = [dict(loss_type="dapo", beta=0.05), dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05)]


@pytest.mark.parametrize("backend", backend_params() + [pytest.param("reference", id="reference")])
@pytest.mark.parametrize("opts", OPTS, ids=["token", "sequence"])
def test_junk_at_padding_positions_is_ignored(backend, opts):
    """Masked positions may hold any token id (-100, >= V) and non-finite old/ref logps:
    they are not checked and change nothing (ids are checked at unmasked positions only)."""
    if backend != "reference":
        require(backend, DEVICE, torch.float32)
    clean = batch()
    dirty = dict(clean)
    pad = ~clean["mask"]
    dirty["targets"] = torch.where(pad, torch.full_like(clean["targets"], -100), clean["targets"])
    dirty["targets"][1, 3] = V + 5
    dirty["old_logps"] = torch.where(pad, torch.full_like(clean["old_logps"], -INF), clean["old_logps"])
    dirty["ref_logps"] = torch.where(pad, torch.full_like(clean["ref_logps"], NAN), clean["ref_logps"])
    # the values at padding positions are irrelevant: compare against zeros there
    zeroed = dict(clean)
    zeroed["targets"] = torch.where(pad, 0, clean["targets"])
    zeroed["old_logps"] = torch.where(pad, 0.0, clean["old_logps"])
    zeroed["ref_logps"] = torch.where(pad, 0.0, clean["ref_logps"])
    out = _grads(dirty, backend=backend, **opts)
    expect = _grads(zeroed, backend=backend, **opts)
    for a, e in zip(out, expect):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    # and the metrics stay finite too
    _, m = call(dirty, backend=backend, return_metrics=True, **opts)
    for name in ("kl_mean", "entropy_mean", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        v = getattr(m, name)
        assert v is None or bool(torch.isfinite(v)), name


def _non_contiguous_variants(b):
    """The same values with other strides: transposed storage, every-other-column slices,
    stride-0 expansions."""
    out = {}
    h = b["hidden"]
    out["hidden_transposed"] = dict(hidden=h.transpose(0, 1).contiguous().transpose(0, 1))
    out["hidden_strided"] = dict(hidden=torch.stack([h, h], dim=-1)[..., 0])
    w = b["weight"]
    out["weight_from_transpose"] = dict(weight=w.t().contiguous().t())  # tied embeddings: [H, V] storage
    out["weight_strided_rows"] = dict(weight=torch.stack([w, w], 1)[:, 0])
    out["targets_strided"] = dict(targets=torch.stack([b["targets"], b["targets"]], -1)[..., 1])
    out["targets_int32"] = dict(targets=b["targets"].int())
    out["targets_uint8"] = dict(targets=b["targets"].to(torch.uint8))
    out["mask_float_strided"] = dict(mask=torch.stack([b["mask"].float()] * 2, -1)[..., 0])
    out["mask_int64"] = dict(mask=b["mask"].long())
    out["advantages_expanded_BT"] = dict(advantages=b["advantages"][:, None].expand(B, T))
    out["advantages_B1"] = dict(advantages=b["advantages"][:, None])
    out["old_logps_transposed"] = dict(old_logps=b["old_logps"].t().contiguous().t())
    out["ref_logps_strided"] = dict(ref_logps=torch.stack([b["ref_logps"]] * 3, 0)[1])
    return out


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_inputs_equal_contiguous(backend):
    require(backend, DEVICE, torch.float32)
    b = batch()
    opts = dict(loss_type="bnpo", beta=0.05, backend=backend)
    expect = _grads(b, **opts)
    for name, change in _non_contiguous_variants(b).items():
        other = dict(b)
        other.update(change)
        got = _grads(other, **opts)
        for a, e in zip(got, expect):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_token_logprobs(backend):
    require(backend, DEVICE, torch.float32)
    b = batch()
    expect = token_logprobs(b["hidden"], b["weight"], b["targets"], backend=backend)
    got = token_logprobs(b["hidden"].transpose(0, 1), b["weight"].t().contiguous().t(), b["targets"].t(),
                         backend=backend)
    torch.testing.assert_close(got.t(), expect, rtol=1e-6, atol=1e-7)


def test_negative_strides_cannot_reach_the_api():
    # torch tensors never have negative strides: flip() copies, and numpy views with a
    # negative stride are refused by torch itself (so nothing for grpo_kernels to check)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::-1]
    with pytest.raises(ValueError, match="negative stride"):
        torch.from_numpy(a)
    assert all(s >= 0 for s in torch.arange(6.0).flip(0).stride())


def test_distill_loss_refuses_a_dtensor_operand(monkeypatch):
    """A DTensor operand is named and refused (the real ColwiseParallel head on two ranks:
    tests/test_distributed.py, ``vocab_parallel_distill/dtensor_refused``); here a stand-in class,
    which the check finds where it looks for DTensor."""
    import torch.distributed.tensor as dt
    from test_distill_inputs import call_bad

    class StandIn(torch.Tensor):
        pass

    monkeypatch.setattr(dt, "DTensor", StandIn)
    w = call_bad.__globals__["_d"]["weight"].as_subclass(StandIn)
    with pytest.raises(TypeError, match=r"^weight is a DTensor: distill_loss takes local tensors"):
        call_bad(dict(weight=w))


def test_token_statistics_shares_token_logprobs_checks():
    from grpo_kernels.api import token_statistics

    b = batch(device="cpu")
    with pytest.raises(ValueError, match=r"targets must have shape \(3, 4\)"):
        token_statistics(b["hidden"], b["weight"], b["targets"][:, :1], backend="torch")
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        token_statistics(b["hidden"], b["weight"], b["targets"], return_entropy=None, backend="torch")


def test_verl_sum_pi_squared_refusals():
    """verl's calculate_sum_pi_squared through the grpo_kernels forward: forward only, one process."""
    from grpo_kernels.integrations import verl_forward

    b = batch(device="cpu")
    h, w, t = b["hidden"].reshape(-1, H), b["weight"], b["targets"].reshape(-1)
    with verl_forward.capture_sum_pi_squared():
        with pytest.raises(NotImplementedError, match="calculate_sum_pi_squared with the grpo_kernels forward is "
                                                      "computed in the forward-only"):
            verl_forward.linear_cross_entropy(h.clone().requires_grad_(True), w, t, backend="torch")
        with torch.no_grad(), pytest.raises(NotImplementedError, match="calculate_sum_pi_squared with the "
                                                                      "grpo_kernels forward has no vocab-parallel"):
            verl_forward.linear_cross_entropy(h, w, t, 1.0, "none", object(), backend="torch")


def test_verl_training_step_refusals():
    """What verl's switched FSDP training steps (the ``ppo_loss`` one and the distillation one) refuse,
    before any model work (runs where verl is installed: its own venv)."""
    pytest.importorskip("verl")
    from tensordict import TensorDict
    from types import SimpleNamespace
    from verl.utils import tensordict_utils as tu

    from grpo_kernels.integrations.verl_step import refuse_unsupported

    engine = SimpleNamespace(use_ulysses_sp=False)
    with pytest.raises(NotImplementedError, match=r"does not support Ulysses sequence parallelism "
                                                  r"\(ulysses_sequence_parallel_size > 1\)"):
        refuse_unsupported(SimpleNamespace(use_ulysses_sp=True), TensorDict({}, batch_size=[]))
    td = TensorDict({}, batch_size=[])
    tu.assign_non_tensor(td, calculate_sum_pi_squared=True)
    with pytest.raises(NotImplementedError, match=r"\(training step\) does not compute calculate_sum_pi_squared"):
        refuse_unsupported(engine, td)
    td = TensorDict({}, batch_size=[])
    tu.assign_non_tensor(td, multi_modal_inputs=[{"pixel_values": None}])
    with pytest.raises(NotImplementedError, match="the fused verl loss does not support multimodal inputs"):
        refuse_unsupported(engine, td)


def test_topk_forward_kl_bad_inputs():
    from grpo_kernels.topk_distill import topk_forward_kl

    b = batch(device="cpu")
    h, w = b["hidden"], b["weight"]
    ids = torch.zeros(B, T, 2, dtype=torch.int64)
    lt = torch.full((B, T, 2), -1.0)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must have shape \(3, 4, 2\) \(hidden's leading "
                                         r"dimensions, K\), got \(3, 2\)"):
        topk_forward_kl(h, w, ids[:, :2, 0], lt)
    with pytest.raises(ValueError, match=r"teacher_topk_ids must hold 1 <= K <= V ids per token, got K = 0"):
        topk_forward_kl(h, w, ids[..., :0], lt[..., :0])
    with pytest.raises(ValueError, match=r"teacher_topk_ids holds token ids outside \[0, 11\)"):
        topk_forward_kl(h, w, ids + V, lt)
    with pytest.raises(ValueError, match=r"teacher_topk_logps must have shape \(3, 4, 2\) \(teacher_topk_ids' "
                                         r"shape\), got \(3, 4, 1\)"):
        topk_forward_kl(h, w, ids, lt[..., :1])


def test_exact_kl_reference_head_as_a_dtensor_is_refused():
    """A DTensor reference head (e.g. ColwiseParallel's Shard(0) beside a vocab-sharded policy head):
    a TypeError naming it, before any collective (a one-process gloo group stands in for the
    vocab-parallel one; the exact KL itself under vocab parallelism: tests/test_distributed.py)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        b = batch(device="cpu")
        head = ref_head(b)
        head["ref_weight"] = distribute_tensor(head["ref_weight"], init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(TypeError, match=r"ref_weight is a DTensor: grpo_loss's reference head takes local "
                                            r"tensors; pass ref_weight\.to_local\(\) with process_group= and "
                                            r"vocab_start= \(docs/distributed\.md\)"):
            call(b, process_group=dist.group.WORLD, **head, **FULL)
    finally:
        dist.destroy_process_group()

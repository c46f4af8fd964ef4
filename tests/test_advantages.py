"""group_advantages / normalize_groups / process_advantages / kl_penalized_rewards.

Expected values are either written out by hand from the numbers in each test, or come from an
inline re-derivation of TRL 1.16.0's ``GRPOTrainer._generate_and_score_completions``
(``multi_objective_aggregation="sum_then_normalize"``) and ``trl.trainer.utils.nanstd``.
"""
from __future__ import annotations

import math

import pytest
import torch

from grpo_kernels import group_advantages
from grpo_kernels.advantages import kl_penalized_rewards, normalize_groups, process_advantages
from support import backend_params, device_for_tests, require

NAN = float("nan")
EPS = 1e-4


def close(actual, expected, dtype=torch.float64, rtol=1e-12, atol=1e-12):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=dtype), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- TRL, re-derived inline


def trl_nanstd(tensor, dim=None, keepdim=False):
    """trl/trainer/utils.py ``nanstd``, line for line."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    if dim is None:
        return std.squeeze()
    return std.squeeze(dim)


def trl_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards):
    """GRPOTrainer._generate_and_score_completions, sum_then_normalize branch, TRL 1.16.0."""
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # GRPOConfig.__post_init__
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":
        if rewards.numel() > 1:
            std_rewards = trl_nanstd(rewards).expand_as(rewards)
        else:
            std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def random_rewards(B, K, seed, nan_frac=0.25, all_nan_rows=(1,)):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, K, generator=g) * 2 + torch.randint(0, 3, (B, K), generator=g)
    r[torch.rand(B, K, generator=g) < nan_frac] = NAN
    for i in all_nan_rows:
        r[i] = NAN
    return r


def test_inline_nanstd_is_trls():
    """The inline copy above is faithful to the installed TRL (skipped without trl)."""
    utils = pytest.importorskip("trl.trainer.utils")
    x = random_rewards(12, 3, seed=7)
    for dim in (None, 0, 1):
        torch.testing.assert_close(trl_nanstd(x, dim=dim), utils.nanstd(x, dim=dim), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_matches_trl_float32(scale_rewards, G):
    B, K = 16, 3
    rewards = random_rewards(B, K, seed=G, all_nan_rows=(1, 6))
    weights = [1.0, 0.5, -2.0]
    expected = trl_advantages(rewards.clone(), torch.tensor(weights, dtype=torch.float32), G, scale_rewards)
    got = group_advantages(rewards, G, scale_rewards=scale_rewards, weights=weights)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got[1] == 0 and got[6] == 0


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_matches_trl_single_reward_function(scale_rewards):
    rewards = random_rewards(12, 1, seed=3, all_nan_rows=(4,))
    expected = trl_advantages(rewards.clone(), torch.ones(1), 3, scale_rewards)
    torch.testing.assert_close(group_advantages(rewards[:, 0], 3, scale_rewards=scale_rewards), expected,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group_advantages(rewards, 3, scale_rewards=scale_rewards), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_matches_trl_formula_float64(scale_rewards):
    """float64 stays float64. TRL's nanstd forms n/(n-1) in float32 even for float64 tensors, so the
    comparison is at float32-level relative accuracy for the std; the mean part is exact."""
    rewards = random_rewards(24, 2, seed=11, all_nan_rows=(0, 13)).double()
    w = torch.tensor([0.3, 1.7], dtype=torch.float64)
    got = group_advantages(rewards, 6, scale_rewards=scale_rewards, weights=w)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, trl_advantages(rewards.clone(), w, 6, scale_rewards), rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- hand-computed


def test_group_hand_computed():
    # group 1: [1, 2, 3] mean 2, deviations [-1, 0, 1], unbiased var (1+0+1)/2 = 1
    # group 2: [0, 0, 6] mean 2, deviations [-2, -2, 4], unbiased var (4+4+16)/2 = 12
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    s2 = math.sqrt(12) + EPS
    close(group_advantages(r, 3), [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -2 / s2, -2 / s2, 4 / s2])


def test_batch_and_none_hand_computed():
    # G=2: groups [0, 2] and [4, 10], group means 1 and 7 -> r - mean = [-1, 1, -3, 3]
    r = torch.tensor([0.0, 2.0, 4.0, 10.0], dtype=torch.float64)
    close(group_advantages(r, 2, scale_rewards="none"), [-1.0, 1.0, -3.0, 3.0])
    close(group_advantages(r, 2, scale_rewards=False), [-1.0, 1.0, -3.0, 3.0])
    # batch: std over all 4 around the batch mean 4: deviations [-4, -2, 0, 6], var (16+4+0+36)/3
    sb = math.sqrt(56 / 3) + EPS
    close(group_advantages(r, 2, scale_rewards="batch"), [-1 / sb, 1 / sb, -3 / sb, 3 / sb])
    # group: stds sqrt(2) and sqrt(18)
    s1, s2 = math.sqrt(2) + EPS, math.sqrt(18) + EPS
    close(group_advantages(r, 2, scale_rewards="group"), [-1 / s1, 1 / s1, -3 / s2, 3 / s2])
    close(group_advantages(r, 2, scale_rewards=True), [-1 / s1, 1 / s1, -3 / s2, 3 / s2])


def test_weights_nans_and_unscorable_row_hand_computed():
    # K=2, weights [1, 0.5]; combined = nansum(w * r):
    # group 1: [1, 2] -> 2, [nan, 4] -> 2, [3, nan] -> 3
    # group 2: [nan, nan] -> unscorable, [0, 2] -> 1, [5, nan] -> 5
    r = torch.tensor([[1, 2], [NAN, 4], [3, NAN], [NAN, NAN], [0, 2], [5, NAN]], dtype=torch.float64)
    adv = group_advantages(r, 3, weights=[1.0, 0.5])
    # group 1: mean 7/3, deviations [-1/3, -1/3, 2/3], var (1/9+1/9+4/9)/2 = 1/3
    s1 = math.sqrt(1 / 3) + EPS
    # group 2: the unscorable row is excluded (NOT counted as 0): values {1, 5}, mean 3, var (4+4)/1
    s2 = math.sqrt(8) + EPS
    close(adv, [-1 / 3 / s1, -1 / 3 / s1, 2 / 3 / s1, 0.0, -2 / s2, 2 / s2])
    # same under "none": the baseline of group 2 is 3, not 2
    close(group_advantages(r, 3, weights=[1.0, 0.5], scale_rewards="none"),
          [-1 / 3, -1 / 3, 2 / 3, 0.0, -2.0, 2.0])


def test_weights_as_tensor_and_default_ones():
    r = torch.tensor([[1.0, 4.0], [3.0, 0.0]], dtype=torch.float64)  # combined with w=1: [5, 3]
    s = math.sqrt(2) + EPS
    close(group_advantages(r, 2), [1 / s, -1 / s])
    # w = [2, 0]: combined [2, 6]
    close(group_advantages(r, 2, weights=torch.tensor([2.0, 0.0])), [-2 / (math.sqrt(8) + EPS), 2 / (math.sqrt(8) + EPS)])


def test_all_nan_row_is_zero_and_excluded_from_batch_std():
    r = torch.tensor([NAN, 1.0, 3.0, 2.0], dtype=torch.float64)
    adv = group_advantages(r, 2, scale_rewards="batch")
    # group 1 has one scorable row: mean 1 -> r - mean = 0; group 2: mean 2.5 -> [0.5, -0.5]
    # batch std over {1, 3, 2} (the NaN row excluded): mean 2, var (1+1+0)/2 = 1
    close(adv, [0.0, 0.0, 0.5 / (1 + EPS), -0.5 / (1 + EPS)])
    assert adv[0] == 0


def test_degenerate_groups_give_zero():
    # a group with one scorable row: its std is NaN under "group" -> both rows 0 (as TRL)
    r = torch.tensor([NAN, 3.0, 1.0, 2.0], dtype=torch.float64)
    close(group_advantages(r, 2), [0.0, 0.0, -0.5 / (math.sqrt(0.5) + EPS), 0.5 / (math.sqrt(0.5) + EPS)])
    # a group with every row unscorable
    close(group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0], dtype=torch.float64), 2, scale_rewards="none"),
          [0.0, 0.0, -0.5, 0.5])
    # G=1: each row is its own group -> 0 in every mode
    for mode in ("group", "batch", "none"):
        close(group_advantages(torch.tensor([1.0, 5.0, -2.0], dtype=torch.float64), 1, scale_rewards=mode),
              [0.0, 0.0, 0.0])
    # equal rewards with eps=0: 0/0 -> 0, never NaN
    close(group_advantages(torch.tensor([2.0, 2.0], dtype=torch.float64), 2, eps=0.0), [0.0, 0.0])


def test_eps_is_used():
    r = torch.tensor([1.0, 3.0], dtype=torch.float64)  # std sqrt(2)
    close(group_advantages(r, 2, eps=0.0), [-1 / math.sqrt(2), 1 / math.sqrt(2)])
    close(group_advantages(r, 2, eps=0.5), [-1 / (math.sqrt(2) + 0.5), 1 / (math.sqrt(2) + 0.5)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computes_in_float32(dtype):
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, NAN], [NAN, NAN]], dtype=dtype)
    got = group_advantages(r, 2, weights=[1.0, 0.25])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, group_advantages(r.double(), 2, weights=[1.0, 0.25]).float(),
                               rtol=1e-6, atol=1e-6)


def test_normalize_groups_direct():
    r = torch.tensor([NAN, 1.0, 3.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    s = math.sqrt(2) + EPS
    # groups [nan, 1] (one scorable row -> 0, 0), [3, 2] (mean 2.5, var 0.5), [4, 9] (mean 6.5, var 12.5)
    close(normalize_groups(r, 2, "group", EPS), [0.0, 0.0, 0.5 / (math.sqrt(0.5) + EPS), -0.5 / (math.sqrt(0.5) + EPS),
                                                -2.5 / (math.sqrt(12.5) + EPS), 2.5 / (math.sqrt(12.5) + EPS)])
    close(normalize_groups(r[2:4], 2, "none", 0.0), [0.5, -0.5])
    close(normalize_groups(torch.tensor([1.0, 3.0], dtype=torch.float64), 2, "batch", EPS), [-1 / s, 1 / s])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_normalize_groups_low_precision_computes_in_float32(dtype):
    # 0.1-step values: in half precision the sums and squares would round visibly
    r = torch.tensor([100.0, 100.5, 101.0, 99.5, 3.0, 3.25, 2.75, NAN], dtype=dtype)
    got = normalize_groups(r, 4, "group", EPS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, normalize_groups(r.double(), 4, "group", EPS).float(), rtol=1e-6, atol=1e-6)


def test_empty_batch():
    assert group_advantages(torch.zeros(0, 2), 4).shape == (0,)


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", backend_params())
def test_backend_group_normalize_plain(backend):
    """Every backend's group advantages (its group_normalize kernel where it has one) equal
    normalize_groups on ordinary rewards."""
    device = device_for_tests()
    require(backend, device)

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        r = (torch.randn(24, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
        for mode in ("group", "batch", "none"):
            for G in (2, 3, 8):
                want = normalize_groups(r, G, mode, EPS)
                got = group_advantages(r, G, scale_rewards=mode, eps=EPS, backend=backend)
                tol = 1e-12 if dtype == torch.float64 else 2e-6
                torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", backend_params())
def test_backend_group_normalize_nan_and_degenerate(backend):
    """The NaN / degenerate-group semantics of normalize_groups, for every backend:
    unscorable rows excluded from mean and std and set to 0, G == 1 and B == 1 give 0, eps=0 ties give 0."""
    device = device_for_tests()
    require(backend, device)

    cases = [
        (torch.tensor([1.0, 2.0, 3.0, NAN, 5.0, 7.0]), 3),
        (torch.tensor([NAN, 3.0, 1.0, 2.0]), 2),
        (torch.tensor([NAN, NAN, 1.0, 2.0]), 2),
        (torch.tensor([1.0, 5.0, -2.0]), 1),
        (torch.tensor([4.0]), 1),
    ]
    for dtype in (torch.float32, torch.float64):
        for r, G in cases:
            r = r.to(dtype).to(device)
            for mode in ("group", "batch", "none"):
                for eps in (EPS, 0.0):
                    want = normalize_groups(r, G, mode, eps)
                    got = group_advantages(r, G, scale_rewards=mode, eps=eps, backend=backend)
                    torch.testing.assert_close(got.to(want.dtype), want, rtol=2e-6, atol=2e-6,
                                               msg=lambda m: f"{backend} {mode} G={G} eps={eps} r={r.tolist()}: {m}")


@pytest.mark.parametrize("backend", backend_params() + [pytest.param("auto", id="auto")])
def test_group_advantages_backend_argument(backend):
    device = device_for_tests()
    if backend != "auto":
        require(backend, device)
    rewards = random_rewards(16, 3, seed=5, all_nan_rows=(2,)).to(device)
    want = group_advantages(rewards, 4, weights=[1.0, 2.0, 0.5])
    got = group_advantages(rewards, 4, weights=[1.0, 2.0, 0.5], backend=backend)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


# ----------------------------------------------------------------------------- process supervision


def test_process_advantages_hand_computed():
    # group 1 (completions 0, 1): valid step rewards {0, 3, 3}: mean 2, deviations [-2, 1, 1],
    #   unbiased var (4+1+1)/2 = 3 -> normalized c0: [-2/s, 1/s] (ends 1, 3), c1: [1/s] (end 2)
    # group 2 (completions 2, 3): c2 {5, 1} (ends 0, 4), c3 has no steps:
    #   mean 3, var (4+4)/1 = 8 -> normalized c2: [2/s8, -2/s8]
    step_rewards = torch.tensor([[0.0, 3.0], [3.0, NAN], [5.0, 1.0], [NAN, NAN]], dtype=torch.float64)
    step_ends = torch.tensor([[1, 3], [2, -1], [0, 4], [-1, 99]])
    adv = process_advantages(step_rewards, step_ends, 2, 5)
    s, s8 = math.sqrt(3) + EPS, math.sqrt(8) + EPS
    close(adv, [
        # t:  0        1        2      3      4
        [-1 / s, -1 / s, 1 / s, 1 / s, 0.0],     # t<=1: -2/s + 1/s; 1<t<=3: 1/s; after the last step: 0
        [1 / s, 1 / s, 1 / s, 0.0, 0.0],         # one step ending at 2
        [0.0, -2 / s8, -2 / s8, -2 / s8, -2 / s8],  # t=0: 2/s8 - 2/s8; then only the step ending at 4
        [0.0, 0.0, 0.0, 0.0, 0.0],               # no steps
    ])
    assert adv.shape == (4, 5) and adv.dtype == torch.float64


def test_process_advantages_unsorted_and_shared_ends():
    # one group of one completion, steps [2, 4, 9] ending at tokens [3, 0, 3] (unsorted, two share 3):
    # mean 5, deviations [-3, -1, 4], var (9+1+16)/2 = 13 -> normalized [-3, -1, 4] / s
    # t=0: all three steps (0); t=1..3: the two ending at 3 ((-3+4)/s); t=4: none
    r = torch.tensor([[2.0, 4.0, 9.0]], dtype=torch.float64)
    ends = torch.tensor([[3, 0, 3]])
    s = math.sqrt(13) + EPS
    close(process_advantages(r, ends, 1, 5), [[0.0, 1 / s, 1 / s, 1 / s, 0.0]])


def test_process_advantages_float16_computes_in_float32():
    r = torch.tensor([[1.0, NAN], [2.0, 4.0]], dtype=torch.float16)
    got = process_advantages(r, torch.tensor([[0, 0], [1, 2]], dtype=torch.int32), 2, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, process_advantages(r.double(), torch.tensor([[0, 0], [1, 2]]), 2, 3).float())


# ----------------------------------------------------------------------------- KL in the reward


def test_kl_penalized_rewards_hand_computed():
    rewards = torch.tensor([1.0, 2.0], dtype=torch.float64)
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -2.0], [-0.2, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    # row 0: d = ref - logp = [-0.5, 0]: k3 = e^-0.5 + 0.5 - 1, and 0
    # row 1: d = [0.3, (2.0 masked out)]: k3 = e^0.3 - 0.3 - 1
    expected = [1.0 - 0.1 * (math.exp(-0.5) + 0.5 - 1), 2.0 - 0.1 * (math.exp(0.3) - 0.3 - 1)]
    close(kl_penalized_rewards(rewards, logps, ref, mask, 0.1), expected)
    close(kl_penalized_rewards(rewards, logps, ref, mask.bool(), 0.1), expected)
    close(kl_penalized_rewards(rewards, logps, ref, mask.double(), 0.1), expected)
    close(kl_penalized_rewards(rewards, logps, ref, mask, 0.0), [1.0, 2.0])
    # masked-out positions are ignored even when non-finite; NaN rewards pass through
    logps_bad = logps.clone()
    logps_bad[1, 1] = NAN
    ref_bad = ref.clone()
    ref_bad[1, 1] = -math.inf
    got = kl_penalized_rewards(torch.tensor([NAN, 2.0], dtype=torch.float64), logps_bad, ref_bad, mask, 0.1)
    assert math.isnan(got[0].item())
    close(got[1:], expected[1:])


def test_kl_penalized_rewards_gradient_and_dtype():
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    out = kl_penalized_rewards(torch.tensor([0.0], dtype=torch.float64), logps, ref, torch.tensor([[True, False]]), 0.2)
    out.sum().backward()
    # d/dlogp of -0.2 * (e^d - d - 1), d = ref - logp: 0.2 * (e^d - 1) at unmasked positions, 0 elsewhere
    close(logps.grad, [[0.2 * (math.exp(-0.5) - 1), 0.0]])
    got = kl_penalized_rewards(torch.zeros(1, dtype=torch.bfloat16), logps.detach().half(), ref.half(),
                               torch.ones(1, 2), 1.0)
    assert got.dtype == torch.float32


# ----------------------------------------------------------------------------- invalid inputs

R = torch.tensor([1.0, 2.0, 3.0, 4.0])
R2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
SR = torch.tensor([[1.0, 2.0], [3.0, NAN]])
SE = torch.tensor([[0, 1], [2, -1]])
LP = torch.full((2, 3), -1.0)
M = torch.ones(2, 3, dtype=torch.bool)


def _inf(x, idx=0):
    x = x.clone()
    x.view(-1)[idx] = math.inf
    return x


INVALID = [
    # group_advantages
    ("ga-list", lambda: group_advantages([1.0, 2.0], 2), TypeError, "rewards"),
    ("ga-int", lambda: group_advantages(torch.tensor([1, 2]), 2), TypeError, "rewards"),
    ("ga-3d", lambda: group_advantages(torch.zeros(2, 2, 2), 2), ValueError, "rewards"),
    ("ga-0d", lambda: group_advantages(torch.tensor(1.0), 1), ValueError, "rewards"),
    ("ga-inf", lambda: group_advantages(_inf(R), 2), ValueError, "rewards"),
    ("ga-neginf-2d", lambda: group_advantages(-_inf(R2, 3), 2), ValueError, "rewards"),
    ("ga-G0", lambda: group_advantages(R, 0), ValueError, "num_generations"),
    ("ga-Gfloat", lambda: group_advantages(R, 2.0), TypeError, "num_generations"),
    ("ga-Gbool", lambda: group_advantages(R, True), TypeError, "num_generations"),
    ("ga-Gdivide", lambda: group_advantages(R, 3), ValueError, "num_generations"),
    ("ga-wlen", lambda: group_advantages(R2, 2, weights=[1.0]), ValueError, "weights"),
    ("ga-wlen-1d", lambda: group_advantages(R, 2, weights=[1.0, 2.0]), ValueError, "weights"),
    ("ga-wtype", lambda: group_advantages(R2, 2, weights="ab"), TypeError, "weights"),
    ("ga-wstr-items", lambda: group_advantages(R2, 2, weights=["a", "b"]), TypeError, "weights"),
    ("ga-w2d", lambda: group_advantages(R2, 2, weights=torch.ones(1, 2)), ValueError, "weights"),
    ("ga-wnan", lambda: group_advantages(R2, 2, weights=[1.0, NAN]), ValueError, "weights"),
    ("ga-scale", lambda: group_advantages(R, 2, scale_rewards="std"), ValueError, "scale_rewards"),
    ("ga-scale-type", lambda: group_advantages(R, 2, scale_rewards=1), TypeError, "scale_rewards"),
    ("ga-eps-neg", lambda: group_advantages(R, 2, eps=-1e-4), ValueError, "eps"),
    ("ga-eps-nan", lambda: group_advantages(R, 2, eps=NAN), ValueError, "eps"),
    ("ga-eps-type", lambda: group_advantages(R, 2, eps="1e-4"), TypeError, "eps"),
    ("ga-backend-type", lambda: group_advantages(R, 2, backend=1), TypeError, "backend"),
    ("ga-backend-name", lambda: group_advantages(R, 2, backend="nope"), ValueError, "backend"),
    # normalize_groups
    ("ng-2d", lambda: normalize_groups(R2, 2, "group", 1e-4), ValueError, "rewards"),
    ("ng-scale", lambda: normalize_groups(R, 2, "mean", 1e-4), ValueError, "scale_rewards"),
    ("ng-G", lambda: normalize_groups(R, 3, "group", 1e-4), ValueError, "num_generations"),
    ("ng-eps", lambda: normalize_groups(R, 2, "group", -1.0), ValueError, "eps"),
    # process_advantages
    ("pa-1d", lambda: process_advantages(R, SE, 2, 3), ValueError, "step_rewards"),
    ("pa-int", lambda: process_advantages(SE, SE, 2, 3), TypeError, "step_rewards"),
    ("pa-inf", lambda: process_advantages(_inf(SR), SE, 2, 3), ValueError, "step_rewards"),
    ("pa-ends-float", lambda: process_advantages(SR, SE.float(), 2, 3), TypeError, "step_ends"),
    ("pa-ends-list", lambda: process_advantages(SR, [[0, 1], [2, 0]], 2, 3), TypeError, "step_ends"),
    ("pa-ends-shape", lambda: process_advantages(SR, SE[:, :1], 2, 3), ValueError, "step_ends"),
    ("pa-ends-high", lambda: process_advantages(SR, torch.tensor([[0, 3], [2, -1]]), 2, 3), ValueError, "step_ends"),
    ("pa-ends-neg", lambda: process_advantages(SR, torch.tensor([[-1, 1], [2, -1]]), 2, 3), ValueError, "step_ends"),
    ("pa-G", lambda: process_advantages(SR, SE, 3, 3), ValueError, "num_generations"),
    ("pa-G0", lambda: process_advantages(SR, SE, 0, 3), ValueError, "num_generations"),
    ("pa-T0", lambda: process_advantages(SR, SE, 2, 0), ValueError, "completion_length"),
    ("pa-Tfloat", lambda: process_advantages(SR, SE, 2, 3.0), TypeError, "completion_length"),
    ("pa-eps", lambda: process_advantages(SR, SE, 2, 3, eps=-0.1), ValueError, "eps"),
    # kl_penalized_rewards
    ("kl-rewards-2d", lambda: kl_penalized_rewards(LP, LP, LP, M, 0.1), ValueError, "rewards"),
    ("kl-rewards-int", lambda: kl_penalized_rewards(torch.tensor([1, 2]), LP, LP, M, 0.1), TypeError, "rewards"),
    ("kl-rewards-inf", lambda: kl_penalized_rewards(_inf(R[:2]), LP, LP, M, 0.1), ValueError, "rewards"),
    ("kl-logps-int", lambda: kl_penalized_rewards(R[:2], LP.long(), LP, M, 0.1), TypeError, "^logps"),
    ("kl-logps-rows", lambda: kl_penalized_rewards(R[:3], LP, LP, M, 0.1), ValueError, "^logps"),
    ("kl-logps-1d", lambda: kl_penalized_rewards(R[:2], LP[0], LP, M, 0.1), ValueError, "^logps"),
    ("kl-logps-inf", lambda: kl_penalized_rewards(R[:2], -_inf(LP), LP, M, 0.1), ValueError, "^logps"),
    ("kl-ref-shape", lambda: kl_penalized_rewards(R[:2], LP, LP[:, :2], M, 0.1), ValueError, "ref_logps"),
    ("kl-ref-nan", lambda: kl_penalized_rewards(R[:2], LP, LP * NAN, M, 0.1), ValueError, "ref_logps"),
    ("kl-mask-shape", lambda: kl_penalized_rewards(R[:2], LP, LP, M[:, :2], 0.1), ValueError, "mask"),
    ("kl-mask-values", lambda: kl_penalized_rewards(R[:2], LP, LP, M.long() * 2, 0.1), ValueError, "mask"),
    ("kl-mask-type", lambda: kl_penalized_rewards(R[:2], LP, LP, [[1, 1, 1]] * 2, 0.1), TypeError, "mask"),
    ("kl-coef-neg", lambda: kl_penalized_rewards(R[:2], LP, LP, M, -0.1), ValueError, "kl_coef"),
    ("kl-coef-nan", lambda: kl_penalized_rewards(R[:2], LP, LP, M, NAN), ValueError, "kl_coef"),
    ("kl-coef-type", lambda: kl_penalized_rewards(R[:2], LP, LP, M, "0.1"), TypeError, "kl_coef"),
]


@pytest.mark.parametrize("call,exc,name", [pytest.param(c, e, n, id=i) for i, c, e, n in INVALID])
def test_invalid_inputs(call, exc, name):
    with pytest.raises(exc, match=name):
        call()

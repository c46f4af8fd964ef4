// The vocabulary row pass of grpo_kernels: parameter structs, the per-token GRPO
// epilogue, the reward -> advantage helpers and the launcher declarations. The row sweep
// itself, written once for the CUDA kernels and the CPU row pass, is row_sweep.h.
//
// No torch here: the CUDA kernels (row_pass.cu) include CUDA headers only, the
// C++/OpenMP implementation (row_pass_cpu.cpp) and the bindings (bindings.cpp)
// include torch. The semantics are those of grpo_kernels/backends/base.py:
//
//   s = c * tanh(z / c) (softcap c > 0, else s = z), u = s / T
//   lse = logsumexp(u), entropy = lse - sum(softmax(u) * u), target_logit = u[target]
//   (0 where target < 0 or target >= V)
//   g_u = dlogp * (onehot - p) - dentropy * p * (u - lse + entropy), p = exp(u - lse)
//   g_z = g_u / T * (1 - tanh(z / c)^2)
//
// Storage dtypes: fp32, fp64, fp16, bf16 logits; every reduction accumulates in fp32
// (fp64 for fp64 logits). Per-row vectors (lse, entropy, target_logit, dlogp,
// dentropy, token inputs, outputs) are contiguous [n] in the accumulation dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define GRPO_HD __host__ __device__
#else
#define GRPO_HD
#endif

namespace grpo {

enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// grpo, bnpo, dr_grpo, dapo and luspo share the clipped objective (they differ only
// in the normalization, folded into the per-token weight).
enum LossKind : int { kClipped = 0, kCispo = 1, kSapo = 2 };

enum ScaleMode : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// One chunk of raw logits z [n, V]: row r starts at logits + r * ld (elements), unit
// column stride.
struct RowArgs {
  void* logits;
  const int64_t* targets;  // [n]
  int64_t n;
  int64_t V;
  int64_t ld;
  double temperature;  // > 0
  double softcap;      // <= 0: no softcap
  int dtype;           // DType of the logits
};

struct StatsOut {
  void* lse;
  void* entropy;
  void* target_logit;
};

// The objective's options, already resolved on the host.
struct EpilogueOptions {
  int kind;              // LossKind
  double lo;             // 1 - epsilon_low (clipped)
  double hi;             // 1 + epsilon_high (clipped)
  int has_delta;
  double delta;          // upper clamp of the unclipped ratio (clipped, has_delta)
  double eps_high;       // cispo's clamp
  float sapo_pos;        // sapo temperatures, fp32 like torch.where(A > 0, float, float)
  float sapo_neg;
  double beta;           // k3 KL weight (0: no KL term)
  int bias_correction_kl;
};

// Per-token inputs, [n] in the accumulation dtype; old/ref/policy_scale may be null
// (old null: on-policy, old = logp; ref is read only when beta != 0); adv is null when the
// advantages come from the rewards (RewardArgs).
struct TokenArgs {
  const void* old;
  const void* adv;
  const void* weight;
  const void* ref;
  const void* policy_scale;
};

struct RowStatsParams {
  RowArgs row;
  StatsOut out;
  int need_entropy;  // 0: the entropy is not computed (written as 0): the log-prob-only pass
};

struct RowGradParams {
  RowArgs row;
  const void* lse;
  const void* entropy;
  const void* dlogp;
  const void* dentropy;  // may be null
};

// Rewards -> advantages in the fused epilogue (advantages.group_advantages, TRL 1.16's
// sum_then_normalize): each row's advantage is that of its sequence seq[r], from the combined
// rewards of its group of G sequences (and the batch's std for kScaleBatch). Accumulation dtype.
struct RewardArgs {
  const void* rewards;  // [B, K] row-major; null: no rewards (TokenArgs.adv holds the advantages)
  const void* weights;  // [K] the reward functions' weights
  const int64_t* seq;   // [n] each row's sequence index in [0, B)
  int64_t B;
  int64_t K;
  int64_t G;  // num_generations, B % G == 0
  int mode;   // ScaleMode
  double eps;
};

struct RowFusedParams {
  RowArgs row;
  StatsOut out;
  TokenArgs tok;
  EpilogueOptions opt;
  void* loss;   // [n] weight * loss_t
  void* dlogp;  // [n] dL/dlogp
  RewardArgs rew;
  void* adv_out;  // [n] each row's advantage, written when rew.rewards is set
};

struct GroupNormParams {
  int64_t B;  // rewards [B], B % G == 0
  int64_t G;  // num_generations
  int mode;   // ScaleMode
  double eps;
  int dtype;  // kF32 or kF64 (rewards and out)
  const void* rewards;
  void* out;
};

// The divergence row pass (grpo_kernels/divergence.py; divergence_sweep.h): both heads' raw logits
// of one chunk, [n, V] each, row r of a head at logits + r * ld (elements), unit column stride.
struct DivHead {
  const void* logits;
  int64_t ld;
  int dtype;           // DType; the heads' dtypes may differ
  double scale;        // HeadTransform.kernel_args(): scale, softcap (<= 0: none), temperature
  double softcap;
  double temperature;
};

struct DivergenceParams {
  DivHead student;
  DivHead teacher;
  int64_t n;
  int64_t V;
  double beta;        // in [0, 1]; 0 and 1 are their own cases
  const void* coef;   // dLoss/dD in the accumulation dtype, [] or [n]; null: no gradient
  int coef_per_row;   // 1: coef[r], 0: coef[0]
  void* out;          // [n, V] the student's dtype, row r at out + r * ld_out; may be student.logits
  int64_t ld_out;
  void* div;          // [n] outputs, accumulation dtype (the student's: fp64 for fp64, else fp32)
  void* entropy;
};

// ---------------------------------------------------------------------------------
// The per-token GRPO epilogue: epilogue.token_epilogue for one token, same op order
// (saturating exp, zero-wins scaling).

template <class A>
GRPO_HD inline A grpo_exp(A x);
template <>
GRPO_HD inline float grpo_exp<float>(float x) { return ::expf(x); }
template <>
GRPO_HD inline double grpo_exp<double>(double x) { return ::exp(x); }

template <class A>
GRPO_HD inline bool grpo_isnan(A x) { return x != x; }

// epilogue.exp_sat: exp with its argument clamped at floor(log(finfo.max) * 1000) / 1000,
// so that a huge log-ratio saturates at a finite value instead of overflowing to inf
template <class A>
GRPO_HD inline A grpo_exp_cap();
template <>
GRPO_HD inline float grpo_exp_cap<float>() { return float(88.722); }
template <>
GRPO_HD inline double grpo_exp_cap<double>() { return 709.782; }

template <class A>
GRPO_HD inline A grpo_exp_sat(A x) {
  const A cap = grpo_exp_cap<A>();
  return grpo_exp<A>(x > cap ? cap : x);  // torch.clamp(max=): NaN passes through
}

// epilogue.scale: x * s, exactly 0 where s == 0 (even for an infinite x)
template <class A>
GRPO_HD inline A grpo_scale(A x, A s) {
  return s == A(0) ? A(0) : x * s;
}

template <class A>
GRPO_HD inline void token_epilogue_one(A logp, const A* old, A adv, A weight, const A* ref, const A* scale,
                                       const EpilogueOptions& o, A* loss_out, A* dlogp_out) {
  const A one = A(1), zero = A(0);
  const A w = grpo_exp_sat<A>(logp - (old ? *old : logp));
  A loss, d;
  if (o.kind == kCispo) {
    const A eh = A(o.eps_high);
    const A c = w > eh ? eh : w;  // torch.clamp(max=): NaN passes through
    loss = -c * adv * logp;
    d = -c * adv;
  } else if (o.kind == kSapo) {
    const A tau = adv > zero ? A(o.sapo_pos) : A(o.sapo_neg);
    const A sig = one / (one + grpo_exp<A>(-(tau * (w - one))));
    loss = -sig * A(4) / tau * adv;
    d = A(-4) * sig * (one - sig) * adv * w;
  } else {
    const A lo = A(o.lo), hi = A(o.hi);
    A w2 = w < lo ? lo : w;
    w2 = w2 > hi ? hi : w2;
    const A dw2 = (w >= lo && w <= hi) ? one : zero;
    A w1 = w, dw1 = one;
    if (o.has_delta) {
      const A dl = A(o.delta);
      w1 = w > dl ? dl : w;
      dw1 = w <= dl ? one : zero;
    }
    const A a = w1 * adv, b = w2 * adv;
    const A tie = a == b ? A(0.5) : zero;
    const A wa = (a < b ? one : zero) + tie;
    const A wb = (a > b ? one : zero) + tie;
    const A mn = grpo_isnan(a) ? a : (grpo_isnan(b) ? b : (a < b ? a : b));  // torch.minimum
    loss = -mn;
    d = -(wa * dw1 + wb * dw2) * adv * w;
  }
  if (scale) {
    loss = grpo_scale(loss, *scale);
    d = grpo_scale(d, *scale);
  }
  if (o.beta != 0.0) {
    const A diff = *ref - logp;
    const A e = grpo_exp_sat<A>(diff);
    A kl = e - diff - one;
    A dkl = one - e;
    if (o.bias_correction_kl) {
      const A klw = kl * w;
      dkl = -diff * w;  // = (dkl + kl) * w without cancelling a saturated e (NaN, or inf under FMA)
      kl = klw;
    }
    loss = loss + A(o.beta) * kl;
    d = d + A(o.beta) * dkl;
  }
  *loss_out = grpo_scale(loss, weight);
  *dlogp_out = grpo_scale(d, weight);
}

// ---------------------------------------------------------------------------------
// Group normalization helpers (advantages.normalize_groups): NaN rewards are unscored and
// left out of the mean and the std; std is the unbiased sample std as TRL's nanstd
// computes it (sqrt(nanmean((x - mean)^2) * n / (n - 1)), NaN when n <= 1).

template <class A>
GRPO_HD inline A grpo_finite_max();
template <>
GRPO_HD inline float grpo_finite_max<float>() { return 3.40282347e+38f; }
template <>
GRPO_HD inline double grpo_finite_max<double>() { return 1.7976931348623157e+308; }

template <class A>
GRPO_HD inline A grpo_nan() {
  return A(0) / A(0) * A(0);  // NaN without <limits> in device code
}

template <class A>
GRPO_HD inline A grpo_sqrt(A x);
template <>
GRPO_HD inline float grpo_sqrt<float>(float x) { return ::sqrtf(x); }
template <>
GRPO_HD inline double grpo_sqrt<double>(double x) { return ::sqrt(x); }

// torch.nan_to_num(a, nan=0.0)
template <class A>
GRPO_HD inline A grpo_nan_to_num(A a) {
  const A big = grpo_finite_max<A>();
  if (a != a) return A(0);
  if (a > big) return big;
  if (a < -big) return -big;
  return a;
}

// std from the sum of squared deviations q over n non-NaN entries
template <class A>
GRPO_HD inline A grpo_nanstd_from(A q, int64_t n) {
  const A cnt = A(n);
  const A var = q / cnt;
  const A corr = n > 1 ? cnt / (cnt - A(1)) : grpo_nan<A>();
  return grpo_sqrt<A>(var * corr);
}

// the values a group's statistics are taken over: combined rewards x[k] as given ...
template <class A>
struct PlainRewards {
  const A* x;
  GRPO_HD A operator()(int64_t k) const { return x[k]; }
};

// ... or combined here from rewards [B, K] and weights [K] (advantages._combine_rewards):
// nansum_k w_k r_ik, NaN when every r_ik is NaN (an unscorable completion)
template <class A>
GRPO_HD inline A grpo_combined_reward(const A* r, const A* w, int64_t K, int64_t i) {
  A s = A(0);
  bool scored = false;
  for (int64_t k = 0; k < K; ++k) {
    const A x = r[i * K + k];
    if (x == x) scored = true;
    const A p = x * w[k];
    if (p == p) s += p;
  }
  return scored ? s : grpo_nan<A>();
}

template <class A>
struct CombinedRewards {
  const A* r;
  const A* w;
  int64_t K;
  int64_t start;  // row of x(0)
  GRPO_HD A operator()(int64_t k) const { return grpo_combined_reward<A>(r, w, K, start + k); }
};

// mean of the non-NaN entries of x(0..len), and their count
template <class A, class X>
GRPO_HD inline A grpo_nan_mean_of(const X& x, int64_t len, int64_t* count) {
  A s = A(0);
  int64_t n = 0;
  for (int64_t k = 0; k < len; ++k) {
    const A v = x(k);
    if (v == v) {
      s += v;
      ++n;
    }
  }
  *count = n;
  return s / A(n);
}

// mean and std of the non-NaN entries of x(0..len)
template <class A, class X>
GRPO_HD inline void grpo_nan_mean_std_of(const X& x, int64_t len, A* mean, A* std) {
  int64_t n;
  const A m = grpo_nan_mean_of<A>(x, len, &n);
  A q = A(0);
  for (int64_t k = 0; k < len; ++k) {
    const A v = x(k);
    if (v == v) {
      const A d = v - m;
      q += d * d;
    }
  }
  *mean = m;
  *std = grpo_nanstd_from<A>(q, n);
}

// a group's mean and the std its advantages divide by: its own under kScaleGroup (0 for a group of
// one), batch_sigma under kScaleBatch; under kScaleBatch and kScaleNone only the mean is computed
template <class A, class X>
GRPO_HD inline void grpo_group_mean_sigma(const X& x, int64_t G, int mode, A batch_sigma, A* mean, A* sigma) {
  if (mode == kScaleGroup) {
    grpo_nan_mean_std_of<A>(x, G, mean, sigma);
    if (G == 1) *sigma = A(0);
    return;
  }
  int64_t n;
  *mean = grpo_nan_mean_of<A>(x, G, &n);
  *sigma = batch_sigma;  // unused under kScaleNone
}

template <class A>
GRPO_HD inline void grpo_nan_mean_std(const A* x, int64_t len, A* mean, A* std) {
  grpo_nan_mean_std_of<A>(PlainRewards<A>{x}, len, mean, std);
}

// one advantage given its group's mean and the std used (none: no division)
template <class A>
GRPO_HD inline A grpo_group_advantage(A x, int mode, A mean, A sigma, A eps) {
  A a = x - mean;
  if (mode != kScaleNone) a = a / (sigma + eps);
  return grpo_nan_to_num<A>(a);
}

// the advantages of one group given its mean and the std used
template <class A>
GRPO_HD inline void grpo_group_advantages(const A* x, A* out, int64_t G, int mode, A mean, A sigma, A eps) {
  for (int64_t k = 0; k < G; ++k) out[k] = grpo_group_advantage<A>(x[k], mode, mean, sigma, eps);
}

// the advantage of sequence s from the rewards: normalize_groups of the combined rewards of its
// group, dividing by batch_sigma (group_sweep.h's reward_batch_sigma) under kScaleBatch
template <class A>
GRPO_HD inline A grpo_reward_advantage(const RewardArgs& ra, int64_t s, A batch_sigma) {
  const A* r = static_cast<const A*>(ra.rewards);
  const A* w = static_cast<const A*>(ra.weights);
  const int64_t start = (s / ra.G) * ra.G;
  A mean, sigma;
  grpo_group_mean_sigma<A>(CombinedRewards<A>{r, w, ra.K, start}, ra.G, ra.mode, batch_sigma, &mean, &sigma);
  return grpo_group_advantage<A>(grpo_combined_reward<A>(r, w, ra.K, s), ra.mode, mean, sigma, A(ra.eps));
}

// ---------------------------------------------------------------------------------
// The CUDA row kernels' block size (threads = lanes per row), from V and the storage dtype only:
// about 8 16-byte vectors per thread, between 128 and kMaxThreads. The device emulation uses it too.
constexpr int kMaxThreads = 512;
constexpr int kGroupThreads = 256;  // group_normalize's one block

GRPO_HD inline int row_threads(int64_t V, int dtype) {
  const int64_t elems_per_vec = (dtype == kF64) ? 2 : (dtype == kF32) ? 4 : 8;
  const int64_t vecs = (V + elems_per_vec - 1) / elems_per_vec;
  int64_t t = 128;
  while (t < kMaxThreads && t * 8 < vecs) t *= 2;
  return (int)t;
}

// ---------------------------------------------------------------------------------
// CPU implementation (row_pass_cpu.cpp); throws std::invalid_argument on a bad dtype.
// emulate_device: run the CUDA kernels' launch on the host (their lanes, column split and
// reduction tree), for testing without a GPU; else the production CPU path.

void row_stats_cpu(const RowStatsParams& p, bool emulate_device);
void row_grad_cpu(const RowGradParams& p, bool emulate_device);
void row_fused_cpu(const RowFusedParams& p, bool emulate_device);
void group_normalize_cpu(const GroupNormParams& p, bool emulate_device);
void divergence_rows_cpu(const DivergenceParams& p, bool emulate_device);

}  // namespace grpo

// ---------------------------------------------------------------------------------
// CUDA launchers (row_pass.cu). Each launches on `stream` on device `device` (the
// caller's current device is restored) and returns cudaGetLastError() after its launch.
#if defined(GRPO_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace grpo {
cudaError_t row_stats_cuda(const RowStatsParams& p, int device, cudaStream_t stream);
cudaError_t row_grad_cuda(const RowGradParams& p, int device, cudaStream_t stream);
cudaError_t row_fused_cuda(const RowFusedParams& p, int device, cudaStream_t stream);
cudaError_t group_normalize_cuda(const GroupNormParams& p, int device, cudaStream_t stream);
cudaError_t divergence_rows_cuda(const DivergenceParams& p, int device, cudaStream_t stream);
}  // namespace grpo
#endif

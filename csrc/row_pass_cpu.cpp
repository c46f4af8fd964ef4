// C++ row pass for CPU tensors (see row_pass.h for the math).
//
// Rows are spread over threads with at::parallel_for (OpenMP in the torch wheels); each
// row is swept once for its statistics (online max / sum-exp / sum(p * (u - max)) with
// running-max rescaling, block by block so that the inner loops vectorize) and once
// more to write the gradient in place. Storage float / double / at::Half / at::BFloat16,
// accumulation fp32 (fp64 for double).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "row_pass.h"

namespace grpo {
namespace {

constexpr int64_t kBlock = 256;  // elements converted and reduced per inner loop

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// exp for the hot loops: branch-free so that `omp simd` loops vectorize. fp32: Cody-Waite
// range reduction and a degree-6 polynomial (about 1 ulp on [-87, 88]; 0 below -87,
// which the sums here never miss: their largest term is 1). fp64: the libm exp.
inline float vexp(float x) {
  const float lo = -87.0f;
  const bool under = !(x >= lo);  // also NaN -> handled below
  float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
  const float fn = xc * 1.44269504088896341f;
  const int32_t n = (int32_t)(fn + (fn >= 0.0f ? 0.5f : -0.5f));
  const float nf = (float)n;
  float r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return under ? (x != x ? x : 0.0f) : y;
}
inline double vexp(double x) { return std::exp(x); }

template <class A>
inline A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

template <class T>
inline typename AccOf<T>::type load(const T* p, int64_t i) {
  return static_cast<typename AccOf<T>::type>(p[i]);
}

template <class T>
inline void store(T* p, int64_t i, typename AccOf<T>::type v) {
  p[i] = static_cast<T>(v);
}

template <class A>
struct Xform {
  A inv_t, cap_over_t, inv_cap;
  bool softcap;
  explicit Xform(const RowArgs& r) {
    softcap = r.softcap > 0.0;
    inv_t = A(1.0 / r.temperature);
    cap_over_t = softcap ? A(r.softcap / r.temperature) : A(0);
    inv_cap = softcap ? A(1.0 / r.softcap) : A(0);
  }
};

// u = softcap(z) / T for z[0..cnt) into buf; returns the block's max.
template <class T, class A>
inline A transform_block(const T* z, int64_t cnt, const Xform<A>& xf, A* buf) {
  A mx = neg_inf<A>();
  if (xf.softcap) {
    for (int64_t k = 0; k < cnt; ++k) {
      const A u = std::tanh(load(z, k) * xf.inv_cap) * xf.cap_over_t;
      buf[k] = u;
      mx = u > mx ? u : mx;
    }
  } else {
    const A it = xf.inv_t;
#pragma omp simd reduction(max : mx)
    for (int64_t k = 0; k < cnt; ++k) {
      const A u = load(z, k) * it;
      buf[k] = u;
      mx = u > mx ? u : mx;
    }
  }
  return mx;
}

template <class A>
struct RowResult {
  A lse, entropy, target_logit;
};

// kEnt = false: the log-prob-only pass, without the entropy's sum (entropy written as 0)
template <class T, class A, bool kEnt = true>
RowResult<A> row_stats_one(const T* row, int64_t V, int64_t tgt, const Xform<A>& xf) {
  alignas(64) A buf[kBlock];
  A m = neg_inf<A>(), s = A(0), t = A(0);
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t cnt = std::min<int64_t>(kBlock, V - j0);
    const A cm = transform_block(row + j0, cnt, xf, buf);
    if (cm == neg_inf<A>()) {  // every element -inf (or NaN: then the sums become NaN)
      for (int64_t k = 0; k < cnt; ++k) {
        if (buf[k] != buf[k]) s = buf[k];
      }
      continue;
    }
    if (cm > m) {  // (a NaN element is not the max, but it reaches the sums below)
      if (s != A(0)) {
        const A delta = m - cm;
        const A a = vexp(delta);
        t = a * (t + delta * s);
        s *= a;
      }
      m = cm;
    }
    A bs = A(0), bt = A(0);
    const A mm = m;
    if constexpr (kEnt) {
#pragma omp simd reduction(+ : bs, bt)
      for (int64_t k = 0; k < cnt; ++k) {
        const A d = buf[k] - mm;
        const A e = vexp(d);
        bs += e;
        bt += e > A(0) ? e * d : A(0);
      }
    } else {
#pragma omp simd reduction(+ : bs)
      for (int64_t k = 0; k < cnt; ++k) bs += vexp(buf[k] - mm);
    }
    s += bs;
    t += bt;
  }
  RowResult<A> r;
  if (s == A(0)) {  // every logit -inf
    r.lse = neg_inf<A>();
    r.entropy = neg_inf<A>();
  } else {  // (NaN logits give NaN)
    const A ls = std::log(s);
    r.lse = m + ls;
    r.entropy = ls - t / s;
  }
  if constexpr (!kEnt) r.entropy = A(0);
  if (tgt >= 0 && tgt < V) {
    const A z = load(row, tgt);
    r.target_logit = xf.softcap ? std::tanh(z * xf.inv_cap) * xf.cap_over_t : z * xf.inv_t;
  } else {
    r.target_logit = A(0);
  }
  return r;
}

template <class T, class A>
void row_grad_one(T* row, int64_t V, int64_t tgt, const Xform<A>& xf, A lse, A ent, A dl, A dent, bool has_dent) {
  alignas(64) A buf[kBlock];
  alignas(64) A dcap[kBlock];
  for (int64_t j0 = 0; j0 < V; j0 += kBlock) {
    const int64_t cnt = std::min<int64_t>(kBlock, V - j0);
    T* z = row + j0;
    if (xf.softcap) {
      for (int64_t k = 0; k < cnt; ++k) {
        const A th = std::tanh(load(z, k) * xf.inv_cap);
        buf[k] = th * xf.cap_over_t;
        dcap[k] = (A(1) - th * th) * xf.inv_t;
      }
    } else {
      const A it = xf.inv_t;
#pragma omp simd
      for (int64_t k = 0; k < cnt; ++k) {
        buf[k] = load(z, k) * it;
        dcap[k] = it;
      }
    }
    // every element as if it were not the target (vectorizes), then the target redone
    const int64_t tk = tgt - j0;
    const A u_t = (tk >= 0 && tk < cnt) ? buf[tk] : A(0);
    if (has_dent) {
#pragma omp simd
      for (int64_t k = 0; k < cnt; ++k) {
        const A u = buf[k];
        const A p = vexp(u - lse);
        const A et = p > A(0) ? p * (u - lse + ent) : A(0);
        buf[k] = (p * (-dl) - et * dent) * dcap[k];
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < cnt; ++k) buf[k] = vexp(buf[k] - lse) * (-dl) * dcap[k];
    }
    if (tk >= 0 && tk < cnt) {
      const A p = vexp(u_t - lse);
      A g = p * (-dl) + dl;
      if (has_dent) g -= (p > A(0) ? p * (u_t - lse + ent) : A(0)) * dent;
      buf[tk] = g * dcap[tk];
    }
    for (int64_t k = 0; k < cnt; ++k) store(z, k, buf[k]);
  }
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

template <class T>
void row_stats_t(const RowStatsParams& p) {
  using A = typename AccOf<T>::type;
  const Xform<A> xf(p.row);
  const T* base = static_cast<const T*>(p.row.logits);
  A* lse = static_cast<A*>(p.out.lse);
  A* ent = static_cast<A*>(p.out.entropy);
  A* tl = static_cast<A*>(p.out.target_logit);
  const bool need_entropy = p.need_entropy != 0;
  at::parallel_for(0, p.row.n, grain_rows(p.row.V), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* row = base + r * p.row.ld;
      const RowResult<A> st = need_entropy ? row_stats_one<T, A, true>(row, p.row.V, p.row.targets[r], xf)
                                           : row_stats_one<T, A, false>(row, p.row.V, p.row.targets[r], xf);
      lse[r] = st.lse;
      ent[r] = st.entropy;
      tl[r] = st.target_logit;
    }
  });
}

template <class T>
void row_grad_t(const RowGradParams& p) {
  using A = typename AccOf<T>::type;
  const Xform<A> xf(p.row);
  T* base = static_cast<T*>(p.row.logits);
  const A* lse = static_cast<const A*>(p.lse);
  const A* ent = static_cast<const A*>(p.entropy);
  const A* dl = static_cast<const A*>(p.dlogp);
  const A* dent = static_cast<const A*>(p.dentropy);
  at::parallel_for(0, p.row.n, grain_rows(p.row.V), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      row_grad_one<T, A>(base + r * p.row.ld, p.row.V, p.row.targets[r], xf, lse[r], ent[r], dl[r],
                         dent ? dent[r] : A(0), dent != nullptr);
    }
  });
}

template <class A>
inline void epilogue_at(const TokenArgs& tk, const EpilogueOptions& opt, int64_t i, A logp, A adv, A* loss,
                        A* dlogp) {
  const A* old = tk.old ? static_cast<const A*>(tk.old) + i : nullptr;
  const A* ref = (opt.beta != 0.0) ? static_cast<const A*>(tk.ref) + i : nullptr;
  const A* scale = tk.policy_scale ? static_cast<const A*>(tk.policy_scale) + i : nullptr;
  token_epilogue_one<A>(logp, old, adv, static_cast<const A*>(tk.weight)[i], ref, scale, opt, loss, dlogp);
}

template <class T>
void row_fused_t(const RowFusedParams& p) {
  using A = typename AccOf<T>::type;
  const Xform<A> xf(p.row);
  T* base = static_cast<T*>(p.row.logits);
  A* lse = static_cast<A*>(p.out.lse);
  A* ent = static_cast<A*>(p.out.entropy);
  A* tl = static_cast<A*>(p.out.target_logit);
  A* loss = static_cast<A*>(p.loss);
  A* dlogp = static_cast<A*>(p.dlogp);
  const bool rewards = p.rew.rewards != nullptr;
  // the batch's std (scale "batch") once per launch; each row's group statistics in its epilogue
  const A batch_sigma = rewards ? grpo_batch_sigma<A>(p.rew) : A(0);
  at::parallel_for(0, p.row.n, grain_rows(p.row.V), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* row = base + r * p.row.ld;
      const int64_t tgt = p.row.targets[r];
      const RowResult<A> st = row_stats_one<T, A>(row, p.row.V, tgt, xf);
      A l, d, adv;
      if (rewards) {
        adv = grpo_reward_advantage<A>(p.rew, p.rew.seq[r], batch_sigma);
        static_cast<A*>(p.adv_out)[r] = adv;
      } else {
        adv = static_cast<const A*>(p.tok.adv)[r];
      }
      epilogue_at<A>(p.tok, p.opt, r, st.target_logit - st.lse, adv, &l, &d);
      lse[r] = st.lse;
      ent[r] = st.entropy;
      tl[r] = st.target_logit;
      loss[r] = l;
      dlogp[r] = d;
      row_grad_one<T, A>(row, p.row.V, tgt, xf, st.lse, st.entropy, d, A(0), false);
    }
  });
}

template <class A>
void group_normalize_t(const GroupNormParams& p) {
  const A* r = static_cast<const A*>(p.rewards);
  A* out = static_cast<A*>(p.out);
  const int64_t B = p.B, G = p.G;
  A batch_std = A(0);
  if (p.mode == kScaleBatch && B > 1) {
    A batch_mean;
    grpo_nan_mean_std<A>(r, B, &batch_mean, &batch_std);
  }
  for (int64_t g = 0; g < B / G; ++g) {
    A mean, sigma;
    grpo_group_mean_sigma<A>(PlainRewards<A>{r + g * G}, G, p.mode, batch_std, &mean, &sigma);
    grpo_group_advantages<A>(r + g * G, out + g * G, G, p.mode, mean, sigma, A(p.eps));
  }
}

[[noreturn]] void bad_dtype(const char* what, int dtype) {
  throw std::invalid_argument(std::string("grpo_kernels ") + what + ": unsupported dtype code " +
                              std::to_string(dtype));
}

template <class P, class F32, class F64, class F16, class BF16>
void dispatch(const P& p, int dtype, const char* what, F32 f32, F64 f64, F16 f16, BF16 bf16) {
  switch (dtype) {
    case kF32:
      return f32(p);
    case kF64:
      return f64(p);
    case kF16:
      return f16(p);
    case kBF16:
      return bf16(p);
    default:
      bad_dtype(what, dtype);
  }
}

}  // namespace

void row_stats_cpu(const RowStatsParams& p) {
  if (p.row.n <= 0) return;
  dispatch(p, p.row.dtype, "row_stats", row_stats_t<float>, row_stats_t<double>, row_stats_t<c10::Half>,
           row_stats_t<c10::BFloat16>);
}

void row_grad_cpu(const RowGradParams& p) {
  if (p.row.n <= 0) return;
  dispatch(p, p.row.dtype, "row_grad_", row_grad_t<float>, row_grad_t<double>, row_grad_t<c10::Half>,
           row_grad_t<c10::BFloat16>);
}

void row_fused_cpu(const RowFusedParams& p) {
  if (p.row.n <= 0) return;
  dispatch(p, p.row.dtype, "row_fused_", row_fused_t<float>, row_fused_t<double>, row_fused_t<c10::Half>,
           row_fused_t<c10::BFloat16>);
}

void group_normalize_cpu(const GroupNormParams& p) {
  if (p.B <= 0) return;
  if (p.G <= 0 || p.B % p.G != 0) throw std::invalid_argument("grpo_kernels group_normalize: B % G != 0");
  if (p.dtype == kF32) return group_normalize_t<float>(p);
  if (p.dtype == kF64) return group_normalize_t<double>(p);
  bad_dtype("group_normalize", p.dtype);
}

}  // namespace grpo

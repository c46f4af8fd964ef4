// The row pass on CPU tensors: two host policies of row_sweep.h (and of divergence_sweep.h).
//
// - Production (the `cpp` backend): one lane per row, 256-column vectors whose loops `omp simd`
//   vectorizes (a polynomial exp), rows spread over threads with at::parallel_for.
// - Device emulation (`emulate_device`): the CUDA launch reproduced on the host, row by row: the
//   kernel's lane count row_threads(V, dtype), its 16-byte vectors and their owners, its
//   element-by-element sums, the warp xor-shuffle tree and the block merge (row_pass.cu's
//   block_reduce). It runs the kernels' code in their summation order, so that the CPU suite checks
//   what only a GPU would otherwise run; its exp is the libm one (the device's __expf differs in
//   the last bits, the order does not).
//
// Storage float / double / at::Half / at::BFloat16, accumulation fp32 (fp64 for double).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "divergence_sweep.h"
#include "group_sweep.h"
#include "row_sweep.h"

namespace grpo {
namespace {

constexpr int kHostWidth = 256;  // production: columns converted and reduced per inner loop

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

// log1p on [0, 1] (the divergence's logaddexp), branch-free for `omp simd`: fp32 as
// 2 atanh(s), s = x / (2 + x) in [0, 1/3], by its series to s^13 (truncation < 3e-8 relative);
// fp64: the libm log1p.
inline float vlog1p_unit(float x) {
  // s clamped at 1e-12 (log1p then 2e-12 instead of x: far below an ulp of log m): s * s^2 stays
  // a normal number, where a subnormal one would cost ~100 cycles per element
  float s = x / (2.0f + x);
  s = s > 1e-12f ? s : 1e-12f;
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  return 2.0f * s + 2.0f * s * s2 * p;
}
inline double vlog1p_unit(double x) { return std::log1p(x); }

// g[0..cnt) rounded to the storage type
template <class T, class A>
void store_as(T* p, int cnt, const A* g) {
  for (int k = 0; k < cnt; ++k) p[k] = static_cast<T>(g[k]);  // (fp16: `omp simd` here is slower)
}

// bfloat16: c10's round-to-nearest-even (NaN -> 0x7fc0) without its branch, so that the loop
// vectorizes; the same bits
inline void store_as(c10::BFloat16* p, int cnt, const float* g) {
  uint16_t* out = reinterpret_cast<uint16_t*>(p);
#pragma omp simd
  for (int k = 0; k < cnt; ++k) {
    uint32_t b;
    std::memcpy(&b, &g[k], sizeof(b));
    const uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    out[k] = g[k] != g[k] ? uint16_t(0x7fc0) : uint16_t(r);
  }
}

// The device's block_reduce over the values of L lanes (L a multiple of 32): per warp, the
// xor-shuffle tree (each lane merges its value with its partner's previous one), then warp 0 over
// the warps' lane-0 results padded with `empty`. Returns what every lane gets.
template <class V, class M>
void emulate_warp_tree(V* v, const M& merge) {
  V prev[32];
  for (int off = 16; off > 0; off >>= 1) {
    std::copy(v, v + 32, prev);
    for (int lane = 0; lane < 32; ++lane) v[lane] = merge(prev[lane], prev[lane ^ off]);
  }
}

template <class V, class M>
V emulate_block_reduce(V* vals, int L, const V& empty, const M& merge) {
  const int nwarps = (L + 31) / 32;
  V warp0[32];
  for (int w = 0; w < nwarps; ++w) emulate_warp_tree(vals + 32 * w, merge);
  for (int lane = 0; lane < 32; ++lane) warp0[lane] = lane < nwarps ? vals[32 * lane] : empty;
  emulate_warp_tree(warp0, merge);
  return warp0[0];
}

// kEmulate: the device emulation (W = 16 bytes, L lanes); else production (W = kHostWidth, 1 lane)
template <class T, bool kEmulate>
struct HostPolicy {
  using Store = T;
  using A = typename AccOf<T>::type;
  static constexpr int kWidth = kEmulate ? int(16 / sizeof(T)) : kHostWidth;
  static constexpr int kUnroll = 1;
  static constexpr bool kSimd = !kEmulate;

  int lanes;  // 1 in production

  static A exp(A x) { return kEmulate ? std::exp(x) : vexp(x); }
  static A log(A x) { return std::log(x); }
  static A tanh(A x) { return std::tanh(x); }
  static A log1p_unit(A x) { return kEmulate ? std::log1p(x) : vlog1p_unit(x); }

  // the host reads the columns where they are used: no loads to put in flight
  using Raw = const T*;
  static void load(const T* row, int64_t c0, int, Raw& p) { p = row + c0; }
  static A at(Raw p, int k) { return static_cast<A>(p[k]); }
  // another storage type's columns (the divergence's teacher), converted to A directly
  template <class U>
  using RawOf = const U*;
  template <class U>
  static void load_as(const U* row, int64_t c0, int, RawOf<U>& p) { p = row + c0; }
  template <class U>
  static A at_as(RawOf<U> p, int k) { return static_cast<A>(p[k]); }
  static void store(T* row, int64_t c0, int cnt, const A* g) { store_as(row + c0, cnt, g); }
  static A load_one(const T* row, int64_t i) { return static_cast<A>(row[i]); }

  bool leader() const { return true; }
  template <class F, class V, class M>
  V reduce_lanes(const F& f, const V& empty, const M& merge) const {
    if (!kEmulate) return f(0, 1);
    V vals[kMaxThreads];
    for (int lane = 0; lane < lanes; ++lane) vals[lane] = f(lane, lanes);
    return emulate_block_reduce(vals, lanes, empty, merge);
  }
  template <class F>
  void for_lanes(const F& f) const {
    for (int lane = 0; lane < lanes; ++lane) f(lane, lanes);
  }
  void broadcast(A (&)[3]) const {}  // one thread runs every lane of a row
};

template <class T, bool kEmulate>
HostPolicy<T, kEmulate> row_policy(const RowArgs& r) {
  return HostPolicy<T, kEmulate>{kEmulate ? row_threads(r.V, r.dtype) : 1};
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)); }

// f(r) for every row, the rows spread over threads (each row is independent: the same bits
// whatever the thread count)
template <class F>
void each_row(int64_t n, int64_t V, const F& f) {
  at::parallel_for(0, n, grain_rows(V), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i);
  });
}
template <class F>
void each_row(const RowArgs& r, const F& f) {
  each_row(r.n, r.V, f);
}

template <class T, bool kEmulate>
void row_stats_t(const RowStatsParams& p) {
  using P = HostPolicy<T, kEmulate>;
  const P pol = row_policy<T, kEmulate>(p.row);
  const Xform<P> xf(p.row);
  if (p.need_entropy) {
    each_row(p.row, [&](int64_t r) { stats_row<P, true>(pol, p, r, xf); });
  } else {
    each_row(p.row, [&](int64_t r) { stats_row<P, false>(pol, p, r, xf); });
  }
}

template <class T, bool kEmulate>
void row_grad_t(const RowGradParams& p) {
  using P = HostPolicy<T, kEmulate>;
  const P pol = row_policy<T, kEmulate>(p.row);
  const Xform<P> xf(p.row);
  each_row(p.row, [&](int64_t r) { grad_row<P>(pol, p, r, xf); });
}

template <class T, bool kEmulate>
void row_fused_t(const RowFusedParams& p) {
  using P = HostPolicy<T, kEmulate>;
  const P pol = row_policy<T, kEmulate>(p.row);
  const Xform<P> xf(p.row);
  // the batch's std (scale "batch") once per launch, as each device block computes it
  const typename P::A batch_sigma = reward_batch_sigma(pol, p.rew);
  each_row(p.row, [&](int64_t r) { fused_row<P>(pol, p, r, xf, batch_sigma); });
}

template <class A, bool kEmulate>
void group_normalize_t(const GroupNormParams& p) {
  group_normalize_all(HostPolicy<A, kEmulate>{kEmulate ? kGroupThreads : 1}, p);
}

// the divergence rows of student type T and teacher type Tt (the student's lanes and vectors)
template <class T, bool kEmulate, class Tt>
void divergence_t(const DivergenceParams& p) {
  using P = HostPolicy<T, kEmulate>;
  const P pol{kEmulate ? row_threads(p.V, p.student.dtype) : 1};
  const HeadXform<P> xs(p.student), xt(p.teacher);
  const DivConsts<typename P::A> c(p.beta);
  switch (div_mode(p.beta)) {
    case kDivForward:
      return each_row(p.n, p.V, [&](int64_t r) { divergence_row<P, Tt, kDivForward>(pol, p, r, xs, xt, c); });
    case kDivReverse:
      return each_row(p.n, p.V, [&](int64_t r) { divergence_row<P, Tt, kDivReverse>(pol, p, r, xs, xt, c); });
    default:
      return each_row(p.n, p.V, [&](int64_t r) { divergence_row<P, Tt, kDivMixture>(pol, p, r, xs, xt, c); });
  }
}

[[noreturn]] void bad_dtype(const char* what, int dtype) {
  throw std::invalid_argument(std::string("grpo_kernels ") + what + ": unsupported dtype code " +
                              std::to_string(dtype));
}

// F<T, kEmulate>::run(p) for the storage type T of the dtype code `dtype`
template <template <class, bool> class F, class Params>
void dispatch_dtype(int dtype, const Params& p, bool emulate, const char* what) {
  switch (dtype) {
    case kF32:
      return emulate ? F<float, true>::run(p) : F<float, false>::run(p);
    case kF64:
      return emulate ? F<double, true>::run(p) : F<double, false>::run(p);
    case kF16:
      return emulate ? F<c10::Half, true>::run(p) : F<c10::Half, false>::run(p);
    case kBF16:
      return emulate ? F<c10::BFloat16, true>::run(p) : F<c10::BFloat16, false>::run(p);
    default:
      bad_dtype(what, dtype);
  }
}

// F<T, kEmulate>::run(p) for the row dtype
template <template <class, bool> class F, class Params>
void dispatch(const Params& p, bool emulate, const char* what) {
  if (p.row.n <= 0) return;
  dispatch_dtype<F>(p.row.dtype, p, emulate, what);
}

// F<T, kEmulate>::run(p) for the student's dtype, teacher dtype Tt
template <class Tt>
struct DivergenceWith {
  template <class T, bool E>
  struct F {
    static void run(const DivergenceParams& p) { divergence_t<T, E, Tt>(p); }
  };
};

template <class T, bool E>
struct Stats {
  static void run(const RowStatsParams& p) { row_stats_t<T, E>(p); }
};
template <class T, bool E>
struct Grad {
  static void run(const RowGradParams& p) { row_grad_t<T, E>(p); }
};
template <class T, bool E>
struct Fused {
  static void run(const RowFusedParams& p) { row_fused_t<T, E>(p); }
};

}  // namespace

void row_stats_cpu(const RowStatsParams& p, bool emulate_device) {
  dispatch<Stats>(p, emulate_device, "row_stats");
}

void row_grad_cpu(const RowGradParams& p, bool emulate_device) { dispatch<Grad>(p, emulate_device, "row_grad_"); }

void row_fused_cpu(const RowFusedParams& p, bool emulate_device) {
  dispatch<Fused>(p, emulate_device, "row_fused_");
}

void divergence_rows_cpu(const DivergenceParams& p, bool emulate_device) {
  if (p.n <= 0) return;
  const char* student = "divergence_rows_ (student)";
  switch (p.teacher.dtype) {
    case kF32:
      return dispatch_dtype<DivergenceWith<float>::F>(p.student.dtype, p, emulate_device, student);
    case kF64:
      return dispatch_dtype<DivergenceWith<double>::F>(p.student.dtype, p, emulate_device, student);
    case kF16:
      return dispatch_dtype<DivergenceWith<c10::Half>::F>(p.student.dtype, p, emulate_device, student);
    case kBF16:
      return dispatch_dtype<DivergenceWith<c10::BFloat16>::F>(p.student.dtype, p, emulate_device, student);
    default:
      bad_dtype("divergence_rows_ (teacher)", p.teacher.dtype);
  }
}

void group_normalize_cpu(const GroupNormParams& p, bool emulate_device) {
  if (p.B <= 0) return;
  if (p.G <= 0 || p.B % p.G != 0) throw std::invalid_argument("grpo_kernels group_normalize: B % G != 0");
  if (p.dtype == kF32) return emulate_device ? group_normalize_t<float, true>(p) : group_normalize_t<float, false>(p);
  if (p.dtype == kF64) return emulate_device ? group_normalize_t<double, true>(p) : group_normalize_t<double, false>(p);
  bad_dtype("group_normalize", p.dtype);
}

}  // namespace grpo

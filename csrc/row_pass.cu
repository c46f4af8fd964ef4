// CUDA kernels of the vocabulary row pass (see row_pass.h for the math).
//
// One block per row (grid-stride over rows): 16-byte vectorized loads/stores over the
// aligned body of the row (a scalar head and tail take care of any alignment and any V),
// online max / sum-exp / sum(p * (u - max)) with running-max rescaling, warp-shuffle
// then shared-memory block reductions, int64 offsets throughout. CUDA headers only: the
// torch binding (bindings.cpp) passes plain params structs and the stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "row_pass.h"

namespace grpo {
namespace {

constexpr int kMaxThreads = 512;  // row kernels: __launch_bounds__ caps registers at 128
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread

// ---------------------------------------------------------------------------------
// storage <-> accumulation

template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_acc(typename AccOf<T>::type x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// exp of a non-positive argument (up to rounding) in the hot loops: the SFU path in fp32
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }

template <class A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000u); }
template <>
__device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ull); }

template <class T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// z -> u = softcap(z) / T
template <class A>
struct Xform {
  A inv_t, cap_over_t, inv_cap;
  bool softcap;
  __device__ __forceinline__ A operator()(A z) const {
    return softcap ? acc_tanh(z * inv_cap) * cap_over_t : z * inv_t;
  }
};

template <class A>
__device__ __forceinline__ Xform<A> make_xform(const RowArgs& r) {
  Xform<A> x;
  x.softcap = r.softcap > 0.0;
  x.inv_t = A(1.0 / r.temperature);
  x.cap_over_t = x.softcap ? A(r.softcap / r.temperature) : A(0);
  x.inv_cap = x.softcap ? A(1.0 / r.softcap) : A(0);
  return x;
}

// Row split into a scalar head (up to the first 16-byte boundary), a vector body and a
// scalar tail.
template <class T>
struct RowSplit {
  int64_t head, nvec, tail_start;
  __device__ __forceinline__ RowSplit(const T* row, int64_t V) {
    constexpr int N = Vec<T>::N;
    const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
    int64_t h = (int64_t)(((16 - (addr & 15)) & 15) / sizeof(T));
    if ((addr % sizeof(T)) != 0) h = V;  // not even element-aligned: all scalar
    head = h < V ? h : V;
    nvec = (V - head) / N;
    tail_start = head + nvec * N;
  }
};

// ---------------------------------------------------------------------------------
// online softmax statistics: m = running max, s = sum exp(u - m), t = sum exp(u - m) (u - m)

template <class A>
struct Online {
  A m, s, t;
};

template <class A>
__device__ __forceinline__ void online_init(Online<A>& o) {
  o.m = neg_inf<A>();
  o.s = A(0);
  o.t = A(0);
}

// ENT = false throughout: the log-prob-only pass, without the entropy's sum t (left 0)
template <class A, bool ENT = true>
__device__ __forceinline__ void online_rescale(Online<A>& o, A new_max) {
  if (o.s != A(0)) {  // (a NaN sum stays NaN)
    const A delta = o.m - new_max;
    const A a = fast_exp(delta);
    if constexpr (ENT) o.t = a * (o.t + delta * o.s);
    o.s *= a;
  }
  o.m = new_max;
}

template <class A, int K, bool ENT = true>
__device__ __forceinline__ void online_add(Online<A>& o, const A (&u)[K]) {
  A cm = u[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = u[k] > cm ? u[k] : cm;
  if (cm == neg_inf<A>()) {  // all -inf: nothing to add, unless a NaN hid behind the max
    bool nan = false;
#pragma unroll
    for (int k = 0; k < K; ++k) nan |= u[k] != u[k];
    if (nan) o.s = grpo_nan<A>();
    return;
  }
  if (cm > o.m) online_rescale<A, ENT>(o, cm);  // a NaN element reaches the sums below
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A d = u[k] - o.m;
    const A e = fast_exp(d);
    o.s += e;
    if constexpr (ENT) o.t += e > A(0) ? e * d : A(0);
  }
}

template <class A, bool ENT = true>
__device__ __forceinline__ Online<A> online_merge(const Online<A>& a, const Online<A>& b) {
  Online<A> r;
  r.m = a.m > b.m ? a.m : b.m;
  r.s = A(0);
  r.t = A(0);
  // s == 0: an empty (all -inf) partial; NaN partials propagate
  if (a.s != A(0)) {
    const A d = a.m - r.m;
    const A e = fast_exp(d);
    r.s += e * a.s;
    if constexpr (ENT) r.t += e * (a.t + d * a.s);
  }
  if (b.s != A(0)) {
    const A d = b.m - r.m;
    const A e = fast_exp(d);
    r.s += e * b.s;
    if constexpr (ENT) r.t += e * (b.t + d * b.s);
  }
  return r;
}

// Warp-wide merge: every lane of the warp gets the merge of the warp's 32 partials.
template <class A, bool ENT>
__device__ __forceinline__ Online<A> warp_merge(Online<A> o) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online<A> other;
    other.m = __shfl_xor_sync(0xffffffffu, o.m, off);
    other.s = __shfl_xor_sync(0xffffffffu, o.s, off);
    other.t = ENT ? __shfl_xor_sync(0xffffffffu, o.t, off) : A(0);
    o = online_merge<A, ENT>(o, other);
  }
  return o;
}

// Block-wide merge; every thread gets the result. `scratch` holds 32 entries.
template <class A, bool ENT = true>
__device__ __forceinline__ Online<A> block_merge(Online<A> o, Online<A>* scratch) {
  o = warp_merge<A, ENT>(o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // scratch may still be read from a previous row
  if (lane == 0) scratch[warp] = o;
  __syncthreads();
  if (warp == 0) {
    Online<A> v;
    if (lane < nwarps) {
      v = scratch[lane];
    } else {
      online_init(v);
    }
    v = warp_merge<A, ENT>(v);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// The statistics sweep of one row: every thread of the block returns the row's Online.
template <class T, class A, bool ENT = true>
__device__ __forceinline__ Online<A> row_online(const T* row, int64_t V, const Xform<A>& xf, Online<A>* scratch) {
  constexpr int N = Vec<T>::N;
  const RowSplit<T> sp(row, V);
  const int64_t tid = threadIdx.x, bd = blockDim.x;
  Online<A> o;
  online_init(o);
  for (int64_t i = tid; i < sp.head; i += bd) {
    A u[1] = {xf(to_acc(row[i]))};
    online_add<A, 1, ENT>(o, u);
  }
  const Vec<T>* body = reinterpret_cast<const Vec<T>*>(row + sp.head);
  int64_t j = tid;
  for (; j + (kUnroll - 1) * bd < sp.nvec; j += kUnroll * bd) {
    Vec<T> x[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) x[q] = body[j + q * bd];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      A u[N];
#pragma unroll
      for (int k = 0; k < N; ++k) u[k] = xf(to_acc(x[q].v[k]));
      online_add<A, N, ENT>(o, u);
    }
  }
  for (; j < sp.nvec; j += bd) {
    const Vec<T> x = body[j];
    A u[N];
#pragma unroll
    for (int k = 0; k < N; ++k) u[k] = xf(to_acc(x.v[k]));
    online_add<A, N, ENT>(o, u);
  }
  for (int64_t i = sp.tail_start + tid; i < V; i += bd) {
    A u[1] = {xf(to_acc(row[i]))};
    online_add<A, 1, ENT>(o, u);
  }
  return block_merge<A, ENT>(o, scratch);
}

template <class A>
__device__ __forceinline__ void finish_stats(const Online<A>& o, A* lse, A* entropy) {
  if (o.s == A(0)) {  // every logit -inf: logsumexp is -inf, and no finite term enters the entropy
    *lse = neg_inf<A>();
    *entropy = neg_inf<A>();
  } else {  // (NaN logits give NaN)
    const A ls = acc_log(o.s);
    *lse = o.m + ls;
    *entropy = ls - o.t / o.s;
  }
}

template <class T, class A>
__device__ __forceinline__ A target_value(const T* row, int64_t V, int64_t tgt, const Xform<A>& xf) {
  return (tgt >= 0 && tgt < V) ? xf(to_acc(row[tgt])) : A(0);
}

// The gradient sweep of one row (in place).
template <class T, class A>
__device__ __forceinline__ void row_grad_sweep(T* row, int64_t V, int64_t tgt, const Xform<A>& xf, A lse, A ent,
                                               A dl, A dent, bool has_dent) {
  constexpr int N = Vec<T>::N;
  const RowSplit<T> sp(row, V);
  const int64_t tid = threadIdx.x, bd = blockDim.x;
  auto grad = [&](A z, int64_t idx) -> A {
    A u, dcap;
    if (xf.softcap) {
      const A th = acc_tanh(z * xf.inv_cap);
      u = th * xf.cap_over_t;
      dcap = (A(1) - th * th) * xf.inv_t;
    } else {
      u = z * xf.inv_t;
      dcap = xf.inv_t;
    }
    const A p = fast_exp(u - lse);
    A g = p * (-dl);
    if (idx == tgt) g += dl;
    if (has_dent) {
      const A et = p > A(0) ? p * (u - lse + ent) : A(0);
      g -= et * dent;
    }
    return g * dcap;
  };
  for (int64_t i = tid; i < sp.head; i += bd) row[i] = from_acc<T>(grad(to_acc(row[i]), i));
  Vec<T>* body = reinterpret_cast<Vec<T>*>(row + sp.head);
  int64_t j = tid;
  for (; j + (kUnroll - 1) * bd < sp.nvec; j += kUnroll * bd) {
    Vec<T> x[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) x[q] = body[j + q * bd];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int64_t base = sp.head + (j + q * bd) * N;
#pragma unroll
      for (int k = 0; k < N; ++k) x[q].v[k] = from_acc<T>(grad(to_acc(x[q].v[k]), base + k));
      body[j + q * bd] = x[q];
    }
  }
  for (; j < sp.nvec; j += bd) {
    Vec<T> x = body[j];
    const int64_t base = sp.head + j * N;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = from_acc<T>(grad(to_acc(x.v[k]), base + k));
    body[j] = x;
  }
  for (int64_t i = sp.tail_start + tid; i < V; i += bd) row[i] = from_acc<T>(grad(to_acc(row[i]), i));
}

// ---------------------------------------------------------------------------------
// kernels

template <class T, bool ENT>
__global__ void __launch_bounds__(kMaxThreads, sizeof(T) == 8 ? 1 : 2) row_stats_kernel(RowStatsParams p) {
  using A = typename AccOf<T>::type;
  __shared__ Online<A> scratch[32];
  const Xform<A> xf = make_xform<A>(p.row);
  const T* base = static_cast<const T*>(p.row.logits);
  for (int64_t r = blockIdx.x; r < p.row.n; r += gridDim.x) {
    const T* row = base + r * p.row.ld;
    const Online<A> o = row_online<T, A, ENT>(row, p.row.V, xf, scratch);
    if (threadIdx.x == 0) {
      A lse, ent;
      finish_stats(o, &lse, &ent);
      static_cast<A*>(p.out.lse)[r] = lse;
      static_cast<A*>(p.out.entropy)[r] = ENT ? ent : A(0);
      static_cast<A*>(p.out.target_logit)[r] = target_value(row, p.row.V, p.row.targets[r], xf);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kMaxThreads, sizeof(T) == 8 ? 1 : 2) row_grad_kernel(RowGradParams p) {
  using A = typename AccOf<T>::type;
  const Xform<A> xf = make_xform<A>(p.row);
  T* base = static_cast<T*>(p.row.logits);
  const bool has_dent = p.dentropy != nullptr;
  for (int64_t r = blockIdx.x; r < p.row.n; r += gridDim.x) {
    const A lse = static_cast<const A*>(p.lse)[r];
    const A ent = static_cast<const A*>(p.entropy)[r];
    const A dl = static_cast<const A*>(p.dlogp)[r];
    const A dent = has_dent ? static_cast<const A*>(p.dentropy)[r] : A(0);
    row_grad_sweep<T, A>(base + r * p.row.ld, p.row.V, p.row.targets[r], xf, lse, ent, dl, dent, has_dent);
  }
}

template <class A>
__device__ __forceinline__ void epilogue_at(const TokenArgs& tk, const EpilogueOptions& opt, int64_t i, A logp,
                                            A adv, A* loss, A* dlogp) {
  const A* old = tk.old ? static_cast<const A*>(tk.old) + i : nullptr;
  const A* ref = (opt.beta != 0.0) ? static_cast<const A*>(tk.ref) + i : nullptr;
  const A* scale = tk.policy_scale ? static_cast<const A*>(tk.policy_scale) + i : nullptr;
  token_epilogue_one<A>(logp, old, adv, static_cast<const A*>(tk.weight)[i], ref, scale, opt, loss, dlogp);
}

template <class A>
__device__ __forceinline__ A block_sum(A v, A* scratch);
template <class A, class X>
__device__ A block_nanstd(const X& x, int64_t len, A* scratch);

template <class T>
__global__ void __launch_bounds__(kMaxThreads, sizeof(T) == 8 ? 1 : 2) row_fused_kernel(RowFusedParams p) {
  using A = typename AccOf<T>::type;
  __shared__ Online<A> scratch[32];
  __shared__ A bcast[3];
  __shared__ A rscratch[32];
  const Xform<A> xf = make_xform<A>(p.row);
  T* base = static_cast<T*>(p.row.logits);
  const bool rewards = p.rew.rewards != nullptr;
  // the batch's std (scale "batch"), once per block by the whole block (block-uniform branch);
  // each row's group statistics in its epilogue (row_pass.h's grpo_reward_advantage)
  A batch_sigma = A(0);
  if (rewards && p.rew.mode == kScaleBatch && p.rew.B > 1) {
    const CombinedRewards<A> x{static_cast<const A*>(p.rew.rewards), static_cast<const A*>(p.rew.weights), p.rew.K,
                               0};
    batch_sigma = block_nanstd<A>(x, p.rew.B, rscratch);
  }
  for (int64_t r = blockIdx.x; r < p.row.n; r += gridDim.x) {
    T* row = base + r * p.row.ld;
    const int64_t tgt = p.row.targets[r];
    const Online<A> o = row_online<T, A>(row, p.row.V, xf, scratch);
    if (threadIdx.x == 0) {
      A lse, ent, loss, dl, adv;
      finish_stats(o, &lse, &ent);
      const A tl = target_value(row, p.row.V, tgt, xf);
      if (rewards) {
        adv = grpo_reward_advantage<A>(p.rew, p.rew.seq[r], batch_sigma);
        static_cast<A*>(p.adv_out)[r] = adv;
      } else {
        adv = static_cast<const A*>(p.tok.adv)[r];
      }
      epilogue_at<A>(p.tok, p.opt, r, tl - lse, adv, &loss, &dl);
      static_cast<A*>(p.out.lse)[r] = lse;
      static_cast<A*>(p.out.entropy)[r] = ent;
      static_cast<A*>(p.out.target_logit)[r] = tl;
      static_cast<A*>(p.loss)[r] = loss;
      static_cast<A*>(p.dlogp)[r] = dl;
      bcast[0] = lse;
      bcast[1] = ent;
      bcast[2] = dl;
    }
    __syncthreads();
    const A lse = bcast[0], ent = bcast[1], dl = bcast[2];
    // every thread has read target_value's element before any thread overwrites it
    row_grad_sweep<T, A>(row, p.row.V, tgt, xf, lse, ent, dl, A(0), false);
    // bcast is rewritten only after block_merge's barriers of the next row
  }
}

template <class A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  // (every thread of the block calls it: the reductions synchronize)
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    A x = lane < nwarps ? scratch[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  return scratch[0];
}

// The nanstd of x(0..len) (row_pass.h's grpo_nan_mean_std_of) by block reductions: every thread of
// the block calls it and gets the result.
template <class A, class X>
__device__ A block_nanstd(const X& x, int64_t len, A* scratch) {
  A s = A(0), c = A(0);
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const A v = x(i);
    if (v == v) {
      s += v;
      c += A(1);
    }
  }
  s = block_sum(s, scratch);
  const int64_t n = (int64_t)block_sum(c, scratch);
  const A mean = s / A(n);
  A q = A(0);
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const A v = x(i);
    if (v == v) {
      const A d = v - mean;
      q += d * d;
    }
  }
  return grpo_nanstd_from<A>(block_sum(q, scratch), n);
}

// Group-normalized advantages (advantages.normalize_groups): one block; the batch std
// (scale "batch") by block reductions, then one thread per group.
template <class A>
__global__ void group_normalize_kernel(GroupNormParams p) {
  __shared__ A scratch[32];
  const A* r = static_cast<const A*>(p.rewards);
  A* out = static_cast<A*>(p.out);
  const int64_t B = p.B, G = p.G;
  A batch_std = A(0);
  if (p.mode == kScaleBatch && B > 1) batch_std = block_nanstd<A>(PlainRewards<A>{r}, B, scratch);
  for (int64_t g = threadIdx.x; g < B / G; g += blockDim.x) {
    A mean, sigma;
    grpo_group_mean_sigma<A>(PlainRewards<A>{r + g * G}, G, p.mode, batch_std, &mean, &sigma);
    grpo_group_advantages<A>(r + g * G, out + g * G, G, p.mode, mean, sigma, A(p.eps));
  }
}

// ---------------------------------------------------------------------------------
// launch helpers

struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&prev);
    if (err == cudaSuccess && device >= 0 && device != prev) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
  }
};

int row_threads(int64_t V, int dtype) {
  const int64_t elems_per_vec = (dtype == kF64) ? 2 : (dtype == kF32) ? 4 : 8;
  const int64_t vecs = (V + elems_per_vec - 1) / elems_per_vec;
  // about 8 vectors per thread, between 128 and kMaxThreads threads
  int64_t t = 128;
  while (t < kMaxThreads && t * 8 < vecs) t *= 2;
  return (int)t;
}

unsigned row_blocks(int64_t n) {
  const int64_t cap = 2147483647;  // gridDim.x limit; rows beyond it are grid-strided
  return (unsigned)(n < cap ? n : cap);
}

template <class Params, class KF32, class KF64, class KF16, class KBF16>
cudaError_t launch_by_dtype(const Params& p, int dtype, dim3 grid, dim3 block, int device, cudaStream_t stream, KF32 kf32,
                            KF64 kf64, KF16 kf16, KBF16 kbf16) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  switch (dtype) {
    case kF32:
      kf32<<<grid, block, 0, stream>>>(p);
      break;
    case kF64:
      kf64<<<grid, block, 0, stream>>>(p);
      break;
    case kF16:
      kf16<<<grid, block, 0, stream>>>(p);
      break;
    case kBF16:
      kbf16<<<grid, block, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t row_stats_cuda(const RowStatsParams& p, int device, cudaStream_t stream) {
  if (p.row.n <= 0) return cudaSuccess;
  const dim3 grid(row_blocks(p.row.n)), block(row_threads(p.row.V, p.row.dtype));
  if (p.need_entropy) {
    return launch_by_dtype(p, p.row.dtype, grid, block, device, stream, row_stats_kernel<float, true>,
                           row_stats_kernel<double, true>, row_stats_kernel<__half, true>,
                           row_stats_kernel<__nv_bfloat16, true>);
  }
  return launch_by_dtype(p, p.row.dtype, grid, block, device, stream, row_stats_kernel<float, false>,
                         row_stats_kernel<double, false>, row_stats_kernel<__half, false>,
                         row_stats_kernel<__nv_bfloat16, false>);
}

cudaError_t row_grad_cuda(const RowGradParams& p, int device, cudaStream_t stream) {
  if (p.row.n <= 0) return cudaSuccess;
  return launch_by_dtype(p, p.row.dtype, dim3(row_blocks(p.row.n)), dim3(row_threads(p.row.V, p.row.dtype)), device,
                         stream, row_grad_kernel<float>, row_grad_kernel<double>, row_grad_kernel<__half>,
                         row_grad_kernel<__nv_bfloat16>);
}

cudaError_t row_fused_cuda(const RowFusedParams& p, int device, cudaStream_t stream) {
  if (p.row.n <= 0) return cudaSuccess;
  return launch_by_dtype(p, p.row.dtype, dim3(row_blocks(p.row.n)), dim3(row_threads(p.row.V, p.row.dtype)), device,
                         stream, row_fused_kernel<float>, row_fused_kernel<double>, row_fused_kernel<__half>,
                         row_fused_kernel<__nv_bfloat16>);
}

cudaError_t group_normalize_cuda(const GroupNormParams& p, int device, cudaStream_t stream) {
  if (p.B <= 0) return cudaSuccess;
  if (p.G <= 0 || p.B % p.G != 0) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  const int threads = 256;
  if (p.dtype == kF32) {
    group_normalize_kernel<float><<<1, threads, 0, stream>>>(p);
  } else if (p.dtype == kF64) {
    group_normalize_kernel<double><<<1, threads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace grpo

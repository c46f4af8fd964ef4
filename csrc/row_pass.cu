// CUDA kernels of the vocabulary row pass: the device policy of row_sweep.h (one block per row,
// grid-stride over rows; lane = thread, L = blockDim.x = row_threads(V, dtype)) and the launchers.
// The row work itself (transform, online statistics, gradient, epilogue, reward reductions) is
// row_sweep.h's, shared with the CPU row pass and its device emulation. CUDA headers only: the torch
// binding (bindings.cpp) passes plain params structs and the stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "divergence_sweep.h"
#include "group_sweep.h"
#include "row_sweep.h"

namespace grpo {
namespace {

// ---------------------------------------------------------------------------------
// storage <-> accumulation

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void from_acc(float x, float* y) { *y = x; }
__device__ __forceinline__ void from_acc(double x, double* y) { *y = x; }
__device__ __forceinline__ void from_acc(float x, __half* y) { *y = __float2half_rn(x); }
__device__ __forceinline__ void from_acc(float x, __nv_bfloat16* y) { *y = __float2bfloat16_rn(x); }

template <class T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// N columns of storage type T (the divergence's teacher, in the student's vector split)
template <class T, int N>
struct alignas(16) Cols {
  T v[N];
};

// ---------------------------------------------------------------------------------
// block reductions: the warp's xor-shuffle tree (offsets 16..1), then warp 0 merges the warps'
// results (scratch[lane] for lane < nwarps, else the empty value) by the same tree. Every thread
// of the block calls it and gets the result. row_pass_cpu.cpp's emulation reproduces this order.

__device__ __forceinline__ float shfl_xor(float v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }
__device__ __forceinline__ double shfl_xor(double v, int off) { return __shfl_xor_sync(0xffffffffu, v, off); }
template <class A>
__device__ __forceinline__ Online<A> shfl_xor(const Online<A>& o, int off) {
  return Online<A>{shfl_xor(o.m, off), shfl_xor(o.s, off), shfl_xor(o.t, off)};
}
template <class A>
__device__ __forceinline__ DivOnline<A> shfl_xor(const DivOnline<A>& o, int off) {
  return DivOnline<A>{shfl_xor(o.ms, off), shfl_xor(o.ss, off), shfl_xor(o.ts, off),
                      shfl_xor(o.mt, off), shfl_xor(o.st, off), shfl_xor(o.x, off)};
}
template <class A>
__device__ __forceinline__ DivPair<A> shfl_xor(const DivPair<A>& o, int off) {
  return DivPair<A>{shfl_xor(o.q, off), shfl_xor(o.p, off)};
}

template <class V, class M>
__device__ __forceinline__ V warp_reduce(V v, const M& merge) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = merge(v, shfl_xor(v, off));
  return v;
}

template <class V, class M>
__device__ __forceinline__ V block_reduce(V v, const V& empty, const M& merge, V* scratch) {
  v = warp_reduce(v, merge);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V x = lane < nwarps ? scratch[lane] : empty;
    x = warp_reduce(x, merge);
    if (lane == 0) scratch[0] = x;
  }
  __syncthreads();
  return scratch[0];
}

// ---------------------------------------------------------------------------------
// the device policy of row_sweep.h

template <class T>
struct DevicePolicy {
  using Store = T;
  using A = typename AccOf<T>::type;
  static constexpr int kWidth = Vec<T>::N;  // one 16-byte vector
  static constexpr int kUnroll = sizeof(T) == 2 ? 2 : 4;  // vectors in flight per thread
  static constexpr bool kSimd = false;

  Online<A>* scratch;  // [32] in shared memory (also holds 32 A for the sums)
  A* bcast;            // [3] in shared memory

  // exp of a non-positive argument (up to rounding) in the hot loops: the SFU path in fp32
  static __device__ __forceinline__ A exp(A x) {
    if constexpr (sizeof(A) == 4) return __expf(x); else return ::exp(x);
  }
  static __device__ __forceinline__ A log(A x) { return ::log(x); }
  static __device__ __forceinline__ A tanh(A x) { return ::tanh(x); }
  static __device__ __forceinline__ A log1p_unit(A x) { return ::log1p(x); }

  // columns [c0, c0 + cnt): one 16-byte load when it is a whole aligned vector, else cnt scalar
  // loads (the same values either way); kept raw until used, to hold fewer registers
  using Raw = Vec<T>;
  static __device__ __forceinline__ void load(const T* row, int64_t c0, int cnt, Raw& x) {
    const T* p = row + c0;
    if (cnt == kWidth && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      x = *reinterpret_cast<const Vec<T>*>(p);
    } else {
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        if (k < cnt) x.v[k] = p[k];
      }
    }
  }
  static __device__ __forceinline__ A at(const Raw& x, int k) { return to_acc(x.v[k]); }
  static __device__ __forceinline__ void store(T* row, int64_t c0, int cnt, const A* g) {
    T* p = row + c0;
    if (cnt == kWidth && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      Vec<T> x;
#pragma unroll
      for (int k = 0; k < kWidth; ++k) from_acc(g[k], &x.v[k]);
      *reinterpret_cast<Vec<T>*>(p) = x;
    } else {
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        if (k < cnt) from_acc(g[k], &p[k]);
      }
    }
  }
  static __device__ __forceinline__ A load_one(const T* row, int64_t i) { return to_acc(row[i]); }
  // another storage type's columns in this type's split (the divergence's teacher): one 16-byte
  // load where the types' sizes match and the vector is whole and aligned, else scalar loads
  template <class U>
  using RawOf = Cols<U, kWidth>;
  template <class U>
  static __device__ __forceinline__ void load_as(const U* row, int64_t c0, int cnt, RawOf<U>& x) {
    const U* p = row + c0;
    if (sizeof(U) == sizeof(T) && cnt == kWidth && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      x = *reinterpret_cast<const RawOf<U>*>(p);
    } else {
#pragma unroll
      for (int k = 0; k < kWidth; ++k) {
        if (k < cnt) x.v[k] = p[k];
      }
    }
  }
  template <class U>
  static __device__ __forceinline__ A at_as(const RawOf<U>& x, int k) { return static_cast<A>(to_acc(x.v[k])); }

  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
  template <class F, class V, class M>
  __device__ __forceinline__ V reduce_lanes(const F& f, const V& empty, const M& merge) const {
    return block_reduce<V>(f((int)threadIdx.x, (int)blockDim.x), empty, merge, reinterpret_cast<V*>(scratch));
  }
  template <class F>
  __device__ __forceinline__ void for_lanes(const F& f) const { f((int)threadIdx.x, (int)blockDim.x); }
  // thread 0's values to every thread; bcast is rewritten only after the next row's reductions
  __device__ __forceinline__ void broadcast(A (&v)[3]) const {
    if (leader()) {
      for (int k = 0; k < 3; ++k) bcast[k] = v[k];
    }
    __syncthreads();
    for (int k = 0; k < 3; ++k) v[k] = bcast[k];
  }
};

// ---------------------------------------------------------------------------------
// kernels: grid-stride over rows, one block per row

#define GRPO_ROW_KERNEL(T) __global__ void __launch_bounds__(kMaxThreads, sizeof(T) == 8 ? 1 : 2)
#define GRPO_DEVICE_POLICY(T)                            \
  using Pol = DevicePolicy<T>;                           \
  using A = typename Pol::A;                             \
  __shared__ Online<A> scratch[32];                      \
  __shared__ A bcast[3];                                 \
  const Pol pol{scratch, bcast}

template <class T, bool ENT>
GRPO_ROW_KERNEL(T) row_stats_kernel(RowStatsParams p) {
  GRPO_DEVICE_POLICY(T);
  const Xform<Pol> xf(p.row);
  for (int64_t r = blockIdx.x; r < p.row.n; r += gridDim.x) stats_row<Pol, ENT>(pol, p, r, xf);
}

template <class T>
GRPO_ROW_KERNEL(T) row_grad_kernel(RowGradParams p) {
  GRPO_DEVICE_POLICY(T);
  const Xform<Pol> xf(p.row);
  for (int64_t r = blockIdx.x; r < p.row.n; r += gridDim.x) grad_row<Pol>(pol, p, r, xf);
}

template <class T>
GRPO_ROW_KERNEL(T) row_fused_kernel(RowFusedParams p) {
  GRPO_DEVICE_POLICY(T);
  const Xform<Pol> xf(p.row);
  // the batch's std (scale "batch") once per block by the whole block (block-uniform branch)
  const A batch_sigma = reward_batch_sigma(pol, p.rew);
  for (int64_t r = blockIdx.x; r < p.row.n; r += gridDim.x) fused_row<Pol>(pol, p, r, xf, batch_sigma);
}

// the divergence rows, student storage T, teacher Tt; the block's scratch holds DivOnline partials
template <class T, class Tt, int MODE>
GRPO_ROW_KERNEL(T) divergence_kernel(DivergenceParams p) {
  using Pol = DevicePolicy<T>;
  using A = typename Pol::A;
  __shared__ DivOnline<A> scratch[32];
  const Pol pol{reinterpret_cast<Online<A>*>(scratch), nullptr};
  const HeadXform<Pol> xs(p.student), xt(p.teacher);
  const DivConsts<A> c(p.beta);
  for (int64_t r = blockIdx.x; r < p.n; r += gridDim.x) divergence_row<Pol, Tt, MODE>(pol, p, r, xs, xt, c);
}

template <class R>
__global__ void group_normalize_kernel(GroupNormParams p) {
  GRPO_DEVICE_POLICY(R);
  group_normalize_all(pol, p);
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

template <class T, class Tt>
cudaError_t launch_divergence_tt(const DivergenceParams& p, dim3 grid, dim3 block, cudaStream_t stream) {
  switch (div_mode(p.beta)) {
    case kDivForward:
      divergence_kernel<T, Tt, kDivForward><<<grid, block, 0, stream>>>(p);
      break;
    case kDivReverse:
      divergence_kernel<T, Tt, kDivReverse><<<grid, block, 0, stream>>>(p);
      break;
    default:
      divergence_kernel<T, Tt, kDivMixture><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_divergence_t(const DivergenceParams& p, dim3 grid, dim3 block, cudaStream_t stream) {
  switch (p.teacher.dtype) {
    case kF32:
      return launch_divergence_tt<T, float>(p, grid, block, stream);
    case kF64:
      return launch_divergence_tt<T, double>(p, grid, block, stream);
    case kF16:
      return launch_divergence_tt<T, __half>(p, grid, block, stream);
    case kBF16:
      return launch_divergence_tt<T, __nv_bfloat16>(p, grid, block, stream);
    default:
      return cudaErrorInvalidValue;
  }
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
  const int threads = kGroupThreads;
  if (p.dtype == kF32) {
    group_normalize_kernel<float><<<1, threads, 0, stream>>>(p);
  } else if (p.dtype == kF64) {
    group_normalize_kernel<double><<<1, threads, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t divergence_rows_cuda(const DivergenceParams& p, int device, cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return guard.err;
  const dim3 grid(row_blocks(p.n)), block(row_threads(p.V, p.student.dtype));
  switch (p.student.dtype) {
    case kF32:
      return launch_divergence_t<float>(p, grid, block, stream);
    case kF64:
      return launch_divergence_t<double>(p, grid, block, stream);
    case kF16:
      return launch_divergence_t<__half>(p, grid, block, stream);
    case kBF16:
      return launch_divergence_t<__nv_bfloat16>(p, grid, block, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace grpo

// The row sweep of grpo_kernels, written once for the CUDA kernels (row_pass.cu) and the CPU
// row pass (row_pass_cpu.cpp): the logit transform, the online max / sum-exp / entropy
// statistics with their merge and finish, the per-logit gradient and the fused row (statistics ->
// token epilogue -> gradient). The reward -> advantage reductions over the same policies are
// group_sweep.h. See row_pass.h for the math, the parameter structs and the launch's row_threads.
//
// Every function here is a template over an execution policy P, which supplies:
//   P::Store, P::A        storage and accumulation types
//   P::kWidth, P::kUnroll  columns per vector W, vectors loaded at once by one lane
//   P::kSimd              whether the vector loops may be reordered by `omp simd` (host only)
//   P::exp/log/tanh        the math (device: __expf in the hot loops; host: a polynomial exp)
//   P::Raw, P::load/at/store  a vector of W columns: its raw load (P::Raw), column k of it in
//                          P::A, the store of its gradient; P::load_one one column in P::A
//   P::RawOf<U>, P::load_as<U>/at_as<U>  the same for another storage type U in this split (the
//                          divergence's teacher, divergence_sweep.h); P::log1p_unit log1p on [0, 1]
//   pol.reduce_lanes(f, empty, merge)  f(lane, L) on every lane, merged into one value that every
//                          lane gets: the device's warp-shuffle tree then block merge, or an exact
//                          host emulation of it, or (one lane) f(0, 1)
//   pol.for_lanes(f)       f(lane, L) on every lane
//   pol.leader(), pol.broadcast(v[3])  lane 0 writes a row's outputs; it shares three values
//
// The column split depends only on the column index, V and the launch (L lanes, width W), never
// on a row's address: vector j covers columns [jW, jW + W) (the last one may be partial), and
// lane l owns vectors l, l + L, l + 2L, ... in increasing order. A row's summation order is thus
// the same wherever the row sits in memory (batch invariance); the device chooses between one
// 16-byte load and W scalar loads by alignment, which changes no arithmetic.
#pragma once

#include "row_pass.h"

#if defined(__CUDA_ARCH__)
#define GRPO_HOST_ALIGN
#define GRPO_PRAGMA_SIMD_MAX(v)
#define GRPO_PRAGMA_SIMD_SUM(a, b)
#define GRPO_PRAGMA_SIMD
#define GRPO_UNROLL _Pragma("unroll")
#elif defined(_OPENMP)
#define GRPO_HOST_ALIGN alignas(64)
#define GRPO_PRAGMA(x) _Pragma(#x)
#define GRPO_PRAGMA_SIMD_MAX(v) GRPO_PRAGMA(omp simd reduction(max : v))
#define GRPO_PRAGMA_SIMD_SUM(a, b) GRPO_PRAGMA(omp simd reduction(+ : a, b))
#define GRPO_PRAGMA_SIMD _Pragma("omp simd")
#define GRPO_UNROLL
#else
#define GRPO_HOST_ALIGN alignas(64)
#define GRPO_PRAGMA_SIMD_MAX(v)
#define GRPO_PRAGMA_SIMD_SUM(a, b)
#define GRPO_PRAGMA_SIMD
#define GRPO_UNROLL
#endif

namespace grpo {

// the accumulation type of a storage type: fp64 for fp64, else fp32
template <class T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <class A>
GRPO_HD inline A grpo_neg_inf() {
  return -A(INFINITY);
}

// ---------------------------------------------------------------------------------
// the logit transform z -> u = softcap(z) / T (the bias is already in z)

template <class P>
struct Xform {
  using A = typename P::A;
  A inv_t, cap_over_t, inv_cap;
  bool softcap;
  GRPO_HD explicit Xform(const RowArgs& r) {
    softcap = r.softcap > 0.0;
    inv_t = A(1.0 / r.temperature);
    cap_over_t = softcap ? A(r.softcap / r.temperature) : A(0);
    inv_cap = softcap ? A(1.0 / r.softcap) : A(0);
  }
  GRPO_HD A operator()(A z) const { return softcap ? P::tanh(z * inv_cap) * cap_over_t : z * inv_t; }
  // u[k] = transform of column k of the raw vector x (P::at) for k < cnt, -inf past it (neutral in
  // the statistics); returns the vector's max (-inf when all are -inf; a NaN is never the max). The
  // branches are outside the loops, so that the host vectorizes the plain whole-vector one.
  template <int W>
  GRPO_HD A apply(const typename P::Raw& raw, int cnt, A* u) const {
    const typename P::Raw x = raw;  // (a local copy: the host's loop then knows u does not alias it)
    A mx = grpo_neg_inf<A>();
    const A it = inv_t;
    if (softcap) {
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A v = k < cnt ? P::tanh(P::at(x, k) * inv_cap) * cap_over_t : grpo_neg_inf<A>();
        u[k] = v;
        mx = v > mx ? v : mx;
      }
    } else if (cnt == W) {
      GRPO_PRAGMA_SIMD_MAX(mx)
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A v = P::at(x, k) * it;
        u[k] = v;
        mx = v > mx ? v : mx;
      }
    } else {
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A v = k < cnt ? P::at(x, k) * it : grpo_neg_inf<A>();
        u[k] = v;
        mx = v > mx ? v : mx;
      }
    }
    return mx;
  }
};

// ---------------------------------------------------------------------------------
// online softmax statistics: m = running max, s = sum exp(u - m), t = sum exp(u - m) (u - m).
// ENT = false: the log-prob-only pass, without the entropy's sum t (left 0).

// partial sums of one host vector (online_add): a fixed count, so that the summation order is the
// same in every instantiation whatever the compiler vectorizes
constexpr int kHostSums = 16;

template <class A>
struct Online {
  A m, s, t;
};

template <class A>
GRPO_HD inline Online<A> online_empty() {
  return Online<A>{grpo_neg_inf<A>(), A(0), A(0)};
}

template <class P, bool ENT>
GRPO_HD inline void online_rescale(Online<typename P::A>& o, typename P::A new_max) {
  using A = typename P::A;
  if (o.s != A(0)) {  // (a NaN sum stays NaN)
    const A delta = o.m - new_max;
    const A a = P::exp(delta);
    if (ENT) o.t = a * (o.t + delta * o.s);
    o.s *= a;
  }
  o.m = new_max;
}

// entropy term of one exp: e * d, 0 where e underflowed (d may be -inf there)
template <class A>
GRPO_HD inline A ent_term(A e, A d) {
  return e > A(0) ? e * d : A(0);
}

// Adds one vector u[W] (padded with -inf past V) of max cm (Xform::apply) to a partial: one
// rescale, then the vector's sums added to the partial's.
template <class P, bool ENT>
GRPO_HD inline void online_add(Online<typename P::A>& o, const typename P::A* u, typename P::A cm) {
  using A = typename P::A;
  constexpr int W = P::kWidth;
  if (cm == grpo_neg_inf<A>()) {  // all -inf: nothing to add, unless a NaN hid behind the max
    bool nan = false;
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) nan |= u[k] != u[k];
    if (nan) o.s = grpo_nan<A>();
    return;
  }
  if (cm > o.m) online_rescale<P, ENT>(o, cm);  // a NaN element reaches the sums below
  const A mm = o.m;
  A bs = A(0), bt = A(0);
  if constexpr (P::kSimd) {
    // the host's wide vectors: kHostSums partial sums, column k into partial k % kHostSums, then a
    // fixed pairwise tree. A reduction clause would let the vectorizer pick the partials per
    // instantiation: the log-prob-only pass (ENT = false) and the entropy pass then summed the same
    // row in different orders, and grpo_loss's logps stopped equalling token_logprobs' bitwise
    // when unrelated code joined the translation unit (tests/test_batch_invariance.py)
    constexpr int K = kHostSums;
    static_assert(W % K == 0, "the host vector width must be a multiple of kHostSums");
    GRPO_HOST_ALIGN A ps[K], pt[K];
    for (int j = 0; j < K; ++j) ps[j] = pt[j] = A(0);
    for (int k0 = 0; k0 < W; k0 += K) {
      GRPO_PRAGMA_SIMD
      for (int j = 0; j < K; ++j) {
        const A d = u[k0 + j] - mm, e = P::exp(d);
        ps[j] += e;
        if (ENT) pt[j] += ent_term(e, d);
      }
    }
    for (int h = K / 2; h > 0; h /= 2) {
      for (int j = 0; j < h; ++j) {
        ps[j] += ps[j + h];
        if (ENT) pt[j] += pt[j + h];
      }
    }
    bs = ps[0];
    bt = pt[0];
  } else {  // the device's order, element by element
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) {
      const A e = P::exp(u[k] - mm);
      bs += e;
      if (ENT) bt += ent_term(e, u[k] - mm);
    }
  }
  o.s += bs;
  if (ENT) o.t += bt;
}

template <class P, bool ENT>
struct OnlineMerge {
  using A = typename P::A;
  // s == 0: an empty (all -inf) partial; NaN partials propagate
  GRPO_HD Online<A> operator()(const Online<A>& a, const Online<A>& b) const {
    Online<A> r{a.m > b.m ? a.m : b.m, A(0), A(0)};
    if (a.s != A(0)) {
      const A d = a.m - r.m, e = P::exp(d);
      r.s += e * a.s;
      if (ENT) r.t += e * (a.t + d * a.s);
    }
    if (b.s != A(0)) {
      const A d = b.m - r.m, e = P::exp(d);
      r.s += e * b.s;
      if (ENT) r.t += e * (b.t + d * b.s);
    }
    return r;
  }
};

template <class P>
GRPO_HD inline void finish_stats(const Online<typename P::A>& o, typename P::A* lse, typename P::A* entropy) {
  using A = typename P::A;
  if (o.s == A(0)) {  // every logit -inf: logsumexp is -inf, and no finite term enters the entropy
    *lse = grpo_neg_inf<A>();
    *entropy = grpo_neg_inf<A>();
  } else {  // (NaN logits give NaN)
    const A ls = P::log(o.s);
    *lse = o.m + ls;
    *entropy = ls - o.t / o.s;
  }
}

// ---------------------------------------------------------------------------------
// one lane's share of a row: vectors lane, lane + L, ... (P::kUnroll of them loaded at once)

// columns of vector j: W, or fewer for the last one
template <int W>
GRPO_HD inline int vec_count(int64_t j, int64_t V) {
  const int64_t left = V - j * W;
  return left < W ? (int)left : W;
}

// f(x, c0, cnt) on the vectors lane owns, in order: x (P::Raw) holds columns [c0, c0 + cnt) of
// vector jq, read with P::at. The next P::kUnroll vectors' loads are issued before their f.
template <class P, class F>
GRPO_HD inline void sweep_lane(const typename P::Store* row, int64_t V, int lane, int L, F&& f) {
  constexpr int W = P::kWidth, U = P::kUnroll;
  const int64_t nvec = (V + W - 1) / W;
  for (int64_t j = lane; j < nvec; j += (int64_t)L * U) {
    typename P::Raw raw[U];
    GRPO_UNROLL
    for (int q = 0; q < U; ++q) {
      const int64_t jq = j + (int64_t)q * L;
      if (jq < nvec) P::load(row, jq * W, vec_count<W>(jq, V), raw[q]);
    }
    GRPO_UNROLL
    for (int q = 0; q < U; ++q) {
      const int64_t jq = j + (int64_t)q * L;
      if (jq >= nvec) break;
      f(raw[q], jq * W, vec_count<W>(jq, V));
    }
  }
}

template <class P, bool ENT>
GRPO_HD inline Online<typename P::A> lane_partial(const typename P::Store* row, int64_t V, int lane, int L,
                                                  const Xform<P>& xf) {
  using A = typename P::A;
  Online<A> o = online_empty<A>();
  sweep_lane<P>(row, V, lane, L, [&](const typename P::Raw& x, int64_t, int cnt) {
    GRPO_HOST_ALIGN A u[P::kWidth];
    const A cm = xf.template apply<P::kWidth>(x, cnt, u);
    online_add<P, ENT>(o, u, cm);
  });
  return o;
}

template <class P, bool ENT>
struct LanePartial {
  const typename P::Store* row;
  int64_t V;
  const Xform<P>* xf;
  GRPO_HD Online<typename P::A> operator()(int lane, int L) const { return lane_partial<P, ENT>(row, V, lane, L, *xf); }
};

// The row's statistics, merged over the lanes: every lane gets them.
template <class P, bool ENT>
GRPO_HD inline Online<typename P::A> row_online(const P& pol, const typename P::Store* row, int64_t V,
                                                const Xform<P>& xf) {
  using A = typename P::A;
  return pol.reduce_lanes(LanePartial<P, ENT>{row, V, &xf}, online_empty<A>(), OnlineMerge<P, ENT>{});
}

template <class P>
GRPO_HD inline typename P::A target_value(const typename P::Store* row, int64_t V, int64_t tgt, const Xform<P>& xf) {
  using A = typename P::A;
  return (tgt >= 0 && tgt < V) ? xf(P::load_one(row, tgt)) : A(0);
}

// ---------------------------------------------------------------------------------
// the gradient, in place: g_z = (dlogp * (onehot - p) - dentropy * p * (u - lse + entropy)) * du/dz

template <class A>
struct GradCoef {
  A lse, ent, dl, dent;
  bool has_dent;
};

// one logit's gradient from u and du/dz; kDent = false: no entropy term
template <class P, bool kDent>
GRPO_HD inline typename P::A grad_logit(typename P::A u, typename P::A du, bool is_target,
                                        const GradCoef<typename P::A>& c) {
  using A = typename P::A;
  const A p = P::exp(u - c.lse);
  A g = p * (-c.dl);
  g = is_target ? g + c.dl : g;
  if (kDent) g -= ent_term(p, u - c.lse + c.ent) * c.dent;
  return g * du;
}

// g[k] = grad_logit(u[k], du[k]) for the whole vector; the host's wide vector does without the
// per-column target test (vectorized) and redoes the target's column
template <class P, bool kDent>
GRPO_HD inline void grad_loop(const typename P::A* u, const typename P::A* du, int tk,
                              const GradCoef<typename P::A>& c, typename P::A* g) {
  using A = typename P::A;
  constexpr int W = P::kWidth;
  if constexpr (P::kSimd) {
    GRPO_PRAGMA_SIMD
    for (int k = 0; k < W; ++k) g[k] = grad_logit<P, kDent>(u[k], du[k], false, c);
    if (tk >= 0) g[tk] = grad_logit<P, kDent>(u[tk], du[tk], true, c);
  } else {
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) g[k] = grad_logit<P, kDent>(u[k], du[k], k == tk, c);
  }
}

// the gradient g[0..cnt) of the raw vector x at columns c0.. (g past cnt: unspecified): u and
// du/dz first (tanh: no vector loop on the host), then the gradient's loop
template <class P>
GRPO_HD inline void grad_vec(const typename P::Raw& raw, int64_t c0, int cnt, int64_t tgt, const Xform<P>& xf,
                             const GradCoef<typename P::A>& c, typename P::A* g) {
  using A = typename P::A;
  constexpr int W = P::kWidth;
  const typename P::Raw x = raw;  // (a local copy: the host's loops then know u, du, g do not alias it)
  GRPO_HOST_ALIGN A u[W];
  GRPO_HOST_ALIGN A du[W];
  if (xf.softcap) {
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) {
      const A th = P::tanh((k < cnt ? P::at(x, k) : A(0)) * xf.inv_cap);
      u[k] = th * xf.cap_over_t;
      du[k] = (A(1) - th * th) * xf.inv_t;
    }
  } else if (cnt == W) {
    GRPO_PRAGMA_SIMD
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) {
      u[k] = P::at(x, k) * xf.inv_t;
      du[k] = xf.inv_t;
    }
  } else {
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) {
      u[k] = (k < cnt ? P::at(x, k) : A(0)) * xf.inv_t;
      du[k] = xf.inv_t;
    }
  }
  const int tk = (tgt >= c0 && tgt < c0 + W) ? int(tgt - c0) : -1;  // the target's index here, or -1
  if (c.has_dent) {
    grad_loop<P, true>(u, du, tk, c, g);
  } else {
    grad_loop<P, false>(u, du, tk, c, g);
  }
}

template <class P>
struct LaneGrad {
  using A = typename P::A;
  typename P::Store* row;
  int64_t V, tgt;
  const Xform<P>* xf;
  GradCoef<A> c;
  GRPO_HD void operator()(int lane, int L) const {
    sweep_lane<P>(row, V, lane, L, [&](const typename P::Raw& x, int64_t c0, int cnt) {
      GRPO_HOST_ALIGN A g[P::kWidth];
      grad_vec<P>(x, c0, cnt, tgt, *xf, c, g);
      P::store(row, c0, cnt, g);
    });
  }
};

// ---------------------------------------------------------------------------------
// the rows: every lane of a row calls these (the reductions synchronize the device's block)

template <class P, bool ENT>
GRPO_HD inline void stats_row(const P& pol, const RowStatsParams& p, int64_t r, const Xform<P>& xf) {
  using A = typename P::A;
  const typename P::Store* row = static_cast<const typename P::Store*>(p.row.logits) + r * p.row.ld;
  const Online<A> o = row_online<P, ENT>(pol, row, p.row.V, xf);
  if (pol.leader()) {
    A lse, ent;
    finish_stats<P>(o, &lse, &ent);
    static_cast<A*>(p.out.lse)[r] = lse;
    static_cast<A*>(p.out.entropy)[r] = ENT ? ent : A(0);
    static_cast<A*>(p.out.target_logit)[r] = target_value<P>(row, p.row.V, p.row.targets[r], xf);
  }
}

template <class P>
GRPO_HD inline void grad_row(const P& pol, const RowGradParams& p, int64_t r, const Xform<P>& xf) {
  using A = typename P::A;
  const bool has_dent = p.dentropy != nullptr;
  const GradCoef<A> c{static_cast<const A*>(p.lse)[r], static_cast<const A*>(p.entropy)[r],
                      static_cast<const A*>(p.dlogp)[r], has_dent ? static_cast<const A*>(p.dentropy)[r] : A(0),
                      has_dent};
  typename P::Store* row = static_cast<typename P::Store*>(p.row.logits) + r * p.row.ld;
  pol.for_lanes(LaneGrad<P>{row, p.row.V, p.row.targets[r], &xf, c});
}

template <class A>
GRPO_HD inline void epilogue_at(const TokenArgs& tk, const EpilogueOptions& opt, int64_t i, A logp, A adv, A* loss,
                                A* dlogp) {
  const A* old = tk.old ? static_cast<const A*>(tk.old) + i : nullptr;
  const A* ref = (opt.beta != 0.0) ? static_cast<const A*>(tk.ref) + i : nullptr;
  const A* scale = tk.policy_scale ? static_cast<const A*>(tk.policy_scale) + i : nullptr;
  token_epilogue_one<A>(logp, old, adv, static_cast<const A*>(tk.weight)[i], ref, scale, opt, loss, dlogp);
}

// Statistics -> token epilogue (advantage from the rewards if given) -> gradient, one row.
template <class P>
GRPO_HD inline void fused_row(const P& pol, const RowFusedParams& p, int64_t r, const Xform<P>& xf, typename P::A batch_sigma) {
  using A = typename P::A;
  typename P::Store* row = static_cast<typename P::Store*>(p.row.logits) + r * p.row.ld;
  const int64_t tgt = p.row.targets[r];
  const Online<A> o = row_online<P, true>(pol, row, p.row.V, xf);
  A shared[3];  // lse, entropy, dL/dlogp
  if (pol.leader()) {
    A lse, ent, loss, dl, adv;
    finish_stats<P>(o, &lse, &ent);
    const A tl = target_value<P>(row, p.row.V, tgt, xf);
    if (p.rew.rewards != nullptr) {
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
    shared[0] = lse;
    shared[1] = ent;
    shared[2] = dl;
  }
  // (every lane has read the target's element before any lane overwrites it)
  pol.broadcast(shared);
  pol.for_lanes(LaneGrad<P>{row, p.row.V, tgt, &xf, GradCoef<A>{shared[0], shared[1], shared[2], A(0), false}});
}

}  // namespace grpo

// The divergence row pass of grpo_kernels (the contract: grpo_kernels/divergence.py), written once
// for the CUDA kernel (row_pass.cu) and the CPU row pass with its device emulation
// (row_pass_cpu.cpp), over row_sweep.h's execution policies and its column split: a row's
// summation order depends on V and the launch only, never on either head's address.
//
// Per row, with u_s / u_t the student's / teacher's transformed logits (scale, softcap, 1/T),
// p = softmax(u_s), q = softmax(u_t), m = (1 - beta) p + beta q:
//   pass 1 (every beta): online max / sum-exp of both heads, the student's entropy sum and, at the
//     endpoints, the KL's own sum rescaled online with its head's max:
//       beta = 1: D = KL(p || q) = X_s / S_s - (lse_s - lse_t), X_s = sum e^(u_s - m_s) (u_s - u_t)
//       beta = 0: D = KL(q || p) = X_t / S_t - (lse_t - lse_s), X_t = sum e^(u_t - m_t) (u_t - u_s)
//   pass 2 (0 < beta < 1 only): KL(q || m) and KL(p || m) given lse_s and lse_t, with
//     log m = logaddexp(log p + log(1 - beta), log q + log beta);
//   gradient pass (coef given): out = coef * dD/du_s * du_s/dz_s, with dD/du_s
//       beta = 0: p - q;  beta = 1: p (u_s - u_t - X_s / S_s) (= p (log p - log q - D));
//       else: (1 - beta) p (log p - log m - KL(p || m)).
// A term p * (...) is 0 where p is exactly 0 (a masked logit: the factor may be inf), NaN where p is.
// Every lane gets the merged sums, so that every lane finishes the row itself: no broadcast.
//
// Both heads share the student's vector split (P::kWidth columns of the student's storage type);
// the teacher's columns are read in its own storage type (P::RawOf<Tt>, P::at_as) and converted to
// the accumulation type A, never rounded through the student's type.
#pragma once

#include "row_sweep.h"

#if defined(__CUDA_ARCH__) || !defined(_OPENMP)
#define GRPO_PRAGMA_SIMD_SUM4(a, b, c, d)
#else
#define GRPO_PRAGMA_SIMD_SUM4(a, b, c, d) GRPO_PRAGMA(omp simd reduction(+ : a, b, c, d))
#endif

namespace grpo {

// the three cases of the contract: the endpoints are their own cases
enum DivMode : int { kDivForward = 0, kDivReverse = 1, kDivMixture = 2 };

GRPO_HD inline int div_mode(double beta) { return beta == 0.0 ? kDivForward : (beta == 1.0 ? kDivReverse : kDivMixture); }

// e * d, 0 where e is exactly 0 (d may be inf or NaN there); a NaN e stays NaN
template <class A>
GRPO_HD inline A term0(A e, A d) {
  return e == A(0) ? A(0) : e * d;
}

// One head's transform (divergence.HeadTransform): y = z * scale, y = c tanh(y / c), u = y / T;
// du/dz = (1 - tanh^2) * scale / T. The ops are torch_divergence's: z * (scale / T) without a
// softcap, tanh(z * (scale / c)) * (c / T) with one.
template <class P>
struct HeadXform {
  using A = typename P::A;
  A mul, pre, post, dudz;
  bool softcap;
  GRPO_HD explicit HeadXform(const DivHead& h) {
    softcap = h.softcap > 0.0;
    mul = A(h.scale / h.temperature);
    pre = softcap ? A(h.scale / h.softcap) : A(0);
    post = softcap ? A(h.softcap / h.temperature) : A(0);
    dudz = A(h.scale / h.temperature);
  }
  // u[k] for the columns k < cnt of the raw vector x of storage type U, -inf past them; returns
  // the vector's max (a NaN is never the max)
  template <class U>
  GRPO_HD A apply(const typename P::template RawOf<U>& raw, int cnt, A* u) const {
    constexpr int W = P::kWidth;
    const typename P::template RawOf<U> x = raw;  // (a local copy: u does not alias it)
    A mx = grpo_neg_inf<A>();
    if (softcap) {
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A v = k < cnt ? P::tanh(P::template at_as<U>(x, k) * pre) * post : grpo_neg_inf<A>();
        u[k] = v;
        mx = v > mx ? v : mx;
      }
    } else if (cnt == W) {
      const A f = mul;
      GRPO_PRAGMA_SIMD_MAX(mx)
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A v = P::template at_as<U>(x, k) * f;
        u[k] = v;
        mx = v > mx ? v : mx;
      }
    } else {
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A v = k < cnt ? P::template at_as<U>(x, k) * mul : grpo_neg_inf<A>();
        u[k] = v;
        mx = v > mx ? v : mx;
      }
    }
    return mx;
  }
  // u[k] and d[k] = du/dz / (scale / T) for the gradient (columns past cnt: unspecified, unstored)
  template <class U>
  GRPO_HD void apply_du(const typename P::template RawOf<U>& raw, int cnt, A* u, A* d) const {
    constexpr int W = P::kWidth;
    const typename P::template RawOf<U> x = raw;
    if (softcap) {
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        const A th = P::tanh((k < cnt ? P::template at_as<U>(x, k) : A(0)) * pre);
        u[k] = th * post;
        d[k] = A(1) - th * th;
      }
    } else if (cnt == W) {
      const A f = mul;
      GRPO_PRAGMA_SIMD
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        u[k] = P::template at_as<U>(x, k) * f;
        d[k] = A(1);
      }
    } else {
      GRPO_UNROLL
      for (int k = 0; k < W; ++k) {
        u[k] = (k < cnt ? P::template at_as<U>(x, k) : A(0)) * mul;
        d[k] = A(1);
      }
    }
  }
};

// log(1 - beta) and log(beta) of the mixture, once per launch
template <class A>
struct DivConsts {
  A beta, l1b, lb;
  GRPO_HD explicit DivConsts(double b)
      : beta(A(b)), l1b(b < 1.0 ? A(::log(1.0 - b)) : A(0)), lb(b > 0.0 ? A(::log(b)) : A(0)) {}
};

// f(xs, xt, c0, cnt) on the vectors lane owns, in order (row_sweep.h's sweep_lane for two heads):
// xs holds the student's columns [c0, c0 + cnt), xt the teacher's
template <class P, class Tt, class F>
GRPO_HD inline void div_sweep_lane(const typename P::Store* rs, const Tt* rt, int64_t V, int lane, int L, F&& f) {
  using S = typename P::Store;
  constexpr int W = P::kWidth, U = P::kUnroll;
  const int64_t nvec = (V + W - 1) / W;
  for (int64_t j = lane; j < nvec; j += (int64_t)L * U) {
    typename P::template RawOf<S> a[U];
    typename P::template RawOf<Tt> b[U];
    GRPO_UNROLL
    for (int q = 0; q < U; ++q) {
      const int64_t jq = j + (int64_t)q * L;
      if (jq < nvec) {
        P::template load_as<S>(rs, jq * W, vec_count<W>(jq, V), a[q]);
        P::template load_as<Tt>(rt, jq * W, vec_count<W>(jq, V), b[q]);
      }
    }
    GRPO_UNROLL
    for (int q = 0; q < U; ++q) {
      const int64_t jq = j + (int64_t)q * L;
      if (jq >= nvec) break;
      f(a[q], b[q], jq * W, vec_count<W>(jq, V));
    }
  }
}

// ---------------------------------------------------------------------------------
// pass 1: both heads' online statistics (student: m_s, S_s and the entropy's T_s as row_sweep.h's
// Online; teacher: m_t, S_t) and the endpoint's KL sum x, rescaled with its head's max

template <class A>
struct DivOnline {
  A ms, ss, ts, mt, st, x;
};

template <class A>
GRPO_HD inline DivOnline<A> div_online_empty() {
  return DivOnline<A>{grpo_neg_inf<A>(), A(0), A(0), grpo_neg_inf<A>(), A(0), A(0)};
}

template <class P, int MODE>
GRPO_HD inline void div_rescale(DivOnline<typename P::A>& o, typename P::A ms, typename P::A mt) {
  using A = typename P::A;
  if (ms > o.ms) {
    if (o.ss != A(0)) {  // (a NaN sum stays NaN)
      const A d = o.ms - ms, a = P::exp(d);
      o.ts = a * (o.ts + d * o.ss);
      o.ss *= a;
      if (MODE == kDivReverse) o.x *= a;
    }
    o.ms = ms;
  }
  if (mt > o.mt) {
    if (o.st != A(0)) {
      const A a = P::exp(o.mt - mt);
      o.st *= a;
      if (MODE == kDivForward) o.x *= a;
    }
    o.mt = mt;
  }
}

template <class A>
struct DivTerms {
  A es, ent, et, x;
};

// one column's terms, exps relative to the running maxima ms, mt
template <class P, int MODE>
GRPO_HD inline DivTerms<typename P::A> div_terms(typename P::A us, typename P::A ut, typename P::A ms,
                                                 typename P::A mt) {
  using A = typename P::A;
  const A es = P::exp(us - ms), et = P::exp(ut - mt);
  A x = A(0);
  if (MODE == kDivReverse) x = term0(es, us - ut);
  if (MODE == kDivForward) x = term0(et, ut - us);
  return DivTerms<A>{es, term0(es, us - ms), et, x};
}

// Adds one vector of both heads (maxima cms, cmt from HeadXform::apply) to a partial.
template <class P, int MODE>
GRPO_HD inline void div_online_add(DivOnline<typename P::A>& o, const typename P::A* us, const typename P::A* ut,
                                   typename P::A cms, typename P::A cmt) {
  using A = typename P::A;
  constexpr int W = P::kWidth;
  div_rescale<P, MODE>(o, cms, cmt);
  // nothing finite yet (an all -inf start): exps against 0, so that -inf gives 0 and NaN stays NaN
  const A ms = o.ms == grpo_neg_inf<A>() ? A(0) : o.ms;
  const A mt = o.mt == grpo_neg_inf<A>() ? A(0) : o.mt;
  A bs = A(0), bt = A(0), bq = A(0), bx = A(0);
  if constexpr (P::kSimd) {  // the host's wide vectors: reassociated by the vectorizer
    GRPO_PRAGMA_SIMD_SUM4(bs, bt, bq, bx)
    for (int k = 0; k < W; ++k) {
      const DivTerms<A> t = div_terms<P, MODE>(us[k], ut[k], ms, mt);
      bs += t.es;
      bt += t.ent;
      bq += t.et;
      bx += t.x;
    }
  } else {  // the device's order, element by element
    GRPO_UNROLL
    for (int k = 0; k < W; ++k) {
      const DivTerms<A> t = div_terms<P, MODE>(us[k], ut[k], ms, mt);
      bs += t.es;
      bt += t.ent;
      bq += t.et;
      bx += t.x;
    }
  }
  o.ss += bs;
  o.ts += bt;
  o.st += bq;
  o.x += bx;
}

template <class P, int MODE>
struct DivMerge {
  using A = typename P::A;
  GRPO_HD DivOnline<A> operator()(const DivOnline<A>& a, const DivOnline<A>& b) const {
    DivOnline<A> r{a.ms > b.ms ? a.ms : b.ms, A(0), A(0), a.mt > b.mt ? a.mt : b.mt, A(0), A(0)};
    const DivOnline<A>* in[2] = {&a, &b};
    for (int i = 0; i < 2; ++i) {  // s == 0: an empty partial; NaN partials propagate
      const DivOnline<A>& o = *in[i];
      if (o.ss != A(0)) {
        const A d = o.ms - r.ms, e = P::exp(d);
        r.ss += e * o.ss;
        r.ts += e * (o.ts + d * o.ss);
        if (MODE == kDivReverse) r.x += e * o.x;
      }
      if (o.st != A(0)) {
        const A e = P::exp(o.mt - r.mt);
        r.st += e * o.st;
        if (MODE == kDivForward) r.x += e * o.x;
      }
    }
    return r;
  }
};

template <class P, class Tt, int MODE>
struct DivLaneStats {
  using A = typename P::A;
  const typename P::Store* rs;
  const Tt* rt;
  int64_t V;
  const HeadXform<P>* xs;
  const HeadXform<P>* xt;
  GRPO_HD DivOnline<A> operator()(int lane, int L) const {
    using S = typename P::Store;
    DivOnline<A> o = div_online_empty<A>();
    div_sweep_lane<P, Tt>(rs, rt, V, lane, L, [&](const typename P::template RawOf<S>& a,
                                                  const typename P::template RawOf<Tt>& b, int64_t, int cnt) {
      GRPO_HOST_ALIGN A us[P::kWidth];
      GRPO_HOST_ALIGN A ut[P::kWidth];
      const A cms = xs->template apply<S>(a, cnt, us);
      const A cmt = xt->template apply<Tt>(b, cnt, ut);
      div_online_add<P, MODE>(o, us, ut, cms, cmt);
    });
    return o;
  }
};

// a row after pass 1: both lse, the entropy, D (endpoints) and the gradient's constant aux
// (beta = 1: X_s / S_s; the mixture: KL(p || m), after pass 2)
template <class A>
struct DivRow {
  A lse_s, lse_t, ent, div, aux;
};

template <class P, int MODE>
GRPO_HD inline DivRow<typename P::A> div_finish(const DivOnline<typename P::A>& o) {
  using A = typename P::A;
  const A ls = P::log(o.ss), lt = P::log(o.st);
  DivRow<A> r;
  r.lse_s = o.ss == A(0) ? grpo_neg_inf<A>() : o.ms + ls;  // every logit -inf: -inf (row_sweep.h)
  r.lse_t = o.st == A(0) ? grpo_neg_inf<A>() : o.mt + lt;
  r.ent = o.ss == A(0) ? grpo_neg_inf<A>() : ls - o.ts / o.ss;
  r.div = A(0);
  r.aux = A(0);
  if (MODE == kDivReverse) {  // lse_s - lse_t as (m_s - m_t) + (log S_s - log S_t): fewer roundings
    r.aux = o.x / o.ss;
    r.div = r.aux - ((o.ms - o.mt) + (ls - lt));
  } else if (MODE == kDivForward) {
    r.div = o.x / o.st - ((o.mt - o.ms) + (lt - ls));
  }
  return r;
}

// ---------------------------------------------------------------------------------
// pass 2 (the mixture): KL(q || m), KL(p || m)

template <class A>
struct DivPair {
  A q, p;
};

template <class A>
struct DivPairPlus {
  GRPO_HD DivPair<A> operator()(const DivPair<A>& a, const DivPair<A>& b) const { return DivPair<A>{a.q + b.q, a.p + b.p}; }
};

// log p, log q, p, q and log m of one column
template <class A>
struct MixCol {
  A lp, lq, p, q, lm;
};

template <class P>
GRPO_HD inline MixCol<typename P::A> mix_col(typename P::A us, typename P::A ut, const DivRow<typename P::A>& r,
                                             const DivConsts<typename P::A>& c) {
  using A = typename P::A;
  MixCol<A> m;
  m.lp = us - r.lse_s;
  m.lq = ut - r.lse_t;
  m.p = P::exp(m.lp);
  m.q = P::exp(m.lq);
  // log m = logaddexp(a, b), a = log p + log(1 - beta), b = log q + log beta: hi + log1p(exp(lo - hi)),
  // exp(lo - hi) as the ratio of the smaller mixture term to the larger (in [0, 1]; 0 / 0 = NaN
  // where both underflow: then p = q = 0 and no term uses log m)
  const A a = m.lp + c.l1b, b = m.lq + c.lb;
  const A wp = (A(1) - c.beta) * m.p, wq = c.beta * m.q;
  const bool pa = a > b;
  m.lm = (pa ? a : b) + P::log1p_unit(pa ? wq / wp : wp / wq);
  return m;
}

template <class P, class Tt>
struct DivLaneMix {
  using A = typename P::A;
  const typename P::Store* rs;
  const Tt* rt;
  int64_t V;
  const HeadXform<P>* xs;
  const HeadXform<P>* xt;
  DivRow<A> row;
  DivConsts<A> c;
  GRPO_HD DivPair<A> operator()(int lane, int L) const {
    using S = typename P::Store;
    DivPair<A> acc{A(0), A(0)};
    div_sweep_lane<P, Tt>(rs, rt, V, lane, L, [&](const typename P::template RawOf<S>& a,
                                                  const typename P::template RawOf<Tt>& b, int64_t, int cnt) {
      GRPO_HOST_ALIGN A us[P::kWidth];
      GRPO_HOST_ALIGN A ut[P::kWidth];
      xs->template apply<S>(a, cnt, us);  // (-inf past cnt: p = q = 0 there)
      xt->template apply<Tt>(b, cnt, ut);
      A kq = A(0), kp = A(0);
      if constexpr (P::kSimd) {
        GRPO_PRAGMA_SIMD_SUM(kq, kp)
        for (int k = 0; k < P::kWidth; ++k) {
          const MixCol<A> m = mix_col<P>(us[k], ut[k], row, c);
          kq += term0(m.q, m.lq - m.lm);
          kp += term0(m.p, m.lp - m.lm);
        }
      } else {
        GRPO_UNROLL
        for (int k = 0; k < P::kWidth; ++k) {
          const MixCol<A> m = mix_col<P>(us[k], ut[k], row, c);
          kq += term0(m.q, m.lq - m.lm);
          kp += term0(m.p, m.lp - m.lm);
        }
      }
      acc.q += kq;
      acc.p += kp;
    });
    return acc;
  }
};

// ---------------------------------------------------------------------------------
// the gradient pass: out = dD/du_s * d * cf, cf = coef * scale / T (times 1 - beta: the mixture)

template <class P, int MODE>
GRPO_HD inline typename P::A div_grad_u(typename P::A us, typename P::A ut, const DivRow<typename P::A>& r,
                                        const DivConsts<typename P::A>& c) {
  using A = typename P::A;
  if (MODE == kDivForward) return P::exp(us - r.lse_s) - P::exp(ut - r.lse_t);
  if (MODE == kDivReverse) return term0(P::exp(us - r.lse_s), (us - ut) - r.aux);
  const MixCol<A> m = mix_col<P>(us, ut, r, c);
  return term0(m.p, (m.lp - m.lm) - r.aux);
}

template <class P, class Tt, int MODE>
struct DivLaneGrad {
  using A = typename P::A;
  const typename P::Store* rs;
  const Tt* rt;
  typename P::Store* ro;
  int64_t V;
  const HeadXform<P>* xs;
  const HeadXform<P>* xt;
  DivRow<A> row;
  DivConsts<A> c;
  A cf;
  GRPO_HD void operator()(int lane, int L) const {
    using S = typename P::Store;
    div_sweep_lane<P, Tt>(rs, rt, V, lane, L, [&](const typename P::template RawOf<S>& a,
                                                  const typename P::template RawOf<Tt>& b, int64_t c0, int cnt) {
      GRPO_HOST_ALIGN A us[P::kWidth];
      GRPO_HOST_ALIGN A d[P::kWidth];
      GRPO_HOST_ALIGN A ut[P::kWidth];
      GRPO_HOST_ALIGN A g[P::kWidth];
      // (both heads' columns are read before the store: out may be the student's logits)
      xs->template apply_du<S>(a, cnt, us, d);
      xt->template apply<Tt>(b, cnt, ut);
      const A f = cf;
      GRPO_PRAGMA_SIMD
      GRPO_UNROLL
      for (int k = 0; k < P::kWidth; ++k) g[k] = div_grad_u<P, MODE>(us[k], ut[k], row, c) * d[k] * f;
      P::store(ro, c0, cnt, g);
    });
  }
};

// ---------------------------------------------------------------------------------
// one row: every lane of it calls this (the reductions synchronize the device's block)

template <class P, class Tt, int MODE>
GRPO_HD inline void divergence_row(const P& pol, const DivergenceParams& p, int64_t r, const HeadXform<P>& xs,
                                   const HeadXform<P>& xt, const DivConsts<typename P::A>& c) {
  using A = typename P::A;
  using S = typename P::Store;
  const S* rs = static_cast<const S*>(p.student.logits) + r * p.student.ld;
  const Tt* rt = static_cast<const Tt*>(p.teacher.logits) + r * p.teacher.ld;
  const DivOnline<A> o =
      pol.reduce_lanes(DivLaneStats<P, Tt, MODE>{rs, rt, p.V, &xs, &xt}, div_online_empty<A>(), DivMerge<P, MODE>{});
  DivRow<A> row = div_finish<P, MODE>(o);
  if (MODE == kDivMixture) {
    const DivPair<A> kl = pol.reduce_lanes(DivLaneMix<P, Tt>{rs, rt, p.V, &xs, &xt, row, c}, DivPair<A>{A(0), A(0)},
                                           DivPairPlus<A>{});
    row.div = c.beta * kl.q + (A(1) - c.beta) * kl.p;
    row.aux = kl.p;
  }
  if (pol.leader()) {
    static_cast<A*>(p.div)[r] = row.div;
    static_cast<A*>(p.entropy)[r] = row.ent;
  }
  if (p.coef == nullptr) return;
  A cf = static_cast<const A*>(p.coef)[p.coef_per_row ? r : 0];
  if (MODE == kDivMixture) cf *= A(1) - c.beta;
  cf *= xs.dudz;
  S* ro = static_cast<S*>(p.out) + r * p.ld_out;
  pol.for_lanes(DivLaneGrad<P, Tt, MODE>{rs, rt, ro, p.V, &xs, &xt, row, c, cf});
}

}  // namespace grpo

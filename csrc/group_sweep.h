// The reward -> advantage reductions of grpo_kernels over row_sweep.h's execution policies (the
// lanes of one CUDA block, their host emulation, or one host lane): the batch's nanstd for
// scale_rewards="batch" in the fused epilogue, and group_normalize. Each lane sums entries lane,
// lane + L, ...; pol.reduce_lanes merges the lanes' sums in the device's tree order.
#pragma once

#include "row_pass.h"

namespace grpo {

template <class A>
struct Plus {
  GRPO_HD A operator()(A a, A b) const { return a + b; }
};

// The nanstd of x(0..len) (row_pass.h's grpo_nan_mean_std_of) by lane sums merged over the lanes.
template <class X, class A>
struct LaneNanSum {
  X x;
  int64_t len;
  bool count;  // false: the sum of the non-NaN values, true: their count
  GRPO_HD A operator()(int lane, int L) const {
    A s = A(0);
    for (int64_t i = lane; i < len; i += L) {
      const A v = x(i);
      if (v == v) s += count ? A(1) : v;
    }
    return s;
  }
};

template <class X, class A>
struct LaneSqDev {
  X x;
  int64_t len;
  A mean;
  GRPO_HD A operator()(int lane, int L) const {
    A q = A(0);
    for (int64_t i = lane; i < len; i += L) {
      const A v = x(i);
      if (v == v) {
        const A d = v - mean;
        q += d * d;
      }
    }
    return q;
  }
};

template <class P, class X>
GRPO_HD inline typename P::A block_nanstd(const P& pol, const X& x, int64_t len) {
  using A = typename P::A;
  const A s = pol.reduce_lanes(LaneNanSum<X, A>{x, len, false}, A(0), Plus<A>{});
  const int64_t n = (int64_t)pol.reduce_lanes(LaneNanSum<X, A>{x, len, true}, A(0), Plus<A>{});
  const A mean = s / A(n);
  return grpo_nanstd_from<A>(pol.reduce_lanes(LaneSqDev<X, A>{x, len, mean}, A(0), Plus<A>{}), n);
}

// the std every group divides by under kScaleBatch (0 for one sequence; unused otherwise), once per launch
template <class P>
GRPO_HD inline typename P::A reward_batch_sigma(const P& pol, const RewardArgs& ra) {
  using A = typename P::A;
  if (ra.rewards == nullptr || ra.mode != kScaleBatch || ra.B <= 1) return A(0);
  const CombinedRewards<A> x{static_cast<const A*>(ra.rewards), static_cast<const A*>(ra.weights), ra.K, 0};
  return block_nanstd(pol, x, ra.B);
}

// Group-normalized advantages (advantages.normalize_groups): the batch std (scale "batch") by
// lane reductions, then lane l normalizes groups l, l + L, ...
template <class A>
struct LaneGroups {
  const GroupNormParams* p;
  A batch_std;
  GRPO_HD void operator()(int lane, int L) const {
    const A* r = static_cast<const A*>(p->rewards);
    A* out = static_cast<A*>(p->out);
    const int64_t G = p->G;
    for (int64_t g = lane; g < p->B / G; g += L) {
      A mean, sigma;
      grpo_group_mean_sigma<A>(PlainRewards<A>{r + g * G}, G, p->mode, batch_std, &mean, &sigma);
      grpo_group_advantages<A>(r + g * G, out + g * G, G, p->mode, mean, sigma, A(p->eps));
    }
  }
};

template <class P>
GRPO_HD inline void group_normalize_all(const P& pol, const GroupNormParams& p) {
  using A = typename P::A;
  A batch_std = A(0);
  if (p.mode == kScaleBatch && p.B > 1) batch_std = block_nanstd(pol, PlainRewards<A>{static_cast<const A*>(p.rewards)}, p.B);
  pol.for_lanes(LaneGroups<A>{&p, batch_std});
}

}  // namespace grpo

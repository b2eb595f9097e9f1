// Segmented reverse scans: step GAE and discounted returns (also token-level GAE, same math
// over the action axis).
//
// Per segment (trajectory) b with entries t = s0..s1-1, V_{s1} = last_values[b] (0 if absent):
//   delta_t = r_t + gamma * V_{t+1} - V_t
//   A_t     = delta_t + gamma * lam * A_{t+1}     (A_{s1} = 0)
//   R_t     = A_t + V_t
// discounted_returns is the same scan with V = 0 and lam = 1 (then A_t = R_t).
//
// Parallel scheme (load-balanced whatever the segment lengths): the flat axis [0, S) is cut
// into P equal chunks [lo_k, hi_k). A chunk's scan only needs A at hi_k (the carry) for the
// segment crossing hi_k, and A is linear in it: A_true(lo_k) = a_k + c^(hi_k - lo_k) A_true(hi_k)
// (c = gamma * lam) when one segment spans the whole chunk and beyond, else a_k alone.
//   pass 1 (parallel): a_k = A at lo_k of the chunk's first segment scanned with carry 0
//           (reads only that segment's part of the chunk: cheap unless segments are long);
//   combine (serial, O(P)): carries from right to left;
//   pass 2 (parallel): every chunk scans with its true carry and writes A and R once.
// So one 100k-token trajectory is split across threads, and short segments cost one pass.
// Accumulation is in double; results are written once (fp32, or fp64 for fp64 inputs).
#include "common.h"

#include <cmath>

namespace steppo_fast {
namespace {

// Entries of the flat axis from which the scan runs on num_threads() threads (below: one
// thread, a plain loop). Crossover measured with bench/bench_threads.py (bench/README.md).
constexpr int64_t kParallelMin = 1 << 16;

template <typename scalar_t, typename out_t, typename index_t>
struct ScanArgs {
  const scalar_t* rewards;     // [S] reward of every entry
  const scalar_t* values;      // [S] value of every entry, nullptr = all zero (returns)
  const out_t* last_values;    // [B] bootstrap value after each segment, nullptr = all zero
  const index_t* cu;           // [B+1] segment offsets into the flat axis
  int64_t num_segments;        // B
  double gamma;                // discount
  double decay;                // gamma * lam, the carry factor of A
  out_t* adv;                  // [S] output A (the returns for discounted_returns)
  out_t* ret;                  // [S] output R = A + V, nullptr = not wanted
};

// Scan entries [p0, p1) of segment b backwards. `carry` is A at p1 when p1 is inside the
// segment (p1 < segment end); at the segment end the scan starts from A = 0, V = last value.
// Writes outputs when `write` is true; returns A at p0.
//
// Entries go in blocks of 4 (t, t-1, t-2, t-3): with the block's deltas d and c = gamma lam,
// A_{t-u} = (d_{t-u} + c d_{t-u+1} + ... + c^u d_t) + c^(u+1) A_{t+1}: the partial sums are
// off the carry chain, so the chain costs one multiply-add per 4 entries instead of one per
// entry (a single scan is bound by that latency, not by memory). Same math; in double the
// reassociation changes results by ~1e-16 relative.
template <bool write, typename scalar_t, typename out_t, typename index_t>
inline double scan_piece(const ScanArgs<scalar_t, out_t, index_t>& a, int64_t b, int64_t p0,
                         int64_t p1, double carry) {
  const int64_t seg_end = static_cast<int64_t>(a.cu[b + 1]);
  auto value = [&](int64_t t) { return a.values ? static_cast<double>(a.values[t]) : 0.0; };
  auto store = [&](int64_t t, double adv, double v) {
    if constexpr (write) {
      a.adv[t] = static_cast<out_t>(adv);
      if (a.ret) a.ret[t] = static_cast<out_t>(adv + v);
    }
  };
  double adv;
  double next_v;
  if (p1 >= seg_end) {
    adv = 0.0;
    next_v = a.last_values ? static_cast<double>(a.last_values[b]) : 0.0;
  } else {
    adv = carry;
    next_v = value(p1);
  }
  const double c = a.decay, g = a.gamma;
  const double c2 = c * c, c3 = c2 * c, c4 = c2 * c2;
  int64_t t = p1 - 1;
  for (; t - 3 >= p0; t -= 4) {
    const double v0 = value(t), v1 = value(t - 1), v2 = value(t - 2), v3 = value(t - 3);
    const double s0 = static_cast<double>(a.rewards[t]) + g * next_v - v0;
    const double s1 = static_cast<double>(a.rewards[t - 1]) + g * v0 - v1 + c * s0;
    const double s2 = static_cast<double>(a.rewards[t - 2]) + g * v1 - v2 + c * s1;
    const double s3 = static_cast<double>(a.rewards[t - 3]) + g * v2 - v3 + c * s2;
    store(t, s0 + c * adv, v0);
    store(t - 1, s1 + c2 * adv, v1);
    store(t - 2, s2 + c3 * adv, v2);
    adv = s3 + c4 * adv;
    store(t - 3, adv, v3);
    next_v = v3;
  }
  for (; t >= p0; --t) {
    const double v = value(t);
    adv = static_cast<double>(a.rewards[t]) + g * next_v - v + c * adv;
    next_v = v;
    store(t, adv, v);
  }
  return adv;
}

template <typename scalar_t, typename out_t, typename index_t>
void scan_kernel(const ScanArgs<scalar_t, out_t, index_t>& a) {
  const int64_t n = static_cast<int64_t>(a.cu[a.num_segments]);
  const int threads = region_threads(n, kParallelMin);
  const int64_t chunks = num_chunks(n, threads);
  if (chunks == 0) return;
  // carry[k] = A_true at hi_k (meaningful only when a segment crosses hi_k).
  std::vector<double> carry(chunks, 0.0);
  if (chunks > 1) {
    std::vector<double> head(chunks, 0.0);   // a_k
    std::vector<double> factor(chunks, 0.0); // c^(hi-lo) if one segment spans the chunk, else 0
    parallel_for_chunks(chunks - 1, threads, [&](int64_t j) {
      const int64_t k = j + 1;
      const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
      const int64_t b = segment_of(a.cu, a.num_segments, lo);
      const int64_t seg_end = static_cast<int64_t>(a.cu[b + 1]);
      head[k] = scan_piece<false>(a, b, lo, std::min(seg_end, hi), 0.0);
      factor[k] = seg_end > hi ? std::pow(a.decay, static_cast<double>(hi - lo)) : 0.0;
    });
    for (int64_t k = chunks - 1; k >= 1; --k) carry[k - 1] = head[k] + factor[k] * carry[k];
  }
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    int64_t b = segment_of(a.cu, a.num_segments, hi - 1);
    double c = carry[k];
    for (; b >= 0 && static_cast<int64_t>(a.cu[b + 1]) > lo; --b) {
      const int64_t p0 = std::max<int64_t>(a.cu[b], lo);
      const int64_t p1 = std::min<int64_t>(a.cu[b + 1], hi);
      if (p0 < p1) scan_piece<true>(a, b, p0, p1, c);
      c = 0.0;  // only the last segment of the chunk can continue past hi
    }
  });
}

// Shared driver: values undefined -> discounted returns (then `want_returns` is false).
std::vector<at::Tensor> run_scan(const at::Tensor& rewards, const c10::optional<at::Tensor>& values,
                                 const at::Tensor& cu, double gamma, double lam,
                                 const c10::optional<at::Tensor>& last_values, bool want_returns) {
  check_1d_cpu(rewards, "rewards");
  check_offsets_dtype(cu, "cu_trajs");
  const int64_t num_segments = cu.numel() - 1;
  const int64_t n = rewards.numel();
  auto r = rewards.contiguous();
  at::Tensor v;
  if (values.has_value()) {
    check_1d_cpu(*values, "values");
    TORCH_CHECK(values->scalar_type() == rewards.scalar_type(),
                "values: dtype must equal the rewards' dtype");
    TORCH_CHECK(values->numel() == n, "values: length must equal the rewards' length");
    v = values->contiguous();
  }
  const auto odt = out_dtype(rewards);
  at::Tensor lv;
  if (last_values.has_value()) {
    check_1d_cpu(*last_values, "last_values");
    TORCH_CHECK(last_values->scalar_type() == odt, "last_values: dtype must be ", odt);
    TORCH_CHECK(last_values->numel() == num_segments, "last_values: length must be len(cu) - 1");
    lv = last_values->contiguous();
  }
  auto cuc = cu.contiguous();
  auto adv = empty_output(n, rewards.options().dtype(odt));
  at::Tensor ret = want_returns ? empty_output(n, rewards.options().dtype(odt)) : at::Tensor();
  STEPPO_DISPATCH_FLOAT(r.scalar_type(), "steppo_fast::scan", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    STEPPO_DISPATCH_INDEX(cuc.scalar_type(), "steppo_fast::scan", [&] {
      TORCH_CHECK(static_cast<int64_t>(cuc.data_ptr<index_t>()[num_segments]) == n,
                  "cu_trajs: offsets must end at the axis length ", n);
      ScanArgs<scalar_t, out_t, index_t> args{
          r.data_ptr<scalar_t>(),
          v.defined() ? v.data_ptr<scalar_t>() : nullptr,
          lv.defined() ? lv.data_ptr<out_t>() : nullptr,
          cuc.data_ptr<index_t>(),
          num_segments,
          gamma,
          gamma * lam,
          adv.data_ptr<out_t>(),
          ret.defined() ? ret.data_ptr<out_t>() : nullptr,
      };
      scan_kernel(args);
    });
  });
  if (want_returns) return {adv, ret};
  return {adv};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> step_gae(const at::Tensor& rewards, const at::Tensor& values,
                                            const at::Tensor& cu_trajs, double gamma, double lam,
                                            const c10::optional<at::Tensor>& last_values) {
  auto out = run_scan(rewards, values, cu_trajs, gamma, lam, last_values, true);
  return {out[0], out[1]};
}

at::Tensor discounted_returns(const at::Tensor& rewards, const at::Tensor& cu_trajs, double gamma,
                              const c10::optional<at::Tensor>& last_values) {
  return run_scan(rewards, c10::nullopt, cu_trajs, gamma, 1.0, last_values, false)[0];
}

}  // namespace steppo_fast

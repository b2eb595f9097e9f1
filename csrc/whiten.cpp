// Whitening over a masked set of entries, forward and backward.
//
//   mask_i = weight_i > 0 (all true without weight), n = sum mask,
//   m = sum_mask x / max(n, 1),  c = x - m,  var = sum_mask c^2 / max(n - 1, 1),
//   scale = sqrt(var) + eps if n >= 2 and sqrt(var) + eps > 0 else 1,
//   y = c / scale   (every entry transformed; eps = 0 on equal entries gives 0, never NaN).
// As the reference: in double, about a pivot p (the first counted entry; 0 if none), i.e.
// m = p + sum_mask (x - p) / n and c = (x - p) - (m - p), so equal entries give c = 0 exactly.
//
// Backward (as torch autograd differentiates the reference; sqrt has gradient 0 at var = 0):
//   G = sum_i g_i, P = sum_i g_i c_i, C = sum_mask c_i, and with k = P / (scale^2 s (n-1))
//   when n >= 2 and var > 0 (else k = 0):
//   dc_i = g_i / scale - mask_i k c_i,  dx_j = dc_j - mask_j / max(n, 1) * (G / scale - k C).
//
// Statistics are computed in one read of x: per cache-sized chunk a local two-pass mean and
// sum of squared deviations, merged across chunks with Chan's formula (all in double).
#include "common.h"

#include <cmath>

namespace steppo_fast {
namespace {

constexpr int64_t kChunk = 1 << 16;  // entries per chunk (fits in L2 for the second pass)
// Entries from which a pass runs on num_threads() threads (below: one thread, a plain
// loop). Crossover measured with bench/bench_threads.py (bench/README.md).
constexpr int64_t kParallelMin = 1 << 16;

// Cache-sized chunks, whatever the thread count (a dynamic schedule shares them out).
inline int64_t cache_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

struct Moments {
  double count = 0.0;  // counted entries
  double mean = 0.0;   // their mean
  double m2 = 0.0;     // their sum of squared deviations from the mean

  // Chan et al. parallel merge of two sets of moments.
  void merge(const Moments& o) {
    if (o.count == 0.0) return;
    if (count == 0.0) {
      *this = o;
      return;
    }
    const double total = count + o.count;
    const double d = o.mean - mean;
    mean += d * o.count / total;
    m2 += o.m2 + d * d * count * o.count / total;
    count = total;
  }
};

struct Stats {
  double count;  // n
  double pivot;  // p: the first counted entry (0 when none)
  double mean;   // m - p: the mean of the counted (x - p)
  double std;    // s = sqrt(var) (0 when n < 2)
  double scale;  // sqrt(var) + eps if n >= 2 else 1
};

// Which entries are counted: all of them, or those with weight > 0.
struct AllCounted {
  bool operator()(int64_t) const { return true; }
};
template <typename weight_t>
struct PositiveWeight {
  const weight_t* weight;  // [n] weights (any float type, or bool)
  bool operator()(int64_t i) const { return static_cast<double>(weight[i]) > 0.0; }
};

template <typename scalar_t, typename Mask>
Stats whiten_stats(const scalar_t* x, Mask counted, int64_t n, double eps) {
  double pivot = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (counted(i)) {
      pivot = static_cast<double>(x[i]);
      break;
    }
  }
  const int threads = region_threads(n, kParallelMin);
  const int64_t chunks = cache_chunks(n);
  std::vector<Moments> part(std::max<int64_t>(chunks, 1));
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    // local two-pass moments: the second pass reads the chunk from cache
    const double count = lane_sum(lo, hi, [&](int64_t i) { return counted(i) ? 1.0 : 0.0; });
    const double sum = lane_sum(
        lo, hi, [&](int64_t i) { return counted(i) ? static_cast<double>(x[i]) - pivot : 0.0; });
    const double mean = count > 0.0 ? sum / count : 0.0;
    const double m2 = lane_sum(lo, hi, [&](int64_t i) {
      const double d = (static_cast<double>(x[i]) - pivot) - mean;
      return counted(i) ? d * d : 0.0;
    });
    part[k] = Moments{count, mean, m2};
  });
  Moments all;
  for (int64_t k = 0; k < chunks; ++k) all.merge(part[k]);
  Stats st{all.count, pivot, all.mean, 0.0, 1.0};
  if (all.count >= 2.0) {
    const double var = all.m2 / (all.count - 1.0);
    st.std = var > 0.0 ? std::sqrt(var) : 0.0;
    st.scale = st.std + eps > 0.0 ? st.std + eps : 1.0;
  }
  return st;
}

template <typename scalar_t, typename out_t>
void whiten_apply(const scalar_t* x, int64_t n, const Stats& st, out_t* y) {
  const double inv = 1.0 / st.scale;
  const int threads = region_threads(n, kParallelMin);
  const int64_t chunks = cache_chunks(n);
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    for (int64_t i = lo; i < hi; ++i) {
      y[i] = static_cast<out_t>(((static_cast<double>(x[i]) - st.pivot) - st.mean) * inv);
    }
  });
}

template <typename scalar_t, typename Mask, typename out_t>
void whiten_grad(const out_t* g, const scalar_t* x, Mask counted, int64_t n, const Stats& st,
                 out_t* dx) {
  const int threads = region_threads(n, kParallelMin);
  const int64_t chunks = cache_chunks(n);
  // Reductions G, P, C (see the header comment), in double.
  std::vector<double> G(std::max<int64_t>(chunks, 1)), P(G.size()), C(G.size());
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    auto centred = [&](int64_t i) { return (static_cast<double>(x[i]) - st.pivot) - st.mean; };
    G[k] = lane_sum(lo, hi, [&](int64_t i) { return static_cast<double>(g[i]); });
    P[k] = lane_sum(lo, hi, [&](int64_t i) { return static_cast<double>(g[i]) * centred(i); });
    C[k] = lane_sum(lo, hi, [&](int64_t i) { return counted(i) ? centred(i) : 0.0; });
  });
  double sum_g = 0.0, sum_gc = 0.0, sum_c = 0.0;
  for (int64_t k = 0; k < chunks; ++k) {
    sum_g += G[k];
    sum_gc += P[k];
    sum_c += C[k];
  }
  const double inv = 1.0 / st.scale;
  const double kk = (st.count >= 2.0 && st.std > 0.0)
                        ? sum_gc / (st.scale * st.scale * st.std * (st.count - 1.0))
                        : 0.0;
  const double mean_term = (sum_g * inv - kk * sum_c) / std::max(st.count, 1.0);
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    for (int64_t i = lo; i < hi; ++i) {
      const double ci = (static_cast<double>(x[i]) - st.pivot) - st.mean;
      double d = static_cast<double>(g[i]) * inv;
      if (counted(i)) d -= kk * ci + mean_term;
      dx[i] = static_cast<out_t>(d);
    }
  });
}

// Call fn(mask) with the mask of counted entries: AllCounted without weight, else
// PositiveWeight over the weight's dtype (any float type, or bool).
template <typename Fn>
void with_mask(const at::Tensor& w, Fn&& fn) {
  if (!w.defined()) {
    fn(AllCounted{});
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, w.scalar_type(),
                                  "steppo_fast::whiten_weight",
                                  [&] { fn(PositiveWeight<scalar_t>{w.data_ptr<scalar_t>()}); });
}

at::Tensor prepare_weight(const c10::optional<at::Tensor>& weight, const at::Tensor& x) {
  if (!weight.has_value()) return at::Tensor();
  check_1d_cpu(*weight, "weight");
  TORCH_CHECK(weight->numel() == x.numel(), "weight: length must equal x's length");
  return weight->contiguous();
}

}  // namespace

at::Tensor whiten(const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps) {
  check_1d_cpu(x, "x");
  auto xc = x.contiguous();
  auto w = prepare_weight(weight, xc);
  const int64_t n = xc.numel();
  auto y = empty_output(n, x.options().dtype(out_dtype(x)));
  if (n == 0) return y;
  STEPPO_DISPATCH_FLOAT(xc.scalar_type(), "steppo_fast::whiten", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    with_mask(w, [&](auto counted) {
      const Stats st = whiten_stats(xp, counted, n, eps);
      whiten_apply(xp, n, st, y.data_ptr<out_t>());
    });
  });
  return y;
}

at::Tensor whiten_backward(const at::Tensor& grad, const at::Tensor& x,
                           const c10::optional<at::Tensor>& weight, double eps) {
  check_1d_cpu(x, "x");
  check_1d_cpu(grad, "grad");
  TORCH_CHECK(grad.numel() == x.numel(), "grad: length must equal x's length");
  auto xc = x.contiguous();
  auto w = prepare_weight(weight, xc);
  const auto odt = out_dtype(x);
  auto gc = grad.to(odt).contiguous();
  const int64_t n = xc.numel();
  auto dx = empty_output(n, x.options().dtype(odt));
  if (n == 0) return dx;
  STEPPO_DISPATCH_FLOAT(xc.scalar_type(), "steppo_fast::whiten_backward", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    with_mask(w, [&](auto counted) {
      const Stats st = whiten_stats(xp, counted, n, eps);
      whiten_grad(gc.data_ptr<out_t>(), xp, counted, n, st, dx.data_ptr<out_t>());
    });
  });
  return dx;
}

}  // namespace steppo_fast

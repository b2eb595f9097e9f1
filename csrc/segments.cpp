// Segment reductions and broadcast over CSR offsets (cu [S+1] into a flat axis of A entries).
//
//   segment_sum(x, cu)[s]       = sum_{i in [cu[s], cu[s+1])} x[i]                 [A] -> [S]
//   segment_mean(x, cu)[s]      = segment_sum(x, cu)[s] / (cu[s+1] - cu[s])       (0 if empty)
//   segment_broadcast(y, cu)[i] = y[s] for i in segment s                          [S] -> [A]
//   segment_mean_backward(g, cu)[i] = g[s] / (cu[s+1] - cu[s])                     [S] -> [A]
//
// All four split the flat axis into equal chunks, whatever the segment lengths (one long
// segment is shared by all threads). Sums accumulate in double; a segment that crosses a
// chunk boundary is summed from per-chunk partials in a short serial pass.
#include "common.h"

namespace steppo_fast {
namespace {

// Entries of the flat axis from which a kernel runs on num_threads() threads (below: one
// thread, a plain loop). Crossover measured with bench/bench_threads.py (bench/README.md).
constexpr int64_t kParallelMin = 1 << 16;
constexpr int64_t kBlock = 16;          // broadcast store block (one 64-byte line of fp32)
constexpr int64_t kShort = 64;          // segments up to this length are written as one block

template <typename scalar_t, typename out_t, typename index_t>
void segment_sum_kernel(const scalar_t* x,    // [A] values to reduce
                        const index_t* cu,    // [S+1] segment offsets
                        int64_t num_segments, // S
                        bool mean,            // divide by the segment length
                        out_t* out) {         // [S] result
  const int64_t n = static_cast<int64_t>(cu[num_segments]);
  const int threads = region_threads(n, kParallelMin);
  const int64_t chunks = num_chunks(n, threads);
  // First and last segment touched by each chunk, with the chunk's partial sums of them.
  std::vector<int64_t> first_seg(chunks), last_seg(chunks);
  std::vector<double> first_sum(chunks, 0.0), last_sum(chunks, 0.0);
  auto seg_total = [&](int64_t p0, int64_t p1) {
    double acc = 0.0;
    for (int64_t i = p0; i < p1; ++i) acc += static_cast<double>(x[i]);
    return acc;
  };
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    // chunk 0 and the last chunk also own the empty segments before/after all entries
    const int64_t b0 = k == 0 ? 0 : segment_of(cu, num_segments, lo);
    const int64_t b1 = k == chunks - 1 ? num_segments - 1 : segment_of(cu, num_segments, hi - 1);
    first_seg[k] = b0;
    last_seg[k] = b1;
    for (int64_t b = b0; b <= b1; ++b) {
      const int64_t p0 = std::max<int64_t>(cu[b], lo), p1 = std::min<int64_t>(cu[b + 1], hi);
      const double s = p0 < p1 ? seg_total(p0, p1) : 0.0;
      if (b == b0) {
        first_sum[k] = s;
      } else if (b == b1) {
        last_sum[k] = s;
      } else {
        const int64_t len = static_cast<int64_t>(cu[b + 1] - cu[b]);
        out[b] = static_cast<out_t>(mean ? (len > 0 ? s / static_cast<double>(len) : 0.0) : s);
      }
    }
  });
  // Boundary segments: add up their partials (serial, 2 per chunk).
  std::vector<std::pair<int64_t, double>> parts;
  parts.reserve(2 * chunks);
  for (int64_t k = 0; k < chunks; ++k) {
    parts.emplace_back(first_seg[k], first_sum[k]);
    if (last_seg[k] != first_seg[k]) parts.emplace_back(last_seg[k], last_sum[k]);
  }
  // parts are ordered by segment (chunks are ordered and first <= last): merge runs
  for (size_t i = 0; i < parts.size();) {
    const int64_t b = parts[i].first;
    double s = 0.0;
    for (; i < parts.size() && parts[i].first == b; ++i) s += parts[i].second;
    const int64_t len = static_cast<int64_t>(cu[b + 1] - cu[b]);
    out[b] = static_cast<out_t>(mean ? (len > 0 ? s / static_cast<double>(len) : 0.0) : s);
  }
}

template <typename scalar_t, typename out_t, typename index_t>
void segment_broadcast_kernel(const scalar_t* y,    // [S] one value per segment
                              const index_t* cu,    // [S+1] segment offsets
                              int64_t num_segments, // S
                              bool divide_by_len,   // write y[s] / len(s) (mean's backward)
                              out_t* out) {         // [A] result
  const int64_t n = static_cast<int64_t>(cu[num_segments]);
  const int threads = region_threads(n, kParallelMin);
  const int64_t chunks = num_chunks(n, threads);
  parallel_for_chunks(chunks, threads, [&](int64_t k) {
    const int64_t lo = chunk_begin(k, n, chunks), hi = chunk_begin(k + 1, n, chunks);
    const int64_t b1 = segment_of(cu, num_segments, hi - 1);
    for (int64_t b = segment_of(cu, num_segments, lo); b <= b1; ++b) {
      const int64_t s0 = cu[b], s1 = cu[b + 1];
      const int64_t p0 = std::max(s0, lo), p1 = std::min(s1, hi);
      double val = static_cast<double>(y[b]);
      if (divide_by_len && s1 > s0) val /= static_cast<double>(s1 - s0);
      const out_t v = static_cast<out_t>(val);
      // Stores may spill past the segment end while inside the chunk: the following
      // segments of this chunk overwrite the spill. A short segment is then one fixed-size
      // run of vector stores, with no data-dependent loop (branch mispredictions dominated:
      // 65k segments of 4-60 entries, one thread: 950 us exact loop, 185 us this way).
      if (p1 - p0 <= kShort && p0 + kShort <= hi) {
        for (int64_t j = 0; j < kShort; ++j) out[p0 + j] = v;
        continue;
      }
      int64_t i = p0;
      for (; i < p1 && i + kBlock <= hi; i += kBlock) {
        for (int64_t j = 0; j < kBlock; ++j) out[i + j] = v;
      }
      for (; i < p1; ++i) out[i] = v;  // last entries of the chunk
    }
  });
}

at::Tensor segment_reduce(const at::Tensor& x, const at::Tensor& cu, bool mean) {
  check_1d_cpu(x, "x");
  check_offsets_dtype(cu, "cu_steps");
  const int64_t num_segments = cu.numel() - 1;
  auto xc = x.contiguous();
  auto cuc = cu.contiguous();
  auto out = empty_output(num_segments, x.options().dtype(out_dtype(x)));
  if (num_segments == 0) return out;
  STEPPO_DISPATCH_FLOAT(xc.scalar_type(), "steppo_fast::segment_sum", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    STEPPO_DISPATCH_INDEX(cuc.scalar_type(), "steppo_fast::segment_sum", [&] {
      const index_t* c = cuc.data_ptr<index_t>();
      TORCH_CHECK(static_cast<int64_t>(c[num_segments]) == xc.numel(),
                  "cu_steps: offsets must end at the axis length ", xc.numel());
      if (xc.numel() == 0) {
        out.zero_();
      } else {
        segment_sum_kernel(xc.data_ptr<scalar_t>(), c, num_segments, mean, out.data_ptr<out_t>());
      }
    });
  });
  return out;
}

at::Tensor broadcast(const at::Tensor& y, const at::Tensor& cu, bool divide_by_len) {
  check_1d_cpu(y, "y");
  check_offsets_dtype(cu, "cu_steps");
  const int64_t num_segments = cu.numel() - 1;
  TORCH_CHECK(y.numel() == num_segments, "y: length ", y.numel(), " != len(cu_steps) - 1 = ",
              num_segments);
  auto yc = y.contiguous();
  auto cuc = cu.contiguous();
  at::Tensor out;
  STEPPO_DISPATCH_FLOAT(yc.scalar_type(), "steppo_fast::segment_broadcast", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    STEPPO_DISPATCH_INDEX(cuc.scalar_type(), "steppo_fast::segment_broadcast", [&] {
      const index_t* c = cuc.data_ptr<index_t>();
      const int64_t n = static_cast<int64_t>(c[num_segments]);
      TORCH_CHECK(n >= 0, "cu_steps: offsets must end at a length >= 0");
      out = empty_output(n, y.options().dtype(out_dtype(y)));
      if (n > 0) {
        segment_broadcast_kernel(yc.data_ptr<scalar_t>(), c, num_segments, divide_by_len,
                                 out.data_ptr<out_t>());
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor segment_sum(const at::Tensor& x, const at::Tensor& cu_steps) {
  return segment_reduce(x, cu_steps, false);
}

at::Tensor segment_mean(const at::Tensor& x, const at::Tensor& cu_steps) {
  return segment_reduce(x, cu_steps, true);
}

at::Tensor segment_broadcast(const at::Tensor& y, const at::Tensor& cu_steps) {
  return broadcast(y, cu_steps, false);
}

at::Tensor segment_mean_backward(const at::Tensor& grad, const at::Tensor& cu_steps) {
  return broadcast(grad, cu_steps, true);
}

}  // namespace steppo_fast

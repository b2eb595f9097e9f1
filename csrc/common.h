// Shared helpers for the steppo_fast CPU kernels (threads: parallel.h).
//
// Conventions used by every kernel in csrc/:
//   * float inputs may be fp32, bf16, fp16 (upcast per element, accumulated in double, written
//     as fp32) or fp64 (computed and written as fp64);
//   * offsets (cu_*) are int32 or int64 (kernels are templated on the index type);
//   * inputs arrive validated from Python (steppo_fast.ops) and contiguous (steppo_fast.cpp
//     makes them so); the TORCH_CHECKs here only guard against misuse of the raw torch ops.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "parallel.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace steppo_fast {

// dtype of the results for float inputs: fp64 stays fp64, everything else is fp32.
inline at::ScalarType out_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- Threads (steppo_fast.cpp.set_num_threads) and when to use them.
//
// Kernels split their flat axis into chunks run by parallel_for_chunks (parallel.h: the
// caller never waits for a thread that was not scheduled, unlike an OpenMP region, which
// stalled here for 20-45 ms per region under load). A kernel uses threads only when its input
// is large enough for a second thread to pay off (thresholds measured with
// bench/bench_threads.py, given in each kernel file), and the thread count is a knob.

// The knob: 0 = follow torch's intra-op setting (torch.set_num_threads), n >= 1 = n threads.
// Process-wide, set from Python only (never read from the environment).
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> value{0};
  return value;
}

// Benchmark override of every kernel's parallel threshold (entries): -1 = the kernels' own.
inline std::atomic<int64_t>& parallel_min_setting() {
  static std::atomic<int64_t> value{-1};
  return value;
}

// Number of threads a kernel may use: the knob, else torch's intra-op setting.
inline int num_threads() {
  const int set = thread_setting().load(std::memory_order_relaxed);
  return std::max(1, set > 0 ? set : at::get_num_threads());
}

// Threads for one parallel loop over `n` entries: num_threads() when n >= `parallel_min`
// (the kernel's measured crossover, or the benchmark override), else 1 (a plain loop).
inline int region_threads(int64_t n, int64_t parallel_min) {
  const int threads = num_threads();
  const int64_t override_min = parallel_min_setting().load(std::memory_order_relaxed);
  const int64_t threshold = override_min >= 0 ? override_min : parallel_min;
  return (threads > 1 && n >= threshold) ? threads : 1;
}

// Split [0, n) into contiguous chunks for a region of `threads` threads: one chunk when
// serial, else `per_thread` chunks per thread (more chunks than threads: threads claim them one
// at a time, so uneven progress, or a thread preempted by another process, costs at most about
// one chunk), never more than n. Chunk k is [k*n/P, (k+1)*n/P).
inline int64_t num_chunks(int64_t n, int threads, int per_thread = 8) {
  if (n <= 0) return 0;
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(n, static_cast<int64_t>(threads) * per_thread));
}
inline int64_t chunk_begin(int64_t k, int64_t n, int64_t chunks) { return k * n / chunks; }

// Index of the non-empty segment that holds element `t` of the flat axis: the largest b with
// cu[b] <= t (then cu[b + 1] > t). `num_segments` = len(cu) - 1; requires 0 <= t < cu[last].
template <typename index_t>
inline int64_t segment_of(const index_t* cu, int64_t num_segments, int64_t t) {
  const index_t* it = std::upper_bound(cu, cu + num_segments + 1, static_cast<index_t>(t));
  return static_cast<int64_t>(it - cu) - 1;
}

// sum_{i in [lo, hi)} term(i) in double with kLanes independent accumulators: one running
// sum is bound by the latency of a floating-point add (4 cycles per entry), not by memory.
// Lanes are combined in a fixed order, so results are deterministic.
template <typename Term>
inline double lane_sum(int64_t lo, int64_t hi, Term term) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int u = 0; u < kLanes; ++u) acc[u] += term(i + u);
  }
  for (; i < hi; ++i) acc[0] += term(i);
  double total = 0.0;
  for (int u = 0; u < kLanes; ++u) total += acc[u];
  return total;
}

// A fresh output tensor [n]. Large outputs are never in the allocator's cache (glibc mmaps
// them), so the first write page-faults every 4 KiB page: measured here at ~1.4 ms per MB,
// 10x the cost of writing it. Advising transparent huge pages for the buffer (a hint, as
// torch's own THP_MEM_ALLOC_ENABLE does) makes that one fault per 2 MiB. Results unchanged.
inline at::Tensor empty_output(int64_t n, const at::TensorOptions& options) {
  at::Tensor out = at::empty({n}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  const uintptr_t bytes = static_cast<uintptr_t>(out.nbytes());
  if (bytes >= 4 * kHugePage) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t end = (start + bytes) & ~(kHugePage - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// Checks shared by the raw ops (the public wrappers validate values; these guard layout).
inline void check_1d_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": steppo_fast C++ kernels need CPU tensors");
  TORCH_CHECK(t.dim() == 1, name, ": expected a 1-D tensor, got ", t.dim(), "-D");
}
inline void check_offsets_dtype(const at::Tensor& cu, const char* name) {
  check_1d_cpu(cu, name);
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, name,
              ": offsets must be int32 or int64");
  TORCH_CHECK(cu.numel() >= 1, name, ": offsets need at least one entry");
}

}  // namespace steppo_fast

// Dispatch a float tensor's dtype (fp32, fp64, bf16, fp16) to `scalar_t` inside the lambda.
#define STEPPO_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Dispatch an offsets tensor's dtype (int32, int64) to `index_t` inside the lambda.
#define STEPPO_DISPATCH_INDEX(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)

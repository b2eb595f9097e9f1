// Caller-runs parallel loop for the CPU kernels (replaces OpenMP regions).
//
// An OpenMP region ends with a barrier over every thread of its team. When other processes
// keep the cores busy, a team thread may wait tens of milliseconds for a time slice before
// it even starts, and the caller waits with it (measured here: 20-45 ms per region at load
// ~9 on 2 cores, every size slower on 2 threads than on 1; bench/bench_threads.py).
//
// parallel_for_chunks runs fn(k) for k in [0, chunks) on the calling thread plus up to
// threads - 1 pool workers. Chunks are claimed one at a time from a shared counter; the
// caller claims chunks itself from the start and, at the end, waits only for workers that
// have already joined the region (they are running a claimed chunk), never for a worker that
// was not scheduled. So a loaded machine costs at most about one chunk of waiting over a
// serial run, and an idle one gets all its threads.
//
// One region runs at a time: a call made while another thread's region is running (two
// Python threads calling ops at once) runs serially on its caller. After fork() the child
// starts with a fresh, empty pool (workers are not inherited). fn must not throw (an
// exception on a worker thread ends the process; on the caller it is rethrown once the
// workers have left the loop).
#pragma once

#include <cstdint>
#include <functional>

namespace steppo_fast {

void parallel_for_chunks(int64_t chunks, int threads, const std::function<void(int64_t)>& fn);

// Counters since the process started: loops handed to the pool (threads > 1, chunks > 1, no
// other region running), and chunks that pool workers ran.
void pool_stats(int64_t* regions, int64_t* worker_chunks);

}  // namespace steppo_fast

// Caller-runs thread pool behind parallel_for_chunks (see parallel.h for the contract).
//
// Synchronisation: the region's function, chunk count and the claim counter are published
// under `mutex` with a new generation number; a worker joins a generation under the same
// mutex (counted in `active`) and then claims chunks with an atomic fetch_add. The caller
// claims chunks too; when it finds none left it waits until `active` is 0 (every joined
// worker has run its last claimed chunk), then closes the generation (fn = nullptr) so a
// worker that wakes late cannot join it (also when fn throws on the caller; fn must not throw
// on a worker: that ends the process, as in an OpenMP region). Workers are detached threads of a pool that is
// never destroyed (no static-destructor races at exit); a fork child gets a new pool.
#include "parallel.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace steppo_fast {
namespace {

struct Pool {
  std::mutex region;       // held by the caller of the running region (try_lock: else serial)
  std::mutex mutex;        // guards everything below except `next`
  std::condition_variable wake;  // workers wait here for a new generation
  std::condition_variable idle;  // the caller waits here for active == 0
  uint64_t generation = 0;
  const std::function<void(int64_t)>* fn = nullptr;  // nullptr: no region open
  int64_t total = 0;          // chunks of the open region
  int wanted = 0;             // workers with index < wanted may join the open region
  int active = 0;             // workers inside the open region
  int started = 0;            // worker threads started
  std::atomic<int64_t> next{0};  // next unclaimed chunk
};

// Counters for tests and benchmarks (_C._pool_stats): loops handed to the pool, and chunks
// run by workers (not by the caller). Process-wide, never reset (a fork child inherits them).
std::atomic<int64_t> regions_run{0};
std::atomic<int64_t> worker_chunks_run{0};

Pool* pool_instance = nullptr;
std::once_flag pool_once;

// `seen`: the generation current when the worker was started (it joins the next one).
void worker_loop(Pool* p, int index, uint64_t seen) {
  std::unique_lock<std::mutex> lock(p->mutex);
  for (;;) {
    p->wake.wait(lock, [&] { return p->generation != seen; });
    seen = p->generation;
    if (p->fn == nullptr || index >= p->wanted) continue;
    const std::function<void(int64_t)>* fn = p->fn;
    const int64_t total = p->total;
    ++p->active;
    lock.unlock();
    for (int64_t k = p->next.fetch_add(1, std::memory_order_relaxed); k < total;
         k = p->next.fetch_add(1, std::memory_order_relaxed)) {
      (*fn)(k);
      worker_chunks_run.fetch_add(1, std::memory_order_relaxed);
    }
    lock.lock();
    if (--p->active == 0) p->idle.notify_all();
  }
}

void reset_after_fork() {
  // The parent's workers do not exist in the child; its mutexes may be held. Leak the old
  // pool (never touch it) and start over.
  pool_instance = new Pool();
}

Pool* pool() {
  std::call_once(pool_once, [] {
    pool_instance = new Pool();
    pthread_atfork(nullptr, nullptr, reset_after_fork);
  });
  return pool_instance;
}

}  // namespace

void parallel_for_chunks(int64_t chunks, int threads, const std::function<void(int64_t)>& fn) {
  if (chunks <= 0) return;
  if (threads <= 1 || chunks == 1) {
    for (int64_t k = 0; k < chunks; ++k) fn(k);
    return;
  }
  Pool* p = pool();
  std::unique_lock<std::mutex> region(p->region, std::try_to_lock);
  if (!region.owns_lock()) {  // another thread's region is running: stay serial
    for (int64_t k = 0; k < chunks; ++k) fn(k);
    return;
  }
  const int workers = threads - 1;
  {
    std::lock_guard<std::mutex> lock(p->mutex);
    while (p->started < workers) {
      std::thread(worker_loop, p, p->started, p->generation).detach();
      ++p->started;
    }
    p->fn = &fn;
    p->total = chunks;
    p->wanted = workers;
    p->next.store(0, std::memory_order_relaxed);
    ++p->generation;
  }
  p->wake.notify_all();
  regions_run.fetch_add(1, std::memory_order_relaxed);
  // Close the region on every exit path, exceptions included: no further claims, wait for
  // the joined workers (they use fn and the caller's data), then no worker may join.
  auto close_region = [p, chunks] {
    p->next.store(chunks, std::memory_order_relaxed);
    std::unique_lock<std::mutex> lock(p->mutex);
    p->idle.wait(lock, [&] { return p->active == 0; });
    p->fn = nullptr;
    p->total = 0;
  };
  try {
    for (int64_t k = p->next.fetch_add(1, std::memory_order_relaxed); k < chunks;
         k = p->next.fetch_add(1, std::memory_order_relaxed)) {
      fn(k);
    }
  } catch (...) {
    close_region();
    throw;
  }
  close_region();
}

void pool_stats(int64_t* regions, int64_t* worker_chunks) {
  *regions = regions_run.load();
  *worker_chunks = worker_chunks_run.load();
}

}  // namespace steppo_fast

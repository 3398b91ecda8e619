// Parallel loops for monojax's CPU kernels (sae_sparse.cc, cross_entropy.cc): XLA's intra-op pool.
#ifndef MONOJAX_KERNELS_PARALLEL_H_
#define MONOJAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace monojax {

namespace ffi = xla::ffi;

// ------------------------------------------------------------------------------------- threads

// Runs fn(i) for i in [0, n). Work items are claimed from a shared counter by the caller and by
// helper tasks, so the loop finishes even if the pool runs no task at all (the FFI allows that);
// a helper that starts after the loop is done finds no item and never touches `fn`.
// Threads: XLA's intra-op pool (the one its own CPU kernels use). MONOJAX_SPARSE_THREADS=N (N >= 1)
// uses N std::threads instead (for measuring), as does a pool that reports no threads.
struct Loop {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void Drain(Loop* st, int64_t n, F* fn) {
  for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
    (*fn)(i);
    if (st->done.fetch_add(1) + 1 == n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  }
}

inline int EnvThreads() {
  static const int n = [] {
    const char* s = std::getenv("MONOJAX_SPARSE_THREADS");
    return s ? std::atoi(s) : 0;
  }();
  return n;
}

class Par {
 public:
  explicit Par(ffi::ThreadPool* pool) : pool_(pool) {
    std_threads_ = EnvThreads();
    if (std_threads_ <= 0 && pool_->num_threads() <= 0) std_threads_ = std::thread::hardware_concurrency();
    threads_ = std_threads_ > 0 ? std_threads_ : pool_->num_threads();
  }
  int64_t threads() const { return threads_; }

  template <typename F>
  void For(int64_t n, F fn) {
    if (n <= 0) return;
    int64_t helpers = std::min<int64_t>(threads_, n) - 1;
    if (helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto st = std::make_shared<Loop>();
    F* f = &fn;
    if (std_threads_ > 0) {
      std::vector<std::thread> ts;
      for (int64_t t = 0; t < helpers; ++t) ts.emplace_back([st, n, f] { Drain(st.get(), n, f); });
      Drain(st.get(), n, f);
      for (auto& t : ts) t.join();
      return;
    }
    for (int64_t t = 0; t < helpers; ++t) pool_->Schedule([st, n, f] { Drain(st.get(), n, f); });
    Drain(st.get(), n, f);
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load() == n; });
  }

 private:
  ffi::ThreadPool* pool_;
  int64_t threads_;
  int std_threads_;
};

}  // namespace monojax

#endif  // MONOJAX_KERNELS_PARALLEL_H_

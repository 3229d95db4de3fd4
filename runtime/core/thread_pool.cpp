#include "runtime/core/thread_pool.h"

#include <algorithm>
#include <atomic>

namespace nosa {

namespace {
std::atomic<int> g_global_threads{0};
}

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 0; i + 1 < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop(int) {
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock lock(mutex_);
    wake_.wait(lock, [&] { return stop_ || (generation_ != seen && next_chunk_ < job_chunks_); });
    if (stop_) return;
    seen = generation_;
    while (next_chunk_ < job_chunks_) {
      int64_t chunk = next_chunk_++;
      auto* job = job_;
      int64_t begin = chunk * job_chunk_, end = std::min(job_n_, begin + job_chunk_);
      lock.unlock();
      try {
        (*job)(begin, end);
      } catch (...) {
        std::lock_guard g(mutex_);
        if (!error_) error_ = std::current_exception();
      }
      lock.lock();
      if (++finished_chunks_ == job_chunks_) done_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                              int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t max_chunks = std::max<int64_t>(1, n / grain);
  int64_t chunks = std::min<int64_t>(max_chunks, int64_t(size()) * 4);
  if (chunks <= 1 || workers_.empty()) {
    fn(0, n);
    return;
  }
  std::lock_guard run_lock(run_mutex_);
  std::unique_lock lock(mutex_);
  job_ = &fn;
  job_n_ = n;
  job_chunk_ = (n + chunks - 1) / chunks;
  job_chunks_ = (n + job_chunk_ - 1) / job_chunk_;
  next_chunk_ = 0;
  finished_chunks_ = 0;
  error_ = nullptr;
  ++generation_;
  wake_.notify_all();
  // The calling thread takes chunks too.
  while (next_chunk_ < job_chunks_) {
    int64_t chunk = next_chunk_++;
    int64_t begin = chunk * job_chunk_, end = std::min(job_n_, begin + job_chunk_);
    lock.unlock();
    try {
      fn(begin, end);
    } catch (...) {
      std::lock_guard g(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    lock.lock();
    ++finished_chunks_;
  }
  done_.wait(lock, [&] { return finished_chunks_ == job_chunks_; });
  job_ = nullptr;
  auto error = error_;
  error_ = nullptr;
  lock.unlock();
  if (error) std::rethrow_exception(error);
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool(g_global_threads.load());
  return pool;
}

void ThreadPool::set_global_threads(int n_threads) { g_global_threads = n_threads; }

}  // namespace nosa

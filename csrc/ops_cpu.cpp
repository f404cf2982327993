// CPU path: the planned runs are copied by a small persistent thread pool,
// each worker taking an equal share of the bytes (large runs are split).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "dynkv/check.h"
#include "dynkv/cpu.h"
#include "dynkv/transfer.h"

namespace dynkv {

namespace {

// Fixed-size pool; one job at a time (callers serialize on job_mu_), the
// calling thread works as task 0.
class ThreadPool {
 public:
  explicit ThreadPool(int n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(0..n-1), n <= size(), and returns when all are done.
  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> job(job_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      tasks_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (id >= tasks_) continue;
        fn = fn_;
      }
      (*fn)(id);
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, job_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  int tasks_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

ThreadPool& pool() {
  static ThreadPool p(max_cpu_threads());
  return p;
}

// Below this many bytes a single thread is faster than waking the pool.
constexpr int64_t kParallelMinBytes = 1 << 20;

}  // namespace

int max_cpu_threads() {
  if (const char* env = std::getenv("DYNKV_CPU_THREADS")) {
    const int n = std::atoi(env);
    DYNKV_CHECK(n >= 1 && n <= 256, "DYNKV_CPU_THREADS=", env,
                " is not valid: expected an integer in [1, 256]");
    return n;
  }
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  return std::clamp(hw, 1, 8);
}

void run_cpu(const std::vector<Run>& runs, int threads) {
  int64_t total = 0;
  for (const Run& r : runs) total += r.bytes;
  if (total == 0) return;
  ThreadPool& p = pool();
  if (threads <= 0) threads = p.size();
  DYNKV_CHECK(threads <= p.size(), "threads=", threads, " exceeds the CPU pool size ", p.size(),
              "; raise DYNKV_CPU_THREADS before the first copy");
  if (threads == 1 || total < kParallelMinBytes || runs.empty()) {
    for (const Run& r : runs)
      std::memcpy(reinterpret_cast<void*>(r.dst), reinterpret_cast<const void*>(r.src),
                  static_cast<size_t>(r.bytes));
    return;
  }
  // Prefix sums let each task find where its byte range starts.
  std::vector<int64_t> starts(runs.size());
  int64_t acc = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    starts[i] = acc;
    acc += runs[i].bytes;
  }
  const int n = threads;
  p.run(n, [&](int task) {
    const int64_t b0 = total * task / n;
    const int64_t b1 = total * (task + 1) / n;
    if (b0 >= b1) return;
    size_t i = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), b0) - starts.begin()) - 1;
    int64_t pos = b0;
    while (pos < b1 && i < runs.size()) {
      const Run& r = runs[i];
      const int64_t off = pos - starts[i];
      const int64_t len = std::min(r.bytes - off, b1 - pos);
      std::memcpy(reinterpret_cast<void*>(r.dst + off), reinterpret_cast<const void*>(r.src + off),
                  static_cast<size_t>(len));
      pos += len;
      ++i;
    }
  });
}

}  // namespace dynkv

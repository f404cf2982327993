// A count of a load's layer groups issued so far, shared by the thread that issues them and the
// threads that wait for one.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace dynkv {

// How many of a load's layer groups have been issued, for a thread that waits for one of them while
// another thread issues them in order (the worker's launch thread: a group's event is recorded, and the
// forward may wait for it on the GPU). Set and waited for without Python's GIL.
class GroupSignal {
 public:
  explicit GroupSignal(int64_t num_groups) : num_groups_(num_groups) {}

  // Groups [0, group] are issued.
  void set(int64_t group) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (group + 1 > issued_) issued_ = group + 1;
    }
    cv_.notify_all();
  }
  // The launch is over (every group issued, or it failed): no waiter waits any longer.
  void set_all() { set(num_groups_ - 1); }
  // Until group `group` is issued (or set_all).
  void wait(int64_t group) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return issued_ > group || issued_ >= num_groups_; });
  }
  int64_t issued() {
    std::lock_guard<std::mutex> lock(mutex_);
    return issued_;
  }
  int64_t num_groups() const { return num_groups_; }

 private:
  const int64_t num_groups_;
  int64_t issued_ = 0;
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace dynkv

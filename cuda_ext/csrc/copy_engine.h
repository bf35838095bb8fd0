// The copy engine's one C++ interface, shared by the CPU (worker threads + memcpy) and
// the CUDA (copy streams + cudaMemcpyAsync + events) implementations. No torch headers:
// the .cu compiles with nvcc alone; bindings.cpp owns the tensors and their lifetimes.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

namespace moe_copy {

// Lower value runs first: a DEMAND copy overtakes every queued PREFETCH copy.
enum class Priority : int { kDemand = 0, kPrefetch = 1 };
constexpr int kNumPriorities = 2;

enum class TicketStatus : int { kQueued = 0, kRunning = 1, kIssued = 2, kDone = 3, kCancelled = 4 };

// Completion state of one submitted copy ("event"). Shared by the queue and the caller.
class TicketState {
 public:
  TicketState() = default;
  virtual ~TicketState() = default;
  TicketState(const TicketState&) = delete;
  TicketState& operator=(const TicketState&) = delete;

  TicketStatus status() const { return static_cast<TicketStatus>(status_.load(std::memory_order_acquire)); }
  // Moves from `from` to `to` only if the status is still `from`; exactly one caller wins.
  bool transition(TicketStatus from, TicketStatus to) {
    int expected = static_cast<int>(from);
    return status_.compare_exchange_strong(expected, static_cast<int>(to), std::memory_order_acq_rel);
  }
  void mark_finished(TicketStatus final_status) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      status_.store(static_cast<int>(final_status), std::memory_order_release);
    }
    cond_.notify_all();
  }
  // Blocks until the status is one of {kIssued, kDone, kCancelled} (issued: handed to the device).
  void wait_until_at_least(TicketStatus target) {
    std::unique_lock<std::mutex> lock(mutex_);
    cond_.wait(lock, [&] {
      int s = status_.load(std::memory_order_acquire);
      return s >= static_cast<int>(target);
    });
  }
  void notify() {
    { std::lock_guard<std::mutex> lock(mutex_); }
    cond_.notify_all();
  }

 private:
  std::atomic<int> status_{static_cast<int>(TicketStatus::kQueued)};
  std::mutex mutex_;
  std::condition_variable cond_;
};

struct CopyJob {
  const void* src = nullptr;
  void* dst = nullptr;
  std::size_t nbytes = 0;
  std::shared_ptr<TicketState> ticket;
  std::shared_ptr<void> keepalive;  // the source and destination tensors, released after the copy
};
using JobPtr = std::shared_ptr<CopyJob>;

// Two FIFO levels; pop() returns the oldest DEMAND job, else the oldest PREFETCH job.
// A job may sit in both levels after promote(); the ticket's kQueued->kRunning transition
// decides the one execution, the stale entry is skipped.
class PriorityCopyQueue {
 public:
  void push(const JobPtr& job, Priority priority) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      levels_[static_cast<int>(priority)].push_back(job);
    }
    cond_.notify_one();
  }
  void push_many(const std::vector<JobPtr>& jobs, Priority priority) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& level = levels_[static_cast<int>(priority)];
      level.insert(level.end(), jobs.begin(), jobs.end());
    }
    cond_.notify_all();
  }
  // Blocks until a job is available or the queue is closed and drained (then returns nullptr).
  JobPtr pop() {
    std::vector<JobPtr> stale;  // destroyed after the lock is released (see pop_locked)
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      cond_.wait(lock, [&] { return closed_ || !empty_locked(); });
      if (JobPtr job = pop_locked(stale)) return job;
      if (closed_) return nullptr;
    }
  }
  // Non-blocking pop; nullptr if nothing is queued.
  JobPtr try_pop() {
    std::vector<JobPtr> stale;
    std::lock_guard<std::mutex> lock(mutex_);
    return pop_locked(stale);
  }
  // Waits up to `timeout_us` for work; returns true if work may be available or closed.
  bool wait_for_work(long timeout_us) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cond_.wait_for(lock, std::chrono::microseconds(timeout_us), [&] { return closed_ || !empty_locked(); });
  }
  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closed_ = true;
    }
    cond_.notify_all();
  }
  bool closed() {
    std::lock_guard<std::mutex> lock(mutex_);
    return closed_;
  }
  // Drops every queued job, marking its ticket cancelled.
  void cancel_all() {
    std::vector<JobPtr> dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& level : levels_) {
      for (auto& job : level) {
        if (job->ticket->transition(TicketStatus::kQueued, TicketStatus::kCancelled)) job->ticket->notify();
        dropped.push_back(std::move(job));
      }
      level.clear();
    }
  }

 private:
  bool empty_locked() const { return levels_[0].empty() && levels_[1].empty(); }
  // Skips stale entries (cancelled, or already run after a promote) into `stale`: dropping the
  // last reference to a job frees its tensors, which may take the GIL, so never under mutex_.
  JobPtr pop_locked(std::vector<JobPtr>& stale) {
    for (auto& level : levels_) {
      while (!level.empty()) {
        JobPtr job = std::move(level.front());
        level.pop_front();
        if (job->ticket->status() == TicketStatus::kQueued) return job;
        stale.push_back(std::move(job));
      }
    }
    return nullptr;
  }

  std::mutex mutex_;
  std::condition_variable cond_;
  std::array<std::deque<JobPtr>, kNumPriorities> levels_;
  bool closed_ = false;
};

// One interface, two implementations (CpuCopyEngine, CudaCopyEngine).
class CopyEngineImpl {
 public:
  virtual ~CopyEngineImpl() = default;
  // Creates the ticket state this implementation completes (CUDA: one that owns an event).
  virtual std::shared_ptr<TicketState> make_ticket() = 0;
  void submit(const std::vector<JobPtr>& jobs, Priority priority) { queue_.push_many(jobs, priority); }
  // Re-queues a still-queued job at DEMAND priority; false if it already started or ended.
  bool promote(const JobPtr& job) {
    if (job->ticket->status() != TicketStatus::kQueued) return false;
    queue_.push(job, Priority::kDemand);
    return true;
  }
  // Drops a still-queued job; false if it already started, finished or was cancelled.
  bool cancel(const std::shared_ptr<TicketState>& ticket) {
    if (!ticket->transition(TicketStatus::kQueued, TicketStatus::kCancelled)) return false;
    ticket->notify();
    return true;
  }
  virtual bool done(const std::shared_ptr<TicketState>& ticket) = 0;
  // CPU: blocks until the copy finished. CUDA: makes `stream` wait on the copy's event.
  virtual void wait(const std::shared_ptr<TicketState>& ticket, std::uintptr_t stream) = 0;
  // Host-blocking wait for completion (both implementations).
  virtual void synchronize(const std::shared_ptr<TicketState>& ticket) = 0;
  virtual void shutdown() = 0;

 protected:
  PriorityCopyQueue queue_;
};

std::unique_ptr<CopyEngineImpl> make_cpu_engine(int num_workers);
#ifdef MOE_WITH_CUDA
std::unique_ptr<CopyEngineImpl> make_cuda_engine(int device_index, int num_streams);
#endif

}  // namespace moe_copy

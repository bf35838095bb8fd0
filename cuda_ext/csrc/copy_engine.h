// The copy engine's one C++ interface, shared by the CPU (worker threads + memcpy) and
// the CUDA (copy streams + cudaMemcpyAsync + events) implementations. No torch headers:
// the .cu compiles with nvcc alone; bindings.cpp owns the tensors and their lifetimes.
//
// Link throttle: the CPU flavour paces its copies to a configured rate (the CPU-only stand-in
// for a host-to-device link); every flavour reports the link's busy time.
//
// Threads: the engine's own threads (CPU workers, CUDA dispatcher) never touch a Python
// object. A job's tensors (its `keepalive`) are handed to the engine's graveyard when the job
// ends, and bindings.cpp frees them on a Python thread that holds the GIL. Any exception on
// an engine thread fails the job it came from (status kFailed plus a message) instead of
// escaping the thread (which would abort the process).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace moe_copy {

// Lower value runs first: a DEMAND copy overtakes every queued PREFETCH copy.
enum class Priority : int { kDemand = 0, kPrefetch = 1 };
constexpr int kNumPriorities = 2;

// Ordered: waits block until the status is at least a target (kParked: a PREFETCH copy that
// was started and put back in the queue for a DEMAND copy; it resumes where it stopped).
enum class TicketStatus : int {
  kQueued = 0, kParked = 1, kRunning = 2, kIssued = 3, kDone = 4, kCancelled = 5, kFailed = 6
};

// Bytes per piece of a large copy; a DEMAND copy waits at most about one piece per worker.
constexpr std::size_t kDefaultChunkBytes = std::size_t{8} << 20;

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
  void mark_failed(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = message;
      status_.store(static_cast<int>(TicketStatus::kFailed), std::memory_order_release);
    }
    cond_.notify_all();
  }
  // Why the copy failed (empty unless the status is kFailed).
  std::string error() {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }
  // Blocks until the status is at least `target` (kIssued: handed to the device).
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
  std::string error_;
};

struct CopyJob {
  const void* src = nullptr;
  void* dst = nullptr;
  std::size_t nbytes = 0;
  std::size_t done_bytes = 0;  // progress of a chunked copy; only its current runner touches it
  Priority priority = Priority::kPrefetch;  // guarded by the queue's mutex (promote raises it)
  std::shared_ptr<TicketState> ticket;
  std::shared_ptr<void> keepalive;  // the tensors; moved to the graveyard by whoever ends the job
};
using JobPtr = std::shared_ptr<CopyJob>;

// Two FIFO levels; pop() returns the oldest DEMAND job, else the oldest PREFETCH job.
// An entry is live while its job is queued or parked at that entry's level; promote() adds a
// DEMAND entry and leaves the PREFETCH one stale. pop() marks the job kRunning under the
// queue's lock, so promote() and park() see one consistent state.
class PriorityCopyQueue {
 public:
  void push_many(const std::vector<JobPtr>& jobs) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& job : jobs) levels_[static_cast<int>(job->priority)].push_back(job);
    }
    cond_.notify_all();
  }
  // Blocks until a job is available (returned kRunning) or the queue is closed and drained (nullptr).
  JobPtr pop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (true) {
      cond_.wait(lock, [&] { return closed_ || !empty_locked(); });
      if (JobPtr job = pop_locked()) return job;
      if (closed_) return nullptr;
    }
  }
  // Non-blocking pop (the job is returned kRunning); nullptr if nothing is queued.
  JobPtr try_pop() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pop_locked();
  }
  // Non-blocking pop of a DEMAND job only.
  JobPtr try_pop_demand() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pop_level_locked(static_cast<int>(Priority::kDemand));
  }
  // Re-queues a still-queued or parked PREFETCH job at DEMAND; a running one is raised to DEMAND
  // in place (it no longer yields to other DEMAND copies). True if the job is (now) queued at DEMAND.
  bool promote(const JobPtr& job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      TicketStatus status = job->ticket->status();
      bool waiting = status == TicketStatus::kQueued || status == TicketStatus::kParked;
      if (!waiting && status != TicketStatus::kRunning) return false;
      if (job->priority == Priority::kDemand) return waiting;
      job->priority = Priority::kDemand;
      if (!waiting) return false;
      levels_[static_cast<int>(Priority::kDemand)].push_back(job);
    }
    cond_.notify_one();
    return true;
  }
  // Puts a running PREFETCH job back at the front of its level if a DEMAND job waits; true if it did.
  bool park_if_demand_waiting(const JobPtr& job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (job->priority == Priority::kDemand || !has_live_locked(static_cast<int>(Priority::kDemand))) return false;
      job->ticket->transition(TicketStatus::kRunning, TicketStatus::kParked);
      levels_[static_cast<int>(job->priority)].push_front(job);
    }
    cond_.notify_one();
    return true;
  }
  Priority priority_of(const JobPtr& job) {
    std::lock_guard<std::mutex> lock(mutex_);
    return job->priority;
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
  // Empties the queue; returns the jobs that were waiting in it (queued or parked), once each.
  std::vector<JobPtr> drain() {
    std::vector<JobPtr> waiting;
    std::lock_guard<std::mutex> lock(mutex_);
    for (int level = 0; level < kNumPriorities; ++level) {
      for (auto& job : levels_[level]) {
        if (live(job, level) && std::find(waiting.begin(), waiting.end(), job) == waiting.end()) {
          waiting.push_back(job);
        }
      }
      levels_[level].clear();
    }
    return waiting;
  }

 private:
  static bool live(const JobPtr& job, int level) {
    TicketStatus status = job->ticket->status();
    return (status == TicketStatus::kQueued || status == TicketStatus::kParked) &&
           static_cast<int>(job->priority) == level;
  }
  bool empty_locked() const { return levels_[0].empty() && levels_[1].empty(); }
  // Drops stale entries from the front of `level`; true if a live entry remains. Dropping an
  // entry never frees tensors: an ended job's tensors are already in the graveyard.
  bool has_live_locked(int level) {
    auto& entries = levels_[level];
    while (!entries.empty() && !live(entries.front(), level)) entries.pop_front();
    return !entries.empty();
  }
  JobPtr pop_level_locked(int level) {
    while (has_live_locked(level)) {
      JobPtr job = std::move(levels_[level].front());
      levels_[level].pop_front();
      TicketStatus status = job->ticket->status();  // a cancel may race us; the CAS decides
      if (job->ticket->transition(status, TicketStatus::kRunning)) return job;
    }
    return nullptr;
  }
  JobPtr pop_locked() {
    for (int level = 0; level < kNumPriorities; ++level) {
      if (JobPtr job = pop_level_locked(level)) return job;
    }
    return nullptr;
  }

  std::mutex mutex_;
  std::condition_variable cond_;
  std::array<std::deque<JobPtr>, kNumPriorities> levels_;
  bool closed_ = false;
};

// The link every copy of one engine shares: an optional rate limit and the busy time. A piece of
// a copy reserves the link for nbytes / rate after the previous reservation ends (whichever
// worker made it); a worker whose memcpy finished earlier sleeps until its reservation ends, so
// the engine never moves more than `rate` bytes per second however many workers it has. Busy
// time is the union of the reservations (unthrottled: of the pieces' memcpy intervals).
class LinkThrottle {
 public:
  using Clock = std::chrono::steady_clock;

  // Bytes per second; 0 (or less) removes the limit.
  void set_rate(double bytes_per_s) {
    std::lock_guard<std::mutex> lock(mutex_);
    rate_ = bytes_per_s > 0 ? bytes_per_s : 0;
  }
  double rate() {
    std::lock_guard<std::mutex> lock(mutex_);
    return rate_;
  }
  // A piece of `nbytes` was copied from `start` until now: books its link time and, when
  // throttled, sleeps until the link would have carried it.
  void pace(std::size_t nbytes, Clock::time_point start) {
    Clock::time_point now = Clock::now(), finish;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      Clock::time_point begin = std::max(start, link_free_);
      if (rate_ > 0) {
        finish = begin + std::chrono::duration_cast<Clock::duration>(
                             std::chrono::duration<double>(static_cast<double>(nbytes) / rate_));
      } else {
        finish = std::max(now, begin);
      }
      busy_ += finish - begin;
      link_free_ = std::max(link_free_, finish);
    }
    if (finish > now) std::this_thread::sleep_until(finish);
  }
  // Seconds the link was busy since the engine started.
  double busy_seconds() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::chrono::duration<double>(busy_).count();
  }

 private:
  std::mutex mutex_;
  double rate_ = 0;
  Clock::time_point link_free_{};
  Clock::duration busy_{0};
};

// One interface, two implementations (CpuCopyEngine, CudaCopyEngine).
class CopyEngineImpl {
 public:
  explicit CopyEngineImpl(std::size_t chunk_bytes) : chunk_bytes_(std::max<std::size_t>(chunk_bytes, 1)) {}
  virtual ~CopyEngineImpl() = default;
  // Creates the ticket state this implementation completes (CUDA: one that owns an event).
  virtual std::shared_ptr<TicketState> make_ticket() = 0;
  void submit(const std::vector<JobPtr>& jobs) { queue_.push_many(jobs); }
  // Moves a still-queued (or parked) job to DEMAND; false if it is running or ended.
  bool promote(const JobPtr& job) { return queue_.promote(job); }
  // Drops a still-queued job; false if it already started, finished or was cancelled.
  bool cancel(const JobPtr& job) {
    if (!job->ticket->transition(TicketStatus::kQueued, TicketStatus::kCancelled)) return false;
    retire(job);
    job->ticket->notify();
    return true;
  }
  // Non-blocking: true once the copy finished; throws CopyFailed if it failed.
  virtual bool done(const std::shared_ptr<TicketState>& ticket) = 0;
  // CPU: blocks until the copy finished. CUDA: makes `stream` wait on the copy's event.
  // Throws CopyFailed if the copy failed.
  virtual void wait(const std::shared_ptr<TicketState>& ticket, std::uintptr_t stream) = 0;
  // Host-blocking wait for completion (both implementations); throws CopyFailed on failure.
  virtual void synchronize(const std::shared_ptr<TicketState>& ticket) = 0;
  virtual void shutdown() = 0;
  // True if `wait` would return without blocking the host.
  virtual bool wait_is_immediate(const std::shared_ptr<TicketState>& ticket) = 0;

  // The tensors of jobs that ended since the last call; the caller frees them under the GIL.
  std::vector<std::shared_ptr<void>> take_retired() {
    std::vector<std::shared_ptr<void>> retired;
    std::lock_guard<std::mutex> lock(graveyard_mutex_);
    retired.swap(graveyard_);
    return retired;
  }
  // The link's throttle (honoured by the CPU flavour) and busy time.
  LinkThrottle& link() { return link_; }
  // Test hook: the next `count` copies to run fail with `message` on the engine's thread.
  void fail_next(int count, const std::string& message) {
    std::lock_guard<std::mutex> lock(inject_mutex_);
    inject_message_ = message;
    inject_count_.store(count, std::memory_order_release);
  }

 protected:
  // Throws the injected failure if one is pending (called where a copy starts executing).
  void maybe_inject_failure() {
    if (inject_count_.load(std::memory_order_acquire) <= 0) return;
    std::lock_guard<std::mutex> lock(inject_mutex_);
    if (inject_count_.load(std::memory_order_relaxed) <= 0) return;
    inject_count_.fetch_sub(1, std::memory_order_relaxed);
    throw std::runtime_error(inject_message_);
  }
  // Hands an ended job's tensors to the graveyard (never freed on an engine thread).
  void retire(const JobPtr& job) {
    std::shared_ptr<void> keepalive = std::move(job->keepalive);
    if (!keepalive) return;
    std::lock_guard<std::mutex> lock(graveyard_mutex_);
    graveyard_.push_back(std::move(keepalive));
  }
  void finish(const JobPtr& job) {
    retire(job);
    job->ticket->mark_finished(TicketStatus::kDone);
  }
  void fail(const JobPtr& job, const std::string& message) {
    retire(job);
    job->ticket->mark_failed(message);
  }
  // Cancels every job still waiting in the queue (parked ones included) and closes it.
  void cancel_waiting() {
    queue_.close();
    for (const JobPtr& job : queue_.drain()) {
      if (job->ticket->transition(TicketStatus::kQueued, TicketStatus::kCancelled) ||
          job->ticket->transition(TicketStatus::kParked, TicketStatus::kCancelled)) {
        retire(job);
        job->ticket->notify();
      }
    }
  }

  PriorityCopyQueue queue_;
  const std::size_t chunk_bytes_;
  LinkThrottle link_;

 private:
  std::mutex graveyard_mutex_;
  std::vector<std::shared_ptr<void>> graveyard_;
  std::mutex inject_mutex_;
  std::atomic<int> inject_count_{0};
  std::string inject_message_;
};

// What done/wait/synchronize throw for a failed copy (bindings turn it into a Python error).
class CopyFailed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws CopyFailed if `ticket` failed.
inline void throw_if_failed(const std::shared_ptr<TicketState>& ticket) {
  if (ticket->status() == TicketStatus::kFailed) throw CopyFailed("copy failed: " + ticket->error());
}

std::unique_ptr<CopyEngineImpl> make_cpu_engine(int num_workers, std::size_t chunk_bytes);
#ifdef MOE_WITH_CUDA
std::unique_ptr<CopyEngineImpl> make_cuda_engine(int device_index, int num_streams, std::size_t chunk_bytes);
#endif

}  // namespace moe_copy

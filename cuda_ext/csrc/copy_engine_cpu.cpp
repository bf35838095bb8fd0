// CPU implementation: `num_workers` threads pop the priority queue and memcpy each job, a
// chunk at a time, each chunk paced by the link throttle; between chunks a PREFETCH copy yields
// to a waiting DEMAND copy.
#include <cstring>
#include <exception>
#include <thread>

#include "copy_engine.h"

namespace moe_copy {
namespace {

class CpuCopyEngine final : public CopyEngineImpl {
 public:
  CpuCopyEngine(int num_workers, std::size_t chunk_bytes) : CopyEngineImpl(chunk_bytes) {
    workers_.reserve(num_workers);
    for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { run(); });
  }
  ~CpuCopyEngine() override { shutdown(); }

  std::shared_ptr<TicketState> make_ticket() override { return std::make_shared<TicketState>(); }

  bool done(const std::shared_ptr<TicketState>& ticket) override {
    throw_if_failed(ticket);
    return ticket->status() == TicketStatus::kDone;
  }
  void wait(const std::shared_ptr<TicketState>& ticket, std::uintptr_t /*stream*/) override { synchronize(ticket); }
  void synchronize(const std::shared_ptr<TicketState>& ticket) override {
    ticket->wait_until_at_least(TicketStatus::kDone);
    throw_if_failed(ticket);
  }
  bool wait_is_immediate(const std::shared_ptr<TicketState>& ticket) override {
    return ticket->status() >= TicketStatus::kDone;
  }
  void shutdown() override {
    std::lock_guard<std::mutex> lock(shutdown_mutex_);
    if (workers_.empty()) return;
    cancel_waiting();
    for (auto& worker : workers_) worker.join();
    workers_.clear();
  }

 private:
  void run() {
    while (JobPtr job = queue_.pop()) {
      try {
        if (copy_chunks(job)) finish(job);
      } catch (const std::exception& error) {
        fail(job, error.what());
      } catch (...) {
        fail(job, "unknown error on a copy worker");
      }
    }
  }
  // Copies the rest of `job`; false if it was parked for a waiting DEMAND copy.
  bool copy_chunks(const JobPtr& job) {
    if (job->done_bytes == 0) maybe_inject_failure();
    auto* dst = static_cast<unsigned char*>(job->dst);
    const auto* src = static_cast<const unsigned char*>(job->src);
    while (job->done_bytes < job->nbytes) {
      std::size_t count = std::min(chunk_bytes_, job->nbytes - job->done_bytes);
      LinkThrottle::Clock::time_point start = LinkThrottle::Clock::now();
      std::memcpy(dst + job->done_bytes, src + job->done_bytes, count);
      link_.pace(count, start);
      job->done_bytes += count;
      if (job->done_bytes < job->nbytes && queue_.park_if_demand_waiting(job)) return false;
    }
    return true;
  }

  std::mutex shutdown_mutex_;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<CopyEngineImpl> make_cpu_engine(int num_workers, std::size_t chunk_bytes) {
  return std::make_unique<CpuCopyEngine>(num_workers, chunk_bytes);
}

}  // namespace moe_copy

// CPU implementation: `num_workers` threads pop the priority queue and memcpy each job.
#include <cstring>
#include <thread>

#include "copy_engine.h"

namespace moe_copy {
namespace {

class CpuCopyEngine final : public CopyEngineImpl {
 public:
  explicit CpuCopyEngine(int num_workers) {
    workers_.reserve(num_workers);
    for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { run(); });
  }
  ~CpuCopyEngine() override { shutdown(); }

  std::shared_ptr<TicketState> make_ticket() override { return std::make_shared<TicketState>(); }

  bool done(const std::shared_ptr<TicketState>& ticket) override {
    return ticket->status() == TicketStatus::kDone;
  }
  void wait(const std::shared_ptr<TicketState>& ticket, std::uintptr_t /*stream*/) override { synchronize(ticket); }
  void synchronize(const std::shared_ptr<TicketState>& ticket) override {
    ticket->wait_until_at_least(TicketStatus::kDone);
  }
  void shutdown() override {
    std::lock_guard<std::mutex> lock(shutdown_mutex_);
    if (workers_.empty()) return;
    queue_.cancel_all();
    queue_.close();
    for (auto& worker : workers_) worker.join();
    workers_.clear();
  }

 private:
  void run() {
    while (JobPtr job = queue_.pop()) {
      if (!job->ticket->transition(TicketStatus::kQueued, TicketStatus::kRunning)) continue;
      std::memcpy(job->dst, job->src, job->nbytes);
      job->keepalive.reset();
      job->ticket->mark_finished(TicketStatus::kDone);
    }
  }

  std::mutex shutdown_mutex_;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<CopyEngineImpl> make_cpu_engine(int num_workers) {
  return std::make_unique<CpuCopyEngine>(num_workers);
}

}  // namespace moe_copy

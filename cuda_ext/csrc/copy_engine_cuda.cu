// CUDA implementation: one dispatcher thread pops the priority queue and issues each job as
// cudaMemcpyAsync on one of `num_streams` dedicated non-blocking copy streams, recording a
// CUDA event per copy. At most kMaxIssuedPerStream copies sit in each stream, so a DEMAND
// copy submitted later still overtakes PREFETCH copies that are queued on the host.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <thread>

#include "copy_engine.h"

namespace moe_copy {
namespace {

constexpr std::size_t kMaxIssuedPerStream = 2;
constexpr long kPollMicros = 50;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

class CudaTicketState final : public TicketState {
 public:
  explicit CudaTicketState(int device_index) {
    check(cudaSetDevice(device_index), "cudaSetDevice");
    check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate");
  }
  ~CudaTicketState() override { cudaEventDestroy(event_); }
  cudaEvent_t event() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

cudaEvent_t event_of(const std::shared_ptr<TicketState>& ticket) {
  return static_cast<CudaTicketState*>(ticket.get())->event();
}

class CudaCopyEngine final : public CopyEngineImpl {
 public:
  CudaCopyEngine(int device_index, int num_streams) : device_index_(device_index) {
    check(cudaSetDevice(device_index_), "cudaSetDevice");
    streams_.resize(num_streams);
    issued_.resize(num_streams);
    for (auto& stream : streams_) check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    dispatcher_ = std::thread([this] { run(); });
  }
  ~CudaCopyEngine() override {
    shutdown();
    for (auto& stream : streams_) cudaStreamDestroy(stream);
  }

  std::shared_ptr<TicketState> make_ticket() override { return std::make_shared<CudaTicketState>(device_index_); }

  bool done(const std::shared_ptr<TicketState>& ticket) override {
    TicketStatus status = ticket->status();
    if (status == TicketStatus::kDone) return true;
    if (status != TicketStatus::kIssued) return false;
    return cudaEventQuery(event_of(ticket)) == cudaSuccess;
  }
  // Host waits only until the copy is issued (a queued job is promoted first), then the
  // compute stream waits on the copy's event on the device.
  void wait(const std::shared_ptr<TicketState>& ticket, std::uintptr_t stream) override {
    ticket->wait_until_at_least(TicketStatus::kIssued);
    if (ticket->status() == TicketStatus::kCancelled) return;
    check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), event_of(ticket), 0), "cudaStreamWaitEvent");
  }
  void synchronize(const std::shared_ptr<TicketState>& ticket) override {
    ticket->wait_until_at_least(TicketStatus::kIssued);
    if (ticket->status() == TicketStatus::kCancelled) return;
    check(cudaEventSynchronize(event_of(ticket)), "cudaEventSynchronize");
  }
  void shutdown() override {
    std::lock_guard<std::mutex> lock(shutdown_mutex_);
    if (!dispatcher_.joinable()) return;
    queue_.cancel_all();
    queue_.close();
    dispatcher_.join();
  }

 private:
  // Releases the tensors of copies whose event completed; returns how many are still in flight.
  std::size_t retire_completed() {
    std::size_t in_flight = 0;
    for (auto& issued : issued_) {
      while (!issued.empty() && cudaEventQuery(event_of(issued.front()->ticket)) == cudaSuccess) {
        issued.front()->keepalive.reset();
        issued.front()->ticket->mark_finished(TicketStatus::kDone);
        issued.pop_front();
      }
      in_flight += issued.size();
    }
    return in_flight;
  }
  int free_stream() const {
    for (std::size_t i = 0; i < issued_.size(); ++i) {
      if (issued_[i].size() < kMaxIssuedPerStream) return static_cast<int>(i);
    }
    return -1;
  }
  void issue(const JobPtr& job, int stream_index) {
    cudaStream_t stream = streams_[stream_index];
    check(cudaMemcpyAsync(job->dst, job->src, job->nbytes, cudaMemcpyDefault, stream), "cudaMemcpyAsync");
    check(cudaEventRecord(event_of(job->ticket), stream), "cudaEventRecord");
    issued_[stream_index].push_back(job);
    job->ticket->mark_finished(TicketStatus::kIssued);
  }
  void run() {
    check(cudaSetDevice(device_index_), "cudaSetDevice");
    while (true) {
      std::size_t in_flight = retire_completed();
      int stream_index = free_stream();
      if (stream_index >= 0) {
        JobPtr job = in_flight == 0 ? queue_.pop() : queue_.try_pop();
        if (job) {
          if (job->ticket->transition(TicketStatus::kQueued, TicketStatus::kRunning)) issue(job, stream_index);
          continue;
        }
        if (in_flight == 0) break;  // pop() returned nothing: the queue is closed and drained
      }
      if (queue_.closed()) break;
      queue_.wait_for_work(kPollMicros);
      if (stream_index < 0) std::this_thread::sleep_for(std::chrono::microseconds(kPollMicros));
    }
    for (auto& issued : issued_) {
      for (auto& job : issued) {
        cudaEventSynchronize(event_of(job->ticket));
        job->keepalive.reset();
        job->ticket->mark_finished(TicketStatus::kDone);
      }
      issued.clear();
    }
  }

  int device_index_;
  std::mutex shutdown_mutex_;
  std::vector<cudaStream_t> streams_;
  std::vector<std::deque<JobPtr>> issued_;
  std::thread dispatcher_;
};

}  // namespace

std::unique_ptr<CopyEngineImpl> make_cuda_engine(int device_index, int num_streams) {
  return std::make_unique<CudaCopyEngine>(device_index, num_streams);
}

}  // namespace moe_copy

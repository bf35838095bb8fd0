// CUDA implementation: one dispatcher thread pops the priority queue and issues each job as
// cudaMemcpyAsync on one of `num_streams` dedicated non-blocking copy streams, recording a
// CUDA event per copy. At most kMaxOpsPerStream copy operations sit in each stream. A DEMAND
// copy is issued whole; a PREFETCH copy is issued a chunk at a time as its stream frees up, and
// a DEMAND copy that arrives meanwhile is issued before its next chunk, so a demand miss waits
// for at most about kMaxOpsPerStream chunks. Every error on the dispatcher fails the affected
// jobs (their tickets carry the message) instead of escaping the thread.
#include <cuda_runtime.h>

#include <exception>
#include <string>
#include <thread>

#include "copy_engine.h"

namespace moe_copy {
namespace {

constexpr std::size_t kMaxOpsPerStream = 2;
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

// One copy operation in a stream: a chunk of `job`, or its last (or only) piece.
struct CopyOp {
  JobPtr job;
  bool last = false;
  cudaEvent_t event = nullptr;  // recorded after the operation; one of the stream's own events
};

// A copy stream, its operations in flight (oldest first) and the PREFETCH job it is chunking.
struct CopyStream {
  cudaStream_t stream = nullptr;
  std::array<cudaEvent_t, kMaxOpsPerStream> events{};
  std::size_t next_event = 0;
  std::deque<CopyOp> ops;
  JobPtr current;
};

class CudaCopyEngine final : public CopyEngineImpl {
 public:
  CudaCopyEngine(int device_index, int num_streams, std::size_t chunk_bytes)
      : CopyEngineImpl(chunk_bytes), device_index_(device_index), streams_(num_streams) {
    check(cudaSetDevice(device_index_), "cudaSetDevice");
    for (auto& stream : streams_) {
      check(cudaStreamCreateWithFlags(&stream.stream, cudaStreamNonBlocking), "cudaStreamCreate");
      for (auto& event : stream.events) check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    }
    dispatcher_ = std::thread([this] { run(); });
  }
  ~CudaCopyEngine() override {
    shutdown();
    for (auto& stream : streams_) {
      for (auto& event : stream.events) cudaEventDestroy(event);
      cudaStreamDestroy(stream.stream);
    }
  }

  std::shared_ptr<TicketState> make_ticket() override { return std::make_shared<CudaTicketState>(device_index_); }

  bool done(const std::shared_ptr<TicketState>& ticket) override {
    TicketStatus status = ticket->status();
    if (status == TicketStatus::kDone) return true;
    throw_if_failed(ticket);
    if (status != TicketStatus::kIssued) return false;
    cudaError_t err = cudaEventQuery(event_of(ticket));
    if (err == cudaErrorNotReady) return false;
    if (err != cudaSuccess) throw CopyFailed(std::string("copy failed on the device: ") + cudaGetErrorString(err));
    return true;
  }
  // Host waits only until the copy is issued (a queued job is promoted first), then the
  // compute stream waits on the copy's event on the device.
  void wait(const std::shared_ptr<TicketState>& ticket, std::uintptr_t stream) override {
    ticket->wait_until_at_least(TicketStatus::kIssued);
    if (ticket->status() == TicketStatus::kCancelled) return;
    throw_if_failed(ticket);
    cudaError_t err = cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream), event_of(ticket), 0);
    if (err != cudaSuccess) throw CopyFailed(std::string("cudaStreamWaitEvent: ") + cudaGetErrorString(err));
  }
  void synchronize(const std::shared_ptr<TicketState>& ticket) override {
    ticket->wait_until_at_least(TicketStatus::kIssued);
    if (ticket->status() == TicketStatus::kCancelled) return;
    throw_if_failed(ticket);
    cudaError_t err = cudaEventSynchronize(event_of(ticket));
    if (err != cudaSuccess) throw CopyFailed(std::string("copy failed on the device: ") + cudaGetErrorString(err));
  }
  bool wait_is_immediate(const std::shared_ptr<TicketState>& ticket) override {
    return ticket->status() >= TicketStatus::kIssued;
  }
  void shutdown() override {
    std::lock_guard<std::mutex> lock(shutdown_mutex_);
    if (!dispatcher_.joinable()) return;
    cancel_waiting();
    dispatcher_.join();
  }

 private:
  void run() {
    try {
      check(cudaSetDevice(device_index_), "cudaSetDevice");
      dispatch();
    } catch (const std::exception& error) {
      fail_everything(std::string("copy dispatcher stopped: ") + error.what());
    } catch (...) {
      fail_everything("copy dispatcher stopped: unknown error");
    }
  }
  // Runs until the queue is closed and every running copy has completed.
  void dispatch() {
    while (true) {
      std::size_t in_flight = retire_completed();
      if (in_flight == 0 && !chunking()) {
        JobPtr job = queue_.pop();  // nothing on the device: block for work
        if (!job) return;           // closed and drained
        issue_next(streams_[0], job);
        continue;
      }
      bool issued = false, stream_free = false;
      for (auto& stream : streams_) {
        if (stream.ops.size() >= kMaxOpsPerStream) continue;
        stream_free = true;
        JobPtr job = queue_.try_pop_demand();
        if (!job) job = stream.current ? stream.current : queue_.try_pop();
        if (!job) continue;
        issue_next(stream, job);
        issued = true;
      }
      if (issued) continue;
      if (stream_free) {
        queue_.wait_for_work(kPollMicros);
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(kPollMicros));
      }
    }
  }
  bool chunking() const {
    for (const auto& stream : streams_) {
      if (stream.current) return true;
    }
    return false;
  }
  // Issues `job` whole (DEMAND) or its next chunk (PREFETCH) on `stream`; a failure fails the job.
  void issue_next(CopyStream& stream, const JobPtr& job) {
    try {
      if (job->done_bytes == 0) maybe_inject_failure();
      std::size_t left = job->nbytes - job->done_bytes;
      std::size_t count = queue_.priority_of(job) == Priority::kDemand ? left : std::min(chunk_bytes_, left);
      check(cudaMemcpyAsync(static_cast<unsigned char*>(job->dst) + job->done_bytes,
                            static_cast<const unsigned char*>(job->src) + job->done_bytes, count,
                            cudaMemcpyDefault, stream.stream),
            "cudaMemcpyAsync");
      job->done_bytes += count;
      bool last = job->done_bytes == job->nbytes;
      if (last) check(cudaEventRecord(event_of(job->ticket), stream.stream), "cudaEventRecord");
      cudaEvent_t event = stream.events[stream.next_event++ % kMaxOpsPerStream];
      check(cudaEventRecord(event, stream.stream), "cudaEventRecord");
      stream.ops.push_back(CopyOp{job, last, event});
      if (!last) {
        stream.current = job;
      } else {
        if (stream.current == job) stream.current = nullptr;
        job->ticket->mark_finished(TicketStatus::kIssued);
      }
    } catch (const std::exception& error) {
      abandon(stream, job, error.what());
    }
  }
  // Fails `job` once nothing of it can still be running on `stream`.
  void abandon(CopyStream& stream, const JobPtr& job, const std::string& message) {
    cudaStreamSynchronize(stream.stream);  // its earlier chunks read the tensors the graveyard takes
    if (stream.current == job) stream.current = nullptr;
    if (job->ticket->status() != TicketStatus::kFailed) fail(job, message);
  }
  // Ends the jobs whose last operation completed; fails those whose operation failed.
  // Returns how many operations are still in flight.
  std::size_t retire_completed() {
    std::size_t in_flight = 0;
    for (auto& stream : streams_) {
      while (!stream.ops.empty()) {
        CopyOp op = stream.ops.front();
        cudaError_t err = cudaEventQuery(op.event);
        if (err == cudaErrorNotReady) break;
        stream.ops.pop_front();
        if (err != cudaSuccess) {
          abandon(stream, op.job, std::string("copy failed on the device: ") + cudaGetErrorString(err));
        } else if (op.last && op.job->ticket->status() != TicketStatus::kFailed) {
          finish(op.job);
        }
      }
      in_flight += stream.ops.size();
    }
    return in_flight;
  }
  // After an error outside any one copy: fails every copy in flight and every later one.
  void fail_everything(const std::string& message) {
    for (auto& stream : streams_) {
      cudaStreamSynchronize(stream.stream);
      for (auto& op : stream.ops) {
        if (op.job->ticket->status() != TicketStatus::kFailed) fail(op.job, message);
      }
      stream.ops.clear();
      if (stream.current && stream.current->ticket->status() != TicketStatus::kFailed) fail(stream.current, message);
      stream.current = nullptr;
    }
    while (JobPtr job = queue_.pop()) fail(job, message);
  }

  int device_index_;
  std::mutex shutdown_mutex_;
  std::vector<CopyStream> streams_;
  std::thread dispatcher_;
};

}  // namespace

std::unique_ptr<CopyEngineImpl> make_cuda_engine(int device_index, int num_streams, std::size_t chunk_bytes) {
  return std::make_unique<CudaCopyEngine>(device_index, num_streams, chunk_bytes);
}

}  // namespace moe_copy

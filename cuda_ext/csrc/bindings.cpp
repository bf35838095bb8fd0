// Python bindings: one CopyEngine class over either implementation. Checks the tensors,
// keeps them alive until their copy ends and frees them here, on a Python thread holding the
// GIL (the engine's threads only hand them to its graveyard); releases the GIL only to block.
#include <torch/extension.h>

#include <string>
#include <utility>

#include "copy_engine.h"

namespace moe_copy {
namespace {

// Frees the tensors of the copies that ended since the last call (the caller holds the GIL).
void free_retired(CopyEngineImpl& engine) { engine.take_retired(); }

class Ticket {
 public:
  Ticket(JobPtr job, std::shared_ptr<CopyEngineImpl> engine) : job_(std::move(job)), engine_(std::move(engine)) {}
  bool done() const { return engine_->done(job_->ticket); }
  bool cancelled() const { return job_->ticket->status() == TicketStatus::kCancelled; }
  bool failed() const { return job_->ticket->status() == TicketStatus::kFailed; }
  std::string error() const { return job_->ticket->error(); }
  void wait(std::uintptr_t stream) {
    block([&] { engine_->wait(job_->ticket, stream); });
  }
  void synchronize() {
    block([&] { engine_->synchronize(job_->ticket); });
  }
  const JobPtr& job() const { return job_; }

 private:
  // Promotes a still-queued copy, runs `wait_fn` (without the GIL if it may block), frees retired tensors.
  template <typename WaitFn>
  void block(WaitFn wait_fn) {
    if (engine_->wait_is_immediate(job_->ticket)) {
      wait_fn();
    } else {
      engine_->promote(job_);
      py::gil_scoped_release release;
      wait_fn();
    }
    free_retired(*engine_);
  }

  JobPtr job_;
  std::shared_ptr<CopyEngineImpl> engine_;  // outlives the Python engine object if tickets do
};

void check_pair(const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(src.scalar_type() == at::kByte && dst.scalar_type() == at::kByte, "copy tensors must be uint8");
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "copy tensors must be contiguous");
  TORCH_CHECK(src.numel() == dst.numel(), "source has ", src.numel(), " bytes, destination ", dst.numel());
  TORCH_CHECK(src.data_ptr() != dst.data_ptr(), "source and destination are the same buffer");
}

class CopyEngine {
 public:
  CopyEngine(const std::string& backend, int device_index, int num_workers, std::size_t chunk_bytes,
             double link_bytes_per_s) {
    TORCH_CHECK(num_workers >= 1, "num_workers must be >= 1, got ", num_workers);
    TORCH_CHECK(chunk_bytes >= 1, "chunk_bytes must be >= 1, got ", chunk_bytes);
    TORCH_CHECK(link_bytes_per_s >= 0, "link_bytes_per_s must be >= 0, got ", link_bytes_per_s);
    if (backend == "cpu") {
      impl_ = make_cpu_engine(num_workers, chunk_bytes);
#ifdef MOE_WITH_CUDA
    } else if (backend == "cuda") {
      impl_ = make_cuda_engine(device_index, num_workers, chunk_bytes);
#endif
    } else {
      TORCH_CHECK(false, "backend '", backend, "' is not compiled into this extension");
    }
    impl_->link().set_rate(link_bytes_per_s);
  }
  ~CopyEngine() { shutdown(); }

  std::vector<Ticket> submit(const std::vector<std::pair<at::Tensor, at::Tensor>>& copies, int priority) {
    TORCH_CHECK(priority >= 0 && priority < kNumPriorities, "unknown priority ", priority);
    TORCH_CHECK(!shut_down_, "copy engine is shut down");
    free_retired(*impl_);
    std::vector<JobPtr> jobs;
    std::vector<Ticket> tickets;
    jobs.reserve(copies.size());
    tickets.reserve(copies.size());
    for (const auto& [src, dst] : copies) {
      check_pair(src, dst);
      auto job = std::make_shared<CopyJob>();
      job->src = src.data_ptr();
      job->dst = dst.data_ptr();
      job->nbytes = static_cast<std::size_t>(src.numel());
      job->priority = static_cast<Priority>(priority);
      job->ticket = impl_->make_ticket();
      job->keepalive = std::make_shared<std::pair<at::Tensor, at::Tensor>>(src, dst);
      jobs.push_back(job);
      tickets.emplace_back(job, impl_);
    }
    impl_->submit(jobs);
    return tickets;
  }
  bool cancel(const Ticket& ticket) {
    bool cancelled = impl_->cancel(ticket.job());
    free_retired(*impl_);
    return cancelled;
  }
  bool promote(const Ticket& ticket) { return !shut_down_ && impl_->promote(ticket.job()); }
  void fail_next(int count, const std::string& message) { impl_->fail_next(count, message); }
  void set_link_rate(double bytes_per_s) {
    TORCH_CHECK(bytes_per_s >= 0, "link_bytes_per_s must be >= 0, got ", bytes_per_s);
    impl_->link().set_rate(bytes_per_s);
  }
  double link_rate() { return impl_->link().rate(); }
  double link_busy_seconds() { return impl_->link().busy_seconds(); }
  void shutdown() {
    if (impl_ == nullptr || shut_down_) return;
    shut_down_ = true;
    {
      py::gil_scoped_release release;
      impl_->shutdown();
    }
    free_retired(*impl_);
  }

 private:
  std::shared_ptr<CopyEngineImpl> impl_;
  bool shut_down_ = false;
};

}  // namespace
}  // namespace moe_copy

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using moe_copy::CopyEngine;
  using moe_copy::Ticket;
  py::register_exception<moe_copy::CopyFailed>(m, "CopyFailed", PyExc_RuntimeError);
  py::class_<Ticket>(m, "Ticket")
      .def("done", &Ticket::done)
      .def("cancelled", &Ticket::cancelled)
      .def("failed", &Ticket::failed)
      .def("error", &Ticket::error)
      .def("wait", &Ticket::wait, py::arg("stream") = 0)
      .def("synchronize", &Ticket::synchronize);
  py::class_<CopyEngine>(m, "CopyEngine")
      .def(py::init<const std::string&, int, int, std::size_t, double>(), py::arg("backend"),
           py::arg("device_index"), py::arg("num_workers"), py::arg("chunk_bytes") = moe_copy::kDefaultChunkBytes,
           py::arg("link_bytes_per_s") = 0.0)
      .def("submit", &CopyEngine::submit, py::arg("copies"), py::arg("priority"))
      .def("cancel", &CopyEngine::cancel)
      .def("promote", &CopyEngine::promote)
      .def("fail_next", &CopyEngine::fail_next, py::arg("count"), py::arg("message"))
      .def("set_link_rate", &CopyEngine::set_link_rate, py::arg("bytes_per_s"))
      .def("link_rate", &CopyEngine::link_rate)
      .def("link_busy_seconds", &CopyEngine::link_busy_seconds)
      .def("shutdown", &CopyEngine::shutdown);
#ifdef MOE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

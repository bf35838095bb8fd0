// Python bindings: one CopyEngine class over either implementation. Checks the tensors,
// keeps them alive until their copy ends, and releases the GIL while blocking.
#include <torch/extension.h>

#include <string>
#include <utility>

#include "copy_engine.h"

namespace moe_copy {
namespace {

class Ticket {
 public:
  Ticket(JobPtr job, std::shared_ptr<CopyEngineImpl> engine) : job_(std::move(job)), engine_(engine) {}
  bool done() const { return engine_->done(job_->ticket); }
  bool cancelled() const { return job_->ticket->status() == TicketStatus::kCancelled; }
  void wait(std::uintptr_t stream) {
    engine_->promote(job_);
    py::gil_scoped_release release;
    engine_->wait(job_->ticket, stream);
  }
  void synchronize() {
    engine_->promote(job_);
    py::gil_scoped_release release;
    engine_->synchronize(job_->ticket);
  }
  const JobPtr& job() const { return job_; }

 private:
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
  CopyEngine(const std::string& backend, int device_index, int num_workers) {
    TORCH_CHECK(num_workers >= 1, "num_workers must be >= 1, got ", num_workers);
    if (backend == "cpu") {
      impl_ = make_cpu_engine(num_workers);
#ifdef MOE_WITH_CUDA
    } else if (backend == "cuda") {
      impl_ = make_cuda_engine(device_index, num_workers);
#endif
    } else {
      TORCH_CHECK(false, "backend '", backend, "' is not compiled into this extension");
    }
  }
  ~CopyEngine() { shutdown(); }

  std::vector<Ticket> submit(const std::vector<std::pair<at::Tensor, at::Tensor>>& copies, int priority) {
    TORCH_CHECK(priority >= 0 && priority < kNumPriorities, "unknown priority ", priority);
    TORCH_CHECK(!shut_down_, "copy engine is shut down");
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
      job->ticket = impl_->make_ticket();
      job->keepalive = std::make_shared<std::pair<at::Tensor, at::Tensor>>(src, dst);
      jobs.push_back(job);
      tickets.emplace_back(job, impl_);
    }
    impl_->submit(jobs, static_cast<Priority>(priority));
    return tickets;
  }
  bool cancel(const Ticket& ticket) { return impl_->cancel(ticket.job()->ticket); }
  bool promote(const Ticket& ticket) { return !shut_down_ && impl_->promote(ticket.job()); }
  void shutdown() {
    if (impl_ == nullptr || shut_down_) return;
    shut_down_ = true;
    py::gil_scoped_release release;
    impl_->shutdown();
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
  py::class_<Ticket>(m, "Ticket")
      .def("done", &Ticket::done)
      .def("cancelled", &Ticket::cancelled)
      .def("wait", &Ticket::wait, py::arg("stream") = 0)
      .def("synchronize", &Ticket::synchronize);
  py::class_<CopyEngine>(m, "CopyEngine")
      .def(py::init<const std::string&, int, int>(), py::arg("backend"), py::arg("device_index"),
           py::arg("num_workers"))
      .def("submit", &CopyEngine::submit, py::arg("copies"), py::arg("priority"))
      .def("cancel", &CopyEngine::cancel)
      .def("promote", &CopyEngine::promote)
      .def("shutdown", &CopyEngine::shutdown);
#ifdef MOE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

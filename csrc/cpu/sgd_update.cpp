// CPU SGD update of every parameter of a group in one call (multi-tensor): the elements of all
// parameters form one range, cut into equal per-thread pieces (one OpenMP fork per call, none
// for small groups), each piece updating the spans of the tensors it covers with the kernel of
// csrc/cpu/kernels/sgd_impl.h. Every argument is checked before anything is written; a
// non-contiguous parameter or buffer is updated in a contiguous copy that is written back.
#include <ATen/ATen.h>
#include <omp.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/cpu_util.h"
#include "cpu/kernels/sgd.h"

namespace fastlin {
namespace {

struct Seg {
  void* p;
  const void* g;
  void* buf;
  int64_t n, start;  // elements, offset in the concatenated range
  int fmt;
};

void sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const char* op = "sgd_update_";
  TORCH_CHECK_VALUE(grads.size() == params.size(), "fastlin.", op, ": grads must have one tensor per parameter (",
                    params.size(), "), got ", grads.size());
  TORCH_CHECK_VALUE(momentum == 0 ? bufs.empty() : bufs.size() == params.size(), "fastlin.", op,
                    ": momentum_buffers must be empty when momentum == 0, else one per parameter (", params.size(),
                    "), got ", bufs.size());
  const size_t np = params.size();
  for (size_t i = 0; i < np; ++i) {
    check_floating(op, "params", params[i]);
    TORCH_CHECK(params[i].device().is_cpu(), "fastlin.", op, ": params must be CPU tensors, got ", params[i].device());
    check_same_dtype(op, "grads", grads[i], "params", params[i]);
    check_same_device(op, "grads", grads[i], "params", params[i]);
    check_shape(op, "grads", grads[i], params[i].sizes(), "(the shape of its parameter)");
    if (!bufs.empty()) {
      check_same_dtype(op, "momentum_buffers", bufs[i], "params", params[i]);
      check_same_device(op, "momentum_buffers", bufs[i], "params", params[i]);
      check_shape(op, "momentum_buffers", bufs[i], params[i].sizes(), "(the shape of its parameter)");
    }
  }
  const bool use_buf = momentum != 0;
  std::vector<Seg> segs;
  segs.reserve(np);
  std::vector<at::Tensor> keep;                               // contiguous copies of grads
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (original, contiguous working copy)
  auto work = [&](const at::Tensor& t) -> at::Tensor {
    if (t.is_contiguous()) return t;
    at::Tensor c = t.contiguous();
    write_back.emplace_back(t, c);
    return c;
  };
  int64_t total = 0;
  for (size_t i = 0; i < np; ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    at::Tensor p = work(params[i]);
    at::Tensor g = grads[i];
    if (!g.is_contiguous()) {
      g = g.contiguous();
      keep.push_back(g);
    }
    at::Tensor b = use_buf ? work(bufs[i]) : at::Tensor();
    segs.push_back({p.data_ptr(), g.data_ptr(), use_buf ? b.data_ptr() : nullptr, n, total,
                    cpu::fmt_index(p.scalar_type())});
    total += n;
  }
  const cpu::SgdOptions o{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step};
  const auto& K = cpu::sgd_kernels();
  // Elements [lo, hi) of the concatenation.
  auto run = [&](int64_t lo, int64_t hi) {
    for (const Seg& s : segs) {
      const int64_t a = std::max(lo, s.start), b = std::min(hi, s.start + s.n);
      if (a >= b) continue;
      const int64_t off = a - s.start, esz = s.fmt == cpu::kF64 ? 8 : s.fmt == cpu::kF32 ? 4 : 2;
      K.update[s.fmt](static_cast<char*>(s.p) + off * esz, static_cast<const char*>(s.g) + off * esz,
                      s.buf ? static_cast<char*>(s.buf) + off * esz : nullptr, b - a, o);
    }
  };
  const int nt = cpu::threads_for(8.0 * static_cast<double>(total));
  if (nt <= 1) {
    run(0, total);
  } else {
#pragma omp parallel num_threads(nt)
    {
      // Piece boundaries on multiples of 16 elements (a 64-byte line of float32) so threads never
      // share a cache line of the same tensor's body.
      const int t = omp_get_thread_num(), k = omp_get_num_threads();
      const int64_t lo = (total * t / k) / 16 * 16, hi = t + 1 == k ? total : (total * (t + 1) / k) / 16 * 16;
      run(lo, hi);
    }
  }
  for (auto& [orig, copy] : write_back) orig.copy_(copy);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("sgd_update_", &sgd_update_cpu); }

}  // namespace fastlin

// CPU SGD update for all parameters of a group. (First version: ATen per tensor; the fused C++
// kernel replaces it.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace fastlin {
namespace {

void sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const char* op = "sgd_update_";
  TORCH_CHECK_VALUE(grads.size() == params.size(), "fastlin.", op, ": grads must have one tensor per parameter (",
                    params.size(), "), got ", grads.size());
  TORCH_CHECK_VALUE(momentum == 0 ? bufs.empty() : bufs.size() == params.size(), "fastlin.", op,
                    ": momentum_buffers must be empty when momentum == 0, else one per parameter (", params.size(),
                    "), got ", bufs.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_floating(op, "params", params[i]);
    check_same_dtype(op, "grads", grads[i], "params", params[i]);
    check_same_device(op, "grads", grads[i], "params", params[i]);
    check_shape(op, "grads", grads[i], params[i].sizes(), "(the shape of its parameter)");
    if (!bufs.empty()) {
      check_same_dtype(op, "momentum_buffers", bufs[i], "params", params[i]);
      check_shape(op, "momentum_buffers", bufs[i], params[i].sizes(), "(the shape of its parameter)");
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    auto p = params[i];
    auto g = maximize ? grads[i].neg() : grads[i];
    if (weight_decay != 0) g = g.add(p, weight_decay);
    if (momentum != 0) {
      auto buf = bufs[i];
      if (first_step) {
        buf.copy_(g);
      } else {
        buf.mul_(momentum).add_(g, 1 - dampening);
      }
      g = nesterov ? g.add(buf, momentum) : buf;
    }
    p.add_(g, -lr);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("sgd_update_", &sgd_update_cpu); }

}  // namespace fastlin

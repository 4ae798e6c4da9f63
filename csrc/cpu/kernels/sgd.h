// Kernel table of the SGD family (csrc/cpu/kernels/sgd_impl.h): torch.optim.SGD's update on one
// contiguous span of a parameter, its gradient and its momentum buffer. The glue
// (csrc/cpu/sgd_update.cpp) concatenates every parameter of a group into one element range and
// splits that range over OpenMP threads.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels/linear.h"  // FmtIndex

namespace fastlin::cpu {

struct SgdOptions {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
};

struct SgdKernels {
  // p, grad, buf: n elements of one format (buf unused when momentum == 0; written, not read,
  // when first_step). Arithmetic in float32 (float64 for float64).
  void (*update[4])(void* p, const void* grad, void* buf, int64_t n, const SgdOptions& o);
};

FASTLIN_ISA_TABLE(SgdKernels, sgd_kernels)

}  // namespace fastlin::cpu

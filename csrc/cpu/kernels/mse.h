// Kernel table of the MSE family (csrc/cpu/kernels/mse_impl.h): elementwise kernels over a
// contiguous span; the glue (csrc/cpu/mse_loss.cpp) splits the elements into fixed chunks,
// runs them over OpenMP threads and adds the per-chunk sums in double in a fixed order.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels/linear.h"  // FmtIndex

namespace fastlin::cpu {

struct MseKernels {
  // sum_i (a[i] - b[i])^2 over n elements: float32 lanes for float32/bfloat16/float16 inputs
  // (float64 for float64), returned as double.
  double (*sum_sq[4])(const void* a, const void* b, int64_t n);
  // out[i] = (a[i] - b[i])^2
  void (*sq[4])(const void* a, const void* b, void* out, int64_t n);
  // out[i] = scale * (a[i] - b[i]) * g[i]   (g == nullptr: g[i] = g_scalar). Torch's order.
  void (*bwd[4])(const void* a, const void* b, const void* g, double g_scalar, double scale, void* out, int64_t n);
};

FASTLIN_ISA_TABLE(MseKernels, mse_kernels)

}  // namespace fastlin::cpu

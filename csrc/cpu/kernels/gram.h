// Kernel table of the Gram family (csrc/cpu/kernels/gram_impl.h): the augmented Gram matrix
// G = Z^T diag(w) Z of Z = [input, 1, target] (N, P), P = D + 1 + O, over a range of rows.
// The glue (csrc/cpu/gram.cpp) cuts the rows into fixed chunks, runs them over OpenMP threads,
// adds the per-chunk float64 partials in chunk order, undoes the shift and mirrors the triangle.
#pragma once

#include <cstdint>

#include "cpu/isa.h"
#include "cpu/kernels/linear.h"  // FmtIndex

namespace fastlin::cpu {

// input (N, D) and target (N, O) with any element strides; sample_weight (N,) or nullptr.
struct GramArgs {
  const void* x;
  int64_t sx0, sx1;
  const void* y;
  int64_t sy0, sy1;
  const void* w;
  int64_t sw;
  int64_t D, O;
};

// Sizes the glue allocates for P columns: the partial is (ld x ld) float64, the per-thread
// scratch `scratch_bytes` bytes (packed row blocks).
struct GramPlan {
  int64_t ld;
  int64_t scratch_bytes;
};

struct GramKernels {
  GramPlan (*plan[4])(int64_t P);  // [FmtIndex]
  // c (P doubles) = the shift: row 0 of [input, 0, target] (non-finite entries replaced by 0).
  void (*shift[4])(const GramArgs&, double* c);
  // g (ld x ld float64, row-major, zero on entry) = Z'^T diag(w) Z' over rows [r0, r1), Z' = Z - 1 c^T with
  // c[D] = 0 (the ones column stays 1). Only the upper triangle (i <= j < P) is meaningful.
  void (*rows[4])(const GramArgs&, const double* c, int64_t r0, int64_t r1, double* g, void* scratch);
};

FASTLIN_ISA_TABLE(GramKernels, gram_kernels)

}  // namespace fastlin::cpu

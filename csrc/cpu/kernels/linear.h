// Kernel table of the linear family (csrc/cpu/kernels/linear_impl.h): raw-pointer kernels for
// y = a @ B^T + bias with a small inner or a small out dimension (forward and grad_input), and
// the per-row-chunk accumulation of grad_weight = g^T @ x and grad_bias = sum_n g (backward).
// The glue (csrc/cpu/linear.cpp) packs B, splits rows over OpenMP threads and reduces partials.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace fastlin::cpu {

// Formats index the per-format entries of every table: f32, f64, bf16, f16 (vec.h's Fmt).
enum FmtIndex : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// y (rows x out, row stride ldy, Elem) = a (rows x inner, row stride lda, unit column stride, Elem)
// @ B^T + bias, accumulated in Acc (float32; float64 for float64). B and bias are Acc, packed by
// the caller for the form:
//   kNtDot   (out < lanes):   b is (out x ldb), ldb >= round_up(inner, lanes), zero padded.
//   kNtAxpy  (out >= lanes):  b is B^T, (inner x ldb), ldb >= round_up(out, lanes), zero padded.
//   kNtOuter (inner == 1):    b is (round_up(out, lanes),) zero padded.
//   kNtAxpyPairs (bfloat16, the axpy shapes, ISA avx512_bf16 only): b is B^T in pairs of rows,
//                ((inner + 1) / 2 x ldb) uint32, entry (j, o) = the bfloat16 bits of B(o, 2j) |
//                those of B(o, 2j + 1) << 16, zero padded (an odd inner's last pair included).
// bias (nullptr for none) is (round_up(out, lanes),) zero padded.
enum NtForm : int { kNtDot = 0, kNtAxpy = 1, kNtOuter = 2, kNtAxpyPairs = 3 };

struct NtArgs {
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  const void* bias;
  void* y;
  int64_t ldy;
  int64_t rows, inner, out;
  int64_t rows_readable;  // rows of a from `a` on (>= rows): how far a kernel may prefetch
};

// part (kdim x ldp, Acc) += bc^T @ vec over `rows` rows, where bc is (rows x kdim) and vec is
// (rows x vdim), both Elem with unit column stride; ldp >= round_up(vdim, lanes) and part has
// round_up(kdim, 4) rows (the kernel's register tile). bsum (nullptr: not wanted) += the column
// sums of bc (bias_from_vec == false; kdim long) or of vec (true; ldp long).
struct TnArgs {
  const void* bc;
  int64_t ldbc;
  const void* vec;
  int64_t ldvec;
  int64_t rows, kdim, vdim;
  void* part;
  int64_t ldp;
  void* bsum;
  bool bias_from_vec;
};

struct LinearKernels {
  void (*nt[4][4])(const NtArgs&);  // [NtForm][FmtIndex]; nullptr where a form has no kernel
  void (*tn[4])(const TnArgs&);     // [FmtIndex]
  // out (cols_pad, Acc) += column sums of g (rows x cols, row stride ldg, Elem).
  void (*colsum[4])(const void* g, int64_t ldg, int64_t rows, int64_t cols, void* out);
  // dst[i] += src[i], i < n, in Acc: [0] float32, [1] float64.
  void (*add_into[2])(void* dst, const void* src, int64_t n);
};

FASTLIN_ISA_TABLE(LinearKernels, linear_kernels)

}  // namespace fastlin::cpu

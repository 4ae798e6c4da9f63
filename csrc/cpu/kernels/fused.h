// Table of the fused linear + MSE kernels (one pass over x: residuals, loss, dW, db and, for
// linear_mse_loss, grad_input / grad_target). Written once in fused_impl.h, compiled per ISA
// (see csrc/cpu/isa.h); the glue (train_step.cpp, fit.cpp, linear_mse_loss.cpp) forks threads,
// hands each a range of rows and reduces the per-thread partials in a fixed order.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/isa.h"

namespace fastlin::cpu {

// Storage format of x / y (and of grad_input / grad_target) and of sample_weight.
enum class FusedFmt : int32_t { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Which kernel shape runs the pass (chosen by FusedKernels::plan from D, O and the format unless
// the caller set it):
//   dot:   O small: a few rows at a time, O dot products along D (vectors along D, the D tail and
//          D < one vector in scalar code), then O axpys of those rows into an L1 dW tile.
//   outer: O large: register-blocked micro-kernels vectorised along O (forward r = x W^T and
//          backward dW^T += x^T r on an L1/L2-resident tile of rows), along D for grad_input.
enum class FusedPath : int32_t { automatic = -1, dot = 0, outer = 1 };

// Everything one pass reads. Row i (0 <= i < n of the step) lives at physical row
// `rows ? rows[i] : i` of x, y, sample_weight, grad_input and grad_target. All offsets 64-bit.
// Parameters are in the accumulation type (float for f32/bf16/f16, double for f64).
struct FusedProblem {
  FusedFmt fmt = FusedFmt::f32;  // x, y, grad_input, grad_target
  int64_t D = 0, O = 0;
  // Filled by plan() where left automatic / 0:
  FusedPath path = FusedPath::automatic;
  int64_t tile_rows = 0;  // rows per tile (one pass over a tile in L1/L2)
  // Data.
  const void* x = nullptr;
  int64_t x_rs = 0;  // x[i, d] at x + i * x_rs + d
  const int64_t* rows = nullptr;
  const void* y = nullptr;
  int64_t y_rs = 0;  // y[i, o] at y + i * y_rs + o
  const void* sw = nullptr;  // optional sample weights sw[i * sw_s], format sw_fmt
  int64_t sw_s = 0;
  FusedFmt sw_fmt = FusedFmt::f32;
  const void* w = nullptr;  // (O, D) contiguous, accumulation type
  const void* b = nullptr;  // (O,) accumulation type, or nullptr
  bool want_dw = true, want_db = true;
  // linear_mse_loss only (nullptr when not wanted): grad_input = gscale * r W (N, D) and
  // grad_target = -gscale * r (N, O), written in `fmt` with row strides gi_rs / gt_rs.
  void* gi = nullptr;
  int64_t gi_rs = 0;
  void* gt = nullptr;
  int64_t gt_rs = 0;
  double gscale = 0;
};

// One thread's partial sums over its rows, in double: dw (O, D) row-major, db (O,),
// loss = sum_i sw_i sum_o r_io^2 and wsum = sum_i sw_i (the row count without sample weights).
struct FusedPartial {
  double* dw = nullptr;
  double* db = nullptr;
  double loss = 0;
  double wsum = 0;
};

struct FusedKernels {
  // Sets p.path (when automatic) and p.tile_rows (when <= 0) from p.fmt, p.D, p.O.
  void (*plan)(FusedProblem& p);
  // Bytes of per-thread scratch pass() needs for p (as planned), 64-byte aligned.
  size_t (*scratch_bytes)(const FusedProblem& p);
  // Rows [begin, end) of the step; scratch: scratch_bytes(p) bytes, 64-byte aligned.
  void (*pass)(const FusedProblem& p, int64_t begin, int64_t end, void* scratch, FusedPartial& out);
};

FASTLIN_ISA_TABLE(FusedKernels, fused_kernels)

}  // namespace fastlin::cpu

// Host interface of the fastlin CUDA kernels (csrc/cuda/*.cu).
//
// This header is plain C++ plus the CUDA runtime API: no torch, no device code. The tensor glue
// (csrc/cuda/*_cuda.cpp) and the torch-free test harness (csrc/cuda/tests/harness.cu) both use it.
// Every launcher takes raw pointers, sizes and a cudaStream_t, launches asynchronously on that
// stream and returns the first CUDA error it met (cudaSuccess otherwise). Launchers never
// synchronise, never allocate and never launch a grid of zero blocks.
//
// Numerics (the same as fastlin/reference.py): float32, bfloat16 and float16 inputs accumulate in
// float32, float64 inputs in float64; loss and sample-weight sums always accumulate in float64.
// Every reduction runs in a fixed order, so results are bit-identical run to run on one device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastlin {
namespace cuda {

enum class DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

// Bytes per element.
inline int dtype_size(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }
// Elements per 16-byte vector load.
inline int vec_width(DType t) { return 16 / dtype_size(t); }
// The accumulation dtype of inputs of dtype t: F64 for F64, else F32.
inline DType acc_dtype(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

// torch.optim.SGD options (see the sgd_update_ schema in csrc/ops.cpp).
struct SgdOpts {
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0;
  int nesterov = 0, maximize = 0, first_step = 0;
};

// ---------------------------------------------------------------------------------------------
// Row pass (rowpass.cuh): one pass over the rows of x (N, D) against a small weight W (O, D).
// Each warp streams rows with 16-byte loads (or 4/8/2-byte loads when the rows are not 16-byte
// aligned); W lives in shared memory, the per-row dot products are reduced across the lanes of a
// row with shuffles, and the dW/db partial sums stay in registers until the end of the block,
// which writes ONE partial (O*D + O values, plus the loss and weight sums) per block. A second
// kernel (finalize) reduces the partials in a fixed order. Used by linear (forward: y_out),
// linear_backward (src = kSrcGrad), linear_mse_loss, train_step and fit.
enum RowSrc : int {
  kSrcDots = 0,  // r = x.W^T + b - y (y optional), times the sample weight: the residual
  kSrcGrad = 1,  // r = g (a given gradient of the output, (N, O))
};

struct RowPassArgs {
  // Rows: batch row i (0 <= i < nrows) is row rows[i] of x/y/g/sw when rows != nullptr, else
  // row row0 + i. Outputs y_out/gi_out/gt_out are indexed by that same row.
  int64_t nrows = 0, row0 = 0;
  const int64_t* rows = nullptr;
  int O = 0, D = 0;
  // x (., D): element (i, d) at x[i * ldx + d] (columns contiguous). dtype: the pass's dtype.
  const void* x = nullptr;
  int64_t ldx = 0;
  // target y (., O) for kSrcDots (nullptr: no target, r = x.W^T + b), or g (., O) for kSrcGrad.
  const void* y = nullptr;
  int64_t ys0 = 0, ys1 = 0;
  const void* g = nullptr;
  int64_t gs0 = 0, gs1 = 0;
  // sample weights (., ) in the accumulation dtype, contiguous; nullptr: all ones.
  const void* sw = nullptr;
  // W (O, D) and b (O,) (b optional), strided, in the pass's dtype, or float32 when param_f32.
  const void* w = nullptr;
  int64_t ws0 = 0, ws1 = 0;
  const void* b = nullptr;
  int64_t bs0 = 0;
  int param_f32 = 0;
  // What to do with r.
  int src = kSrcDots;
  int load_x = 1;    // read x (needed for kSrcDots and for acc_w)
  int acc_w = 0;     // partial sums of r^T x  (O, D)
  int acc_b = 0;     // partial sums of r      (O,)
  int acc_loss = 0;  // partial sums of r * (residual) and of the sample weights (float64)
  void* y_out = nullptr;   // (N, O) contiguous: x.W^T + b           (kSrcDots)
  void* gi_out = nullptr;  // (N, D) contiguous: out_scale * r W     (row-contiguous, 16-byte aligned)
  void* gt_out = nullptr;  // (N, O) contiguous: -out_scale * r
  double out_scale = 1.0;
  // Partials: part (G, O*D + O) in the accumulation dtype, part_s (G, 2) float64 (loss, weights).
  void* part = nullptr;
  double* part_s = nullptr;
  // fit: when *stopped != 0 the kernel does nothing (a previous step was not applied).
  const int* stopped = nullptr;
  // Geometry, filled in from the plan by rowpass_launch.
  int L = 0, kc = 0;
};

struct RowPassPlan {
  int ok = 0;            // 0: no kernel covers this shape; the glue uses its ATen path (why says why)
  const char* why = "";
  int vec = 1;           // elements per load: vec_width(dtype) or 1
  int ot = 0, kmax = 0;  // compile-time output tile and chunks per lane of the chosen kernel
  int L = 0, kc = 0;     // lanes per row, chunks per lane
  int rb = 0;            // rows per warp and iteration (per row group)
  int G = 0;             // blocks (= number of partials)
  size_t smem = 0;       // dynamic shared memory per block
};

// vec_ok: x (when read) is 16-byte aligned with ldx and D multiples of vec_width(xt), or x is not
// read and D is a multiple of vec_width(xt). nrows > 0 (a plan for nrows == 0 is not ok).
RowPassPlan rowpass_plan(DType xt, bool vec_ok, int O, int D, int64_t nrows, int num_sms);
cudaError_t rowpass_launch(DType xt, const RowPassPlan& plan, RowPassArgs args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Finalize (finalize.cu): the deterministic second stage of the row pass. Reduces the G partials
// in a fixed order, then
//   kFinGrad:   writes grad_scale * sums to out_w (O, D) / out_b (O,) (contiguous, dtype pt) and the
//               loss (loss sum / loss_div) to out_loss (0-d, dtype pt);
//   kFinUpdate: applies the SGD update with the gradient 2 / (O * weight sum) * sums to w, b and
//               their momentum buffers in place (dtype pt), and writes the loss (loss sum /
//               (O * weight sum)) to loss_out (0-d, accumulation dtype);
//   kFinStage:  the same update, written to staging (2, O*D + O) in the accumulation dtype, plus
//               one flag per block (1: every new parameter and, in block 0, the loss are finite)
//               and state[2] = loss, state[3] = weight sum. fit_commit applies it.
enum FinalizeMode : int { kFinGrad = 0, kFinUpdate = 1, kFinStage = 2 };

struct FinalizeArgs {
  int mode = kFinGrad;
  DType pt = DType::F32;  // dtype of the outputs / parameters
  const void* part = nullptr;
  const double* part_s = nullptr;
  int G = 0;
  int O = 0, D = 0;
  int need_totals = 0;  // read part_s (loss / weight sums)
  // kFinGrad
  void* out_w = nullptr;
  void* out_b = nullptr;
  void* out_loss = nullptr;
  double grad_scale = 1.0, loss_div = 1.0;
  // kFinUpdate / kFinStage: parameters (strided), momentum buffers (nullptr when momentum == 0)
  void* w = nullptr;
  int64_t ws0 = 0, ws1 = 0;
  void* b = nullptr;
  int64_t bs0 = 0;
  void* wm = nullptr;
  int64_t wms0 = 0, wms1 = 0;
  void* bm = nullptr;
  int64_t bms0 = 0;
  SgdOpts opt;
  void* loss_out = nullptr;  // kFinUpdate
  void* staging = nullptr;   // kFinStage
  int* flags = nullptr;      // kFinStage: finalize_grid(O, D) ints
  double* state = nullptr;   // kFinStage: fit's state (4 doubles)
  const int* stopped = nullptr;
};

int64_t finalize_grid(int O, int D);
cudaError_t finalize_launch(const FinalizeArgs& args, cudaStream_t stream);

// fit: apply (or not) the staged step. ok = !*stopped && all flags. If ok: copy staging to the
// parameters and buffers, state[0] += loss * weight sum, state[1] += weight sum, and at the end of
// an epoch history[epoch] = state[0] / state[1] and both reset. If not ok: *stopped = 1.
struct CommitArgs {
  DType pt = DType::F32;
  int O = 0, D = 0;
  void* w = nullptr;
  int64_t ws0 = 0, ws1 = 0;
  void* b = nullptr;
  int64_t bs0 = 0;
  void* wm = nullptr;
  int64_t wms0 = 0, wms1 = 0;
  void* bm = nullptr;
  int64_t bms0 = 0;
  const void* staging = nullptr;
  const int* flags = nullptr;
  int nflags = 0;
  double* state = nullptr;
  int* stopped = nullptr;
  double* history = nullptr;
  int64_t epoch = 0;
  int epoch_end = 0;
};
cudaError_t fit_commit_launch(const CommitArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// MSE (mse_loss.cu). Contiguous tensors of n elements of dtype t.
// out = (x - y)^2
cudaError_t mse_none_launch(DType t, const void* x, const void* y, void* out, int64_t n, int num_sms,
                            cudaStream_t stream);
// Number of float64 partials mse_reduce_launch needs (0 when n == 0).
int mse_reduce_blocks(int64_t n, int num_sms);
// out (0-d, dtype t) = sum (x - y)^2, divided by n when mean (NaN for n == 0 and mean).
cudaError_t mse_reduce_launch(DType t, const void* x, const void* y, int64_t n, double* partials, void* out,
                              bool mean, int num_sms, cudaStream_t stream);
// out = (x - y) * go * scale; go: a 0-d value in the accumulation dtype when go_scalar, else n
// elements of dtype t.
cudaError_t mse_backward_launch(DType t, const void* x, const void* y, const void* go, bool go_scalar,
                                double scale, void* out, int64_t n, int num_sms, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Multi-tensor SGD (sgd_update.cu): every tensor of the list in one launch per dtype present and
// kSgdMaxTensors tensors. p, g, buf: dense tensors of n elements with the same layout; buf == nullptr when
// momentum == 0.
constexpr int kSgdMaxTensors = 64;
struct SgdTensorRef {
  void* p = nullptr;
  const void* g = nullptr;
  void* buf = nullptr;
  int64_t n = 0;
  DType dt = DType::F32;
};
// How the chunks are cut and how many blocks walk them (the kernel's results do not depend on it):
// chunk: elements per chunk, rounded up to a multiple of 8; 0 = one contiguous range per block (the
// batch's elements split evenly over the grid, rounded up to 4096). blocks_per_sm: grid = SMs x
// this (never more blocks than chunks); 0 = the kernel's occupancy, one full wave of resident blocks.
struct SgdLaunchCfg {
  int64_t chunk = 16384;
  int blocks_per_sm = 8;
};
cudaError_t sgd_update_launch(const SgdTensorRef* tensors, int count, const SgdOpts& opt, int num_sms,
                              cudaStream_t stream, const SgdLaunchCfg& cfg = SgdLaunchCfg());

}  // namespace cuda
}  // namespace fastlin

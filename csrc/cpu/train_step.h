// Internal glue shared by the fused CPU ops (train_step, fit, linear_mse_loss): argument checks,
// the threaded fused pass over rows (csrc/cpu/kernels/fused.h) and the trainer that adds the SGD
// update. OpenMP lives here (train_step.cpp), never in the ISA translation units.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/kernels/fused.h"

namespace fastlin {

struct SgdOptions {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// Checks every argument of train_step/fit (shapes, dtypes, devices); throws before anything is written.
void check_train_args(const char* op, const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                      const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                      const SgdOptions& opt);

cpu::FusedFmt fused_fmt(at::ScalarType t);

// 64-byte aligned scratch that grows and is reused (no allocation once it is large enough).
class AlignedBuffer {
 public:
  void* get(size_t bytes);

 private:
  std::unique_ptr<char[]> mem_;
  size_t cap_ = 0;
};

// The fused pass over a row set of one problem, threaded: owns the plan, the per-thread scratch
// and the per-chunk partials (grown once, reused by every run), and reduces the partials in chunk
// order, so results depend only on the inputs and on the number of threads (at most 4 chunks per
// thread: peak extra memory O(threads x O x D)).
class FusedPass {
 public:
  // prob: D, O, fmt and the data pointers (x, y, w, b, sample weights, outputs) set by the caller;
  // path / tile_rows may be preset (FASTLIN_FUSED_PATH / FASTLIN_FUSED_TILE_ROWS override them).
  explicit FusedPass(const cpu::FusedProblem& prob);
  cpu::FusedProblem& problem() { return prob_; }
  // Runs rows [0, n) of problem() (physical rows problem().rows[i], or i). Afterwards dw() (O x D),
  // db() (O) and loss / wsum hold the totals (double).
  void run(int64_t n);
  const double* dw() const { return part_dw_.get(); }
  const double* db() const { return part_db_.get(); }
  double loss = 0, wsum = 0;
  int threads_for(int64_t n) const;

 private:
  cpu::FusedProblem prob_;
  const cpu::FusedKernels& k_;
  int max_threads_;
  int64_t fork_rows_ = 0;  // a pass forks only from this many rows on (threads_for)
  size_t scratch_stride_ = 0;
  AlignedBuffer scratch_;
  void ensure_parts(int chunks);
  std::unique_ptr<double[]> part_dw_, part_db_;  // chunks x (O * D), chunks x O
  std::vector<cpu::FusedPartial> parts_;
};

// train_step / fit on the CPU: prepares the problem once (strides, working copies of parameters
// that are not contiguous, the fused pass), then runs steps on row sets with no allocation.
class FusedTrainer {
 public:
  FusedTrainer(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
               const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
               const SgdOptions& opt);
  // One step over n rows: rows[i] (rows != nullptr) or row0 + i. Returns the loss before the update
  // and, through *wsum, the step's sum of sample weights (or its row count). With check_finite the
  // update is skipped when the loss or an updated parameter is non-finite (*applied says which).
  double step(const int64_t* rows, int64_t row0, int64_t n, bool first_step, bool check_finite, double* wsum,
              bool* applied);
  // Copies working copies back into the caller's parameters (those that were not contiguous).
  void finish();
  int64_t rows() const { return N_; }

 private:
  template <typename T>
  bool update(bool first_step, bool check_finite, double gscale);

  SgdOptions opt_;
  int64_t N_, D_, O_;
  at::Tensor x_, y_, sw_;                  // what the pointers point into (kept alive)
  at::Tensor w_, b_, wm_, bm_;             // contiguous parameters (maybe working copies)
  at::Tensor w_user_, b_user_, wm_user_, bm_user_;  // the caller's tensors, when copies were made
  void *wp_ = nullptr, *bp_ = nullptr, *wmp_ = nullptr, *bmp_ = nullptr;  // data of w_, b_, wm_, bm_
  const char* x_base_ = nullptr;
  const char* y_base_ = nullptr;
  const char* sw_base_ = nullptr;
  int64_t x_step_ = 0, y_step_ = 0, sw_step_ = 0;  // bytes per row
  std::unique_ptr<FusedPass> pass_;
  std::vector<char> newvals_;  // candidate parameters when check_finite
};

}  // namespace fastlin

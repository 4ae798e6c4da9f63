// Internal entry shared by train_step and fit on the CPU.
#pragma once
#include <ATen/ATen.h>

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

// One fused step over rows [rows) of input (all rows when `rows` is undefined). Returns the loss
// (before the update) as a double and, through *weight_sum, the sum of the step's sample weights
// (or its row count). When check_finite is set, the update is skipped if the loss or any updated
// parameter would be non-finite, and *applied says whether it was applied.
double train_step_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                       const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                       const at::Tensor& rows, const SgdOptions& opt, bool first_step, bool check_finite,
                       double* weight_sum, bool* applied);

}  // namespace fastlin

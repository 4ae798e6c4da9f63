// CPU MSE loss forward/backward. (First version: ATen; the C++ kernels replace it.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace fastlin {
namespace {

void check_mse_args(const char* op, const at::Tensor& input, const at::Tensor& target, c10::string_view reduction) {
  check_reduction(op, reduction, /*allow_none=*/true);
  check_floating(op, "input", input);
  check_same_dtype(op, "target", target, "input", input);
  check_same_device(op, "target", target, "input", input);
  check_shape(op, "target", target, input.sizes(), "(the shape of input; fastlin never broadcasts a target)");
}

at::Tensor mse_loss_cpu(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction) {
  check_mse_args("mse_loss", input, target, reduction);
  auto sq = (input - target).square();
  if (reduction == "none") return sq;
  return reduction == "sum" ? sq.sum() : sq.mean();
}

at::Tensor mse_loss_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                                 c10::string_view reduction) {
  check_mse_args("mse_loss_backward", input, target, reduction);
  double scale = reduction == "mean" ? 2.0 / static_cast<double>(input.numel()) : 2.0;
  return (input - target) * grad_output * scale;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) {
  m.impl("mse_loss", &mse_loss_cpu);
  m.impl("mse_loss_backward", &mse_loss_backward_cpu);
}

}  // namespace fastlin

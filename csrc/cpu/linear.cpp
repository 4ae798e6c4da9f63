// CPU linear forward/backward. (First version: ATen GEMM; the fused C++ kernels replace it.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace fastlin {
namespace {

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear_args("linear", input, weight, bias);
  if (has(bias)) return at::addmm(*bias, input, weight.t());
  return at::mm(input, weight.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& weight,
                                                                   std::array<bool, 3> mask) {
  check_linear_args("linear_backward", input, weight, c10::nullopt);
  check_same_dtype("linear_backward", "grad_output", grad_output, "input", input);
  check_shape("linear_backward", "grad_output", grad_output, {input.size(0), weight.size(0)}, "(N, out_features)");
  auto empty = input.new_empty({0});
  return {mask[0] ? at::mm(grad_output, weight) : empty, mask[1] ? at::mm(grad_output.t(), input) : empty,
          mask[2] ? grad_output.sum(0) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace fastlin

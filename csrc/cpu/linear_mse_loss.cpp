// CPU fused linear + MSE loss with gradients. (First version: ATen, materialises the residual;
// the one-pass C++ kernel replaces it.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace fastlin {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_mse_loss_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    c10::string_view reduction, std::array<bool, 4> mask) {
  const char* op = "linear_mse_loss";
  check_linear_args(op, input, weight, bias);
  check_same_dtype(op, "target", target, "input", input);
  check_target(op, target, input, weight);
  check_reduction(op, reduction, /*allow_none=*/false);
  auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = input.to(acc);
  auto r = at::mm(x, weight.to(acc).t());
  if (has(bias)) r.add_(bias->to(acc));
  r.sub_(target.to(acc));
  auto loss = r.square().sum();
  double scale = 2.0;
  if (reduction == "mean") {
    loss.div_(static_cast<double>(r.numel()));
    scale /= static_cast<double>(r.numel());
  }
  auto g = r * scale;
  auto dt = input.scalar_type();
  auto empty = input.new_empty({0});
  return {loss.to(dt), mask[0] ? at::mm(g, weight.to(acc)).to(dt) : empty, mask[1] ? at::mm(g.t(), x).to(dt) : empty,
          mask[2] ? g.sum(0).to(dt) : empty, mask[3] ? g.neg().to(dt) : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("linear_mse_loss", &linear_mse_loss_cpu); }

}  // namespace fastlin

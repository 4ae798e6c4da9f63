// CPU fused linear + MSE loss with its gradients ("gradients during forward"): one pass over
// input (csrc/cpu/kernels/fused_impl.h, the pass of train_step without the update) computes the
// loss, dW and db and writes grad_input = s r W and grad_target = -s r tile by tile; the (N, O)
// prediction is never materialised. Backward only rescales by grad_output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "checks.h"
#include "train_step.h"

namespace fastlin {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Empty shapes (N, D or O == 0) through ATen: nothing to stream, and the conventions (NaN mean
// loss, zero gradients) come for free.
Grads linear_mse_loss_aten(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& target, c10::string_view reduction, std::array<bool, 4> mask) {
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
  auto empty = [&] { return input.new_empty({0}); };  // one per output: outputs must not alias
  return {loss.to(dt), mask[0] ? at::mm(g, weight.to(acc)).to(dt) : empty(),
          mask[1] ? at::mm(g.t(), x).to(dt) : empty(), mask[2] ? g.sum(0).to(dt) : empty(),
          mask[3] ? g.neg().to(dt) : empty()};
}

// out (input's dtype) = scale * src (double), element by element.
at::Tensor scaled_from_double(const double* src, at::IntArrayRef shape, double scale, const at::TensorOptions& opts) {
  at::Tensor out = at::empty(shape, opts);
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "linear_mse_loss", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t e = 0; e < n; ++e) o[e] = static_cast<scalar_t>(src[e] * scale);
  });
  return out;
}

Grads linear_mse_loss_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& target, c10::string_view reduction, std::array<bool, 4> mask) {
  const char* op = "linear_mse_loss";
  check_linear_args(op, input, weight, bias);
  check_same_dtype(op, "target", target, "input", input);
  check_target(op, target, input, weight);
  check_reduction(op, reduction, /*allow_none=*/false);
  const int64_t N = input.size(0), D = input.size(1), O = weight.size(0);
  if (N == 0 || D == 0 || O == 0) return linear_mse_loss_aten(input, weight, bias, target, reduction, mask);

  const auto dt = input.scalar_type();
  const auto acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  // Rows at any stride are read in place; only a non-unit column stride forces a copy.
  const at::Tensor x = (D == 1 || input.stride(1) == 1) ? input : input.contiguous();
  const at::Tensor y = (O == 1 || target.stride(1) == 1) ? target : target.contiguous();
  const at::Tensor w = weight.to(acc).contiguous();  // (O, D): no copy when already so
  at::Tensor b;
  if (has(bias)) b = bias->to(acc).contiguous();
  const bool mean = reduction == "mean";
  const double scale = mean ? 2.0 / (static_cast<double>(N) * static_cast<double>(O)) : 2.0;
  auto empty = [&] { return input.new_empty({0}); };  // one per output: outputs must not alias
  at::Tensor gi = mask[0] ? at::empty({N, D}, input.options()) : empty();
  at::Tensor gt = mask[3] ? at::empty({N, O}, input.options()) : empty();
  if (std::getenv("FASTLIN_DEBUG_POISON")) {
    // Tests set this so that an element the kernel fails to write shows up as NaN.
    if (mask[0]) gi.fill_(std::numeric_limits<double>::quiet_NaN());
    if (mask[3]) gt.fill_(std::numeric_limits<double>::quiet_NaN());
  }

  cpu::FusedProblem p;
  p.fmt = fused_fmt(dt);
  p.D = D;
  p.O = O;
  p.x = x.data_ptr();
  p.x_rs = x.stride(0);
  p.y = y.data_ptr();
  p.y_rs = y.stride(0);
  p.w = w.data_ptr();
  p.b = b.defined() ? b.data_ptr() : nullptr;
  p.want_dw = mask[1];
  p.want_db = mask[2];
  if (mask[0]) {
    p.gi = gi.data_ptr();
    p.gi_rs = gi.stride(0);
  }
  if (mask[3]) {
    p.gt = gt.data_ptr();
    p.gt_rs = gt.stride(0);
  }
  p.gscale = scale;
  FusedPass pass(p);
  pass.run(N);

  double loss = pass.loss;
  if (mean) loss /= static_cast<double>(N) * static_cast<double>(O);
  return {at::scalar_tensor(loss, input.options()),
          gi,
          mask[1] ? scaled_from_double(pass.dw(), {O, D}, scale, input.options()) : empty(),
          mask[2] ? scaled_from_double(pass.db(), {O}, scale, input.options()) : empty(),
          gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("linear_mse_loss", &linear_mse_loss_cpu); }

}  // namespace fastlin

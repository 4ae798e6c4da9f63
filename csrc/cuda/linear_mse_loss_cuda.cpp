// CUDA glue of linear_mse_loss: the loss and every requested gradient from ONE pass over input
// (the row pass computes the residual of each row in registers, writes grad_input / grad_target
// rows on the fly and keeps dW/db partials), then the deterministic second stage (finalize) sums
// the partials. Outputs wider than 16 (or very long rows) use ATen/cuBLAS and materialise the
// (N, O) residual.
#include <torch/library.h>

#include "glue.h"

namespace fastlin {
namespace {

namespace fc = ::fastlin::cuda;
using namespace ::fastlin::cuda_glue;

using Out5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ATen version (the CPU glue's math), for the shapes the row pass does not cover.
Out5 lmse_aten(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
               const at::Tensor& target, bool mean, std::array<bool, 4> mask) {
  const auto acc = acc_scalar_type(input.scalar_type());
  const at::Tensor x = input.to(acc);
  at::Tensor r = at::mm(x, weight.to(acc).t());
  if (has(bias)) r.add_(bias->to(acc));
  r.sub_(target.to(acc));
  at::Tensor loss = r.square().sum();
  double scale = 2.0;
  if (mean) {
    loss.div_(static_cast<double>(r.numel()));
    scale /= static_cast<double>(r.numel());
  }
  const at::Tensor g = r * scale;
  const auto dt = input.scalar_type();
  // Masked-off outputs: a fresh (0,) tensor each (outputs of one call must not alias).
  const auto empty = [&input] { return input.new_empty({0}); };
  return {loss.to(dt), mask[0] ? at::mm(g, weight.to(acc)).to(dt) : empty(),
          mask[1] ? at::mm(g.t(), x).to(dt) : empty(), mask[2] ? g.sum(0).to(dt) : empty(),
          mask[3] ? g.neg().to(dt) : empty()};
}

Out5 linear_mse_loss_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& target, c10::string_view reduction, std::array<bool, 4> mask) {
  const char* op = "linear_mse_loss";
  check_linear_args(op, input, weight, bias);
  check_same_dtype(op, "target", target, "input", input);
  check_target(op, target, input, weight);
  check_reduction(op, reduction, /*allow_none=*/false);
  check_cuda(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool mean = reduction == "mean";
  const int64_t N = input.size(0), D = input.size(1), O = weight.size(0);
  const fc::DType xt = dtype_of(input);
  int64_t ldx = 0;
  const at::Tensor x = rows_view(input, &ldx);
  const fc::RowPassPlan plan = plan_rows(xt, rows_vec_ok(xt, x, ldx, D, true), O, D, N);
  if (!plan.ok) return lmse_aten(input, weight, bias, target, mean, mask);

  const at::TensorOptions opts = input.options();
  // Masked-off outputs: a fresh (0,) tensor each (outputs of one call must not alias).
  const auto empty = [&input] { return input.new_empty({0}); };
  at::Tensor loss = at::empty({}, opts);
  at::Tensor gi = mask[0] ? at::empty({N, D}, opts) : empty();
  at::Tensor gw = mask[1] ? at::empty({O, D}, opts) : empty();
  at::Tensor gb = mask[2] ? at::empty({O}, opts) : empty();
  at::Tensor gt = mask[3] ? at::empty({N, O}, opts) : empty();
  at::Tensor part = at::empty({plan.G, O * D + O}, opts.dtype(acc_scalar_type(input.scalar_type())));
  at::Tensor part_s = at::empty({plan.G, 2}, opts.dtype(at::kDouble));
  const double numel = static_cast<double>(N) * static_cast<double>(O);
  const double scale = mean ? 2.0 / numel : 2.0;

  fc::RowPassArgs a;
  a.nrows = N;
  a.O = static_cast<int>(O);
  a.D = static_cast<int>(D);
  a.x = x.data_ptr();
  a.ldx = ldx;
  a.y = target.data_ptr();
  a.ys0 = target.stride(0);
  a.ys1 = target.stride(1);
  a.w = weight.data_ptr();
  a.ws0 = weight.stride(0);
  a.ws1 = weight.stride(1);
  if (has(bias)) {
    a.b = bias->data_ptr();
    a.bs0 = bias->stride(0);
  }
  a.src = fc::kSrcDots;
  a.load_x = 1;
  a.acc_w = mask[1] ? 1 : 0;
  a.acc_b = mask[2] ? 1 : 0;
  a.acc_loss = 1;
  a.gi_out = mask[0] ? gi.data_ptr() : nullptr;
  a.gt_out = mask[3] ? gt.data_ptr() : nullptr;
  a.out_scale = scale;
  a.part = part.data_ptr();
  a.part_s = part_s.data_ptr<double>();
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(fc::rowpass_launch(xt, plan, a, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  fc::FinalizeArgs f;
  f.mode = fc::kFinGrad;
  f.pt = xt;
  f.part = part.data_ptr();
  f.part_s = part_s.data_ptr<double>();
  f.G = plan.G;
  f.O = static_cast<int>(O);
  f.D = static_cast<int>(D);
  f.need_totals = 1;
  f.out_w = mask[1] ? gw.data_ptr() : nullptr;
  f.out_b = mask[2] ? gb.data_ptr() : nullptr;
  f.out_loss = loss.data_ptr();
  f.grad_scale = scale;
  f.loss_div = mean ? numel : 1.0;
  C10_CUDA_CHECK(fc::finalize_launch(f, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, gi, gw, gb, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CUDA, m) { m.impl("linear_mse_loss", &linear_mse_loss_cuda); }

}  // namespace fastlin

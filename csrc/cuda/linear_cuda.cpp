// CUDA glue of linear and linear_backward. Outputs up to 16 wide (and rows up to the kernels'
// register budget) go through the row pass (rowpass.cuh): one pass over x, its columns read with
// 16-byte loads. Wider outputs are matrix products, which cuBLAS (at::mm / at::addmm) does better.
#include <torch/library.h>

#include "glue.h"

namespace fastlin {
namespace {

namespace fc = ::fastlin::cuda;
using namespace ::fastlin::cuda_glue;

at::Tensor linear_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const char* op = "linear";
  check_linear_args(op, input, weight, bias);
  check_cuda(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), D = input.size(1), O = weight.size(0);
  const fc::DType xt = dtype_of(input);
  int64_t ldx = 0;
  const at::Tensor x = rows_view(input, &ldx);
  const fc::RowPassPlan plan = plan_rows(xt, rows_vec_ok(xt, x, ldx, D, true), O, D, N);
  if (!plan.ok) {  // cuBLAS: wide outputs, long rows, empty shapes
    return has(bias) ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
  }
  at::Tensor out = at::empty({N, O}, input.options());
  fc::RowPassArgs a;
  a.nrows = N;
  a.O = static_cast<int>(O);
  a.D = static_cast<int>(D);
  a.x = x.data_ptr();
  a.ldx = ldx;
  a.w = weight.data_ptr();
  a.ws0 = weight.stride(0);
  a.ws1 = weight.stride(1);
  if (has(bias)) {
    a.b = bias->data_ptr();
    a.bs0 = bias->stride(0);
  }
  a.src = fc::kSrcDots;
  a.load_x = 1;
  a.y_out = out.data_ptr();
  C10_CUDA_CHECK(fc::rowpass_launch(xt, plan, a, current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(const at::Tensor& grad_output,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight,
                                                                    std::array<bool, 3> mask) {
  const char* op = "linear_backward";
  check_linear_args(op, input, weight, c10::nullopt);
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  check_same_device(op, "grad_output", grad_output, "input", input);
  check_shape(op, "grad_output", grad_output, {input.size(0), weight.size(0)}, "(N, out_features)");
  check_cuda(op, "input", input);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), D = input.size(1), O = weight.size(0);
  // Masked-off outputs: a fresh (0,) tensor each (outputs of one call must not alias).
  const auto empty = [&input] { return input.new_empty({0}); };
  if (!mask[0] && !mask[1] && !mask[2]) return {empty(), empty(), empty()};
  const fc::DType xt = dtype_of(input);
  int64_t ldx = 0;
  const at::Tensor x = mask[1] ? rows_view(input, &ldx) : input;
  const fc::RowPassPlan plan = plan_rows(xt, rows_vec_ok(xt, x, ldx, D, mask[1]), O, D, N);
  if (!plan.ok) {  // cuBLAS
    return {mask[0] ? at::mm(grad_output, weight) : empty(), mask[1] ? at::mm(grad_output.t(), input) : empty(),
            mask[2] ? grad_output.sum(0) : empty()};
  }
  at::Tensor gi = mask[0] ? at::empty({N, D}, input.options()) : empty();
  at::Tensor gw = mask[1] ? at::empty({O, D}, input.options()) : empty();
  at::Tensor gb = mask[2] ? at::empty({O}, input.options()) : empty();
  const bool reduce = mask[1] || mask[2];
  at::Tensor part, part_s;
  if (reduce) {
    part = at::empty({plan.G, O * D + O}, input.options().dtype(acc_scalar_type(input.scalar_type())));
    part_s = at::empty({plan.G, 2}, input.options().dtype(at::kDouble));
  }
  fc::RowPassArgs a;
  a.nrows = N;
  a.O = static_cast<int>(O);
  a.D = static_cast<int>(D);
  if (mask[1]) {
    a.x = x.data_ptr();
    a.ldx = ldx;
  }
  a.g = grad_output.data_ptr();
  a.gs0 = grad_output.stride(0);
  a.gs1 = grad_output.stride(1);
  a.w = weight.data_ptr();
  a.ws0 = weight.stride(0);
  a.ws1 = weight.stride(1);
  a.src = fc::kSrcGrad;
  a.load_x = mask[1] ? 1 : 0;
  a.acc_w = mask[1] ? 1 : 0;
  a.acc_b = mask[2] ? 1 : 0;
  a.gi_out = mask[0] ? gi.data_ptr() : nullptr;
  a.out_scale = 1.0;
  if (reduce) {
    a.part = part.data_ptr();
    a.part_s = part_s.data_ptr<double>();
  }
  const cudaStream_t stream = current_stream();
  C10_CUDA_CHECK(fc::rowpass_launch(xt, plan, a, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (reduce) {
    fc::FinalizeArgs f;
    f.mode = fc::kFinGrad;
    f.pt = xt;
    f.part = part.data_ptr();
    f.part_s = part_s.data_ptr<double>();
    f.G = plan.G;
    f.O = static_cast<int>(O);
    f.D = static_cast<int>(D);
    f.need_totals = 0;
    f.out_w = mask[1] ? gw.data_ptr() : nullptr;
    f.out_b = mask[2] ? gb.data_ptr() : nullptr;
    f.grad_scale = 1.0;
    C10_CUDA_CHECK(fc::finalize_launch(f, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
}

}  // namespace fastlin

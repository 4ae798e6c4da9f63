// CUDA glue of mse_loss and mse_loss_backward (kernels in mse_loss.cu). Inputs of any shape;
// non-contiguous ones are copied to contiguous first.
#include <torch/library.h>

#include <cmath>

#include "glue.h"

namespace fastlin {
namespace {

namespace fc = ::fastlin::cuda;
using namespace ::fastlin::cuda_glue;

void check_cuda_mse_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                         c10::string_view reduction) {
  check_mse_args(op, input, target, reduction);
  check_cuda(op, "input", input);
}

at::Tensor mse_loss_cuda(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction) {
  const char* op = "mse_loss";
  check_cuda_mse_args(op, input, target, reduction);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor y = target.contiguous();
  const int64_t n = x.numel();
  const fc::DType t = dtype_of(x);
  const cudaStream_t stream = current_stream();
  if (reduction == "none") {
    at::Tensor out = at::empty(input.sizes(), x.options());
    C10_CUDA_CHECK(fc::mse_none_launch(t, x.data_ptr(), y.data_ptr(), out.data_ptr(), n, num_sms(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  at::Tensor out = at::empty({}, x.options());
  const int nparts = fc::mse_reduce_blocks(n, num_sms());
  at::Tensor partials = at::empty({std::max(nparts, 1)}, x.options().dtype(at::kDouble));
  C10_CUDA_CHECK(fc::mse_reduce_launch(t, x.data_ptr(), y.data_ptr(), n, partials.data_ptr<double>(), out.data_ptr(),
                                       reduction == "mean", num_sms(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor mse_loss_backward_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                                  c10::string_view reduction) {
  const char* op = "mse_loss_backward";
  check_cuda_mse_args(op, input, target, reduction);
  check_mse_grad_output(op, grad_output, input);
  const bool scalar = grad_output.numel() == 1;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor y = target.contiguous();
  const int64_t n = x.numel();
  // A scalar grad_output is read on the device in the accumulation dtype (no host sync).
  const at::Tensor go = scalar ? grad_output.reshape({}).to(acc_scalar_type(input.scalar_type())).contiguous()
                               : grad_output.expand(input.sizes()).contiguous();
  const double scale = reduction == "mean" && n > 0 ? 2.0 / static_cast<double>(n) : 2.0;
  at::Tensor out = at::empty(input.sizes(), x.options());
  C10_CUDA_CHECK(fc::mse_backward_launch(dtype_of(x), x.data_ptr(), y.data_ptr(), go.data_ptr(), scalar, scale,
                                         out.data_ptr(), n, num_sms(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CUDA, m) {
  m.impl("mse_loss", &mse_loss_cuda);
  m.impl("mse_loss_backward", &mse_loss_backward_cuda);
}

}  // namespace fastlin

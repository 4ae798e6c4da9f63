// Dtype dispatch of the row pass (kernels in rowpass_<dtype>.cu, template in rowpass.cuh).
#include "kernels.h"
#include "rowpass_dispatch.h"

namespace fastlin {
namespace cuda {

RowPassPlan rowpass_plan(DType xt, bool vec_ok, int O, int D, int64_t nrows, int num_sms) {
  switch (xt) {
    case DType::F32: return rowpass_plan_f32(vec_ok, O, D, nrows, num_sms);
    case DType::F64: return rowpass_plan_f64(vec_ok, O, D, nrows, num_sms);
    case DType::BF16: return rowpass_plan_bf16(vec_ok, O, D, nrows, num_sms);
    case DType::F16: return rowpass_plan_f16(vec_ok, O, D, nrows, num_sms);
  }
  RowPassPlan p;
  p.why = "unknown dtype";
  return p;
}

cudaError_t rowpass_launch(DType xt, const RowPassPlan& plan, RowPassArgs args, cudaStream_t stream) {
  switch (xt) {
    case DType::F32: return rowpass_launch_f32(plan, args, stream);
    case DType::F64: return rowpass_launch_f64(plan, args, stream);
    case DType::BF16: return rowpass_launch_bf16(plan, args, stream);
    case DType::F16: return rowpass_launch_f16(plan, args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlin

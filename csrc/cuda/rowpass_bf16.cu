// Row pass kernels for __nv_bfloat16 inputs (see rowpass.cuh).
#include "rowpass.cuh"
#include "rowpass_dispatch.h"

namespace fastlin {
namespace cuda {

RowPassPlan rowpass_plan_bf16(bool vec_ok, int O, int D, int64_t nrows, int num_sms) {
  return RowPass<__nv_bfloat16>::plan(vec_ok, O, D, nrows, num_sms);
}

cudaError_t rowpass_launch_bf16(const RowPassPlan& plan, const RowPassArgs& args, cudaStream_t stream) {
  return RowPass<__nv_bfloat16>::launch(plan, args, stream);
}

}  // namespace cuda
}  // namespace fastlin

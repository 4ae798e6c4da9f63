// Row pass kernels for __half inputs (see rowpass.cuh).
#include "rowpass.cuh"
#include "rowpass_dispatch.h"

namespace fastlin {
namespace cuda {

RowPassPlan rowpass_plan_f16(bool vec_ok, int O, int D, int64_t nrows, int num_sms) {
  return RowPass<__half>::plan(vec_ok, O, D, nrows, num_sms);
}

cudaError_t rowpass_launch_f16(const RowPassPlan& plan, const RowPassArgs& args, cudaStream_t stream) {
  return RowPass<__half>::launch(plan, args, stream);
}

}  // namespace cuda
}  // namespace fastlin

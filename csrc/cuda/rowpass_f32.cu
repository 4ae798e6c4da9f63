// Row pass kernels for float inputs (see rowpass.cuh).
#include "rowpass.cuh"
#include "rowpass_dispatch.h"

namespace fastlin {
namespace cuda {

RowPassPlan rowpass_plan_f32(bool vec_ok, int O, int D, int64_t nrows, int num_sms) {
  return RowPass<float>::plan(vec_ok, O, D, nrows, num_sms);
}

cudaError_t rowpass_launch_f32(const RowPassPlan& plan, const RowPassArgs& args, cudaStream_t stream) {
  return RowPass<float>::launch(plan, args, stream);
}

}  // namespace cuda
}  // namespace fastlin

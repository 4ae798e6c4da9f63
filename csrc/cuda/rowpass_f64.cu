// Row pass kernels for double inputs (see rowpass.cuh).
#include "rowpass.cuh"
#include "rowpass_dispatch.h"

namespace fastlin {
namespace cuda {

RowPassPlan rowpass_plan_f64(bool vec_ok, int O, int D, int64_t nrows, int num_sms) {
  return RowPass<double>::plan(vec_ok, O, D, nrows, num_sms);
}

cudaError_t rowpass_launch_f64(const RowPassPlan& plan, const RowPassArgs& args, cudaStream_t stream) {
  return RowPass<double>::launch(plan, args, stream);
}

}  // namespace cuda
}  // namespace fastlin

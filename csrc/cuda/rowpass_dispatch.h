// Per-dtype entry points of the row pass, defined in rowpass_<dtype>.cu (one translation unit per
// input dtype, so the build compiles the kernel variants in parallel) and dispatched in rowpass.cu.
#pragma once

#include "kernels.h"

namespace fastlin {
namespace cuda {

#define FASTLIN_ROWPASS_DECLARE(SUFFIX)                                                                 \
  RowPassPlan rowpass_plan_##SUFFIX(bool vec_ok, int O, int D, int64_t nrows, int num_sms);            \
  cudaError_t rowpass_launch_##SUFFIX(const RowPassPlan& plan, const RowPassArgs& args, cudaStream_t stream);

FASTLIN_ROWPASS_DECLARE(f32)
FASTLIN_ROWPASS_DECLARE(f64)
FASTLIN_ROWPASS_DECLARE(bf16)
FASTLIN_ROWPASS_DECLARE(f16)

#undef FASTLIN_ROWPASS_DECLARE

}  // namespace cuda
}  // namespace fastlin

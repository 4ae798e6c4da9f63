// Helpers shared by the CUDA tensor glue (csrc/cuda/*_cuda.cpp): dtype mapping, the current
// stream and device properties, row-contiguous views and row-pass planning. The kernels
// themselves (csrc/cuda/*.cu) see none of this: they take raw pointers (kernels.h).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

#include "checks.h"
#include "kernels.h"

namespace fastlin {
namespace cuda_glue {

namespace fc = ::fastlin::cuda;

inline fc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fc::DType::F32;
    case at::kDouble: return fc::DType::F64;
    case at::kBFloat16: return fc::DType::BF16;
    case at::kHalf: return fc::DType::F16;
    default: TORCH_CHECK_TYPE(false, "fastlin (CUDA): unsupported dtype ", t.scalar_type());
  }
}

// A tuning knob from the environment (read at each call, so benches and tests can change it in one
// process): the integer >= 0 in variable `name`, or `fallback` when it is unset or empty; anything
// else raises, naming op and variable.
inline int64_t env_count(const char* op, const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && n >= 0 && n <= (1LL << 40), "fastlin.", op, ": ", name,
                    " must be an integer >= 0, got '", v, "'");
  return n;
}

// Accumulation dtype: float64 for float64, else float32.
inline at::ScalarType acc_scalar_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Multiprocessors of the current device (c10's header set, not ATen/cuda/CUDAContext.h, which pulls
// in cuBLAS/cuSPARSE headers: the glue stays checkable on a machine with only the CUDA runtime).
inline int num_sms() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}
// The current stream of the current device (the guard in each op has set the device).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Every tensor argument of a CUDA op must be on the CUDA device of the first one. (The dispatcher
// sends an op here when any argument is a CUDA tensor; a CPU tensor among them must not reach a
// kernel.)
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "fastlin.", op, ": ", name, " must be a CUDA tensor for the CUDA backend, got ", t.device());
}

// A 2-D tensor with contiguous columns for the row pass: t itself when its columns are contiguous
// (any row stride, including 0 for expanded rows), else a contiguous copy. *ld: its row stride.
inline at::Tensor rows_view(const at::Tensor& t, int64_t* ld) {
  at::Tensor u = (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
  *ld = u.size(0) <= 1 ? u.size(1) : u.stride(0);
  return u;
}

// Whether the row pass may use 16-byte loads of x (x read) or 16-byte stores of D-wide rows.
inline bool rows_vec_ok(fc::DType xt, const at::Tensor& x, int64_t ldx, int64_t D, bool x_read) {
  const int v = fc::vec_width(xt);
  if (D % v != 0) return false;
  return !x_read || (aligned16(x.data_ptr()) && ldx % v == 0);
}

// The row-pass plan, or a not-ok plan when no kernel covers the shape (the caller then uses ATen).
// Batches of at least this many elements with O > 4 outputs take the ATen/cuBLAS path. The row pass
// reads W (O x D) from shared memory for every row, O times the bytes of the row itself, and its
// OT = 16 variant holds one row per warp (RB = 1) at 8 warps per SM: a 4M x 256, O = 16 train_step
// took 20.2 ms (float32) and 22.7 ms (bfloat16) on an H200 against 4.3 / 1.6 ms for stock eager
// (bench/RESULTS.md, 2026-11-26). The ATen path needs no float32 copy of a whole 2-byte x (bf16 meets
// three exact bf16 pieces of the float32 operands, fp16 is widened one row chunk at a time:
// Problem::aten_chunk), so every dtype takes it. Small batches keep the row pass: one launch instead
// of ~6.
constexpr int64_t kRowPassMaxElemsWideO = int64_t(1) << 19;

inline fc::RowPassPlan plan_rows(fc::DType xt, bool vec_ok, int64_t O, int64_t D, int64_t nrows) {
  if (nrows <= 0 || O < 1 || O > 16 || D < 1 || D > (1 << 16)) return fc::RowPassPlan();
  if (O > 4 && nrows * D >= kRowPassMaxElemsWideO) return fc::RowPassPlan();
  return fc::rowpass_plan(xt, vec_ok, static_cast<int>(O), static_cast<int>(D), nrows, num_sms());
}

inline void check_int_range(const char* op, const char* name, int64_t v) {
  TORCH_CHECK_VALUE(v < std::numeric_limits<int>::max(), "fastlin.", op, ": ", name, " = ", v,
                    " is too large for the CUDA kernels");
}

}  // namespace cuda_glue
}  // namespace fastlin

// MSE loss forward ("none", "mean", "sum") and backward over contiguous tensors of n elements.
//
// Elementwise kernels work on "units" of VEC elements (16-byte vectors when every pointer is
// 16-byte aligned, else single elements) in a grid-stride loop; the n % VEC tail elements go to
// the first threads of the grid. The reduction writes one float64 partial per block (fixed-order
// tree) and a single block adds the partials in order, so the loss is deterministic.
#include "common.cuh"

namespace fastlin {
namespace cuda {
namespace {

constexpr int kEwThreads = 256;

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline unsigned ew_blocks(int64_t units, int num_sms) {
  const int64_t want = ceil_div(units, kEwThreads);
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 8;
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kEwThreads)
    mse_none_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out, int64_t n) {
  using A = acc_t<T>;
  const int64_t units = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t u = t0; u < units; u += stride) {
    A xv[VEC], yv[VEC], ov[VEC];
    ldcs_vec<T, VEC>(x + u * VEC, xv);
    ldcs_vec<T, VEC>(y + u * VEC, yv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = xv[j] - yv[j];
      ov[j] = d * d;
    }
    st_vec<T, VEC>(out + u * VEC, ov);
  }
  const int64_t i = units * VEC + t0;  // tail (VEC > 1 only)
  if (VEC > 1 && i < n) {
    const A d = to_acc(x[i]) - to_acc(y[i]);
    out[i] = from_acc<T>(d * d);
  }
}

// Fixed-shape tree over the block (deterministic).
__device__ __forceinline__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kEwThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  return sh[0];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kEwThreads)
    mse_partial_kernel(const T* __restrict__ x, const T* __restrict__ y, int64_t n, double* __restrict__ partials) {
  using A = acc_t<T>;
  __shared__ double sh[kEwThreads];
  const int64_t units = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  for (int64_t u = t0; u < units; u += stride) {
    A xv[VEC], yv[VEC];
    ldcs_vec<T, VEC>(x + u * VEC, xv);
    ldcs_vec<T, VEC>(y + u * VEC, yv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A d = xv[j] - yv[j];
      acc += static_cast<double>(d * d);  // squared in the accumulation dtype, like the reference
    }
  }
  const int64_t i = units * VEC + t0;
  if (VEC > 1 && i < n) {
    const A d = to_acc(x[i]) - to_acc(y[i]);
    acc += static_cast<double>(d * d);
  }
  const double total = block_sum(acc, sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T>
__global__ void __launch_bounds__(kEwThreads)
    mse_total_kernel(const double* __restrict__ partials, int nparts, int64_t n, bool mean, T* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ double sh[kEwThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nparts; i += kEwThreads) acc += partials[i];
  const double total = block_sum(acc, sh);
  if (threadIdx.x == 0) {
    // mean of no elements is NaN (0 / 0), like torch.
    const double v = mean ? total / static_cast<double>(n) : total;
    *out = from_acc<T>(static_cast<A>(v));
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kEwThreads)
    mse_backward_kernel(const T* __restrict__ x, const T* __restrict__ y, const void* __restrict__ go, bool go_scalar,
                        double scale, T* __restrict__ out, int64_t n) {
  using A = acc_t<T>;
  const A sc = static_cast<A>(scale);
  const A g0 = go_scalar ? *static_cast<const A*>(go) : A(0);
  const T* gv = static_cast<const T*>(go);
  const int64_t units = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t u = t0; u < units; u += stride) {
    A xv[VEC], yv[VEC], gg[VEC], ov[VEC];
    ldcs_vec<T, VEC>(x + u * VEC, xv);
    ldcs_vec<T, VEC>(y + u * VEC, yv);
    if (go_scalar) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) gg[j] = g0;
    } else {
      ldcs_vec<T, VEC>(gv + u * VEC, gg);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) ov[j] = (xv[j] - yv[j]) * gg[j] * sc;
    st_vec<T, VEC>(out + u * VEC, ov);
  }
  const int64_t i = units * VEC + t0;
  if (VEC > 1 && i < n) {
    const A g = go_scalar ? g0 : to_acc(gv[i]);
    out[i] = from_acc<T>((to_acc(x[i]) - to_acc(y[i])) * g * sc);
  }
}

template <typename T>
cudaError_t none_t(const void* x, const void* y, void* out, int64_t n, int num_sms, cudaStream_t stream) {
  constexpr int V = kVecOf<T>;
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  T* op = static_cast<T*>(out);
  if (aligned16(x) && aligned16(y) && aligned16(out) && n >= V) {
    auto* k = mse_none_kernel<T, V>;
    FASTLIN_LAUNCH(k, ew_blocks(n / V, num_sms), kEwThreads, 0, stream, xp, yp, op, n);
  } else {
    auto* k = mse_none_kernel<T, 1>;
    FASTLIN_LAUNCH(k, ew_blocks(n, num_sms), kEwThreads, 0, stream, xp, yp, op, n);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t reduce_t(const void* x, const void* y, int64_t n, double* partials, void* out, bool mean, int num_sms,
                     cudaStream_t stream) {
  constexpr int V = kVecOf<T>;
  const int nparts = mse_reduce_blocks(n, num_sms);
  if (nparts > 0) {
    const T* xp = static_cast<const T*>(x);
    const T* yp = static_cast<const T*>(y);
    // Same block count as mse_reduce_blocks in both branches (it is computed from n alone).
    if (aligned16(x) && aligned16(y)) {
      auto* k = mse_partial_kernel<T, V>;
      FASTLIN_LAUNCH(k, nparts, kEwThreads, 0, stream, xp, yp, n, partials);
    } else {
      auto* k = mse_partial_kernel<T, 1>;
      FASTLIN_LAUNCH(k, nparts, kEwThreads, 0, stream, xp, yp, n, partials);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  auto* total = mse_total_kernel<T>;
  FASTLIN_LAUNCH(total, 1, kEwThreads, 0, stream, partials, nparts, n, mean, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* x, const void* y, const void* go, bool go_scalar, double scale, void* out,
                       int64_t n, int num_sms, cudaStream_t stream) {
  constexpr int V = kVecOf<T>;
  const T* xp = static_cast<const T*>(x);
  const T* yp = static_cast<const T*>(y);
  T* op = static_cast<T*>(out);
  const bool vec = aligned16(x) && aligned16(y) && aligned16(out) && (go_scalar || aligned16(go)) && n >= V;
  if (vec) {
    auto* k = mse_backward_kernel<T, V>;
    FASTLIN_LAUNCH(k, ew_blocks(n / V, num_sms), kEwThreads, 0, stream, xp, yp, go, go_scalar, scale, op, n);
  } else {
    auto* k = mse_backward_kernel<T, 1>;
    FASTLIN_LAUNCH(k, ew_blocks(n, num_sms), kEwThreads, 0, stream, xp, yp, go, go_scalar, scale, op, n);
  }
  return cudaGetLastError();
}

}  // namespace

int mse_reduce_blocks(int64_t n, int num_sms) {
  if (n <= 0) return 0;
  // About 16 elements per thread at least, at most 4 blocks per SM (the partials stay few).
  const int64_t want = ceil_div(n, static_cast<int64_t>(kEwThreads) * 16);
  const int64_t cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * 4;
  return static_cast<int>(want < cap ? want : cap);
}

cudaError_t mse_none_launch(DType t, const void* x, const void* y, void* out, int64_t n, int num_sms,
                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (t) {
    case DType::F32: return none_t<float>(x, y, out, n, num_sms, stream);
    case DType::F64: return none_t<double>(x, y, out, n, num_sms, stream);
    case DType::BF16: return none_t<__nv_bfloat16>(x, y, out, n, num_sms, stream);
    case DType::F16: return none_t<__half>(x, y, out, n, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t mse_reduce_launch(DType t, const void* x, const void* y, int64_t n, double* partials, void* out, bool mean,
                              int num_sms, cudaStream_t stream) {
  switch (t) {
    case DType::F32: return reduce_t<float>(x, y, n, partials, out, mean, num_sms, stream);
    case DType::F64: return reduce_t<double>(x, y, n, partials, out, mean, num_sms, stream);
    case DType::BF16: return reduce_t<__nv_bfloat16>(x, y, n, partials, out, mean, num_sms, stream);
    case DType::F16: return reduce_t<__half>(x, y, n, partials, out, mean, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t mse_backward_launch(DType t, const void* x, const void* y, const void* go, bool go_scalar, double scale,
                                void* out, int64_t n, int num_sms, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (t) {
    case DType::F32: return backward_t<float>(x, y, go, go_scalar, scale, out, n, num_sms, stream);
    case DType::F64: return backward_t<double>(x, y, go, go_scalar, scale, out, n, num_sms, stream);
    case DType::BF16: return backward_t<__nv_bfloat16>(x, y, go, go_scalar, scale, out, n, num_sms, stream);
    case DType::F16: return backward_t<__half>(x, y, go, go_scalar, scale, out, n, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlin

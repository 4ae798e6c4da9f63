// Device helpers shared by the fastlin CUDA kernels: dtype traits, conversions, 16-byte vector
// loads/stores, the SGD step. CUDA headers only.
#pragma once

#ifdef FASTLIN_CUDA_EMU
// CPU emulation of the CUDA execution model for the kernel tests (csrc/cuda/tests/): must come
// before the CUDA headers. Never defined in a real build.
#include "tests/cuda_emu.h"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace fastlin {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- dtype traits -----------------------------------------------------------------------------
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

// Elements per 16-byte vector.
template <typename T>
constexpr int kVecOf = static_cast<int>(16 / sizeof(T));

// ---- conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__ etc.) ----
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}

// Finite test in the accumulation dtype.
__device__ __forceinline__ bool is_finite(float v) { return isfinite(v); }
__device__ __forceinline__ bool is_finite(double v) { return isfinite(v); }

// ---- loads / stores -----------------------------------------------------------------------------
// 2-byte types travel as their bits (unsigned short), so that no code copies bytes into a class.
template <typename T>
__device__ __forceinline__ acc_t<T> bits_to_acc(unsigned short bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  } else {
    static_assert(std::is_same_v<T, __half>, "2-byte types are bfloat16 and float16");
    return __half2float(__ushort_as_half(bits));
  }
}
template <typename T>
__device__ __forceinline__ unsigned short acc_to_bits(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    static_assert(std::is_same_v<T, __half>, "2-byte types are bfloat16 and float16");
    return __half_as_ushort(__float2half_rn(v));
  }
}

// Read-only (non-coherent cache) scalar load, for data no kernel thread writes while it runs.
template <typename T>
__device__ __forceinline__ acc_t<T> ldg_acc(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return bits_to_acc<T>(__ldg(reinterpret_cast<const unsigned short*>(p)));
  } else {
    return __ldg(p);
  }
}

// Plain load (for parameters a kernel also writes).
template <typename T>
__device__ __forceinline__ acc_t<T> ld_acc(const T* p) {
  return to_acc(*p);
}

// 16 bytes -> VEC values of the accumulation dtype.
template <typename T, int VEC>
__device__ __forceinline__ void unpack16(const uint4& raw, acc_t<T> (&out)[VEC]) {
  static_assert(VEC * sizeof(T) == 16, "one 16-byte vector");
  if constexpr (sizeof(T) == 2) {
    unsigned short b[VEC];
    __builtin_memcpy(b, &raw, 16);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = bits_to_acc<T>(b[j]);
  } else {
    T v[VEC];
    __builtin_memcpy(v, &raw, 16);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = v[j];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ uint4 pack16(const acc_t<T> (&in)[VEC]) {
  static_assert(VEC * sizeof(T) == 16, "one 16-byte vector");
  uint4 raw;
  if constexpr (sizeof(T) == 2) {
    unsigned short b[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) b[j] = acc_to_bits<T>(in[j]);
    __builtin_memcpy(&raw, b, 16);
  } else {
    T v[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = in[j];
    __builtin_memcpy(&raw, v, 16);
  }
  return raw;
}

// Streaming loads of VEC consecutive elements (16 bytes when VEC == kVecOf<T>, else VEC == 1),
// evict-first: x is read once per pass and should not push W or the partials out of L2.
// p must be 16-byte aligned when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void ldcs_vec(const T* p, acc_t<T> (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == kVecOf<T>, "VEC is 1 or one 16-byte vector");
  if constexpr (VEC == 1) {
    if constexpr (sizeof(T) == 2) {
      out[0] = bits_to_acc<T>(__ldcs(reinterpret_cast<const unsigned short*>(p)));
    } else {
      out[0] = __ldcs(p);
    }
  } else {
    unpack16<T, VEC>(__ldcs(reinterpret_cast<const uint4*>(p)), out);
  }
}

// Plain vector load (data also written by this kernel, e.g. a parameter), p 16-byte aligned.
template <typename T, int VEC>
__device__ __forceinline__ void ld_vec(const T* p, acc_t<T> (&out)[VEC]) {
  static_assert(VEC == 1 || VEC == kVecOf<T>, "VEC is 1 or one 16-byte vector");
  if constexpr (VEC == 1) {
    out[0] = to_acc(*p);
  } else {
    // Loaded into a value first: bound straight to unpack16's reference, the memcpy there read the
    // vector from global memory byte by byte (16 LDG.E.U8 per vector in the sm_90 SASS of
    // sgd_update_, whose CUDA kernel then reached 63% of the copy bandwidth on an H200).
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    unpack16<T, VEC>(raw, out);
  }
}

// Vector store of VEC elements converted from the accumulation dtype; p 16-byte aligned when VEC > 1.
template <typename T, int VEC>
__device__ __forceinline__ void st_vec(T* p, const acc_t<T> (&in)[VEC]) {
  static_assert(VEC == 1 || VEC == kVecOf<T>, "VEC is 1 or one 16-byte vector");
  if constexpr (VEC == 1) {
    *p = from_acc<T>(in[0]);
  } else {
    *reinterpret_cast<uint4*>(p) = pack16<T, VEC>(in);
  }
}

// Shared-memory vector read of VEC accumulation-dtype values (16-byte aligned when the width allows).
template <typename A, int VEC>
__device__ __forceinline__ void lds_vec(const A* p, A (&out)[VEC]) {
  constexpr int kPer16 = static_cast<int>(16 / sizeof(A));
  if constexpr (VEC % kPer16 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += kPer16) {
      if constexpr (sizeof(A) == 4) {
        const float4 v = *reinterpret_cast<const float4*>(p + j);
        out[j] = v.x;
        out[j + 1] = v.y;
        out[j + 2] = v.z;
        out[j + 3] = v.w;
      } else {
        const double2 v = *reinterpret_cast<const double2*>(p + j);
        out[j] = v.x;
        out[j + 1] = v.y;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[j];
  }
}

// ---- torch.optim.SGD's step for one element, in the accumulation dtype --------------------------
//   g = grad (negated if maximize) + weight_decay * p
//   if momentum != 0: buf = g if first_step else momentum * buf + (1 - dampening) * g
//                     g = g + momentum * buf if nesterov else buf
//   p -= lr * g
// buf is read only when momentum != 0 and !first_step, and meaningful on return only when momentum != 0.
template <typename A>
struct SgdScalars {
  A lr, momentum, one_minus_dampening, weight_decay;
  bool use_momentum, nesterov, maximize, first_step, use_wd;
  __device__ __forceinline__ explicit SgdScalars(const SgdOpts& o)
      : lr(static_cast<A>(o.lr)),
        momentum(static_cast<A>(o.momentum)),
        one_minus_dampening(static_cast<A>(1.0 - o.dampening)),
        weight_decay(static_cast<A>(o.weight_decay)),
        use_momentum(o.momentum != 0.0),
        nesterov(o.nesterov != 0),
        maximize(o.maximize != 0),
        first_step(o.first_step != 0),
        use_wd(o.weight_decay != 0.0) {}
};

template <typename A>
__device__ __forceinline__ void sgd_step(A& p, A g, A& buf, const SgdScalars<A>& s) {
  if (s.maximize) g = -g;
  if (s.use_wd) g = g + s.weight_decay * p;
  if (s.use_momentum) {
    buf = s.first_step ? g : s.momentum * buf + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

// ---- launch helpers ------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Kernel launch and dynamic shared memory, spelled so that the CPU emulator can stand in for both.
// KERNEL must be a plain name (take a pointer first for a template instance).
#ifdef FASTLIN_CUDA_EMU
#define FASTLIN_LAUNCH(KERNEL, GRID, BLOCK, SMEM, STREAM, ...) \
  ::fastlin::emu::launch(KERNEL, dim3(GRID), dim3(BLOCK), SMEM, STREAM, __VA_ARGS__)
#define FASTLIN_DYNAMIC_SMEM(NAME) unsigned char* NAME = ::fastlin::emu::dynamic_smem()
#else
#define FASTLIN_LAUNCH(KERNEL, GRID, BLOCK, SMEM, STREAM, ...) KERNEL<<<GRID, BLOCK, SMEM, STREAM>>>(__VA_ARGS__)
#define FASTLIN_DYNAMIC_SMEM(NAME) extern __shared__ __align__(16) unsigned char NAME[]
#endif

}  // namespace cuda
}  // namespace fastlin

// Small helpers shared by the CPU glue of linear, mse_loss and sgd_update_ (tensor -> raw kernel
// arguments, thread counts). No kernels here: those live in csrc/cpu/kernels/.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels/linear.h"  // FmtIndex

namespace fastlin::cpu {

inline int fmt_index(at::ScalarType s) {
  switch (s) {
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return kF32;
  }
}

// Accumulator lanes per 64-byte vector: 8 for float64, 16 for everything else (float32 math).
inline int64_t acc_lanes(at::ScalarType s) { return s == at::kDouble ? 8 : 16; }

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Threads for a call doing about `work` element operations: 1 below the threshold, so that small
// calls never pay an OpenMP fork (measured ~3-10 us on this 2-core machine, more under load,
// versus ~1 us for a whole N = 100 forward). kParallelWork ~ 100 us of single-thread work.
constexpr double kParallelWork = 1 << 20;
inline int threads_for(double work) {
  if (work < kParallelWork) return 1;
  const int nt = at::get_num_threads();
  return nt < 1 ? 1 : nt;
}

// A 2-D tensor whose rows are addressable as base + row * ld with unit column stride: itself
// when it is (stride(1) == 1, or one column), else one contiguous copy.
inline at::Tensor as_rows(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}
inline int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

// A zero-filled scratch buffer of n elements: on the stack up to N, else on the heap (small
// calls, e.g. the seed's N = 100 step, then make no allocation for packing).
template <typename T, size_t N = 256>
class Scratch {
 public:
  explicit Scratch(size_t n) {
    if (n <= N) {
      p_ = stack_;
      std::fill(stack_, stack_ + n, T(0));
    } else {
      heap_.assign(n, T(0));
      p_ = heap_.data();
    }
  }
  T* data() { return p_; }
  T& operator[](size_t i) { return p_[i]; }

 private:
  T stack_[N];
  std::vector<T> heap_;
  T* p_;
};

}  // namespace fastlin::cpu

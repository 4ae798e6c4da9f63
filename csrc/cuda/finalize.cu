// Second stage of the row pass (see kernels.h: FinalizeArgs, CommitArgs).
//
// finalize: block b owns the 32 elements e = 32b .. 32b+31 of the flattened (W, b) gradient. Its 8
// warps sum the G partials of those elements with stride 8 (warp t takes partials t, t+8, ...;
// coalesced 128-byte rows), then warp 0 adds the 8 warp sums in order and applies the output or
// the SGD update. Every block also sums the G (loss, weight) pairs with the same fixed tree, so
// each has the identical totals without a grid-wide barrier.
//
// fit_commit: applies a staged step (or stops the loop) so that fit never writes a parameter from
// a step whose loss or new parameters are non-finite, without a host round trip.
#include "common.cuh"

namespace fastlin {
namespace cuda {
namespace {

constexpr int kFinThreads = 256;
constexpr int kFinCols = 32;
constexpr int kFinRows = kFinThreads / kFinCols;  // 8
constexpr int kCommitThreads = 256;

// Element e of the flattened (W (O, D), b (O,)) -> offsets into strided W/b; is_w says which.
struct ElemPos {
  bool is_w;
  int64_t o, d;
};
__device__ __forceinline__ ElemPos elem_pos(int64_t e, int O, int D) {
  const int64_t od = static_cast<int64_t>(O) * D;
  ElemPos p;
  p.is_w = e < od;
  p.o = p.is_w ? e / D : e - od;
  p.d = p.is_w ? e - p.o * D : 0;
  return p;
}

template <typename P>
__global__ void __launch_bounds__(kFinThreads) finalize_kernel(const FinalizeArgs f) {
  using A = acc_t<P>;
  if (f.stopped != nullptr && *f.stopped != 0) return;  // fit: uniform over the grid

  __shared__ double tot_s[2][kFinThreads];
  __shared__ A col_s[kFinRows][kFinCols];

  const int tid = threadIdx.x;
  const int tx = tid % kFinCols;
  const int ty = tid / kFinCols;
  const int O = f.O;
  const int D = f.D;
  const int G = f.G;
  const int64_t E = static_cast<int64_t>(O) * D + O;

  // Loss and weight totals: strided sums, then a fixed tree (identical in every block).
  double l = 0.0, w = 0.0;
  if (f.need_totals) {
    for (int g = tid; g < G; g += kFinThreads) {
      l += f.part_s[2 * static_cast<int64_t>(g)];
      w += f.part_s[2 * static_cast<int64_t>(g) + 1];
    }
  }
  tot_s[0][tid] = l;
  tot_s[1][tid] = w;
  __syncthreads();
  for (int s = kFinThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      tot_s[0][tid] += tot_s[0][tid + s];
      tot_s[1][tid] += tot_s[1][tid + s];
    }
    __syncthreads();
  }
  const double lsum = tot_s[0][0];
  const double wsum = tot_s[1][0];

  // This block's elements. `want`: the element has a destination (only those partials were written).
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kFinCols + tx;
  const ElemPos pos = elem_pos(e < E ? e : 0, O, D);
  bool want = false;
  if (e < E) {
    if (f.mode == kFinGrad) {
      want = pos.is_w ? f.out_w != nullptr : f.out_b != nullptr;
    } else {
      want = pos.is_w || f.b != nullptr;
    }
  }
  const A* part = static_cast<const A*>(f.part);
  A s = A(0);
  if (want) {
#pragma unroll 4
    for (int g = ty; g < G; g += kFinRows) s += part[static_cast<int64_t>(g) * E + e];
  }
  col_s[ty][tx] = s;
  __syncthreads();

  bool finite = true;
  if (ty == 0 && want) {
    A sum = col_s[0][tx];
#pragma unroll
    for (int t = 1; t < kFinRows; ++t) sum += col_s[t][tx];
    if (f.mode == kFinGrad) {
      const A v = static_cast<A>(f.grad_scale) * sum;
      if (pos.is_w) {
        static_cast<P*>(f.out_w)[e] = from_acc<P>(v);
      } else {
        static_cast<P*>(f.out_b)[pos.o] = from_acc<P>(v);
      }
    } else {
      P* p = pos.is_w ? static_cast<P*>(f.w) + pos.o * f.ws0 + pos.d * f.ws1 : static_cast<P*>(f.b) + pos.o * f.bs0;
      P* m = nullptr;
      if (f.opt.momentum != 0.0) {
        if (pos.is_w && f.wm != nullptr) m = static_cast<P*>(f.wm) + pos.o * f.wms0 + pos.d * f.wms1;
        if (!pos.is_w && f.bm != nullptr) m = static_cast<P*>(f.bm) + pos.o * f.bms0;
      }
      const SgdScalars<A> sc(f.opt);
      // gradient = 2 / (O * sum of weights) * sum_i rw_i x_i  (d mean squared error / d W)
      const A grad = static_cast<A>(2.0 / (static_cast<double>(O) * wsum)) * sum;
      A pv = ld_acc(p);
      A mv = (m != nullptr && !sc.first_step) ? ld_acc(m) : A(0);
      sgd_step(pv, grad, mv, sc);
      if (f.mode == kFinUpdate) {
        *p = from_acc<P>(pv);
        if (m != nullptr) *m = from_acc<P>(mv);
      } else {
        A* st = static_cast<A*>(f.staging);
        st[e] = pv;
        st[E + e] = mv;
        finite = is_finite(pv);
      }
    }
  }
  if (f.mode != kFinGrad && blockIdx.x == 0 && tid == 0) {
    const A loss = static_cast<A>(lsum / (static_cast<double>(O) * wsum));
    if (f.mode == kFinUpdate) {
      *static_cast<A*>(f.loss_out) = loss;
    } else {
      f.state[2] = static_cast<double>(loss);
      f.state[3] = wsum;
      finite = finite && is_finite(loss);
    }
  }
  if (f.mode == kFinGrad && blockIdx.x == 0 && tid == 0 && f.out_loss != nullptr) {
    *static_cast<P*>(f.out_loss) = from_acc<P>(static_cast<A>(lsum / f.loss_div));
  }
  if (f.mode == kFinStage) {
    const int all = __syncthreads_and(finite ? 1 : 0);
    if (tid == 0) f.flags[blockIdx.x] = all;
  }
}

template <typename P>
__global__ void __launch_bounds__(kCommitThreads) commit_kernel(const CommitArgs c) {
  using A = acc_t<P>;
  const int tid = threadIdx.x;
  // Every thread reads *stopped before the barrier below. Block 0 writes it only when the step is
  // not applied, and every block then reaches the same decision from the same flags, so it does
  // not matter whether another block reads *stopped before or after that write.
  const bool was_stopped = *c.stopped != 0;
  int mine = 1;
  for (int i = tid; i < c.nflags; i += kCommitThreads) mine &= c.flags[i];
  const bool ok = __syncthreads_and(mine) != 0 && !was_stopped;

  const int64_t E = static_cast<int64_t>(c.O) * c.D + c.O;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kCommitThreads + tid;
  if (ok && e < E) {
    const ElemPos pos = elem_pos(e, c.O, c.D);
    P* p = pos.is_w ? static_cast<P*>(c.w) + pos.o * c.ws0 + pos.d * c.ws1
                    : (c.b != nullptr ? static_cast<P*>(c.b) + pos.o * c.bs0 : nullptr);
    if (p != nullptr) {
      const A* st = static_cast<const A*>(c.staging);
      *p = from_acc<P>(st[e]);
      P* m = pos.is_w ? (c.wm != nullptr ? static_cast<P*>(c.wm) + pos.o * c.wms0 + pos.d * c.wms1 : nullptr)
                      : (c.bm != nullptr ? static_cast<P*>(c.bm) + pos.o * c.bms0 : nullptr);
      if (m != nullptr) *m = from_acc<P>(st[E + e]);
    }
  }
  if (blockIdx.x == 0 && tid == 0) {
    if (ok) {
      double* s = c.state;
      s[0] += s[2] * s[3];
      s[1] += s[3];
      if (c.epoch_end) {
        c.history[c.epoch] = s[0] / s[1];
        s[0] = 0.0;
        s[1] = 0.0;
      }
    } else {
      *c.stopped = 1;
    }
  }
}

}  // namespace

int64_t finalize_grid(int O, int D) {
  const int64_t E = static_cast<int64_t>(O) * D + O;
  return ceil_div(E, kFinCols);
}

cudaError_t finalize_launch(const FinalizeArgs& f, cudaStream_t stream) {
  const int64_t blocks = finalize_grid(f.O, f.D);
  if (blocks <= 0 || blocks > 0x7fffffff || f.G < 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (f.pt) {
    case DType::F32: {
      auto* k = finalize_kernel<float>; FASTLIN_LAUNCH(k, grid, kFinThreads, 0, stream, f);
      break;
    }
    case DType::F64: {
      auto* k = finalize_kernel<double>; FASTLIN_LAUNCH(k, grid, kFinThreads, 0, stream, f);
      break;
    }
    case DType::BF16: {
      auto* k = finalize_kernel<__nv_bfloat16>; FASTLIN_LAUNCH(k, grid, kFinThreads, 0, stream, f);
      break;
    }
    case DType::F16: {
      auto* k = finalize_kernel<__half>; FASTLIN_LAUNCH(k, grid, kFinThreads, 0, stream, f);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t fit_commit_launch(const CommitArgs& c, cudaStream_t stream) {
  const int64_t E = static_cast<int64_t>(c.O) * c.D + c.O;
  const int64_t blocks = ceil_div(E, kCommitThreads);
  if (blocks <= 0 || blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (c.pt) {
    case DType::F32: {
      auto* k = commit_kernel<float>; FASTLIN_LAUNCH(k, grid, kCommitThreads, 0, stream, c);
      break;
    }
    case DType::F64: {
      auto* k = commit_kernel<double>; FASTLIN_LAUNCH(k, grid, kCommitThreads, 0, stream, c);
      break;
    }
    case DType::BF16: {
      auto* k = commit_kernel<__nv_bfloat16>; FASTLIN_LAUNCH(k, grid, kCommitThreads, 0, stream, c);
      break;
    }
    case DType::F16: {
      auto* k = commit_kernel<__half>; FASTLIN_LAUNCH(k, grid, kCommitThreads, 0, stream, c);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastlin

// Multi-tensor SGD: torch.optim.SGD's update for every tensor of a parameter group in one launch
// (one per dtype in a group that mixes dtypes; one per kSgdMaxTensors tensors).
//
// The tensor list travels by value as a __grid_constant__ kernel parameter (pointers, sizes,
// dtypes and a prefix sum of chunk counts; under 4 KB), so there is no host-to-device copy and the
// launch can be captured in a CUDA graph. Each tensor is cut into chunks (SgdLaunchCfg: 16384
// elements by default); the blocks walk the chunks of all tensors in a grid-stride loop, find their
// tensor by binary search in the prefix sums, and update the chunk with 16-byte accesses when the
// tensor's three pointers are aligned (chunk starts are multiples of 8 elements, so they stay
// aligned), else element-wise. The cut and the grid change which block updates an element, never
// how: every element's update is the same arithmetic whatever the configuration.
#include "common.cuh"

namespace fastlin {
namespace cuda {
namespace {

constexpr int kSgdThreads = 256;
constexpr int kIlp = 4;  // vectors per thread in flight in the main loop

struct SgdBatch {
  SgdTensorRef t[kSgdMaxTensors];
  int64_t chunk_begin[kSgdMaxTensors + 1];  // chunk_begin[i]: first global chunk of tensor i
  int aligned[kSgdMaxTensors];              // p, g (and buf) 16-byte aligned
  int count;
  int64_t chunk;  // elements per chunk: a positive multiple of 8 (every vector width)
};
static_assert(sizeof(SgdBatch) + sizeof(SgdOpts) <= 4000, "kernel parameters must stay under 4 KB");

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// U vectors of VEC elements at i, i + stride, ...: every load issued before any store (the stores
// may alias the next loads for all the compiler knows, so vectors updated one at a time would
// leave one 16-byte load per tensor in flight per thread: 57% of the copy bandwidth on an H200).
template <typename P, int VEC, int U>
__device__ __forceinline__ void sgd_vectors(P* p, const P* g, P* buf, bool read_buf, int64_t i, int64_t stride,
                                            const SgdScalars<acc_t<P>>& sc) {
  using A = acc_t<P>;
  A pv[U][VEC], gv[U][VEC], bv[U][VEC];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    ld_vec<P, VEC>(p + i + u * stride, pv[u]);
    ld_vec<P, VEC>(g + i + u * stride, gv[u]);
    if (read_buf) {
      ld_vec<P, VEC>(buf + i + u * stride, bv[u]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) bv[u][j] = A(0);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) sgd_step(pv[u][j], gv[u][j], bv[u][j], sc);
    st_vec<P, VEC>(p + i + u * stride, pv[u]);
    if (buf != nullptr) st_vec<P, VEC>(buf + i + u * stride, bv[u]);
  }
}

template <typename P, int VEC>
__device__ __forceinline__ void sgd_range(const SgdTensorRef& r, int64_t begin, int64_t end, const SgdScalars<acc_t<P>>& sc) {
  P* p = static_cast<P*>(r.p);
  const P* g = static_cast<const P*>(r.g);
  P* buf = static_cast<P*>(r.buf);
  const bool read_buf = buf != nullptr && !sc.first_step;
  // begin is a multiple of VEC; the first two loops cover the whole vectors of [begin, end): kIlp
  // vectors per thread at a time, then the thread's last < kIlp one by one; then the elements after
  // the last whole vector (VEC > 1 only).
  const int64_t vend = begin + (end - begin) / VEC * VEC;
  constexpr int64_t kStride = static_cast<int64_t>(kSgdThreads) * VEC;
  int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC;
  for (; i + (kIlp - 1) * kStride < vend; i += kIlp * kStride) sgd_vectors<P, VEC, kIlp>(p, g, buf, read_buf, i, kStride, sc);
  for (; i < vend; i += kStride) sgd_vectors<P, VEC, 1>(p, g, buf, read_buf, i, kStride, sc);
  for (i = vend + threadIdx.x; i < end; i += kSgdThreads) sgd_vectors<P, 1, 1>(p, g, buf, read_buf, i, 0, sc);  // tail
}

template <typename P>
__device__ __forceinline__ void sgd_chunk(const SgdTensorRef& r, bool aligned, int64_t begin, int64_t end,
                                          const SgdOpts& opt) {
  const SgdScalars<acc_t<P>> sc(opt);
  if (aligned) {
    sgd_range<P, kVecOf<P>>(r, begin, end, sc);
  } else {
    sgd_range<P, 1>(r, begin, end, sc);
  }
}

// One kernel per parameter dtype: a kernel holds the registers of its widest path, and one kernel
// switching over all four dtypes took 128 registers (its float64 path's), which left two blocks of
// 256 threads per SM for float32 too.
template <typename P>
__global__ void __launch_bounds__(kSgdThreads) sgd_multi_kernel(const __grid_constant__ SgdBatch bt, const SgdOpts opt) {
  const int64_t total = bt.chunk_begin[bt.count];
  for (int64_t c = blockIdx.x; c < total; c += gridDim.x) {
    // The tensor t with chunk_begin[t] <= c < chunk_begin[t + 1] (empty tensors have no chunks).
    int lo = 0, hi = bt.count - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (bt.chunk_begin[mid] <= c) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const SgdTensorRef& r = bt.t[lo];
    const int64_t begin = (c - bt.chunk_begin[lo]) * bt.chunk;
    const int64_t end = begin + bt.chunk < r.n ? begin + bt.chunk : r.n;
    sgd_chunk<P>(r, bt.aligned[lo] != 0, begin, end, opt);
  }
}

template <typename P>
constexpr DType kDTypeOf = std::is_same_v<P, float>           ? DType::F32
                           : std::is_same_v<P, double>        ? DType::F64
                           : std::is_same_v<P, __nv_bfloat16> ? DType::BF16
                                                              : DType::F16;

// Launches the kernel of dtype P over the tensors of that dtype, kSgdMaxTensors at a time.
template <typename P>
cudaError_t launch_dtype(const SgdTensorRef* tensors, int count, const SgdOpts& opt, int num_sms,
                         const SgdLaunchCfg& cfg, cudaStream_t stream) {
  int64_t cap = 0;  // blocks per launch, known once there is a tensor of this dtype
  int i = 0;
  while (i < count) {
    SgdBatch bt{};
    int k = 0;
    int64_t elems = 0;
    for (; i < count && k < kSgdMaxTensors; ++i) {
      const SgdTensorRef& r = tensors[i];
      if (r.n <= 0 || r.dt != kDTypeOf<P>) continue;
      bt.t[k] = r;
      bt.aligned[k] = aligned16(r.p) && aligned16(r.g) && (r.buf == nullptr || aligned16(r.buf));
      elems += r.n;
      ++k;
    }
    if (k == 0) break;  // no tensor of this dtype was left
    if (cap == 0) {
      int per_sm = cfg.blocks_per_sm;
      if (per_sm <= 0) {  // one full wave of resident blocks
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sgd_multi_kernel<P>, kSgdThreads, 0) !=
                cudaSuccess ||
            per_sm <= 0) {
          (void)cudaGetLastError();
          per_sm = 1;
        }
      }
      cap = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * per_sm;
    }
    // chunk 0: the batch split evenly over the grid (a tensor smaller than that is one chunk)
    const int64_t chunk = cfg.chunk > 0 ? round_up(cfg.chunk, 8) : round_up(ceil_div(elems, cap), 4096);
    int64_t chunks = 0;
    for (int j = 0; j < k; ++j) {
      bt.chunk_begin[j] = chunks;
      chunks += ceil_div(bt.t[j].n, chunk);
    }
    bt.chunk_begin[k] = chunks;
    bt.count = k;
    bt.chunk = chunk;
    const unsigned blocks = static_cast<unsigned>(chunks < cap ? chunks : cap);
    FASTLIN_LAUNCH(sgd_multi_kernel<P>, blocks, kSgdThreads, 0, stream, bt, opt);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t sgd_update_launch(const SgdTensorRef* tensors, int count, const SgdOpts& opt, int num_sms,
                              cudaStream_t stream, const SgdLaunchCfg& cfg) {
  // One launch per dtype present (per kSgdMaxTensors tensors of it): a group of one dtype, the
  // usual case, is one launch; launch_dtype launches nothing for a dtype without tensors.
  cudaError_t err = launch_dtype<float>(tensors, count, opt, num_sms, cfg, stream);
  if (err == cudaSuccess) err = launch_dtype<double>(tensors, count, opt, num_sms, cfg, stream);
  if (err == cudaSuccess) err = launch_dtype<__nv_bfloat16>(tensors, count, opt, num_sms, cfg, stream);
  if (err == cudaSuccess) err = launch_dtype<__half>(tensors, count, opt, num_sms, cfg, stream);
  return err;
}

}  // namespace cuda
}  // namespace fastlin

// The row pass: one streaming pass over the rows of x (N, D) against a small W (O, D). See
// RowPassArgs in kernels.h for what it computes; this file holds the kernel template and the
// per-dtype plan/launch code, instantiated once per input dtype in rowpass_<dtype>.cu (separate
// files so that the build compiles them in parallel).
//
// Geometry. A block has kRowWarps warps. The lanes of a warp split into S = 32 / L row groups of L
// lanes (L a power of two, L = 32 unless a row has fewer than 32 vectors). Lane cl of a group owns
// the vectors v = cl + L * k (k < kc) of its row, that is columns v*VEC .. v*VEC+VEC-1, and so the
// same columns in every row: its dW partial sums acc[o][k][j] stay in registers for the whole
// pass. Per iteration a warp takes RB rows per row group (RB * S rows), issues all their loads
// first (RB * kc independent 16-byte loads per lane), then
//   dot[o]  = sum over its columns of x * W[o]    (W from shared memory, one read per RB rows)
//   dot[o] += butterfly over the L lanes           (every lane ends with the full dot product)
//   r[o]    = dot[o] + b[o] - y[o], rw = r * sample weight
//   acc[o][k][j] += rw[o] * x[k][j]; lane 0 of the group keeps db, the loss and the weight sum.
// Rows are split into G contiguous ranges, one per block; G is one full wave of resident blocks
// (capped so that each block has at least a few iterations of work). At the end the warps' partials
// are combined in shared memory in warp order and the block writes one partial. Everything runs in
// a fixed order: the result depends only on the inputs and G (that is, the device's SM count).
#pragma once

#include <algorithm>

#include "common.cuh"

namespace fastlin {
namespace cuda {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

template <typename T, int VEC, int OT, int KMAX>
struct RowCfg {
  using A = acc_t<T>;
  static constexpr int kWA = static_cast<int>(sizeof(A) / 4);  // 32-bit registers per A value
  static constexpr int DW = 32 * KMAX * VEC;                     // padded row length of W in smem
  static constexpr int BS = OT < 4 ? 4 : OT;                     // bias slots (keeps 16-byte offsets)
  // Registers of the dW accumulators per lane; instantiations above 128 would spill.
  static constexpr int kAccRegs = OT * KMAX * VEC * kWA;
  static constexpr bool kFits = kAccRegs <= 128;
  // 2-byte x in 16-byte vectors stays packed in registers (4 per vector) and is widened where it
  // is used, so a row costs half the registers of float32 and twice the rows fit in flight.
  static constexpr bool kPacked = sizeof(T) == 2 && VEC > 1;
  static constexpr int kXRegs = kPacked ? KMAX * 4 : KMAX * VEC * kWA;  // x registers per row
  // Rows per row group and iteration, for memory parallelism: up to 4 (8 packed, the same bytes
  // in flight as float32), fewer when the row's registers (x: kXRegs; dot/target/residual: OT
  // values) would not fit. (bf16 with 4 rows: 33% of its read limit on an H200, float32 87%.)
  static constexpr int min3(int a, int b, int c) { return a < b ? (a < c ? a : c) : (b < c ? b : c); }
  static constexpr int RB0 = min3(kPacked ? 8 : 4, 32 / kXRegs, 16 / (OT * kWA));
  static constexpr int RB = RB0 < 1 ? 1 : RB0;
  // One output, 16-byte loads, at most 32 accumulator registers (the train-step kernels of float32
  // rows up to 1024 and bf16/fp16 rows up to 512): two resident blocks per SM, so at most 128
  // registers. ptxas fits all of them without spills; uncapped, the whole-iteration fast path
  // took 135 registers in the float32 D = 256 kernel, one block per SM.
  static constexpr int kMinBlocks = OT == 1 && VEC > 1 && kAccRegs <= 32 ? 2 : 1;
  static constexpr size_t kSmem = static_cast<size_t>(OT * DW + BS) * sizeof(A) + 2 * sizeof(double);
  static_assert(!kFits || kSmem <= 48 * 1024, "row pass shared memory must fit the default 48 KB");
  static_assert((OT * DW + BS) * sizeof(A) % 16 == 0, "the float64 slots after W and b must be aligned");
};

template <typename T>
__device__ __forceinline__ acc_t<T> load_param(const void* p, bool f32, int64_t idx) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return __ldg(static_cast<const T*>(p) + idx);
  } else {
    return f32 ? __ldg(static_cast<const float*>(p) + idx) : ldg_acc(static_cast<const T*>(p) + idx);
  }
}

template <typename T, int VEC, int OT, int KMAX>
__global__ void __launch_bounds__(kRowThreads, RowCfg<T, VEC, OT, KMAX>::kMinBlocks) rowpass_kernel(const RowPassArgs a) {
  using C = RowCfg<T, VEC, OT, KMAX>;
  using A = typename C::A;
  constexpr int DW = C::DW;
  constexpr int RB = C::RB;

  // fit: a previous step ended the loop. Uniform over the grid, before any barrier.
  if (a.stopped != nullptr && *a.stopped != 0) return;

  FASTLIN_DYNAMIC_SMEM(smem_raw);
  A* w_s = reinterpret_cast<A*>(smem_raw);  // [OT][DW]
  A* b_s = w_s + OT * DW;                   // [BS]
  double* red_s = reinterpret_cast<double*>(b_s + C::BS);  // [2]: loss, weight sum

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int O = a.O;
  const int D = a.D;
  const int L = a.L;    // lanes per row: a power of two in [1, 32]
  const int kc = a.kc;  // chunks per lane: 1 <= kc <= KMAX, and L * kc * VEC <= DW
  const int cl = lane & (L - 1);
  const int sub = lane / L;
  const int S = 32 / L;
  const int nvec = VEC == 1 ? D : D / VEC;

  // W and b into shared memory in the accumulation dtype, zero-padded to [OT][DW].
  const bool pf32 = a.param_f32 != 0;
  for (int i = tid; i < OT * DW; i += kRowThreads) {
    const int o = i / DW;
    const int d = i - o * DW;
    A v = A(0);
    if (a.w != nullptr && o < O && d < D) v = load_param<T>(a.w, pf32, o * a.ws0 + d * a.ws1);
    w_s[i] = v;
  }
  for (int i = tid; i < C::BS; i += kRowThreads) {
    b_s[i] = (a.b != nullptr && i < O) ? load_param<T>(a.b, pf32, i * a.bs0) : A(0);
  }
  __syncthreads();

  // This block's rows [r_begin, r_end); empty for trailing blocks when G does not divide evenly.
  const int64_t rpb = (a.nrows + gridDim.x - 1) / gridDim.x;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * rpb;
  const int64_t r_end = r_begin + rpb < a.nrows ? r_begin + rpb : a.nrows;

  const T* __restrict__ x = static_cast<const T*>(a.x);
  const bool dots = a.src == kSrcDots;
  const T* __restrict__ ysrc = static_cast<const T*>(dots ? a.y : a.g);
  const int64_t ss0 = dots ? a.ys0 : a.gs0;
  const int64_t ss1 = dots ? a.ys1 : a.gs1;
  const A* __restrict__ sw = static_cast<const A*>(a.sw);
  T* __restrict__ y_out = static_cast<T*>(a.y_out);
  T* __restrict__ gi_out = static_cast<T*>(a.gi_out);
  T* __restrict__ gt_out = static_cast<T*>(a.gt_out);
  const A out_scale = static_cast<A>(a.out_scale);
  const bool load_x = a.load_x != 0;
  const bool acc_w = a.acc_w != 0;
  const bool acc_b = a.acc_b != 0;
  const bool acc_loss = a.acc_loss != 0;

  A acc[OT][KMAX][VEC];
  A accb[OT];
#pragma unroll
  for (int o = 0; o < OT; ++o) {
    accb[o] = A(0);
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[o][k][j] = A(0);
  }
  double lsum = 0.0, wsum = 0.0;

  // One iteration: RB rows per row group from `base`. kFull (std::true_type): all of them exist
  // and are contiguous (no gather), so rows and addresses are affine in rb and need no checks:
  // the common case, compiled without the per-row validity and gather branches (in the bf16
  // kernel those were a third of the loop's instructions, and the packed kernels are
  // issue-bound). Otherwise (std::false_type) every row is checked and may be gathered.
  // xs, ys: bytes between a group's consecutive rows of x and of y / g. Addresses are kept as
  // integers: x or y may be null when unused, and no pointer arithmetic is done on a null pointer.
  const uintptr_t xs = static_cast<uintptr_t>(S * a.ldx) * sizeof(T);
  const uintptr_t ys = static_cast<uintptr_t>(S * ss0) * sizeof(T);
  auto iteration = [&](int64_t base, auto full) {
    constexpr bool kFull = decltype(full)::value;
    bool valid[RB];
    int64_t row[RB];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
      const int64_t r = base + rb * S + sub;
      if constexpr (kFull) {
        valid[rb] = true;
        row[rb] = a.row0 + r;
      } else {
        valid[rb] = r < r_end;
        row[rb] = !valid[rb] ? 0 : (a.rows != nullptr ? a.rows[r] : a.row0 + r);
      }
    }
    // The start of row rb of x and of y / g. kFull: the first row's address plus rb strides, by
    // additions (the compiler kept a 64-bit multiply per row for rb * stride).
    uintptr_t xa[RB], ya[RB];
    if constexpr (kFull) {
      xa[0] = reinterpret_cast<uintptr_t>(x) + static_cast<uintptr_t>((a.row0 + base + sub) * a.ldx) * sizeof(T);
      ya[0] = reinterpret_cast<uintptr_t>(ysrc) + static_cast<uintptr_t>((a.row0 + base + sub) * ss0) * sizeof(T);
#pragma unroll
      for (int rb = 1; rb < RB; ++rb) {
        xa[rb] = xa[rb - 1] + xs;
        ya[rb] = ya[rb - 1] + ys;
      }
    } else {
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
        xa[rb] = reinterpret_cast<uintptr_t>(x) + static_cast<uintptr_t>(row[rb] * a.ldx) * sizeof(T);
        ya[rb] = reinterpret_cast<uintptr_t>(ysrc) + static_cast<uintptr_t>(row[rb] * ss0) * sizeof(T);
      }
    }
    auto x_row = [&](int rb) { return reinterpret_cast<const T*>(xa[rb]); };
    auto s_row = [&](int rb) { return reinterpret_cast<const T*>(ya[rb]); };

    // All loads of the iteration first: RB * kc vectors of x, then y or g, then the sample weights.
    // x is kept widened (xv) or packed (xr, kPacked), the other array has one unused element.
    [[maybe_unused]] A xv[C::kPacked ? 1 : RB][C::kPacked ? 1 : KMAX][VEC];
    [[maybe_unused]] uint4 xr[C::kPacked ? RB : 1][C::kPacked ? KMAX : 1];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const int v = cl + L * k;
        const bool live = load_x && valid[rb] && k < kc && v < nvec;
        if constexpr (C::kPacked) {
          xr[rb][k] = live ? __ldcs(reinterpret_cast<const uint4*>(x_row(rb) + static_cast<int64_t>(v) * VEC))
                           : make_uint4(0, 0, 0, 0);  // zero bits: +0.0
        } else if (live) {
          ldcs_vec<T, VEC>(x_row(rb) + static_cast<int64_t>(v) * VEC, xv[rb][k]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) xv[rb][k][j] = A(0);
        }
      }
    }
    // x of row rb, vector k, widened to the accumulation dtype.
    auto x_at = [&](int rb, int k, A (&out)[VEC]) {
      if constexpr (C::kPacked) {
        unpack16<T, VEC>(xr[rb][k], out);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = xv[rb][k][j];
      }
    };
    A sv[RB][OT];  // y (kSrcDots) or g (kSrcGrad); 0 for invalid rows and o >= O
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
      for (int o = 0; o < OT; ++o) {
        sv[rb][o] = (ysrc != nullptr && valid[rb] && o < O) ? ldg_acc(s_row(rb) + o * ss1) : A(0);
      }
    }
    A swv[RB];
#pragma unroll
    for (int rb = 0; rb < RB; ++rb) swv[rb] = (sw != nullptr && valid[rb]) ? __ldg(sw + row[rb]) : A(1);

    // rw: the row's factor in the W/b gradients, 0 for invalid rows and for o >= O (selected,
    // never multiplied, so a NaN elsewhere cannot leak in). The loss, the weight sum and db are
    // kept by lane 0 of each row group, right here, so that the residuals need no registers later.
    A rw[RB][OT];
    const bool keeper = cl == 0;
    if (dots) {
      A dt[RB][OT];
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int o = 0; o < OT; ++o) dt[rb][o] = A(0);
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (k < kc) {
          const int d0 = (cl + L * k) * VEC;
#pragma unroll
          for (int o = 0; o < OT; ++o) {
            if (o < O) {
              A wv[VEC];
              lds_vec<A, VEC>(w_s + o * DW + d0, wv);
#pragma unroll
              for (int rb = 0; rb < RB; ++rb) {
                A xk[VEC];
                x_at(rb, k, xk);
#pragma unroll
                for (int j = 0; j < VEC; ++j) dt[rb][o] = fma(xk[j], wv[j], dt[rb][o]);
              }
            }
          }
        }
      }
      // Butterfly over the L lanes of each row group (xor offsets < L stay inside the group); IEEE
      // addition is commutative, so every lane of the group ends with the same bits.
      // (Unrolled over the five possible offsets; `off < L` is uniform over the warp.)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        if (off < L) {
#pragma unroll
          for (int rb = 0; rb < RB; ++rb)
#pragma unroll
            for (int o = 0; o < OT; ++o)
              if (o < O) dt[rb][o] += __shfl_xor_sync(kFullMask, dt[rb][o], off);
        }
      }
      // The iteration's loss and weight terms are summed in A, then added to the float64 totals
      // once (a float64 conversion and add per row were a tenth of the packed kernels' loop).
      A lit = A(0), wit = A(0);
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
        for (int o = 0; o < OT; ++o) {
          const bool live = valid[rb] && o < O;
          const A pred = dt[rb][o] + b_s[o];
          if (y_out != nullptr && live && (o & (L - 1)) == cl) y_out[row[rb] * O + o] = from_acc<T>(pred);
          const A r = live ? pred - sv[rb][o] : A(0);
          rw[rb][o] = live ? r * swv[rb] : A(0);
          lit = fma(rw[rb][o], r, lit);
        }
        if (valid[rb]) wit += swv[rb];
      }
      if (acc_loss && keeper) {
        lsum += static_cast<double>(lit);
        wsum += static_cast<double>(wit);
      }
    } else {
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int o = 0; o < OT; ++o) rw[rb][o] = sv[rb][o];
    }
    if (acc_b && keeper) {
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int o = 0; o < OT; ++o) accb[o] += rw[rb][o];
    }
    if (acc_w) {
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (k < kc) {
#pragma unroll
          for (int o = 0; o < OT; ++o) {
            if (o < O) {
#pragma unroll
              for (int rb = 0; rb < RB; ++rb) {
                A xk[VEC];
                x_at(rb, k, xk);
#pragma unroll
                for (int j = 0; j < VEC; ++j) acc[o][k][j] = fma(rw[rb][o], xk[j], acc[o][k][j]);
              }
            }
          }
        }
      }
    }
    if (gi_out != nullptr) {  // gi = out_scale * rw W: row-contiguous (N, D), aligned when VEC > 1
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
        if (!valid[rb]) continue;
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
          const int v = cl + L * k;
          if (k < kc && v < nvec) {
            A out[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] = A(0);
#pragma unroll
            for (int o = 0; o < OT; ++o) {
              if (o < O) {
                A wv[VEC];
                lds_vec<A, VEC>(w_s + o * DW + v * VEC, wv);
#pragma unroll
                for (int j = 0; j < VEC; ++j) out[j] = fma(rw[rb][o], wv[j], out[j]);
              }
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] *= out_scale;
            st_vec<T, VEC>(gi_out + row[rb] * D + static_cast<int64_t>(v) * VEC, out);
          }
        }
      }
    }
    if (gt_out != nullptr) {  // gt = -out_scale * rw, (N, O)
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
#pragma unroll
        for (int o = 0; o < OT; ++o) {
          if (valid[rb] && o < O && (o & (L - 1)) == cl) gt_out[row[rb] * O + o] = from_acc<T>(-(out_scale * rw[rb][o]));
        }
      }
    }
  };

  // The loop bounds depend on the warp only, so every lane runs the same iterations (shuffles):
  // whole contiguous iterations first, then the rest (the range's last rows, or gathered rows).
  const int64_t step = static_cast<int64_t>(kRowWarps) * RB * S;
  int64_t base = r_begin + static_cast<int64_t>(warp) * RB * S;
  if constexpr (OT == 1) {  // (with more outputs the per-row overhead is shared by more work)
    if (a.rows == nullptr) {
      for (; base + RB * S <= r_end; base += step) iteration(base, std::true_type());
    }
  }
  for (; base < r_end; base += step) iteration(base, std::false_type());

  if (!(acc_w || acc_b || acc_loss)) return;  // uniform over the grid

  // Combine the row groups of the warp: lanes with the same cl own the same columns; xor offsets
  // >= L keep cl. Afterwards lanes 0..L-1 (row group 0) hold the warp's sums.
  for (int off = L; off < 32; off <<= 1) {
    if (acc_w) {
#pragma unroll
      for (int o = 0; o < OT; ++o)
#pragma unroll
        for (int k = 0; k < KMAX; ++k)
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            if (o < O && k < kc) acc[o][k][j] += __shfl_xor_sync(kFullMask, acc[o][k][j], off);
    }
#pragma unroll
    for (int o = 0; o < OT; ++o) accb[o] += __shfl_xor_sync(kFullMask, accb[o], off);
    lsum += __shfl_xor_sync(kFullMask, lsum, off);
    wsum += __shfl_xor_sync(kFullMask, wsum, off);
  }

  // Combine the warps in warp order in shared memory (W is no longer needed: reuse its space).
  __syncthreads();
  for (int w = 0; w < kRowWarps; ++w) {
    if (warp == w && lane < L) {
      if (acc_w) {
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
          if (k < kc) {
            const int d0 = (cl + L * k) * VEC;
#pragma unroll
            for (int o = 0; o < OT; ++o) {
              if (o < O) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) {
                  A* p = w_s + o * DW + d0 + j;
                  *p = w == 0 ? acc[o][k][j] : *p + acc[o][k][j];
                }
              }
            }
          }
        }
      }
      if (cl == 0) {
#pragma unroll
        for (int o = 0; o < OT; ++o) {
          if (o < O) b_s[o] = w == 0 ? accb[o] : b_s[o] + accb[o];
        }
        red_s[0] = w == 0 ? lsum : red_s[0] + lsum;
        red_s[1] = w == 0 ? wsum : red_s[1] + wsum;
      }
    }
    __syncthreads();
  }

  // One partial per block.
  const int64_t E = static_cast<int64_t>(O) * D + O;
  A* part = static_cast<A*>(a.part) + static_cast<int64_t>(blockIdx.x) * E;
  if (acc_w) {
    for (int i = tid; i < O * D; i += kRowThreads) {
      const int o = i / D;
      const int d = i - o * D;
      part[i] = w_s[o * DW + d];
    }
  }
  if (acc_b) {
    for (int o = tid; o < O; o += kRowThreads) part[static_cast<int64_t>(O) * D + o] = b_s[o];
  }
  if (acc_loss && tid == 0) {
    a.part_s[2 * static_cast<int64_t>(blockIdx.x)] = red_s[0];
    a.part_s[2 * static_cast<int64_t>(blockIdx.x) + 1] = red_s[1];
  }
}

// ---- plan / launch for one input dtype ---------------------------------------------------------
// Kernel variants (VEC, OT, KMAX): OT in {1, 4, 16} (O is padded up; the padded outputs cost
// registers, not work), KMAX in {1, 2, 8} for 16-byte loads and {2, 16} for element loads, each
// only where its accumulators fit in 128 registers (RowCfg::kFits).
template <typename T>
struct RowPass {
  static constexpr int VF = kVecOf<T>;
  using Fn = void (*)(RowPassArgs);

  struct Variant {
    Fn fn = nullptr;
    int rb = 0;
    size_t smem = 0;
    int* occ_cache = nullptr;  // per-device occupancy cache (blocks per SM), 0 = not yet known
  };

  // The KMAX values plan() asks for: {1, 2, 8} with 16-byte loads, {2, 16} with element loads.
  template <int VEC, int KMAX>
  static constexpr bool kWanted = VEC == 1 ? (KMAX == 2 || KMAX == 16) : (KMAX == 1 || KMAX == 2 || KMAX == 8);

  template <int VEC, int OT, int KMAX>
  static Variant variant() {
    using C = RowCfg<T, VEC, OT, KMAX>;
    Variant v;
    if constexpr (C::kFits && kWanted<VEC, KMAX>) {
      static int cache[64] = {};
      v.fn = rowpass_kernel<T, VEC, OT, KMAX>;
      v.rb = C::RB;
      v.smem = C::kSmem;
      v.occ_cache = cache;
    }
    return v;
  }

  template <int VEC, int OT>
  static Variant by_kmax(int kmax) {
    switch (kmax) {
      case 1: return variant<VEC, OT, 1>();
      case 2: return variant<VEC, OT, 2>();
      case 8: return variant<VEC, OT, 8>();
      case 16: return variant<VEC, OT, 16>();
      default: return Variant();
    }
  }

  template <int VEC>
  static Variant by_ot(int ot, int kmax) {
    switch (ot) {
      case 1: return by_kmax<VEC, 1>(kmax);
      case 4: return by_kmax<VEC, 4>(kmax);
      case 16: return by_kmax<VEC, 16>(kmax);
      default: return Variant();
    }
  }

  static Variant find(int vec, int ot, int kmax) {
    return vec == 1 ? by_ot<1>(ot, kmax) : by_ot<VF>(ot, kmax);
  }

  static int occupancy(const Variant& v) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (dev >= 0 && dev < 64 && v.occ_cache[dev] > 0) return v.occ_cache[dev];
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, v.fn, kRowThreads, v.smem) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the caller reports "no kernel" and falls back
      return 0;
    }
    if (dev >= 0 && dev < 64 && blocks > 0) v.occ_cache[dev] = blocks;  // benign race: same value
    return blocks;
  }

  static RowPassPlan plan(bool vec_ok, int O, int D, int64_t nrows, int num_sms) {
    RowPassPlan p;
    if (nrows <= 0) { p.why = "no rows"; return p; }
    if (O < 1 || O > 16) { p.why = "out_features outside [1, 16]"; return p; }
    if (D < 1) { p.why = "in_features == 0"; return p; }
    const int vec = vec_ok && D % VF == 0 ? VF : 1;
    const int nvec = vec == 1 ? D : D / vec;
    const int ot = O == 1 ? 1 : O <= 4 ? 4 : 16;
    int L = 1;
    while (L < 32 && L < nvec) L <<= 1;
    const int kc = static_cast<int>(ceil_div(nvec, L));
    static const int kVecK[] = {1, 2, 8};
    static const int kOneK[] = {2, 16};
    const int* ks = vec == 1 ? kOneK : kVecK;
    const int nk = vec == 1 ? 2 : 3;
    Variant v;
    int kmax = 0;
    for (int i = 0; i < nk && v.fn == nullptr; ++i) {
      if (kc <= ks[i]) {
        v = find(vec, ot, ks[i]);
        kmax = ks[i];
      }
    }
    if (v.fn == nullptr) { p.why = "in_features too large for the register-resident kernels at this out_features"; return p; }
    const int occ = occupancy(v);
    if (occ <= 0) { p.why = "the kernel cannot be resident on this device"; return p; }
    const int S = 32 / L;
    const int64_t min_rows = std::max<int64_t>(64, static_cast<int64_t>(kRowWarps) * v.rb * S);
    const int64_t wave = static_cast<int64_t>(std::max(num_sms, 1)) * occ;
    p.G = static_cast<int>(std::max<int64_t>(1, std::min(wave, ceil_div(nrows, min_rows))));
    p.ok = 1;
    p.vec = vec;
    p.ot = ot;
    p.kmax = kmax;
    p.L = L;
    p.kc = kc;
    p.rb = v.rb;
    p.smem = v.smem;
    return p;
  }

  static cudaError_t launch(const RowPassPlan& p, RowPassArgs a, cudaStream_t stream) {
    if (!p.ok || p.G <= 0) return cudaErrorInvalidValue;
    const Variant v = find(p.vec, p.ot, p.kmax);
    if (v.fn == nullptr) return cudaErrorInvalidValue;
    a.L = p.L;
    a.kc = p.kc;
    FASTLIN_LAUNCH(v.fn, p.G, kRowThreads, v.smem, stream, a);
    return cudaGetLastError();
  }
};

}  // namespace cuda
}  // namespace fastlin

// Fused linear + MSE pass (train_step, fit, linear_mse_loss): one read of x computes, per tile of
// rows, the residual r = x W^T + b - y, the loss partial, db += sum sw r, dW += (sw r)^T x and, for
// linear_mse_loss, grad_target = -s r and grad_input = s r W. Compiled once per ISA (isa.h), inside
// namespace fastlin::cpu::<isa>; includes nothing. Raw pointers, 64-bit offsets everywhere.
//
// The two numbers (float32, per row of x, D features, O outputs):
//   bytes: 4 D read once from DRAM (+ 4 O of y); everything else (W, dW, the tile) lives in L1/L2.
//   flops: 4 D O (2 D O forward, 2 D O backward), + 2 D O more for grad_input.
// On this machine (2 Zen 4 cores at ~3.66 GHz: one 16-lane FMA per cycle per core, 117 GFLOP/s
// per core measured, 234 for both; ~17 GB/s read with both cores) the balance point is ~14
// flop/byte, i.e. O ~ 14: O = 1 is memory-bound by ~14x (the work is to stream x once with the
// prefetchers' help and do both products on the L1 copy of the rows), O = 16 is balanced to
// compute-bound (262144x256x16: 4.3 GFLOP = 18 ms at peak vs 16 ms to read x), so there the
// micro-kernels must run near the FMA peak and the read must hide under them.
//
// Accumulation: in the accumulation type S (float; double for float64) inside a tile of rows,
// then added into per-thread double totals once per tile (two-level summation: error grows with
// tile_rows + rows / tile_rows, not with rows). Loss and weight sums in double. Everything is
// in a fixed order, so results depend only on the inputs, tile_rows and the row range.

namespace fused {

// 0 generic (SSE2: a 64-byte vector is 4 registers of 16), 1 avx2 (2 of 16), 2 avx512 (1 of 32).
constexpr int kIsa = kIsaLevel;  // vec.h
// How many 64-byte accumulators a micro-kernel may hold without spilling (leaves room for the
// B vectors and the broadcast).
constexpr int kAccBudget = kIsa == 2 ? 24 : kIsa == 1 ? 6 : 3;
// Widest group of output vectors per micro-kernel call, and rows per register block.
constexpr int kMaxNG = kIsa == 2 ? 4 : kIsa == 1 ? 2 : 1;
constexpr int mr_for(int ng) { return kAccBudget / ng < 8 ? kAccBudget / ng : 8; }
// Rows in flight in the dot path (accumulators: one per row).
constexpr int kDotRows = kIsa == 0 ? 2 : 4;
// Rows of at least this many bytes take the dot path's rolled row loop (see dot_block).
constexpr int64_t kDotRollBytes = 512;
// O below this takes the dot path (vectors along D), from O on the outer path (vectors along O).
constexpr int64_t kOuterMinO = 8;

template <Fmt F>
struct K {
  using E = typename FmtTraits<F>::Elem;  // storage
  using S = typename FmtTraits<F>::Acc;   // arithmetic
  using V = typename FmtTraits<F>::V;
  static constexpr int W = FmtTraits<F>::W;
  static constexpr bool kPack = F == Fmt::bf16 || F == Fmt::f16;  // outer path: tile converted to S first
};

template <typename V, typename S>
inline V ld(const S* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename S>
inline void st(S* p, V v) {
  __builtin_memcpy(p, &v, sizeof v);
}

inline void add_to_double(double* __restrict dst, f32x16 v) {
  for (int l = 0; l < 16; ++l) dst[l] += static_cast<double>(v[l]);
}
inline void add_to_double(double* __restrict dst, f64x8 v) {
  for (int l = 0; l < 8; ++l) dst[l] += v[l];
}
// Lane sums in double, pairwise (a sequential chain of 16 double adds cost ~60 cycles per call).
typedef float fused_f32x8 __attribute__((vector_size(32)));
// (Shuffles, not memcpy: taking the address kept the caller's accumulators on the stack.)
inline double lane_sum_double(f32x16 v) {
  const fused_f32x8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const fused_f32x8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return vhsum(__builtin_convertvector(lo, f64x8) + __builtin_convertvector(hi, f64x8));
}
inline double lane_sum_double(f64x8 v) { return vhsum(v); }

// Four lane sums at once (a transposing reduction: 8 shuffles and 4 adds for four vectors
// instead of four separate reductions).
inline void hsum4(const f32x16 (&a)[4], float (&out)[4]) {
  const f32x16 u01 = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                     __builtin_shufflevector(a[0], a[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const f32x16 u23 = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                     __builtin_shufflevector(a[2], a[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const f32x16 v = __builtin_shufflevector(u01, u23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                   __builtin_shufflevector(u01, u23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const f32x16 w = __builtin_shufflevector(v, v, 0, 1, 4, 5, 8, 9, 12, 13, 0, 1, 4, 5, 8, 9, 12, 13) +
                   __builtin_shufflevector(v, v, 2, 3, 6, 7, 10, 11, 14, 15, 2, 3, 6, 7, 10, 11, 14, 15);
  for (int i = 0; i < 4; ++i) out[i] = w[2 * i] + w[2 * i + 1];
}
inline void hsum4(const f64x8 (&a)[4], double (&out)[4]) {
  const f64x8 u01 = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(a[0], a[1], 4, 5, 6, 7, 12, 13, 14, 15);
  const f64x8 u23 = __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(a[2], a[3], 4, 5, 6, 7, 12, 13, 14, 15);
  const f64x8 v = __builtin_shufflevector(u01, u23, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(u01, u23, 2, 3, 6, 7, 10, 11, 14, 15);
  for (int i = 0; i < 4; ++i) out[i] = v[2 * i] + v[2 * i + 1];
}

inline int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

template <typename S>
inline S read_sw(const void* p, int64_t i, FusedFmt f) {
  switch (f) {
    case FusedFmt::f32: return static_cast<S>(static_cast<const float*>(p)[i]);
    case FusedFmt::f64: return static_cast<S>(static_cast<const double*>(p)[i]);
    case FusedFmt::bf16: return static_cast<S>(to_acc<Fmt::bf16>(static_cast<const uint16_t*>(p)[i]));
    default: return static_cast<S>(to_acc<Fmt::f16>(static_cast<const uint16_t*>(p)[i]));
  }
}

// Offsets (bytes) of one thread's scratch areas; every area 64-byte aligned.
struct Layout {
  size_t xr = 0, pfr = 0, xpack = 0, rt = 0, rp = 0, wt = 0, wp = 0, bp = 0, dwt = 0, dbt = 0, dwT = 0, total = 0;
  int64_t Op = 0, Dp = 0;
};

template <Fmt F>
Layout layout(const FusedProblem& p) {
  using S = typename K<F>::S;
  constexpr int W = K<F>::W;
  Layout L;
  const bool outer = p.path == FusedPath::outer;
  const int64_t TR = p.tile_rows, D = p.D, O = p.O;
  L.Dp = round_up(D, W);
  L.Op = outer ? round_up(O, W) : O;
  size_t off = 0;
  auto take = [&](int64_t bytes) {
    size_t at = off;
    off += static_cast<size_t>(round_up(bytes, 64));
    return at;
  };
  L.xr = take(TR * static_cast<int64_t>(sizeof(void*)));
  if (K<F>::kPack && outer) L.xpack = take(TR * L.Dp * static_cast<int64_t>(sizeof(S)));
  L.rt = take(TR * (L.Op > 0 ? L.Op : 1) * static_cast<int64_t>(sizeof(S)));
  L.bp = take((L.Op > 0 ? L.Op : 1) * static_cast<int64_t>(sizeof(S)));
  L.dbt = take((L.Op > 0 ? L.Op : 1) * static_cast<int64_t>(sizeof(S)));
  if (outer) {
    L.rp = take(TR * static_cast<int64_t>(sizeof(void*)));
    L.pfr = take(TR * static_cast<int64_t>(sizeof(void*)));
    L.wt = take(D * L.Op * static_cast<int64_t>(sizeof(S)));
    if (p.gi) L.wp = take(O * L.Dp * static_cast<int64_t>(sizeof(S)));
    if (p.want_dw) L.dwT = take(D * L.Op * static_cast<int64_t>(sizeof(double)));
  } else {
    L.dwt = take(O * D * static_cast<int64_t>(sizeof(S)));
  }
  L.total = off;
  return L;
}

// ---------------------------------------------------------------------------------------------
// Software prefetch of the next tile's rows of x, spread over the current tile's micro-kernel
// iterations (one cache line every `step` iterations, rows in order). The outer path's
// register blocking reads MR rows in lock-step, which the hardware prefetchers do not follow:
// 262144x256x16 on one core from DRAM ran at 57% of the FMA peak without this, vs 91% with the
// data in cache.
struct Prefetcher {
  const char* const* rows = nullptr;  // the next tile's rows
  int64_t nrows = 0, span = 0;        // rows, bytes to cover per row (row bytes + one line)
  int64_t r = 0, off = 0, step = 1, count = 0;
  // Inlined into the FMA loops (an out-of-line call there spilled registers: 76% -> 82% of the
  // FMA peak on 4096x256x16). Blocking the k loop by `step` instead was slower (69%): for O = 16
  // the step is 4 iterations, too short an inner loop.
  inline __attribute__((always_inline)) void tick() {
    if (++count < step) return;
    count = 0;
    if (r >= nrows) return;
    __builtin_prefetch(rows[r] + off, 0, 3);
    off += 64;
    if (off >= span) {
      off = 0;
      ++r;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Register-blocked micro-kernels: acc[m][j] (+)= sum_k A(m, k) * B[k][j-th vector], with B rows of
// ldb elements and A read as broadcast scalars. Two ways to address A:
//   rows: A(m, k) = a[m][k]        (forward r = x W^T: m = row, k = feature; grad_input: m = row, k = output)
//   cols: A(m, k) = a[k][aoff + m] (backward dW^T += x^T r: m = feature, k = row)
// Per k: NG vector loads of B and MR broadcasts for MR * NG FMAs.

template <typename S, typename V, int MR, int NG>
inline void mk_rows(int64_t Kn, const S* const* a, const S* __restrict B, int64_t ldb, V (&acc)[MR][NG],
                    Prefetcher* pf = nullptr) {
  constexpr int W = sizeof(V) / sizeof(S);
  const S* ap[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) ap[m] = a[m];
  for (int64_t k = 0; k < Kn; ++k) {
    if (pf) pf->tick();
    const S* bk = B + k * ldb;
    V bv[NG];
#pragma GCC unroll 8
    for (int j = 0; j < NG; ++j) bv[j] = ld<V>(bk + j * W);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V av = vbcast<V>(ap[m][k]);
#pragma GCC unroll 8
      for (int j = 0; j < NG; ++j) acc[m][j] += av * bv[j];
    }
  }
}

template <typename S, typename V, int MR, int NG>
inline void mk_cols(int64_t Kn, const S* const* a, int64_t aoff, const S* __restrict B, int64_t ldb,
                    V (&acc)[MR][NG], Prefetcher* pf = nullptr) {
  constexpr int W = sizeof(V) / sizeof(S);
  for (int64_t k = 0; k < Kn; ++k) {
    if (pf) pf->tick();
    const S* ak = a[k] + aoff;
    const S* bk = B + k * ldb;
    V bv[NG];
#pragma GCC unroll 8
    for (int j = 0; j < NG; ++j) bv[j] = ld<V>(bk + j * W);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V av = vbcast<V>(ak[m]);
#pragma GCC unroll 8
      for (int j = 0; j < NG; ++j) acc[m][j] += av * bv[j];
    }
  }
}

// Runs STMT with `constexpr int NG` set to ng (1..kMaxNG); wider groups are not instantiated.
#define FASTLIN_FUSED_WITH_NG(ng, STMT)                     \
  switch (ng) {                                             \
    case 1: { constexpr int NG = 1; STMT; } break;          \
    case 2: if constexpr (kMaxNG >= 2) { constexpr int NG = 2; STMT; } break; \
    case 3: if constexpr (kMaxNG >= 3) { constexpr int NG = 3; STMT; } break; \
    default: if constexpr (kMaxNG >= 4) { constexpr int NG = 4; STMT; } break; \
  }

// ---------------------------------------------------------------------------------------------
// Shared per-tile state.

template <Fmt F>
struct Tile {
  using S = typename K<F>::S;
  const FusedProblem& p;
  int64_t t0 = 0, n = 0;  // step rows [t0, t0 + n)
  const S** xr = nullptr;  // n row pointers (into x, or into the converted copy)
  inline int64_t phys(int64_t i) const { return p.rows ? p.rows[t0 + i] : t0 + i; }
};

// Row pointers of the tile; reduced-precision rows are converted to S into xpack (D elements each).
template <Fmt F>
inline void tile_rows_ptrs(Tile<F>& t, typename K<F>::S* xpack, int64_t Dp) {
  using E = typename K<F>::E;
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  const FusedProblem& p = t.p;
  const E* x = static_cast<const E*>(p.x);
  for (int64_t i = 0; i < t.n; ++i) {
    const E* src = x + t.phys(i) * p.x_rs;
    if constexpr (K<F>::kPack) {
      S* dst = xpack + i * Dp;
      int64_t d = 0;
      for (; d + W <= p.D; d += W) st<V>(dst + d, vload<F>(src + d));
      for (; d < p.D; ++d) dst[d] = to_acc<F>(src[d]);
      t.xr[i] = dst;
    } else {
      (void)xpack;
      (void)Dp;
      t.xr[i] = src;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dot path: O < kOuterMinO. R rows in flight; per output o a dot product along D (R accumulators),
// then the R residuals go into dW[o] with one load/store of each dW vector per R rows.

template <Fmt F, int R, int OC, bool ROLL>
inline void dot_block(const Tile<F>& t, int64_t i0, typename K<F>::S* __restrict dwt, typename K<F>::S* __restrict dbt,
                      const typename K<F>::S* __restrict bp, typename K<F>::S& loss_t, double& wsum_t) {
  using E = typename K<F>::E;
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  const FusedProblem& p = t.p;
  // OC: O as a compile-time constant (1), or 0 for O at run time. ROLL: see the row loop below.
  const int64_t D = p.D, O = OC ? OC : p.O, nfull = D / W * W;
  const S* w = static_cast<const S*>(p.w);
  // Rows are read in their storage format (bf16/f16 converted in registers, twice: cheaper than
  // a converted copy of the tile).
  const E* xp[R];
  int64_t g[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    g[i] = t.phys(i0 + i);
    xp[i] = static_cast<const E*>(p.x) + g[i] * p.x_rs;
  }
  S sw[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) sw[i] = p.sw ? read_sw<S>(p.sw, g[i] * p.sw_s, p.sw_fmt) : S(1);
  if (p.sw) {
    for (int i = 0; i < R; ++i) wsum_t += static_cast<double>(sw[i]);
  }
  S rr[R][kOuterMinO];
  S lrow[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) lrow[i] = 0;
  const E* y = static_cast<const E*>(p.y);
  for (int64_t o = 0; o < O; ++o) {
    const S* wo = w + o * D;
    S s[R];
    // Rows one after the other, never in lock-step: reading R rows in lock-step took 3.1x the
    // time of a plain read (262144x256x1, one core, from DRAM). Long rows go through ONE loop (not
    // unrolled over the rows), so that a single load instruction walks x contiguously and the
    // per-instruction stride prefetcher runs ahead across rows: 262144x256x1 took 1.15-1.5x the
    // read time (depending on where x starts in its page) with the row loop unrolled, 0.93-1.13x
    // rolled. Short rows are better unrolled (1048576x64x1: 0.86-0.93x vs 1.14-1.26x rolled).
    // Two accumulators per row halve the FMA dependency chain.
    auto row_dot = [&](int i) {
      const E* xi = xp[i];
      V a0 = vzero<V>(), a1 = vzero<V>();
      int64_t c = 0;
      for (; c + 2 * W <= nfull; c += 2 * W) {
        a0 += vload<F>(xi + c) * ld<V>(wo + c);
        a1 += vload<F>(xi + c + W) * ld<V>(wo + c + W);
      }
      if (c < nfull) a0 += vload<F>(xi + c) * ld<V>(wo + c);
      return a0 + a1;
    };
    V acc[R];
    if constexpr (ROLL) {
#pragma GCC unroll 1
      for (int i = 0; i < R; ++i) acc[i] = row_dot(i);
    } else {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) acc[i] = row_dot(i);
    }
    if constexpr (R == 4) {
      hsum4(acc, s);
    } else {
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) s[i] = vhsum(acc[i]);
    }
    for (int64_t d = nfull; d < D; ++d) {
      const S wd = wo[d];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) s[i] += to_acc<F>(xp[i][d]) * wd;
    }
    S dbo = 0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const S r = s[i] + bp[o] - to_acc<F>(y[g[i] * p.y_rs + o]);
      if (p.gt) static_cast<E*>(p.gt)[g[i] * p.gt_rs + o] = from_acc<F>(static_cast<S>(-p.gscale) * r);
      const S rw = sw[i] * r;
      lrow[i] += r * rw;
      dbo += rw;
      rr[i][o] = rw;
    }
    dbt[o] += dbo;
  }
  // Loss of the R rows added pairwise, so the running tile sum sees one add per block.
  if constexpr (R == 4) {
    loss_t += (lrow[0] + lrow[1]) + (lrow[2] + lrow[3]);
  } else if constexpr (R == 2) {
    loss_t += lrow[0] + lrow[1];
  } else {
    for (int i = 0; i < R; ++i) loss_t += lrow[i];
  }
  if (p.want_dw) {
    for (int64_t o = 0; o < O; ++o) {
      S* dwo = dwt + o * D;
      V rv[R];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) rv[i] = vbcast<V>(rr[i][o]);
      for (int64_t c = 0; c < nfull; c += W) {
        V dv = ld<V>(dwo + c);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) dv += rv[i] * vload<F>(xp[i] + c);
        st<V>(dwo + c, dv);
      }
      for (int64_t d = nfull; d < D; ++d) {
        S dv = dwo[d];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) dv += rr[i][o] * to_acc<F>(xp[i][d]);
        dwo[d] = dv;
      }
    }
  }
  if (p.gi) {
    const S gs = static_cast<S>(p.gscale);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      E* gi = static_cast<E*>(p.gi) + g[i] * p.gi_rs;
      for (int64_t c = 0; c < nfull; c += W) {
        V a = vzero<V>();
        for (int64_t o = 0; o < O; ++o) a += vbcast<V>(rr[i][o]) * ld<V>(w + o * D + c);
        vstore<F>(gi + c, a * gs);
      }
      for (int64_t d = nfull; d < D; ++d) {
        S a = 0;
        for (int64_t o = 0; o < O; ++o) a += rr[i][o] * w[o * D + d];
        gi[d] = from_acc<F>(a * gs);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// outer path.

// r tile (rows x Op) = x_tile W^T, vectorised along O.
template <Fmt F, int NG>
inline void outer_forward(const Tile<F>& t, const typename K<F>::S* wt, int64_t Op, int64_t og,
                          typename K<F>::S* rt, Prefetcher* pf) {
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  constexpr int MR = mr_for(NG);
  const S* B = wt + og * W;
  int64_t i = 0;
  for (; i + MR <= t.n; i += MR) {
    V acc[MR][NG] = {};
    mk_rows<S, V, MR, NG>(t.p.D, t.xr + i, B, Op, acc, pf);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < NG; ++j) st<V>(rt + (i + m) * Op + (og + j) * W, acc[m][j]);
  }
  for (; i < t.n; ++i) {
    V acc[1][NG] = {};
    mk_rows<S, V, 1, NG>(t.p.D, t.xr + i, B, Op, acc, pf);
#pragma GCC unroll 8
    for (int j = 0; j < NG; ++j) st<V>(rt + i * Op + (og + j) * W, acc[0][j]);
  }
}

// dW^T (D x Op, double) += x_tile^T rw_tile, the tile sum formed in registers.
template <Fmt F, int NG>
inline void outer_backward(const Tile<F>& t, const typename K<F>::S* rt, int64_t Op, int64_t og, double* dwT,
                           Prefetcher* pf) {
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  constexpr int MR = mr_for(NG);
  const S* B = rt + og * W;
  const int64_t D = t.p.D;
  int64_t d = 0;
  for (; d + MR <= D; d += MR) {
    V acc[MR][NG] = {};
    mk_cols<S, V, MR, NG>(t.n, t.xr, d, B, Op, acc, pf);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int j = 0; j < NG; ++j) add_to_double(dwT + (d + m) * Op + (og + j) * W, acc[m][j]);
  }
  for (; d < D; ++d) {
    V acc[1][NG] = {};
    mk_cols<S, V, 1, NG>(t.n, t.xr, d, B, Op, acc, pf);
#pragma GCC unroll 8
    for (int j = 0; j < NG; ++j) add_to_double(dwT + d * Op + (og + j) * W, acc[0][j]);
  }
}

// grad_input rows = gscale * r_tile W (vectorised along D), written in the input format.
template <Fmt F, int NG>
inline void outer_grad_input(const Tile<F>& t, const typename K<F>::S* const* rp, const typename K<F>::S* wp,
                             int64_t Dp, int64_t dg) {
  using E = typename K<F>::E;
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  constexpr int MR = mr_for(NG);
  const FusedProblem& p = t.p;
  const S gs = static_cast<S>(p.gscale);
  const S* B = wp + dg * W;
  auto store = [&](int64_t i, int j, V v) {
    E* dst = static_cast<E*>(p.gi) + t.phys(i) * p.gi_rs + (dg + j) * W;
    const int64_t left = p.D - (dg + j) * W;
    if (left >= W) vstore<F>(dst, v * gs);
    else vstore_partial<F>(dst, v * gs, left);
  };
  int64_t i = 0;
  for (; i + MR <= t.n; i += MR) {
    V acc[MR][NG] = {};
    mk_rows<S, V, MR, NG>(p.O, rp + i, B, Dp, acc);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NG; ++j) store(i + m, j, acc[m][j]);
  }
  for (; i < t.n; ++i) {
    V acc[1][NG] = {};
    mk_rows<S, V, 1, NG>(p.O, rp + i, B, Dp, acc);
    for (int j = 0; j < NG; ++j) store(i, j, acc[0][j]);
  }
}

// ---------------------------------------------------------------------------------------------
// D = 1, O = 1 (simple regression, the seed's problem): vectorised along rows when x and y are
// contiguous columns, else one row at a time; no per-tile setup. A 100-row epoch of fit is
// ~60 ns of kernel this way, vs ~500 ns through the general dot path.

template <Fmt F>
void pass_d1o1(const FusedProblem& p, int64_t begin, int64_t end, FusedPartial& out) {
  using E = typename K<F>::E;
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  const S w0 = static_cast<const S*>(p.w)[0];
  const S b0 = p.b ? static_cast<const S*>(p.b)[0] : S(0);
  const E* x = static_cast<const E*>(p.x);
  const E* y = static_cast<const E*>(p.y);
  const bool vec = !p.rows && !p.sw && !p.gi && !p.gt && p.x_rs == 1 && p.y_rs == 1;
  const S gs = static_cast<S>(p.gscale);
  const int64_t TR = p.tile_rows;
  double loss = 0, dw = 0, db = 0, wsum = 0;
  for (int64_t t0 = begin; t0 < end; t0 += TR) {
    const int64_t t1 = end - t0 < TR ? end : t0 + TR;
    int64_t i = t0;
    V lv = vzero<V>(), dwv = vzero<V>(), dbv = vzero<V>();
    if (vec) {
      for (; i + W <= t1; i += W) {
        const V xv = vload<F>(x + i);
        const V r = xv * w0 + b0 - vload<F>(y + i);
        lv += r * r;
        dwv += r * xv;
        dbv += r;
      }
    }
    S ls = 0, dws = 0, dbs = 0;
    for (; i < t1; ++i) {
      const int64_t g = p.rows ? p.rows[i] : i;
      const S xv = to_acc<F>(x[g * p.x_rs]);
      const S r = xv * w0 + b0 - to_acc<F>(y[g * p.y_rs]);
      const S sw = p.sw ? read_sw<S>(p.sw, g * p.sw_s, p.sw_fmt) : S(1);
      if (p.sw) wsum += static_cast<double>(sw);
      if (p.gt) static_cast<E*>(p.gt)[g * p.gt_rs] = from_acc<F>(-gs * r);
      const S rw = sw * r;
      if (p.gi) static_cast<E*>(p.gi)[g * p.gi_rs] = from_acc<F>(gs * rw * w0);
      ls += r * rw;
      dws += rw * xv;
      dbs += rw;
    }
    loss += lane_sum_double(lv) + static_cast<double>(ls);
    dw += lane_sum_double(dwv) + static_cast<double>(dws);
    db += lane_sum_double(dbv) + static_cast<double>(dbs);
  }
  out.loss = loss;
  out.wsum = p.sw ? wsum : static_cast<double>(end - begin);
  if (out.dw) out.dw[0] = dw;
  if (out.db) out.db[0] = db;
}

// ---------------------------------------------------------------------------------------------

template <Fmt F>
void pass_impl(const FusedProblem& p, int64_t begin, int64_t end, void* scratch, FusedPartial& out) {
  using E = typename K<F>::E;
  using S = typename K<F>::S;
  using V = typename K<F>::V;
  constexpr int W = K<F>::W;
  if (p.D == 1 && p.O == 1 && p.path == FusedPath::dot) return pass_d1o1<F>(p, begin, end, out);
  const Layout L = layout<F>(p);
  char* sb = static_cast<char*>(scratch);
  const int64_t D = p.D, O = p.O, Op = L.Op, Dp = L.Dp, TR = p.tile_rows;
  const bool outer = p.path == FusedPath::outer;
  const S* w = static_cast<const S*>(p.w);

  S* xpack = K<F>::kPack && outer ? reinterpret_cast<S*>(sb + L.xpack) : nullptr;
  S* rt = reinterpret_cast<S*>(sb + L.rt);
  S* bp = reinterpret_cast<S*>(sb + L.bp);
  S* dbt = reinterpret_cast<S*>(sb + L.dbt);
  for (int64_t o = 0; o < Op; ++o) bp[o] = (p.b && o < O) ? static_cast<const S*>(p.b)[o] : S(0);
  for (int64_t o = 0; o < Op; ++o) dbt[o] = 0;

  out.loss = 0;
  out.wsum = 0;
  if (out.dw) std::memset(out.dw, 0, sizeof(double) * static_cast<size_t>(O * D));
  if (out.db) std::memset(out.db, 0, sizeof(double) * static_cast<size_t>(O));

  S* wt = nullptr;
  S* wp = nullptr;
  S** rp = nullptr;
  double* dwT = nullptr;
  S* dwt = nullptr;
  if (outer) {
    wt = reinterpret_cast<S*>(sb + L.wt);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t o = 0; o < Op; ++o) wt[d * Op + o] = o < O ? w[o * D + d] : S(0);
    if (p.gi) {
      wp = reinterpret_cast<S*>(sb + L.wp);
      for (int64_t o = 0; o < O; ++o)
        for (int64_t d = 0; d < Dp; ++d) wp[o * Dp + d] = d < D ? w[o * D + d] : S(0);
    }
    rp = reinterpret_cast<S**>(sb + L.rp);
    for (int64_t i = 0; i < TR; ++i) rp[i] = rt + i * Op;
    if (p.want_dw) {
      dwT = reinterpret_cast<double*>(sb + L.dwT);
      std::memset(dwT, 0, sizeof(double) * static_cast<size_t>(D * Op));
    }
  } else {
    dwt = reinterpret_cast<S*>(sb + L.dwt);
  }

  Tile<F> t{p};
  t.xr = reinterpret_cast<const S**>(sb + L.xr);
  const E* y = static_cast<const E*>(p.y);
  const int64_t NVo = Op / W, NVd = Dp / W;
  const S gs_neg = static_cast<S>(-p.gscale);

  for (int64_t t0 = begin; t0 < end; t0 += TR) {
    t.t0 = t0;
    t.n = end - t0 < TR ? end - t0 : TR;
    if (outer) tile_rows_ptrs<F>(t, xpack, Dp);  // the dot path reads rows in place
    double tile_wsum = 0;

    if (!outer) {
      if (p.want_dw) std::memset(dwt, 0, sizeof(S) * static_cast<size_t>(O * D));
      S loss_t = 0;
      int64_t i = 0;
      const bool roll = D * static_cast<int64_t>(sizeof(E)) >= kDotRollBytes;
      if (O == 1 && roll) {
        for (; i + kDotRows <= t.n; i += kDotRows) dot_block<F, kDotRows, 1, true>(t, i, dwt, dbt, bp, loss_t, tile_wsum);
      } else if (O == 1) {
        for (; i + kDotRows <= t.n; i += kDotRows) dot_block<F, kDotRows, 1, false>(t, i, dwt, dbt, bp, loss_t, tile_wsum);
      } else if (roll) {
        for (; i + kDotRows <= t.n; i += kDotRows) dot_block<F, kDotRows, 0, true>(t, i, dwt, dbt, bp, loss_t, tile_wsum);
      } else {
        for (; i + kDotRows <= t.n; i += kDotRows) dot_block<F, kDotRows, 0, false>(t, i, dwt, dbt, bp, loss_t, tile_wsum);
      }
      for (; i < t.n; ++i) dot_block<F, 1, 0, false>(t, i, dwt, dbt, bp, loss_t, tile_wsum);
      out.loss += static_cast<double>(loss_t);
      if (p.want_dw && out.dw) {
        for (int64_t e = 0; e < O * D; ++e) out.dw[e] += static_cast<double>(dwt[e]);
      }
    } else {
      // Prefetch the next tile while this one computes (see Prefetcher).
      Prefetcher pf;
      const int64_t t1 = t0 + TR, nn = end - t1 < TR ? end - t1 : TR;
      if (nn > 0) {
        const char** pr = reinterpret_cast<const char**>(sb + L.pfr);
        const char* xb = static_cast<const char*>(p.x);
        for (int64_t i = 0; i < nn; ++i)
          pr[i] = xb + (p.rows ? p.rows[t1 + i] : t1 + i) * p.x_rs * static_cast<int64_t>(sizeof(E));
        pf.rows = pr;
        pf.nrows = nn;
        pf.span = D * static_cast<int64_t>(sizeof(E)) + 64;
        // Micro-kernel iterations of this tile, forward and backward; finish at ~3/4 of them.
        int64_t iters = 0;
        for (int64_t og = 0; og < NVo; og += kMaxNG) {
          const int ng = static_cast<int>(NVo - og < kMaxNG ? NVo - og : kMaxNG);
          const int64_t mr = mr_for(ng);
          iters += (t.n / mr + t.n % mr) * D + (p.want_dw ? (D / mr + D % mr) * t.n : 0);
        }
        const int64_t lines = nn * ((pf.span + 63) / 64);
        pf.step = iters * 3 / 4 / (lines > 0 ? lines : 1);
        if (pf.step < 1) pf.step = 1;
      }
      for (int64_t og = 0; og < NVo; og += kMaxNG) {
        const int ng = static_cast<int>(NVo - og < kMaxNG ? NVo - og : kMaxNG);
        FASTLIN_FUSED_WITH_NG(ng, (outer_forward<F, NG>(t, wt, Op, og, rt, &pf)));
      }
      // Epilogue along O: residual, grad_target, sample weight, loss and db; rt becomes sw * r.
      V lossv = vzero<V>();
      for (int64_t i = 0; i < t.n; ++i) {
        const int64_t g = t.phys(i);
        const S sw = p.sw ? read_sw<S>(p.sw, g * p.sw_s, p.sw_fmt) : S(1);
        if (p.sw) tile_wsum += static_cast<double>(sw);
        const E* yrow = y + g * p.y_rs;
        E* gtrow = p.gt ? static_cast<E*>(p.gt) + g * p.gt_rs : nullptr;
        S* ri = rt + i * Op;
        for (int64_t j = 0; j < NVo; ++j) {
          const int64_t left = O - j * W;
          const V yv = left >= W ? vload<F>(yrow + j * W) : vload_partial<F>(yrow + j * W, left);
          const V r = ld<V>(ri + j * W) + ld<V>(bp + j * W) - yv;
          if (gtrow) {
            if (left >= W) vstore<F>(gtrow + j * W, r * gs_neg);
            else vstore_partial<F>(gtrow + j * W, r * gs_neg, left);
          }
          const V rw = p.sw ? r * sw : r;
          lossv += r * rw;
          st<V>(dbt + j * W, ld<V>(dbt + j * W) + rw);
          st<V>(ri + j * W, rw);
        }
      }
      out.loss += lane_sum_double(lossv);
      if (p.want_dw) {
        for (int64_t og = 0; og < NVo; og += kMaxNG) {
          const int ng = static_cast<int>(NVo - og < kMaxNG ? NVo - og : kMaxNG);
          FASTLIN_FUSED_WITH_NG(ng, (outer_backward<F, NG>(t, rt, Op, og, dwT, &pf)));
        }
      }
      if (p.gi) {
        for (int64_t dg = 0; dg < NVd; dg += kMaxNG) {
          const int ng = static_cast<int>(NVd - dg < kMaxNG ? NVd - dg : kMaxNG);
          FASTLIN_FUSED_WITH_NG(ng, (outer_grad_input<F, NG>(t, rp, wp, Dp, dg)));
        }
      }
    }
    // Tile totals into the thread's double totals.
    if (out.db) {
      for (int64_t o = 0; o < O; ++o) out.db[o] += static_cast<double>(dbt[o]);
    }
    for (int64_t o = 0; o < Op; ++o) dbt[o] = 0;
    out.wsum += p.sw ? tile_wsum : static_cast<double>(t.n);
  }
  if (outer && dwT && out.dw) {
    for (int64_t o = 0; o < O; ++o)
      for (int64_t d = 0; d < D; ++d) out.dw[o * D + d] = dwT[d * Op + o];
  }
}

template <Fmt F>
size_t scratch_impl(const FusedProblem& p) {
  return layout<F>(p).total;
}

// No path hands a piece to ATen's GEMM, even for large O. Measured on one core (thread CPU time,
// x in cache): torch.mm (MKL) of 4096x256 by 256xO runs at 75 GFLOP/s for O = 16 and 92-96
// GFLOP/s for O = 64..512 (79-82% of the 117 GFLOP/s FMA peak); the outer path's micro-kernels
// run forward + backward of 4096x256xO at 82-86% of the peak for O = 16, 32, 64 and 256, with the
// residual epilogue fused in. Calling mm per cache-sized tile would add dispatch per tile for no
// gain.
inline void plan(FusedProblem& p) {
  // The dot path keeps O residuals per row in registers: it exists for O < kOuterMinO only.
  if (p.path == FusedPath::automatic || p.O >= kOuterMinO) p.path = p.O >= kOuterMinO ? FusedPath::outer : FusedPath::dot;
  if (p.tile_rows <= 0) {
    const int64_t esize = p.fmt == FusedFmt::f64 ? 8 : 4;
    if (p.path == FusedPath::outer) {
      // The tile is read by the forward (from DRAM) and again by the backward (from L2), and the
      // register tile of dW^T is flushed to the double totals once per tile: ~256 KB of rows
      // (half the L2) measured best. 4096x256x16 on one core: 64 rows 77%, 128 rows 86%,
      // 256 rows 91% of the FMA peak (117 GFLOP/s at 3.66 GHz).
      int64_t tr = (256 * 1024) / (esize * (p.D > 0 ? p.D : 1));
      tr = tr < 64 ? 64 : tr > 512 ? 512 : tr;
      p.tile_rows = tr;
    } else {
      // Rows are reused from L1 right after their dot products; the tile only bounds the run
      // length of the float dW partial (two-level summation).
      int64_t tr = (64 * 1024) / (esize * (p.D > 0 ? p.D : 1));
      tr = tr < 16 ? 16 : tr > 512 ? 512 : tr;
      p.tile_rows = tr / kDotRows * kDotRows;
    }
  }
}

inline size_t scratch_bytes(const FusedProblem& p) {
  switch (p.fmt) {
    case FusedFmt::f32: return scratch_impl<Fmt::f32>(p);
    case FusedFmt::f64: return scratch_impl<Fmt::f64>(p);
    case FusedFmt::bf16: return scratch_impl<Fmt::bf16>(p);
    default: return scratch_impl<Fmt::f16>(p);
  }
}

inline void pass(const FusedProblem& p, int64_t begin, int64_t end, void* scratch, FusedPartial& out) {
  switch (p.fmt) {
    case FusedFmt::f32: return pass_impl<Fmt::f32>(p, begin, end, scratch, out);
    case FusedFmt::f64: return pass_impl<Fmt::f64>(p, begin, end, scratch, out);
    case FusedFmt::bf16: return pass_impl<Fmt::bf16>(p, begin, end, scratch, out);
    default: return pass_impl<Fmt::f16>(p, begin, end, scratch, out);
  }
}

}  // namespace fused

inline FusedKernels fused_kernels_table() { return FusedKernels{&fused::plan, &fused::scratch_bytes, &fused::pass}; }

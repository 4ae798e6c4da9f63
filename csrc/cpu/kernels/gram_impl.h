// Gram-family kernels (table: gram.h), compiled once per ISA (see isa.h). Included inside
// namespace fastlin::cpu::<isa>; includes nothing.
//
// G += Z'^T diag(w) Z' over a range of rows, Z' = [input, 1, target] - 1 c^T, in one read of
// input/target:
//   1. pack a block of B rows into Acc (float32, float64 for float64 inputs): zv = Z' (B x ld,
//      zero padded to ld columns) and zb = w * Z' (sample weights; zb = zv without them);
//   2. for each register tile of MR rows i x NV vectors of 8 (float32) / 4 (float64) columns j
//      of the upper triangle of the first pm = P / 8 * 8 columns, accumulate sum_n zb[n, i] *
//      zv[n, j] over the block's rows in registers (broadcast x vector FMAs), then add the tile
//      into the float64 partial g; the P % 8 ragged last columns go along i instead (rag_tile).
// The 32-byte vectors match Zen 4's two 256-bit FMA pipes (a 512-bit op is two of them) and cut
// the padding/diagonal waste of the triangle: P = 66 runs 306 8-wide FMAs per row against 276.4
// needed (16-wide tiles with the ragged columns padded in ran 468, 8-wide 372). Measured on one
// Zen 4 core (CPU time, 1048576 x 64 float32, O = 1): 78-82 ms = 57-60 GFLOP/s of the triangle's
// 4.64 GFLOP, against 113 ms for ATen's sgemm x.T @ x (the 64 x 64 square alone) and 10-14 ms for
// one read of x: the op is compute-bound (bench/bench_gram.py).
//
// Numerics. float64 inputs: float64 products and sums. float32 / bfloat16 / float16 inputs:
// products and sums in float32 over one block of B = 128 rows, then added into float64, so the
// float32 error of a block is at most ~B * eps32 = 128 * 6e-8 = 7.6e-6 of sum_n |zb zv| over that
// block (typically sqrt(B) * eps32 ~ 7e-7), and blocks add in float64. The shift c (row 0 of the
// data, chosen by the glue) makes that bound relative to the data's spread instead of its mean:
// for x = 100 + randn a plain float32 Gram loses ~1e4x more of the centred statistics a solver
// needs; with the shift the solved weights match the float64 solve to ~1e-6 (tests/test_gram.py).
// The glue undoes the shift exactly in float64.
// Within one ISA the order of operations depends only on the shape and the row range, never on
// the thread split: results are bit-reproducible.

namespace gram_impl {

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

template <typename A> struct V32;
template <> struct V32<float> { using V = f32x8; static constexpr int L = 8; };
template <> struct V32<double> { using V = f64x4; static constexpr int L = 4; };

// Register tile of the main block: MR broadcast rows x NV 32-byte column vectors of accumulators,
// plus NV loads and one broadcast: 32 registers (avx512: 8 x 3 = 24 + 4), 16 ymm (avx2: 4 x 2 =
// 8 + 3), 16 xmm (generic: a 32-byte vector is two xmm; 2 x 2 = 8 + 6). MR divides 8, so the row
// groups never cross into the ragged columns (below).
constexpr int kMR = kIsaLevel == 2 ? 8 : kIsaLevel == 1 ? 4 : 2;
constexpr int kNV = kIsaLevel == 2 ? 3 : kIsaLevel == 1 ? 2 : 2;
// Ragged tile: accumulators for NI vectors along i x R broadcast columns j (NI = kRagAcc / R).
constexpr int kRagAcc = kIsaLevel == 2 ? 24 : kIsaLevel == 1 ? 10 : 5;

template <Fmt F> using AccOf = typename FmtTraits<F>::Acc;
// Rows per block: float32 products sum over at most this many rows before reaching float64.
template <Fmt F> constexpr int64_t block_rows() { return F == Fmt::f64 ? 64 : 128; }

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t ld_of(int64_t P) { return round_up(P, 8); }

template <Fmt F> GramPlan plan(int64_t P) {
  const int64_t ld = ld_of(P);
  return {ld, static_cast<int64_t>(sizeof(AccOf<F>)) * (ld + 2 * block_rows<F>() * ld) + 64};
}

template <Fmt F> void shift(const GramArgs& a, double* c) {
  using Elem = typename FmtTraits<F>::Elem;
  const Elem* x = static_cast<const Elem*>(a.x);
  const Elem* y = static_cast<const Elem*>(a.y);
  for (int64_t j = 0; j < a.D; ++j) c[j] = static_cast<double>(to_acc<F>(x[j * a.sx1]));
  c[a.D] = 0.0;
  for (int64_t k = 0; k < a.O; ++k) c[a.D + 1 + k] = static_cast<double>(to_acc<F>(y[k * a.sy1]));
  for (int64_t j = 0; j < a.D + 1 + a.O; ++j)
    if (!std::isfinite(c[j])) c[j] = 0.0;  // an inf/nan in row 0 must not poison the other rows
}

// dst[r * ld + j] = src[n0 + r, j] - cacc[j] for r < nb, j < cols (src element strides s0, s1).
template <Fmt F>
inline void pack_cols(const typename FmtTraits<F>::Elem* src, int64_t s0, int64_t s1, int64_t cols, int64_t n0,
                      int64_t nb, const AccOf<F>* cacc, AccOf<F>* dst, int64_t ld) {
  using T = FmtTraits<F>;
  using A = AccOf<F>;
  constexpr int W = T::W;
  constexpr Fmt AF = F == Fmt::f64 ? Fmt::f64 : Fmt::f32;
  if (cols == 0) return;
  if (s1 == 1 || cols == 1) {  // rows of unit-stride columns
    for (int64_t r = 0; r < nb; ++r) {
      const auto* sr = src + (n0 + r) * s0;
      A* dr = dst + r * ld;
      int64_t j = 0;
      if (s1 == 1)
        for (; j + W <= cols; j += W) vstore<AF>(dr + j, vload<F>(sr + j) - vload<AF>(cacc + j));
      for (; j < cols; ++j) dr[j] = to_acc<F>(sr[j * s1]) - cacc[j];
    }
  } else if (s0 == 1) {  // column-major storage (e.g. a transposed tensor): read down the columns
    for (int64_t j = 0; j < cols; ++j) {
      const auto* sc = src + n0 + j * s1;
      const A cj = cacc[j];
      for (int64_t r = 0; r < nb; ++r) dst[r * ld + j] = to_acc<F>(sc[r]) - cj;
    }
  } else {
    for (int64_t r = 0; r < nb; ++r) {
      const auto* sr = src + (n0 + r) * s0;
      for (int64_t j = 0; j < cols; ++j) dst[r * ld + j] = to_acc<F>(sr[j * s1]) - cacc[j];
    }
  }
}

// g[0..L) += acc (float32 accumulators widened to float64).
template <typename A> inline void add_acc(double* gp, typename V32<A>::V acc) {
  if constexpr (V32<A>::L == 8) {
    const f64x8 d = __builtin_convertvector(acc, f64x8);
    f64x8 o;
    __builtin_memcpy(&o, gp, sizeof o);
    o += d;
    __builtin_memcpy(gp, &o, sizeof o);
  } else {
    f64x4 o;
    __builtin_memcpy(&o, gp, sizeof o);
    o += acc;
    __builtin_memcpy(gp, &o, sizeof o);
  }
}

template <typename A, int MR, int NV>
inline void tile(const A* zb, const A* zv, int64_t ld, int64_t nb, int64_t i0, int64_t j0, double* g) {
  using V = typename V32<A>::V;
  constexpr int L = V32<A>::L;
  V acc[MR * NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) acc[i] = V{};
  const A* b = zb + i0;
  const A* v = zv + j0;
  for (int64_t n = 0; n < nb; ++n, b += ld, v += ld) {
    V vv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) __builtin_memcpy(&vv[c], v + c * L, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V s = vbcast<V>(b[r]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r * NV + c] += s * vv[c];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      add_acc<A>(g + (i0 + r) * ld + j0 + c * L, acc[r * NV + c]);
    }
  }
}

template <typename A, int NV>
inline void tile_dispatch(int nv, const A* zb, const A* zv, int64_t ld, int64_t nb, int64_t i0, int64_t j0,
                          double* g) {
  if constexpr (NV >= 1) {
    if (nv == NV) return tile<A, kMR, NV>(zb, zv, ld, nb, i0, j0, g);
    tile_dispatch<A, NV - 1>(nv, zb, zv, ld, nb, i0, j0, g);
  }
}

// Ragged columns j in [pm, P) (P % 8 of them: for P = 66 the ones and target columns): vectors
// along i instead, g[j * ld + i] += sum_n zb[n, i] * zv[n, j] for every i < ld (the transposed
// position; rows() moves the i < pm part into the upper triangle). P = 66 then runs 288 + 18 = 306
// 8-wide FMAs per row instead of 372 with the ragged columns padded into the main tiles.
template <typename A, int NI, int R>
inline void rag_tile(const A* zb, const A* zv, int64_t ld, int64_t nb, int64_t i0, int64_t pm, double* g) {
  using V = typename V32<A>::V;
  constexpr int L = V32<A>::L;
  V acc[NI * R];
#pragma GCC unroll 32
  for (int i = 0; i < NI * R; ++i) acc[i] = V{};
  const A* b = zb + i0;
  const A* v = zv + pm;
  for (int64_t n = 0; n < nb; ++n, b += ld, v += ld) {
    V bb[NI];
#pragma GCC unroll 8
    for (int c = 0; c < NI; ++c) __builtin_memcpy(&bb[c], b + c * L, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const V s = vbcast<V>(v[r]);
#pragma GCC unroll 8
      for (int c = 0; c < NI; ++c) acc[c * R + r] += s * bb[c];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NI; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) add_acc<A>(g + (pm + r) * ld + i0 + c * L, acc[c * R + r]);
  }
}

// NI <= NIMAX vectors per tile, as many as are left: a tile of few accumulators is bound by the
// FMA latency (4 cycles, 2 pipes: 8 independent chains keep them busy).
template <typename A, int R, int NIMAX>
inline void rag_ni(int64_t left, const A* zb, const A* zv, int64_t ld, int64_t nb, int64_t i0, int64_t pm, double* g) {
  if constexpr (NIMAX >= 1) {
    if (left >= NIMAX) return rag_tile<A, NIMAX, R>(zb, zv, ld, nb, i0, pm, g);
    rag_ni<A, R, NIMAX - 1>(left, zb, zv, ld, nb, i0, pm, g);
  }
}

template <typename A, int R>
inline void rag_cols(const A* zb, const A* zv, int64_t ld, int64_t nb, int64_t pm, double* g) {
  constexpr int L = V32<A>::L;
  constexpr int NI = kRagAcc / R > 0 ? kRagAcc / R : 1;
  const int64_t nvec = ld / L;
  for (int64_t c = 0; c < nvec;) {
    const int64_t k = nvec - c < NI ? nvec - c : NI;
    rag_ni<A, R, NI>(k, zb, zv, ld, nb, c * L, pm, g);
    c += k;
  }
}

template <typename A>
inline void rag_dispatch(int64_t r, const A* zb, const A* zv, int64_t ld, int64_t nb, int64_t pm, double* g) {
  switch (r) {
    case 1: return rag_cols<A, 1>(zb, zv, ld, nb, pm, g);
    case 2: return rag_cols<A, 2>(zb, zv, ld, nb, pm, g);
    case 3: return rag_cols<A, 3>(zb, zv, ld, nb, pm, g);
    case 4: return rag_cols<A, 4>(zb, zv, ld, nb, pm, g);
    case 5: return rag_cols<A, 5>(zb, zv, ld, nb, pm, g);
    case 6: return rag_cols<A, 6>(zb, zv, ld, nb, pm, g);
    case 7: return rag_cols<A, 7>(zb, zv, ld, nb, pm, g);
    default: return;
  }
}

template <Fmt F> void rows(const GramArgs& a, const double* c, int64_t r0, int64_t r1, double* g, void* scratch) {
  using Elem = typename FmtTraits<F>::Elem;
  using A = AccOf<F>;
  constexpr int L = V32<A>::L;
  constexpr int64_t B = block_rows<F>();
  const int64_t D = a.D, O = a.O, P = D + 1 + O;
  const int64_t ld = ld_of(P), pm = P / 8 * 8, nch = pm / L;  // main block: columns < pm
  A* cacc = static_cast<A*>(scratch);
  A* zv = cacc + ld;
  A* zb = a.w ? zv + B * ld : zv;
  for (int64_t j = 0; j < ld; ++j) cacc[j] = j < P ? static_cast<A>(c[j]) : A(0);
  const Elem* x = static_cast<const Elem*>(a.x);
  const Elem* y = static_cast<const Elem*>(a.y);
  const Elem* w = static_cast<const Elem*>(a.w);
  for (int64_t n0 = r0; n0 < r1; n0 += B) {
    const int64_t nb = r1 - n0 < B ? r1 - n0 : B;
    pack_cols<F>(x, a.sx0, a.sx1, D, n0, nb, cacc, zv, ld);
    pack_cols<F>(y, a.sy0, a.sy1, O, n0, nb, cacc + D + 1, zv + D + 1, ld);
    for (int64_t r = 0; r < nb; ++r) {
      A* zr = zv + r * ld;
      zr[D] = A(1);
      for (int64_t j = P; j < ld; ++j) zr[j] = A(0);
      if (w) {
        const A wr = to_acc<F>(w[(n0 + r) * a.sw]);
        A* br = zb + r * ld;
        for (int64_t j = 0; j < ld; ++j) br[j] = wr * zr[j];
      }
    }
    // Prefetch the next block's rows of input while this block computes, a slice per row group:
    // without it the pack stalled on memory (perf: ~30% of the kernel's time on the loads of x).
    const int64_t nx0 = n0 + nb, nx1 = n0 + nb + B < r1 ? n0 + nb + B : r1;
    const int64_t groups = pm / kMR + 1, per = (nx1 - nx0 + groups - 1) / groups;
    int64_t pf = nx0;
    auto prefetch_next = [&]() {
      const int64_t end = pf + per < nx1 ? pf + per : nx1;
      if (a.sx1 == 1 || D == 1) {
        for (; pf < end; ++pf) {
          const char* row = reinterpret_cast<const char*>(x + pf * a.sx0);
          for (int64_t bo = 0; bo < D * static_cast<int64_t>(sizeof(Elem)); bo += 64) __builtin_prefetch(row + bo, 0, 2);
        }
      }
      pf = end;
    };
    for (int64_t i0 = 0; i0 < pm; i0 += kMR) {
      prefetch_next();
      for (int64_t cc = i0 / L; cc < nch; cc += kNV) {
        const int nv = static_cast<int>(nch - cc < kNV ? nch - cc : kNV);
        tile_dispatch<A, kNV>(nv, zb, zv, ld, nb, i0, cc * L, g);
      }
    }
    prefetch_next();
    rag_dispatch<A>(P - pm, zb, zv, ld, nb, pm, g);
  }
  // Move the ragged columns' i < pm part to the upper triangle. (Entries i, j >= pm: the upper
  // ones already hold G[j][i] = G[i][j] from column i; the lower ones are left unused.)
  for (int64_t j = pm; j < P; ++j)
    for (int64_t i = 0; i < pm; ++i) {
      g[i * ld + j] += g[j * ld + i];
      g[j * ld + i] = 0.0;
    }
}

}  // namespace gram_impl

inline GramKernels gram_kernels_table() {
  using namespace gram_impl;
  GramKernels t{};
  t.plan[kF32] = plan<Fmt::f32>;
  t.plan[kF64] = plan<Fmt::f64>;
  t.plan[kBF16] = plan<Fmt::bf16>;
  t.plan[kF16] = plan<Fmt::f16>;
  t.shift[kF32] = shift<Fmt::f32>;
  t.shift[kF64] = shift<Fmt::f64>;
  t.shift[kBF16] = shift<Fmt::bf16>;
  t.shift[kF16] = shift<Fmt::f16>;
  t.rows[kF32] = rows<Fmt::f32>;
  t.rows[kF64] = rows<Fmt::f64>;
  t.rows[kBF16] = rows<Fmt::bf16>;
  t.rows[kF16] = rows<Fmt::f16>;
  return t;
}

// Linear-family kernels (table: linear.h), compiled once per ISA (see isa.h). Included inside
// namespace fastlin::cpu::<isa>; includes nothing.
//
// Three forms of y = a @ B^T + bias, chosen by the glue from the shape (lanes W = 16 float32 /
// 8 float64 accumulators per 64-byte vector):
//   dot    (out < W):   each output is a dot product along `inner`; an R x K register tile
//                       (R rows, K outputs, R*K <= W accumulators) is folded into ONE vector of
//                       R*K sums by a transposed lane reduction (fold), so a row of y leaves in
//                       one store. (Forward with O = 1: 16 rows per tile, one 16-wide store.)
//   axpy   (out >= W):  y[n, :] = sum_i a[n, i] * B^T[i, :], vectorised along `out`; an R x C
//                       tile (R rows, C output chunks) broadcasts a[n, i] from L1.
//   outer  (inner == 1): y[n, o] = a[n] * b[o] + bias[o]; vectorised along rows when out == 1.
//   axpy by pairs (bfloat16, out >= W, avx512_bf16 CPUs): the axpy form with `vdpbf16ps`.
// grad_weight (tn): per row chunk, part[k, :] += sum_n bc[n, k] * vec[n, :] in a K x C register
// tile over sub-tiles of kTnRows rows (the vec tile stays in L1/L2 across the k blocks).
// Within one ISA every kernel's order of operations depends only on the shape, never on the
// thread split (the glue fixes the row chunks), so results are bit-reproducible.

namespace linear_impl {

// 64-byte accumulators a tile may keep in registers: 32 zmm (avx512); each vector is two ymm of
// 16 (avx2) or four xmm of 16 (generic).
constexpr int kRegVecs = kIsaLevel == 2 ? 16 : kIsaLevel == 1 ? 6 : 3;
constexpr int kTnK = kIsaLevel == 2 ? 4 : kIsaLevel == 1 ? 2 : 1;
constexpr int64_t kTnRows = 128;
// The first pass over a row block (k0 = 0) prefetches the same columns of the next block, when a
// tile covers part of a row only (a strided read: whole rows stream in order and the hardware
// prefetchers keep up). One Zen 4 core, linear_backward's grad_weight from DRAM, 262144x256 x
// 16 outputs: float32 50 -> 67 GFLOP/s 64 rows ahead, 70 a block (128) ahead; bfloat16 65 -> 88
// (in cache: 95); 16 rows ahead did nothing.
constexpr int64_t kTnPrefetchRows = kTnRows;

template <Fmt F> constexpr Fmt acc_fmt() { return F == Fmt::f64 ? Fmt::f64 : Fmt::f32; }

template <int...> struct iseq {};
template <int N, int... I> struct make_iseq : make_iseq<N - 1, N - 1, I...> {};
template <int... I> struct make_iseq<0, I...> { using type = iseq<I...>; };

// fold: vectors a, b each hold W/G groups of G partial sums (one group per accumulator); the
// result holds the groups of a then those of b, each halved to G/2 partials (low half + high half).
template <int W, int G, bool HI> constexpr int fold_idx(int j) {
  const int h = G / 2, m = W / G, q = j / h, r = j % h, off = HI ? h : 0;
  return q < m ? q * G + r + off : W + (q - m) * G + r + off;
}
template <int W, int G, bool HI, typename V, int... J> inline V fold_half(V a, V b, iseq<J...>) {
  return __builtin_shufflevector(a, b, fold_idx<W, G, HI>(J)...);
}
template <int W, int G, typename V> inline V fold(V a, V b) {
  using S = typename make_iseq<W>::type;
  return fold_half<W, G, false>(a, b, S{}) + fold_half<W, G, true>(a, b, S{});
}
template <int W, int N, int G, typename V> inline V reduce_rec(V* v) {
  if constexpr (N > 1) {
    constexpr int M = (N + 1) / 2;
    for (int i = 0; i < M; ++i) v[i] = fold<W, G>(v[2 * i], 2 * i + 1 < N ? v[2 * i + 1] : V{});
    return reduce_rec<W, M, G / 2>(v);
  } else if constexpr (G > 1) {
    v[0] = fold<W, G>(v[0], v[0]);
    return reduce_rec<W, 1, G / 2>(v);
  } else {
    return v[0];
  }
}
// Lane j < N of the result is the sum of the lanes of v[j] (fixed pairwise order); v is clobbered.
template <int W, int N, typename V> inline V reduce_lanes(V* v) {
  static_assert(N >= 1 && N <= W, "reduce_lanes: at most one accumulator per lane");
  return reduce_rec<W, N, W>(v);
}

// ----------------------------------------------------------------------------------------------
// dot form

template <Fmt F, int R, int K>
inline void dot_tile(const typename FmtTraits<F>::Elem* a, int64_t lda, const typename FmtTraits<F>::Acc* b,
                     int64_t ldb, int64_t inner, typename FmtTraits<F>::V biasv, typename FmtTraits<F>::Elem* y,
                     int64_t ldy, bool packed) {
  using T = FmtTraits<F>;
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr Fmt AF = acc_fmt<F>();
  V acc[R * K];
  for (int i = 0; i < R * K; ++i) acc[i] = V{};
  // Row by row, each row's chunks in address order: the tile's R rows are one contiguous block
  // of x, read front to back (a chunk-major order strides 4 lines per row and left the hardware
  // prefetcher behind: N = 262144, D = 64, O = 1 ran at 3 GB/s, ATen's gemv at 20).
  // (Fully unrolled so that the accumulators stay in registers.)
  const int64_t full = inner / W * W;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const auto* ar = a + r * lda;
    for (int64_t c = 0; c < full; c += W) {
      const V xv = vload<F>(ar + c);
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) acc[r * K + k] += xv * vload<AF>(b + k * ldb + c);
    }
    if (full < inner) {  // b is zero padded to ldb, x's missing lanes load as zero
      const V xv = vload_partial<F>(ar + full, inner - full);
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) acc[r * K + k] += xv * vload<AF>(b + k * ldb + full);
    }
  }
  const V s = reduce_lanes<W, R * K>(acc) + biasv;
  if (packed) {  // the tile's R rows of K outputs are contiguous in y
    if constexpr (R * K == W) {
      vstore<F>(y, s);
    } else {
      vstore_partial<F>(y, s, R * K);
    }
  } else {
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) y[r * ldy + k] = from_acc<F>(s[r * K + k]);
  }
}

template <Fmt F, int K> inline void dot_block(const NtArgs& p, int64_t o0) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr int L = W < kRegVecs ? W : kRegVecs;
  constexpr int R = L / K > 0 ? L / K : 1;
  const Elem* a = static_cast<const Elem*>(p.a);
  const Acc* b = static_cast<const Acc*>(p.b) + o0 * p.ldb;
  const Acc* bias = p.bias ? static_cast<const Acc*>(p.bias) + o0 : nullptr;
  Elem* y = static_cast<Elem*>(p.y) + o0;
  const bool packed = K == p.out && p.ldy == p.out;
  V bias_r{}, bias_1{};
  if (bias) {
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < K; ++k) bias_r[r * K + k] = bias[k];
    for (int k = 0; k < K; ++k) bias_1[k] = bias[k];
  }
  int64_t n = 0;
  if constexpr (R > 1) {
    for (; n + R <= p.rows; n += R)
      dot_tile<F, R, K>(a + n * p.lda, p.lda, b, p.ldb, p.inner, bias_r, y + n * p.ldy, p.ldy, packed);
  }
  for (; n < p.rows; ++n) dot_tile<F, 1, K>(a + n * p.lda, p.lda, b, p.ldb, p.inner, bias_1, y + n * p.ldy, p.ldy, packed);
}

template <Fmt F, int K> inline void dot_dispatch(int k, const NtArgs& p, int64_t o0) {
  if constexpr (K >= 1) {
    if (k == K) return dot_block<F, K>(p, o0);
    dot_dispatch<F, K - 1>(k, p, o0);
  }
}

template <Fmt F> void nt_dot(const NtArgs& p) {
  constexpr int W = FmtTraits<F>::W;
  constexpr int Kmax = W < kRegVecs ? W : kRegVecs;
  for (int64_t o0 = 0; o0 < p.out; o0 += Kmax) {
    const int k = static_cast<int>(p.out - o0 < Kmax ? p.out - o0 : Kmax);
    dot_dispatch<F, Kmax>(k, p, o0);
  }
}

// ----------------------------------------------------------------------------------------------
// axpy form

template <Fmt F, int R, int C>
inline void axpy_tile(const typename FmtTraits<F>::Elem* a, int64_t lda, const typename FmtTraits<F>::Acc* bt,
                      int64_t ldb, int64_t inner, const typename FmtTraits<F>::Acc* bias,
                      typename FmtTraits<F>::Elem* y, int64_t ldy, int64_t left,
                      const typename FmtTraits<F>::Elem* next) {
  using T = FmtTraits<F>;
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr Fmt AF = acc_fmt<F>();
  // Software prefetch of `next` (the next tile's R rows, or nullptr), one line per row at each
  // line of these rows: the tile reads its R rows in lock-step, which the hardware prefetchers do
  // not follow (the fused kernel's outer path found the same, fused_impl.h's Prefetcher).
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(typename T::Elem));
  const auto prefetch = [&](int64_t at) {
    if (next && at % kLine == 0) {
      for (int r = 0; r < R; ++r) __builtin_prefetch(next + r * lda + at, 0, 3);
    }
  };
  V acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = V{};
  int64_t i = 0;
  if constexpr (F == Fmt::bf16 || F == Fmt::f16) {
    // 16-bit a: W values of each row converted by one vector load into a float32 strip, then
    // broadcast from there. A scalar conversion per broadcast cost a quarter to a third of the FMA
    // rate (one Zen 4 core, 1024x256 x 16 outputs in cache: bfloat16 73, float16 63 GFLOP/s
    // against float32's 100; now 93-96). Same products in the same order: bit-identical results.
    typename T::Acc strip[R][W];
    for (; i + W <= inner; i += W) {
      prefetch(i);
      for (int r = 0; r < R; ++r) vstore<AF>(strip[r], vload<F>(a + r * lda + i));
      for (int j = 0; j < W; ++j) {
        V bv[C];
        for (int c = 0; c < C; ++c) bv[c] = vload<AF>(bt + (i + j) * ldb + c * W);
        for (int r = 0; r < R; ++r) {
          const V s = vbcast<V>(strip[r][j]);
          for (int c = 0; c < C; ++c) acc[r * C + c] += s * bv[c];
        }
      }
    }
  }
  for (; i < inner; ++i) {
    prefetch(i);
    V bv[C];
    for (int c = 0; c < C; ++c) bv[c] = vload<AF>(bt + i * ldb + c * W);
    for (int r = 0; r < R; ++r) {
      const V s = vbcast<V>(to_acc<F>(a[r * lda + i]));
      for (int c = 0; c < C; ++c) acc[r * C + c] += s * bv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      V v = acc[r * C + c];
      if (bias) v += vload<AF>(bias + c * W);
      const int64_t m = left - c * W;
      if (m >= W) {
        vstore<F>(y + r * ldy + c * W, v);
      } else {
        vstore_partial<F>(y + r * ldy + c * W, v, m);
      }
    }
  }
}

// How far ahead axpy_tile prefetches. One Zen 4 core, ops.linear on 262144x256 x from DRAM, 16
// outputs, builds alternated: float32 44-46 GFLOP/s without prefetch, 60-61 one tile (8 KiB)
// ahead, 65-70 two tiles (16 KiB; 32 KiB no better); bfloat16 55-57 -> 94-100 (in cache: 103).
constexpr int64_t kAxpyPrefetchBytes = 16384;

// Rows from a tile's first row to the first row of the tile it prefetches: whole tiles of R rows,
// at least kAxpyPrefetchBytes (lda = 0, rows of one broadcast row: `never`, nothing to prefetch).
inline int64_t axpy_prefetch_rows(int R, int64_t lda, int64_t elem_bytes, int64_t never) {
  const int64_t tile_bytes = R * lda * elem_bytes;
  return tile_bytes > 0 ? R * ((kAxpyPrefetchBytes + tile_bytes - 1) / tile_bytes) : never;
}

constexpr int axpy_rows(int c) {
  const int l = kRegVecs / c;
  return l >= 8 ? 8 : l >= 4 ? 4 : l >= 2 ? 2 : 1;
}

// The axpy form's tile kinds: AxpyFmaTile (float32 FMAs, every format) and AxpyPairsTile (bfloat16
// pairs, below). Tile::run<R, C>(p, n, c0, next): the R x C tile at row n and output chunk c0.
template <Fmt F> struct AxpyFmaTile {
  using Elem = typename FmtTraits<F>::Elem;
  template <int R, int C> static inline void run(const NtArgs& p, int64_t n, int64_t c0, const Elem* next) {
    using Acc = typename FmtTraits<F>::Acc;
    constexpr int W = FmtTraits<F>::W;
    const Acc* bias = p.bias ? static_cast<const Acc*>(p.bias) + c0 * W : nullptr;
    axpy_tile<F, R, C>(static_cast<const Elem*>(p.a) + n * p.lda, p.lda, static_cast<const Acc*>(p.b) + c0 * W, p.ldb,
                       p.inner, bias, static_cast<Elem*>(p.y) + n * p.ldy + c0 * W, p.ldy, p.out - c0 * W, next);
  }
};

// Rows n0..n0+nr, output chunks c0..c0+C-1, in tiles of axpy_rows(C) rows, then single rows.
template <typename Tile, int C> inline void axpy_block(const NtArgs& p, int64_t n0, int64_t nr, int64_t c0) {
  using Elem = typename Tile::Elem;
  constexpr int R = axpy_rows(C);
  const Elem* a = static_cast<const Elem*>(p.a);
  // The tile whose rows a tile prefetches: axpy_prefetch_rows ahead, into the rows after this
  // call's (the glue hands out 64-row blocks: two threads, 262144x256 x 16, forward float32 21-22
  // -> 16-17 ms, bfloat16 17-18 -> 11-12 ms against stopping at the block's end), while a has rows
  // (single-row tail tiles prefetch nothing).
  const int64_t ahead = axpy_prefetch_rows(R, p.lda, sizeof(Elem), p.rows_readable);
  int64_t n = n0;
  if constexpr (R > 1) {
    for (; n + R <= n0 + nr; n += R)
      Tile::template run<R, C>(p, n, c0, n + ahead <= p.rows_readable - R ? a + (n + ahead) * p.lda : nullptr);
  }
  for (; n < n0 + nr; ++n) Tile::template run<1, C>(p, n, c0, nullptr);
}

// The axpy form's walk, for either tile kind: rows outer (a block of 8 rows of `a` stays in L1
// across the output chunks), chunks inner, up to 4 chunks of W outputs per tile.
template <typename Tile, int W> void axpy_walk(const NtArgs& p) {
  const int64_t chunks = (p.out + W - 1) / W;
  for (int64_t n0 = 0; n0 < p.rows; n0 += 8) {
    const int64_t nr = p.rows - n0 < 8 ? p.rows - n0 : 8;
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
      switch (chunks - c0 < 4 ? chunks - c0 : 4) {
        case 1: axpy_block<Tile, 1>(p, n0, nr, c0); break;
        case 2: axpy_block<Tile, 2>(p, n0, nr, c0); break;
        case 3: axpy_block<Tile, 3>(p, n0, nr, c0); break;
        default: axpy_block<Tile, 4>(p, n0, nr, c0); break;
      }
    }
  }
}

template <Fmt F> void nt_axpy(const NtArgs& p) { axpy_walk<AxpyFmaTile<F>, FmtTraits<F>::W>(p); }

// ----------------------------------------------------------------------------------------------
// axpy form for bfloat16 by pairs (ISA avx512_bf16): `vdpbf16ps` adds a[n, i] * B(o, i) +
// a[n, i + 1] * B(o, i + 1) to 16 float32 sums in one instruction, from a's two neighbouring
// values broadcast as one 32-bit lane and B^T packed in pairs of rows (linear.h): twice the
// products per instruction of the float32 FMAs of nt_axpy, with no conversion of a (which nt_axpy
// widens to a float32 strip). The products of two bfloat16 are exact in float32 as before; the
// instruction treats subnormal inputs as zero and flushes a subnormal result (|x| < 1.2e-38).

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTLIN_BF16_PAIRS __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int R, int C>
FASTLIN_BF16_PAIRS inline void axpy_pairs_tile(const uint16_t* a, int64_t lda, const uint32_t* bp, int64_t ldb,
                                               int64_t inner, const float* bias, uint16_t* y, int64_t ldy,
                                               int64_t left, const uint16_t* next) {
  using V = typename FmtTraits<Fmt::f32>::V;
  constexpr int W = 16;
  constexpr int64_t kLine = 32;  // bfloat16 per cache line
  __m512 acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t pairs = inner / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    if (next && (2 * j) % kLine == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(next + r * lda + 2 * j, 0, 3);
    __m512i bv[C];
    for (int c = 0; c < C; ++c) bv[c] = _mm512_loadu_si512(bp + j * ldb + c * W);
    for (int r = 0; r < R; ++r) {
      uint32_t two;
      std::memcpy(&two, a + r * lda + 2 * j, sizeof(two));
      const __m512bh s = (__m512bh)_mm512_set1_epi32(static_cast<int>(two));
      for (int c = 0; c < C; ++c) acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], s, (__m512bh)bv[c]);
    }
  }
  if (inner % 2) {  // the last value alone, against the zero half of the packed pair
    __m512i bv[C];
    for (int c = 0; c < C; ++c) bv[c] = _mm512_loadu_si512(bp + pairs * ldb + c * W);
    for (int r = 0; r < R; ++r) {
      const __m512bh s = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * lda + inner - 1]));
      for (int c = 0; c < C; ++c) acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], s, (__m512bh)bv[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      V v;
      std::memcpy(&v, &acc[r * C + c], sizeof(v));
      if (bias) v += vload<Fmt::f32>(bias + c * W);
      const int64_t m = left - c * W;
      if (m >= W) {
        vstore<Fmt::bf16>(y + r * ldy + c * W, v);
      } else {
        vstore_partial<Fmt::bf16>(y + r * ldy + c * W, v, m);
      }
    }
  }
}

struct AxpyPairsTile {
  using Elem = uint16_t;
  template <int R, int C>
  FASTLIN_BF16_PAIRS static inline void run(const NtArgs& p, int64_t n, int64_t c0, const Elem* next) {
    const float* bias = p.bias ? static_cast<const float*>(p.bias) + c0 * 16 : nullptr;
    axpy_pairs_tile<R, C>(static_cast<const Elem*>(p.a) + n * p.lda, p.lda, static_cast<const uint32_t*>(p.b) + c0 * 16,
                          p.ldb, p.inner, bias, static_cast<Elem*>(p.y) + n * p.ldy + c0 * 16, p.ldy,
                          p.out - c0 * 16, next);
  }
};

// (The walk itself is not compiled for avx512_bf16: it calls one tile per 8 rows x 16-64 outputs.)
inline void nt_axpy_pairs(const NtArgs& p) { axpy_walk<AxpyPairsTile, 16>(p); }
#undef FASTLIN_BF16_PAIRS
#endif

// ----------------------------------------------------------------------------------------------
// outer form (inner == 1)

template <Fmt F> void nt_outer(const NtArgs& p) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr Fmt AF = acc_fmt<F>();
  const Elem* a = static_cast<const Elem*>(p.a);
  const Acc* b = static_cast<const Acc*>(p.b);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  Elem* y = static_cast<Elem*>(p.y);
  if (p.out == 1 && p.lda == 1 && p.ldy == 1) {  // y = a * b0 + bias0 along the rows
    const V bv = vbcast<V>(b[0]), cv = vbcast<V>(bias ? bias[0] : Acc(0));
    int64_t n = 0;
    for (; n + W <= p.rows; n += W) vstore<F>(y + n, vload<F>(a + n) * bv + cv);
    if (n < p.rows) vstore_partial<F>(y + n, vload_partial<F>(a + n, p.rows - n) * bv + cv, p.rows - n);
  } else if (p.out >= W) {
    for (int64_t n = 0; n < p.rows; ++n) {
      const V s = vbcast<V>(to_acc<F>(a[n * p.lda]));
      for (int64_t c = 0; c < p.out; c += W) {
        V v = s * vload<AF>(b + c);
        if (bias) v += vload<AF>(bias + c);
        if (p.out - c >= W) {
          vstore<F>(y + n * p.ldy + c, v);
        } else {
          vstore_partial<F>(y + n * p.ldy + c, v, p.out - c);
        }
      }
    }
  } else {
    for (int64_t n = 0; n < p.rows; ++n) {
      const Acc s = to_acc<F>(a[n * p.lda]);
      for (int64_t o = 0; o < p.out; ++o) y[n * p.ldy + o] = from_acc<F>(s * b[o] + (bias ? bias[o] : Acc(0)));
    }
  }
}

// ----------------------------------------------------------------------------------------------
// grad_weight / grad_bias partials

template <Fmt F, int K, int C>
inline void tn_tile(const typename FmtTraits<F>::Elem* bc, int64_t ldbc, const typename FmtTraits<F>::Elem* vec,
                    int64_t ldvec, int64_t rows, int64_t kleft, int64_t vleft, typename FmtTraits<F>::Acc* part,
                    int64_t ldp, typename FmtTraits<F>::Acc* bsum_bc, typename FmtTraits<F>::Acc* bsum_vec,
                    int64_t pf_rows) {
  using T = FmtTraits<F>;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr Fmt AF = acc_fmt<F>();
  V acc[K * C];
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < C; ++c) acc[k * C + c] = vload<AF>(part + k * ldp + c * W);
  // Column sums of bc (grad_bias): a scalar chain per k, so kept in double (free for scalar adds)
  // and rounded once per tile: a float32 chain over the tile's rows lost 1e-5 of a sum that
  // cancels (N = 4097, O = 1).
  double bs[K];
  for (int k = 0; k < K; ++k) bs[k] = 0.0;
  V bv[C];
  for (int c = 0; c < C; ++c) bv[c] = bsum_vec ? vload<AF>(bsum_vec + c * W) : V{};
  const bool fullv = vleft >= C * W, fullk = kleft >= K;
  for (int64_t n = 0; n < rows; ++n) {
    const auto* vr = vec + n * ldvec;
    const auto* br = bc + n * ldbc;
    // Columns of the row kTnPrefetchRows ahead, for the first pf_rows rows (see kTnPrefetchRows).
    if (n < pf_rows)
      for (int c = 0; c < C; ++c) __builtin_prefetch(vr + kTnPrefetchRows * ldvec + c * W, 0, 2);
    V xv[C];
    if (fullv) {
      for (int c = 0; c < C; ++c) xv[c] = vload<F>(vr + c * W);
    } else {
      for (int c = 0; c < C; ++c) {
        const int64_t m = vleft - c * W;
        xv[c] = m >= W ? vload<F>(vr + c * W) : m > 0 ? vload_partial<F>(vr + c * W, m) : V{};
      }
    }
    for (int k = 0; k < K; ++k) {
      const Acc s = (fullk || k < kleft) ? to_acc<F>(br[k]) : Acc(0);
      if (bsum_bc) bs[k] += s;
      const V sv = vbcast<V>(s);
      for (int c = 0; c < C; ++c) acc[k * C + c] += sv * xv[c];
    }
    if (bsum_vec)
      for (int c = 0; c < C; ++c) bv[c] += xv[c];
  }
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < C; ++c) vstore<AF>(part + k * ldp + c * W, acc[k * C + c]);
  if (bsum_bc)
    for (int k = 0; k < K && k < kleft; ++k) bsum_bc[k] += static_cast<Acc>(bs[k]);
  if (bsum_vec)
    for (int c = 0; c < C; ++c) vstore<AF>(bsum_vec + c * W, bv[c]);
}

// One tn_tile of p: K outputs from k0 by C vectors of columns from vector c0, over rows n0..n0+nr.
// grad_bias rides along with the first tile of each row block (c0 == 0, or k0 == 0 when transposed).
template <Fmt F, int K, int C>
inline void tn_at(const TnArgs& p, int64_t n0, int64_t nr, int64_t k0, int64_t c0) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using Acc = typename T::Acc;
  constexpr int W = T::W;
  Acc* bsum = static_cast<Acc*>(p.bsum);
  tn_tile<F, K, C>(static_cast<const Elem*>(p.bc) + n0 * p.ldbc + k0, p.ldbc,
                   static_cast<const Elem*>(p.vec) + n0 * p.ldvec + c0 * W, p.ldvec, nr, p.kdim - k0, p.vdim - c0 * W,
                   static_cast<Acc*>(p.part) + k0 * p.ldp + c0 * W, p.ldp,
                   bsum && !p.bias_from_vec && c0 == 0 ? bsum + k0 : nullptr,
                   bsum && p.bias_from_vec && k0 == 0 ? bsum + c0 * W : nullptr,
                   k0 == 0 && p.vdim > C * W ? p.rows - n0 - kTnPrefetchRows : 0);
}

// tn_at with min(n, 4) vectors of columns.
template <Fmt F, int K>
inline void tn_at_upto4(const TnArgs& p, int64_t n0, int64_t nr, int64_t k0, int64_t c0, int64_t n) {
  switch (n < 4 ? n : 4) {
    case 1: tn_at<F, K, 1>(p, n0, nr, k0, c0); break;
    case 2: tn_at<F, K, 2>(p, n0, nr, k0, c0); break;
    case 3: tn_at<F, K, 3>(p, n0, nr, k0, c0); break;
    default: tn_at<F, K, 4>(p, n0, nr, k0, c0); break;
  }
}

template <Fmt F> void tn(const TnArgs& p) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  const Elem* bc = static_cast<const Elem*>(p.bc);
  const Elem* vec = static_cast<const Elem*>(p.vec);
  Acc* part = static_cast<Acc*>(p.part);
  Acc* bsum = static_cast<Acc*>(p.bsum);
  if (p.kdim == 1 && p.vdim == 1) {  // (N, 1) x (N, 1): one dot product along the rows
    const Elem* bias_src = p.bias_from_vec ? vec : bc;
    const int64_t ldb = p.bias_from_vec ? p.ldvec : p.ldbc;
    if (p.ldbc == 1 && p.ldvec == 1) {
      V s0{}, s1{}, b0{}, b1{};
      int64_t n = 0;
      for (; n + 2 * W <= p.rows; n += 2 * W) {
        const V u0 = vload<F>(bc + n), u1 = vload<F>(bc + n + W);
        const V v0 = vload<F>(vec + n), v1 = vload<F>(vec + n + W);
        s0 += u0 * v0;
        s1 += u1 * v1;
        b0 += p.bias_from_vec ? v0 : u0;
        b1 += p.bias_from_vec ? v1 : u1;
      }
      for (; n < p.rows; n += W) {
        const int64_t m = p.rows - n < W ? p.rows - n : W;
        const V u = vload_partial<F>(bc + n, m), v = vload_partial<F>(vec + n, m);
        s0 += u * v;
        b0 += p.bias_from_vec ? v : u;
      }
      part[0] += vhsum(s0 + s1);
      if (bsum) bsum[0] += vhsum(b0 + b1);
    } else {
      Acc s = 0, bsv = 0;
      for (int64_t n = 0; n < p.rows; ++n) {
        s += to_acc<F>(bc[n * p.ldbc]) * to_acc<F>(vec[n * p.ldvec]);
        bsv += to_acc<F>(bias_src[n * ldb]);
      }
      part[0] += s;
      if (bsum) bsum[0] += bsv;
    }
    return;
  }
  const int64_t chunks = (p.vdim + W - 1) / W;
  for (int64_t n0 = 0; n0 < p.rows; n0 += kTnRows) {
    const int64_t nr = p.rows - n0 < kTnRows ? p.rows - n0 : kTnRows;
    if (p.kdim == 1) {
      // One output (grad_weight of O = 1): K = 1 and kRegVecs vectors of the row per tile, so rows
      // of up to 256 float32 (avx512) stream through in one sequential pass (the K x 4 tiles read
      // each 128-row block four times, 64 columns at a time, with K - 1 FMAs on padding); the last
      // vectors of the row at most 4 at a time (no FMAs on absent columns).
      int64_t c0 = 0;
      for (; c0 + kRegVecs <= chunks; c0 += kRegVecs) tn_at<F, 1, kRegVecs>(p, n0, nr, 0, c0);
      for (; c0 < chunks; c0 += 4) tn_at_upto4<F, 1>(p, n0, nr, 0, c0, chunks - c0);
      continue;
    }
    for (int64_t k0 = 0; k0 < p.kdim; k0 += kTnK)
      for (int64_t c0 = 0; c0 < chunks; c0 += 4) tn_at_upto4<F, kTnK>(p, n0, nr, k0, c0, chunks - c0);
  }
}

template <Fmt F> void colsum(const void* g_, int64_t ldg, int64_t rows, int64_t cols, void* out_) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  constexpr Fmt AF = acc_fmt<F>();
  const Elem* g = static_cast<const Elem*>(g_);
  Acc* out = static_cast<Acc*>(out_);
  if (cols == 1 && ldg == 1) {
    V s0{}, s1{};
    int64_t n = 0;
    for (; n + 2 * W <= rows; n += 2 * W) {
      s0 += vload<F>(g + n);
      s1 += vload<F>(g + n + W);
    }
    for (; n < rows; n += W) s0 += vload_partial<F>(g + n, rows - n < W ? rows - n : W);
    out[0] += vhsum(s0 + s1);
    return;
  }
  for (int64_t c = 0; c < cols; c += W) {
    const int64_t m = cols - c < W ? cols - c : W;
    V s = vload<AF>(out + c);
    if (m == W) {
      for (int64_t n = 0; n < rows; ++n) s += vload<F>(g + n * ldg + c);
    } else {
      for (int64_t n = 0; n < rows; ++n) s += vload_partial<F>(g + n * ldg + c, m);
    }
    vstore<AF>(out + c, s);
  }
}

template <Fmt AF> void add_into(void* dst_, const void* src_, int64_t n) {
  using T = FmtTraits<AF>;
  using Elem = typename T::Elem;
  constexpr int W = T::W;
  Elem* dst = static_cast<Elem*>(dst_);
  const Elem* src = static_cast<const Elem*>(src_);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore<AF>(dst + i, vload<AF>(dst + i) + vload<AF>(src + i));
  for (; i < n; ++i) dst[i] += src[i];
}

}  // namespace linear_impl

inline LinearKernels linear_kernels_table() {
  using namespace linear_impl;
  LinearKernels t{};
  t.nt[kNtDot][kF32] = nt_dot<Fmt::f32>;
  t.nt[kNtDot][kF64] = nt_dot<Fmt::f64>;
  t.nt[kNtDot][kBF16] = nt_dot<Fmt::bf16>;
  t.nt[kNtDot][kF16] = nt_dot<Fmt::f16>;
  t.nt[kNtAxpy][kF32] = nt_axpy<Fmt::f32>;
  t.nt[kNtAxpy][kF64] = nt_axpy<Fmt::f64>;
  t.nt[kNtAxpy][kBF16] = nt_axpy<Fmt::bf16>;
  t.nt[kNtAxpy][kF16] = nt_axpy<Fmt::f16>;
  t.nt[kNtOuter][kF32] = nt_outer<Fmt::f32>;
  t.nt[kNtOuter][kF64] = nt_outer<Fmt::f64>;
  t.nt[kNtOuter][kBF16] = nt_outer<Fmt::bf16>;
  t.nt[kNtOuter][kF16] = nt_outer<Fmt::f16>;
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (kIsaLevel == 2) t.nt[kNtAxpyPairs][kBF16] = nt_axpy_pairs;  // run on avx512_bf16 CPUs only
#endif
  t.tn[kF32] = tn<Fmt::f32>;
  t.tn[kF64] = tn<Fmt::f64>;
  t.tn[kBF16] = tn<Fmt::bf16>;
  t.tn[kF16] = tn<Fmt::f16>;
  t.colsum[kF32] = colsum<Fmt::f32>;
  t.colsum[kF64] = colsum<Fmt::f64>;
  t.colsum[kBF16] = colsum<Fmt::bf16>;
  t.colsum[kF16] = colsum<Fmt::f16>;
  t.add_into[0] = add_into<Fmt::f32>;
  t.add_into[1] = add_into<Fmt::f64>;
  return t;
}

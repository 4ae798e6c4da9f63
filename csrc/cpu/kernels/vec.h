// Portable 64-byte SIMD vectors for the CPU kernels, written with GCC/Clang vector extensions.
// The same source becomes one AVX-512 register, two AVX2 registers or four SSE2 registers,
// depending on the `#pragma GCC target` of the ISA translation unit that includes it (isa.h).
// Included inside namespace fastlin::cpu::<isa>; includes nothing (isa_prelude.h has the headers).
//
// Storage types: float, double, and uint16_t for bfloat16 / float16 (kernels name the format
// with the Fmt tag). Arithmetic is float32 for 16-bit and float32 inputs, float64 for float64.
// FMA: `a * b + c` is contracted to a fused multiply-add where the ISA has one (-ffp-contract=fast),
// so results may differ between ISAs in the last bit; within one ISA and thread count they are
// deterministic.

// The ISA of this translation unit as a number, for tile sizes: GCC's C++ front end does not
// define __AVX2__ / __AVX512F__ after `#pragma GCC target`, so the kernels cannot test those.
#define FASTLIN_ISA_LEVEL_generic 0
#define FASTLIN_ISA_LEVEL_avx2 1
#define FASTLIN_ISA_LEVEL_avx512 2
#define FASTLIN_ISA_LEVEL_OF_(x) FASTLIN_ISA_LEVEL_##x
#define FASTLIN_ISA_LEVEL_OF(x) FASTLIN_ISA_LEVEL_OF_(x)
constexpr int kIsaLevel = FASTLIN_ISA_LEVEL_OF(FASTLIN_ISA);  // 0 generic, 1 avx2, 2 avx512

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));

enum class Fmt { f32, f64, bf16, f16 };

// Scalar / vector types for a storage format: Elem is what memory holds, Acc the arithmetic type.
template <Fmt F> struct FmtTraits;
template <> struct FmtTraits<Fmt::f32> { using Elem = float; using Acc = float; using V = f32x16; static constexpr int W = 16; };
template <> struct FmtTraits<Fmt::f64> { using Elem = double; using Acc = double; using V = f64x8; static constexpr int W = 8; };
template <> struct FmtTraits<Fmt::bf16> { using Elem = uint16_t; using Acc = float; using V = f32x16; static constexpr int W = 16; };
template <> struct FmtTraits<Fmt::f16> { using Elem = uint16_t; using Acc = float; using V = f32x16; static constexpr int W = 16; };

template <typename V> inline V vzero() { return V{}; }
// s - 0 (not 0 + s): folds to a plain broadcast (x - 0.0 == x for every x, -0.0 included).
template <typename V, typename S> inline V vbcast(S s) { return s - V{}; }

// 16-bit <-> float32 conversions of 16 lanes. GCC 12 scalarises __builtin_convertvector between
// _Float16 and float vectors unless the ISA has AVX512-FP16 (16 vcvtph2ps of one lane each, plus
// inserts) and splits the bf16 widening into two half conversions and a re-insert, so on x86 the
// two vector ISAs say it with intrinsics: vpmovzxwd + vpslld for bf16 -> float (exact), vcvtph2ps /
// vcvtps2ph for float16 (round to nearest even, like the scalar cast). Measured on one Zen 4 core,
// train_step 262144x256x1 with x in L3: float16 2.2 GB/s and bfloat16 15 GB/s before, against
// float32's 39 GB/s. The generic ISA keeps the portable form. (GCC 12 warns that the intrinsics'
// own placeholder operands are used uninitialized once they are inlined here: a false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if FASTLIN_ISA_LEVEL_OF(FASTLIN_ISA) == 2
inline f32x16 bf16_bits_to_f32(const uint16_t* p) {
  const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<f32x16>(_mm512_castsi512_ps(u));
}
inline f32x16 f16_bits_to_f32(const uint16_t* p) {
  return reinterpret_cast<f32x16>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
inline void f32_to_f16_bits(uint16_t* p, f32x16 v) {
  const __m256i h = _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
#define FASTLIN_VEC_X86_16BIT 1
#elif FASTLIN_ISA_LEVEL_OF(FASTLIN_ISA) == 1
inline __m128i load8x16(const uint16_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline f32x16 join_halves(__m256 lo, __m256 hi) {
  f32x16 v;
  __builtin_memcpy(&v, &lo, 32);
  __builtin_memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
}
inline __m256 bf16_half(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8x16(p)), 16));
}
inline f32x16 bf16_bits_to_f32(const uint16_t* p) { return join_halves(bf16_half(p), bf16_half(p + 8)); }
inline f32x16 f16_bits_to_f32(const uint16_t* p) {
  return join_halves(_mm256_cvtph_ps(load8x16(p)), _mm256_cvtph_ps(load8x16(p + 8)));
}
inline void f32_to_f16_bits(uint16_t* p, f32x16 v) {
  __m256 lo, hi;
  __builtin_memcpy(&lo, &v, 32);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(lo, kRne));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(hi, kRne));
}
#define FASTLIN_VEC_X86_16BIT 1
#else
#define FASTLIN_VEC_X86_16BIT 0
#endif
#pragma GCC diagnostic pop

// Full-width load/store of W elements (unaligned).
template <Fmt F> inline typename FmtTraits<F>::V vload(const typename FmtTraits<F>::Elem* p) {
  if constexpr (F == Fmt::f32 || F == Fmt::f64) {
    typename FmtTraits<F>::V v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  } else if constexpr (FASTLIN_VEC_X86_16BIT && F == Fmt::bf16) {
    return bf16_bits_to_f32(p);
  } else if constexpr (FASTLIN_VEC_X86_16BIT) {
    return f16_bits_to_f32(p);
  } else if constexpr (F == Fmt::bf16) {
    u16x16 h;
    __builtin_memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v;
    __builtin_memcpy(&v, &u, sizeof v);
    return v;
  } else {
    f16x16 h;
    __builtin_memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, f32x16);
  }
}

// float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline u16x16 f32_to_bf16_bits(f32x16 v) {
  u32x16 u;
  __builtin_memcpy(&u, &v, sizeof u);
  u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  u32x16 nan = (u >> 16) | 0x40u;
  u32x16 is_nan = (u32x16)((u & 0x7fffffffu) > 0x7f800000u);
  return __builtin_convertvector((is_nan & nan) | (~is_nan & rounded), u16x16);
}

template <Fmt F> inline void vstore(typename FmtTraits<F>::Elem* p, typename FmtTraits<F>::V v) {
  if constexpr (F == Fmt::f32 || F == Fmt::f64) {
    __builtin_memcpy(p, &v, sizeof v);
  } else if constexpr (F == Fmt::bf16) {
    u16x16 h = f32_to_bf16_bits(v);
    __builtin_memcpy(p, &h, sizeof h);
  } else if constexpr (FASTLIN_VEC_X86_16BIT) {
    f32_to_f16_bits(p, v);
  } else {
    f16x16 h = __builtin_convertvector(v, f16x16);
    __builtin_memcpy(p, &h, sizeof h);
  }
}

// Tail load/store of n < W elements (missing lanes read as zero).
template <Fmt F> inline typename FmtTraits<F>::V vload_partial(const typename FmtTraits<F>::Elem* p, int64_t n) {
  typename FmtTraits<F>::Elem buf[FmtTraits<F>::W] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return vload<F>(buf);
}

template <Fmt F> inline void vstore_partial(typename FmtTraits<F>::Elem* p, typename FmtTraits<F>::V v, int64_t n) {
  typename FmtTraits<F>::Elem buf[FmtTraits<F>::W];
  vstore<F>(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

// Scalar conversions.
template <Fmt F> inline typename FmtTraits<F>::Acc to_acc(typename FmtTraits<F>::Elem e) {
  if constexpr (F == Fmt::f32 || F == Fmt::f64) {
    return e;
  } else if constexpr (F == Fmt::bf16) {
    uint32_t u = static_cast<uint32_t>(e) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
  } else {
    _Float16 h;
    __builtin_memcpy(&h, &e, sizeof h);
    return static_cast<float>(h);
  }
}

template <Fmt F> inline typename FmtTraits<F>::Elem from_acc(typename FmtTraits<F>::Acc a) {
  if constexpr (F == Fmt::f32 || F == Fmt::f64) {
    return a;
  } else if constexpr (F == Fmt::bf16) {
    uint32_t u;
    __builtin_memcpy(&u, &a, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  } else {
    _Float16 h = static_cast<_Float16>(a);
    uint16_t e;
    __builtin_memcpy(&e, &h, sizeof e);
    return e;
  }
}

// Lane sum in a fixed pairwise order (deterministic, and more accurate than a running sum).
inline float vhsum(f32x16 v) {
  float s8[8], s4[4];
  for (int i = 0; i < 8; ++i) s8[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

inline double vhsum(f64x8 v) {
  double s4[4];
  for (int i = 0; i < 4; ++i) s4[i] = v[i] + v[i + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Run-time choice of the CPU instruction set for the raw-pointer kernels in csrc/cpu/kernels/.
//
// Mechanism (one for every kernel family): a family's kernels are written once, as templates over
// raw pointers in csrc/cpu/kernels/<family>_impl.h, using the portable vector type of vec.h. That
// header is compiled three times, by isa_generic.cpp, isa_avx2.cpp and isa_avx512.cpp, each under
// its own `#pragma GCC target` and inside its own namespace (generic / avx2 / avx512). The family's
// table of function pointers (csrc/cpu/kernels/<family>.h) is picked once per process from the best
// ISA this CPU supports, so the build never probes the build machine's hardware.
//
// FASTLIN_CPU_ISA=generic|avx2|avx512|avx512_bf16 caps the choice (the tests run every ISA the CPU
// has). avx512_bf16 is avx512 plus `vdpbf16ps`: the avx512 tables, with bfloat16 `linear` in the
// axpy form taking pairs of products per instruction (linear_impl.h, nt_axpy_pairs).
// OpenMP stays out of the ISA translation units: the glue forks threads and calls the kernels
// per thread on row ranges.
#pragma once

#include <cstdlib>
#include <cstring>

namespace fastlin::cpu {

enum class Isa { generic = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

inline Isa detect_isa() {
  Isa best = Isa::generic;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::avx2;
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::avx512;
  if (best == Isa::avx512 && __builtin_cpu_supports("avx512bf16")) best = Isa::avx512_bf16;
#endif
  if (const char* cap = std::getenv("FASTLIN_CPU_ISA")) {
    Isa want = !std::strcmp(cap, "avx512_bf16") ? Isa::avx512_bf16
               : !std::strcmp(cap, "avx512")    ? Isa::avx512
               : !std::strcmp(cap, "avx2")      ? Isa::avx2
                                                : Isa::generic;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

// The ISA chosen for this process (read once; FASTLIN_CPU_ISA must be set before first use).
inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace fastlin::cpu

// Declares the per-ISA accessors of a family table and a dispatching accessor `NAME()`:
//   FASTLIN_ISA_TABLE(FusedKernels, fused_kernels)
// declares fused_kernels_generic(), fused_kernels_avx2(), fused_kernels_avx512() (defined by the
// ISA translation units through FASTLIN_DEFINE_ISA_TABLE) and `const FusedKernels& fused_kernels()`.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTLIN_ISA_TABLE(TYPE, NAME)                                       \
  const TYPE& NAME##_generic();                                             \
  const TYPE& NAME##_avx2();                                                \
  const TYPE& NAME##_avx512();                                              \
  inline const TYPE& NAME() {                                               \
    switch (::fastlin::cpu::cpu_isa()) {                                    \
      case ::fastlin::cpu::Isa::avx512_bf16:                                \
      case ::fastlin::cpu::Isa::avx512: return NAME##_avx512();             \
      case ::fastlin::cpu::Isa::avx2: return NAME##_avx2();                 \
      default: return NAME##_generic();                                     \
    }                                                                       \
  }
#else
#define FASTLIN_ISA_TABLE(TYPE, NAME) \
  const TYPE& NAME##_generic();       \
  inline const TYPE& NAME() { return NAME##_generic(); }
#endif

#define FASTLIN_PASTE2(a, b) a##_##b
#define FASTLIN_PASTE(a, b) FASTLIN_PASTE2(a, b)
// Used in kernels/all_impl.inc: defines NAME_<isa>() from the family's NAME_table() of the
// current ISA namespace.
#define FASTLIN_ISA_ACCESSOR(TYPE, NAME)                   \
  const TYPE& FASTLIN_PASTE(NAME, FASTLIN_ISA)() {         \
    static const TYPE table = FASTLIN_ISA::NAME##_table(); \
    return table;                                          \
  }

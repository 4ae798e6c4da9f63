// The CPU kernels compiled for the avx2 instruction set (see csrc/cpu/isa.h).
#include "cpu/kernels/isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define FASTLIN_ISA avx2
#include "cpu/kernels/all_impl.inc"
#endif

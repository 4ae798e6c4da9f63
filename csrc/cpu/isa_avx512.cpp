// The CPU kernels compiled for the avx512 instruction set (see csrc/cpu/isa.h).
#include "cpu/kernels/isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#define FASTLIN_ISA avx512
#include "cpu/kernels/all_impl.inc"
#endif

// The CPU kernels compiled for the baseline instruction set of the target (see csrc/cpu/isa.h).
#include "cpu/kernels/isa_prelude.h"

#define FASTLIN_ISA generic
#include "cpu/kernels/all_impl.inc"

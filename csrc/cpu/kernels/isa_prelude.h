// Everything the ISA translation units include before their `#pragma GCC target`: the std
// headers the kernels use and the family table declarations. Kernel headers include nothing.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#if defined(__x86_64__)
#include <immintrin.h>  // vec.h's 16-bit conversions (declared for every target; used under the ISA's pragma)
#endif

#include "cpu/isa.h"
#include "cpu/kernels/linear.h"
#include "cpu/kernels/mse.h"
#include "cpu/kernels/sgd.h"
#include "cpu/kernels/gram.h"
#include "cpu/kernels/fused.h"

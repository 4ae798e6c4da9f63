// CPU linear forward/backward: checks, packing and threading around the raw-pointer kernels of
// csrc/cpu/kernels/linear_impl.h (chosen per ISA at run time).
//
// Why not ATen's GEMM: torch's CPU build calls MKL, which on this AMD Zen 4 runs these shapes far
// below the memory and FMA limits (stock F.linear N=262144 D=256 O=16: 70 ms = 4 GB/s of x, the
// machine reads 24 GB/s; go.mm(w) for grad_input: 166 ms), and at N = 100 its per-call overhead
// dominates. The own kernels read x once at close to the read bandwidth (one thread,
// N=262144: D=64 O=1 22.7 GB/s vs MKL 20; D=64 O=16 3.9x MKL; D=1 O=1 5x). For large O and D
// both (where a blocked GEMM's reuse of the weight wins) the op hands the whole product to ATen
// (use_aten_gemm below, with the measurement).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu/cpu_util.h"
#include "cpu/kernels/linear.h"

namespace fastlin {
namespace {

using cpu::NtArgs;
using cpu::TnArgs;

// ATen (MKL) for the forward / grad_input products once both dimensions are large: the own
// kernels keep B in L1/L2 and stream `a` once, with no cache blocking of B, which stops paying
// as B grows. Measured (one thread, N = 4096, float32, GF/s own vs MKL): D=O=127: 92 vs 64;
// D=512 O=64: 99 vs 72; D=64 O=512: 74 vs 76 (parity); at D=O=128 MKL already holds its own.
bool use_aten_gemm(int64_t inner, int64_t out) { return inner >= 128 && out >= 128 && inner * out >= (1 << 16); }

// Size of the packed B for the chosen form (linear.h).
inline int64_t packed_size(int form, int64_t out, int64_t inner, int64_t ldb) {
  return form == cpu::kNtDot ? out * ldb : form == cpu::kNtAxpy ? inner * ldb : ldb;
}

// B(o, i) = transposed ? src[i, o] : src[o, i], packed in Acc for the chosen form (linear.h)
// into the zero-filled buf.
template <typename scalar_t, typename Acc>
void pack_b(const at::Tensor& src, bool transposed, int form, int64_t out, int64_t inner, int64_t ldb, Acc* buf) {
  const scalar_t* s = src.data_ptr<scalar_t>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  auto at2 = [&](int64_t o, int64_t i) -> Acc {
    return static_cast<Acc>(transposed ? s[i * s0 + o * s1] : s[o * s0 + i * s1]);
  };
  if (form == cpu::kNtDot) {
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < inner; ++i) buf[o * ldb + i] = at2(o, i);
  } else if (form == cpu::kNtAxpy) {
    for (int64_t i = 0; i < inner; ++i)
      for (int64_t o = 0; o < out; ++o) buf[i * ldb + o] = at2(o, i);
  } else {
    for (int64_t o = 0; o < out; ++o) buf[o] = at2(o, 0);
  }
}

// B^T in pairs of rows as bfloat16 bits for kNtAxpyPairs (linear.h), into the zero-filled buf.
void pack_b_pairs(const at::Tensor& src, bool transposed, int64_t out, int64_t inner, int64_t ldb, uint32_t* buf) {
  const c10::BFloat16* s = src.data_ptr<c10::BFloat16>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  for (int64_t i = 0; i < inner; ++i) {
    const int shift = (i % 2) * 16;
    uint32_t* row = buf + (i / 2) * ldb;
    for (int64_t o = 0; o < out; ++o)
      row[o] |= static_cast<uint32_t>((transposed ? s[i * s0 + o * s1] : s[o * s0 + i * s1]).x) << shift;
  }
}

// y (rows x out) = a (rows x inner) @ B^T + bias, B(o, i) from `src` (see pack_b).
template <typename scalar_t>
void nt_run(const at::Tensor& a_in, const at::Tensor& src, bool transposed, const c10::optional<at::Tensor>& bias,
            at::Tensor& y, int64_t rows, int64_t inner, int64_t out) {
  using Acc = at::opmath_type<scalar_t>;
  const int64_t W = cpu::acc_lanes(y.scalar_type());
  // out >= lanes: axpy (measured 110 GF/s in cache at D=256 O=16, one thread; the dot form with
  // its 16-way lane fold reached 68 GF/s there).
  int form = inner == 1 ? cpu::kNtOuter : out >= W ? cpu::kNtAxpy : cpu::kNtDot;
  const auto& kernels = cpu::linear_kernels().nt;
  const int fmt = cpu::fmt_index(y.scalar_type());
  // bfloat16 on avx512_bf16 CPUs: pairs of products per instruction (linear_impl.h's
  // nt_axpy_pairs). One Zen 4 core, 4096x256 x 16 outputs in cache: 182-186 GFLOP/s against
  // nt_axpy's 100-103; 262144x256 x 64 from DRAM 137 against 85.
  if (form == cpu::kNtAxpy && y.scalar_type() == at::kBFloat16 && cpu::cpu_isa() == cpu::Isa::avx512_bf16 &&
      kernels[cpu::kNtAxpyPairs][fmt] != nullptr)
    form = cpu::kNtAxpyPairs;
  const int64_t ldb = form == cpu::kNtDot ? cpu::round_up(inner, W) : cpu::round_up(out, W);
  const bool pairs = form == cpu::kNtAxpyPairs;
  cpu::Scratch<Acc> b(pairs ? 0 : static_cast<size_t>(packed_size(form, out, inner, ldb)));
  cpu::Scratch<uint32_t> bpair(pairs ? static_cast<size_t>((inner + 1) / 2 * ldb) : 0);
  if (pairs) {
    pack_b_pairs(src, transposed, out, inner, ldb, bpair.data());
  } else {
    pack_b<scalar_t, Acc>(src, transposed, form, out, inner, ldb, b.data());
  }
  const bool with_bias = has(bias);
  cpu::Scratch<Acc, 64> bb(with_bias ? static_cast<size_t>(cpu::round_up(out, W)) : 0);
  if (with_bias) {
    const scalar_t* bp = bias->data_ptr<scalar_t>();
    const int64_t bs = bias->stride(0);
    for (int64_t o = 0; o < out; ++o) bb[o] = static_cast<Acc>(bp[o * bs]);
  }
  const at::Tensor a = cpu::as_rows(a_in);
  NtArgs args{a.data_ptr(), cpu::row_stride(a), pairs ? static_cast<const void*>(bpair.data()) : b.data(), ldb,
              with_bias ? bb.data() : nullptr,
              y.data_ptr(),  out,                rows,     inner, out,  rows};
  const auto kernel = kernels[form][fmt];
  const int nt = cpu::threads_for(static_cast<double>(rows) * (inner * out + inner + out));
  if (nt == 1) {
    kernel(args);
    return;
  }
  // Row blocks of 64 (a multiple of every row tile); each block's result does not depend on
  // which thread runs it.
  const int64_t blocks = (rows + 63) / 64;
  const size_t esz = y.element_size();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    NtArgs p = args;
    const int64_t n0 = blk * 64;
    p.rows = rows - n0 < 64 ? rows - n0 : 64;
    p.rows_readable = rows - n0;  // the blocks after this one: the prefetch runs on into them
    p.a = static_cast<const char*>(args.a) + n0 * args.lda * static_cast<int64_t>(esz);
    p.y = static_cast<char*>(args.y) + n0 * args.ldy * static_cast<int64_t>(esz);
    kernel(p);
  }
}

template <typename scalar_t>
void linear_forward_impl(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::Tensor& y) {
  nt_run<scalar_t>(input, weight, /*transposed=*/false, bias, y, input.size(0), input.size(1), weight.size(0));
}

at::Tensor linear_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear_args("linear", input, weight, bias);
  const int64_t N = input.size(0), D = input.size(1), O = weight.size(0);
  if (use_aten_gemm(D, O)) return has(bias) ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
  auto y = at::empty({N, O}, input.options());
  if (N == 0 || O == 0) return y;
  if (D == 0) {  // no features: y = bias (or 0), like torch
    y.zero_();
    if (has(bias)) y.add_(*bias);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fastlin_linear", [&] {
    linear_forward_impl<scalar_t>(input, weight, bias, y);
  });
  return y;
}

// grad_weight = g^T @ x and/or grad_bias = sum_n g, over fixed row chunks (partials) reduced in
// a fixed pairwise order: the result depends on N only, not on the number of threads.
template <typename scalar_t>
void grad_weight_bias(const at::Tensor& g_in, const at::Tensor* x_in, at::Tensor* gw, at::Tensor* gb) {
  using Acc = at::opmath_type<scalar_t>;
  const int64_t N = g_in.size(0), O = g_in.size(1), D = x_in ? x_in->size(1) : 0;
  const int64_t W = cpu::acc_lanes(g_in.scalar_type());
  const int fmt = cpu::fmt_index(g_in.scalar_type());
  const auto& K = cpu::linear_kernels();
  const at::Tensor g = cpu::as_rows(g_in);
  const at::Tensor x = x_in ? cpu::as_rows(*x_in) : at::Tensor();
  // D < lanes and O >= lanes: vectorise along O instead (the kernel computes grad_weight^T).
  const bool swapped = x_in && D < W && O >= W;
  const int64_t kdim = x_in ? (swapped ? D : O) : 0, vdim = x_in ? (swapped ? O : D) : 0;
  const int64_t kpad = cpu::round_up(kdim, 4), ldp = cpu::round_up(vdim, W);
  const int64_t blen = cpu::round_up(swapped ? ldp : O, W);
  const int64_t M = kpad * ldp + blen;
  constexpr int64_t kChunkRows = 1024, kMaxParts = 64;
  int64_t P = (N + kChunkRows - 1) / kChunkRows;
  P = P < 1 ? 1 : P > kMaxParts ? kMaxParts : P;
  const int64_t rows_per = (N + P - 1) / P;
  P = N == 0 ? 1 : (N + rows_per - 1) / rows_per;
  cpu::Scratch<Acc> parts(static_cast<size_t>(P * M));
  const size_t esz = g.element_size();
  const char* gbase = static_cast<const char*>(g.data_ptr());
  const char* xbase = x_in ? static_cast<const char*>(x.data_ptr()) : nullptr;
  const int64_t ldg = cpu::row_stride(g), ldx = x_in ? cpu::row_stride(x) : 0;
  auto run_part = [&](int64_t p) {
    const int64_t n0 = p * rows_per, nr = std::min(rows_per, N - n0);
    if (nr <= 0) return;
    Acc* part = parts.data() + p * M;
    Acc* bsum = gb ? part + kpad * ldp : nullptr;
    const char* gp = gbase + n0 * ldg * static_cast<int64_t>(esz);
    if (!x_in) {
      K.colsum[fmt](gp, ldg, nr, O, bsum);
      return;
    }
    const char* xp = xbase + n0 * ldx * static_cast<int64_t>(esz);
    TnArgs a{swapped ? xp : gp, swapped ? ldx : ldg, swapped ? gp : xp, swapped ? ldg : ldx, nr, kdim, vdim, part,
             ldp, bsum, swapped};
    K.tn[fmt](a);
  };
  const int nt = std::min<int64_t>(cpu::threads_for(static_cast<double>(N) * (O * (D + 1) + D)), P);
  if (nt <= 1) {
    for (int64_t p = 0; p < P; ++p) run_part(p);
  } else {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < P; ++p) run_part(p);
  }
  for (int64_t s = 1; s < P; s *= 2)
    for (int64_t p = 0; p + s < P; p += 2 * s)
      K.add_into[W == 8 ? 1 : 0](parts.data() + p * M, parts.data() + (p + s) * M, M);
  const Acc* r = parts.data();
  if (gw) {
    scalar_t* o = gw->data_ptr<scalar_t>();
    for (int64_t i = 0; i < O; ++i)
      for (int64_t d = 0; d < D; ++d) o[i * D + d] = static_cast<scalar_t>(swapped ? r[d * ldp + i] : r[i * ldp + d]);
  }
  if (gb) {
    scalar_t* o = gb->data_ptr<scalar_t>();
    for (int64_t i = 0; i < O; ++i) o[i] = static_cast<scalar_t>(r[kpad * ldp + i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& weight,
                                                                   std::array<bool, 3> mask) {
  const char* op = "linear_backward";
  check_linear_args(op, input, weight, c10::nullopt);
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  check_same_device(op, "grad_output", grad_output, "input", input);
  check_shape(op, "grad_output", grad_output, {input.size(0), weight.size(0)}, "(N, out_features)");
  const int64_t N = input.size(0), D = input.size(1), O = weight.size(0);
  const auto opts = input.options();
  at::Tensor gi, gw, gb;
  // With a mask bit off the matching input may be a zero-storage stand-in (fastlin/autograd.py):
  // grad_input reads only grad_output and weight, grad_weight only grad_output and input.
  if (mask[0]) {
    if (use_aten_gemm(O, D)) {
      gi = at::mm(grad_output, weight);
    } else {
      gi = at::empty({N, D}, opts);
      if (N > 0 && D > 0) {
        if (O == 0) {
          gi.zero_();
        } else {
          AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fastlin_linear_gi", [&] {
            nt_run<scalar_t>(grad_output, weight, /*transposed=*/true, c10::nullopt, gi, N, O, D);
          });
        }
      }
    }
  }
  if (mask[1] && use_aten_gemm(O, D)) {
    gw = at::mm(grad_output.t(), input);
    if (mask[2]) gb = grad_output.sum(0);
  } else if (mask[1] || mask[2]) {
    if (mask[1]) gw = at::empty({O, D}, opts);
    if (mask[2]) gb = at::empty({O}, opts);
    if (N == 0 || O == 0) {
      if (mask[1]) gw.zero_();
      if (mask[2]) gb.zero_();
    } else if (mask[1] && D == 0) {
      if (mask[2]) gb.copy_(grad_output.sum(0));
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "fastlin_linear_gw", [&] {
        grad_weight_bias<scalar_t>(grad_output, mask[1] ? &input : nullptr, mask[1] ? &gw : nullptr,
                                   mask[2] ? &gb : nullptr);
      });
    }
  }
  auto empty = [&] { return at::empty({0}, opts); };
  return {mask[0] ? gi : empty(), mask[1] ? gw : empty(), mask[2] ? gb : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) {
  m.impl("linear", &linear_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
}

}  // namespace fastlin

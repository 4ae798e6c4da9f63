// CPU MSE loss forward/backward: checks, layout and threading around the elementwise kernels of
// csrc/cpu/kernels/mse_impl.h. Any shape (0-d and empty included). Reduced losses: the elements
// are cut into fixed chunks (independent of the thread count), each chunk sums its squares in
// float32 lanes (float64 for float64), and the chunk sums are added in double in chunk order:
// deterministic, and accurate for large N.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_util.h"
#include "cpu/kernels/mse.h"

namespace fastlin {
namespace {

constexpr int64_t kChunk = 4096;  // elements per chunk sum (256 per float32 lane)

// Operands as `rows` rows of `cols` elements (base + r * ld): one flat row when every operand is
// contiguous; rows of a 2-D tensor with unit column stride (a row stride, or stride 0 for an
// expanded dimension) when that avoids a copy and rows are long enough to vectorise; else one
// contiguous copy of the operands that need it. (Fixed arrays: no allocation for small calls.)
struct Layout {
  int64_t rows = 1, cols = 0;
  int n = 0;
  at::Tensor t[3];  // the operands as used (kept alive)
  int64_t ld[3] = {0, 0, 0};
};

Layout layout(const at::Tensor& a, const at::Tensor& b, const at::Tensor* c = nullptr) {
  Layout L;
  const at::Tensor* ops[3] = {&a, &b, c};
  L.n = c ? 3 : 2;
  bool all_contig = true, rowable = a.dim() == 2 && a.size(1) >= 64;
  for (int i = 0; i < L.n; ++i) {
    all_contig = all_contig && ops[i]->is_contiguous();
    rowable = rowable && ops[i]->stride(1) == 1;
  }
  if (!all_contig && rowable) {
    L.rows = a.size(0);
    L.cols = a.size(1);
    for (int i = 0; i < L.n; ++i) {
      L.t[i] = *ops[i];
      L.ld[i] = ops[i]->stride(0);
    }
    return L;
  }
  L.cols = a.numel();
  for (int i = 0; i < L.n; ++i) L.t[i] = ops[i]->is_contiguous() ? *ops[i] : ops[i]->contiguous();
  return L;
}

// Work items: spans (row, column start, length) of at most kChunk elements, numbered in a fixed
// order (row-major), independent of the thread count.
struct Span {
  int64_t row, col, len;
};
struct Spans {
  int64_t per_row, count, cols;
  explicit Spans(const Layout& L)
      : per_row((L.cols + kChunk - 1) / kChunk), count(L.rows * ((L.cols + kChunk - 1) / kChunk)), cols(L.cols) {}
  Span operator[](int64_t i) const {
    const int64_t r = i / per_row, c = (i % per_row) * kChunk;
    return {r, c, std::min(kChunk, cols - c)};
  }
};

template <typename F>
void for_spans(const Spans& s, int64_t numel, F&& f) {
  const int nt = cpu::threads_for(4.0 * static_cast<double>(numel));
  const int64_t n = s.count;
  if (nt <= 1 || n < 2) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i);
}

inline const void* at_elem(const at::Tensor& t, int64_t ld, const Span& sp) {
  return static_cast<const char*>(t.data_ptr()) + (sp.row * ld + sp.col) * static_cast<int64_t>(t.element_size());
}

void write_scalar(at::Tensor& out, double v) {
  switch (out.scalar_type()) {
    case at::kDouble: *out.data_ptr<double>() = v; break;
    case at::kFloat: *out.data_ptr<float>() = static_cast<float>(v); break;
    case at::kBFloat16: *out.data_ptr<at::BFloat16>() = at::BFloat16(static_cast<float>(v)); break;
    default: *out.data_ptr<at::Half>() = at::Half(static_cast<float>(v)); break;
  }
}

double read_scalar(const at::Tensor& t) {
  const void* p = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kFloat: return *static_cast<const float*>(p);
    case at::kBFloat16: return static_cast<float>(*static_cast<const at::BFloat16*>(p));
    default: return static_cast<float>(*static_cast<const at::Half*>(p));
  }
}

at::Tensor mse_loss_cpu(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction) {
  check_mse_args("mse_loss", input, target, reduction);
  const int fmt = cpu::fmt_index(input.scalar_type());
  const auto& K = cpu::mse_kernels();
  const int64_t n = input.numel();
  if (reduction == "none") {
    auto out = at::empty(input.sizes(), input.options());
    if (n == 0) return out;
    const Layout L = layout(input, target);
    const Spans s(L);
    char* o = static_cast<char*>(out.data_ptr());
    const int64_t esz = out.element_size();
    for_spans(s, n, [&](int64_t i) {
      const Span sp = s[i];
      K.sq[fmt](at_elem(L.t[0], L.ld[0], sp), at_elem(L.t[1], L.ld[1], sp), o + (sp.row * L.cols + sp.col) * esz,
                sp.len);
    });
    return out;
  }
  auto out = at::empty({}, input.options());
  double total = 0.0;
  if (n > 0) {
    const Layout L = layout(input, target);
    const Spans s(L);
    if (s.count == 1) {
      const Span sp = s[0];
      total = K.sum_sq[fmt](at_elem(L.t[0], L.ld[0], sp), at_elem(L.t[1], L.ld[1], sp), sp.len);
    } else {
      std::vector<double> part(static_cast<size_t>(s.count));
      for_spans(s, n, [&](int64_t i) {
        const Span sp = s[i];
        part[i] = K.sum_sq[fmt](at_elem(L.t[0], L.ld[0], sp), at_elem(L.t[1], L.ld[1], sp), sp.len);
      });
      for (double v : part) total += v;  // chunk order: deterministic
    }
  }
  if (reduction == "mean") total = n > 0 ? total / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
  write_scalar(out, total);
  return out;
}

at::Tensor mse_loss_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
                                 c10::string_view reduction) {
  const char* op = "mse_loss_backward";
  check_mse_args(op, input, target, reduction);
  check_mse_grad_output(op, grad_output, input);
  const int64_t n = input.numel();
  auto out = at::empty(input.sizes(), input.options());
  if (n == 0) return out;
  at::Tensor g = grad_output;
  if (g.sizes() != input.sizes() && g.numel() != 1) g = g.expand(input.sizes());
  bool scalar = g.numel() == 1;
  if (!scalar) {
    scalar = true;
    for (int64_t d = 0; d < g.dim(); ++d) scalar = scalar && (g.stride(d) == 0 || g.size(d) == 1);
  }
  const double g_scalar = scalar ? read_scalar(g) : 0.0;
  const double scale = reduction == "mean" ? 2.0 / static_cast<double>(n) : 2.0;
  const int fmt = cpu::fmt_index(input.scalar_type());
  const auto& K = cpu::mse_kernels();
  const Layout L = scalar ? layout(input, target) : layout(input, target, &g);
  const Spans s(L);
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t esz = out.element_size();
  for_spans(s, n, [&](int64_t i) {
    const Span sp = s[i];
    K.bwd[fmt](at_elem(L.t[0], L.ld[0], sp), at_elem(L.t[1], L.ld[1], sp),
               scalar ? nullptr : at_elem(L.t[2], L.ld[2], sp), g_scalar, scale,
               o + (sp.row * L.cols + sp.col) * esz, sp.len);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) {
  m.impl("mse_loss", &mse_loss_cpu);
  m.impl("mse_loss_backward", &mse_loss_backward_cpu);
}

}  // namespace fastlin

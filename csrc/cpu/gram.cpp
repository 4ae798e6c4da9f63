// CPU augmented Gram matrix (schema in csrc/ops.cpp): G = Z^T diag(w) Z for Z = [input, 1, target],
// float64 (P, P), in one read of input/target. Glue around csrc/cpu/kernels/gram_impl.h:
//   - the rows are cut into fixed chunks of kChunkRows (independent of the thread count), handed
//     to the OpenMP threads in order (dynamic), each chunk summed by one thread into its own float64
//     partial, and the partials added in chunk order at the end: bit-identical results for any
//     thread count (within one ISA);
//   - the kernels work on shifted rows Z' = Z - 1 c^T (c = row 0 of [input, 0, target]), which
//     keeps float32 products accurate when the data's mean is large against its spread; the shift
//     is undone here, exactly in float64: with g = G'[:, D] (the ones column) and s = G'[D, D],
//     G = G' + g c^T + c g^T + s c c^T.
// Any strides (unit-stride rows, column-major and general strided layouts are read in place).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu/cpu_util.h"
#include "cpu/kernels/gram.h"

namespace fastlin {
namespace {

// Rows per chunk, at least: a multiple of the kernels' blocks, long enough that a chunk's float64
// partial (ld^2 doubles, 41 KB for P = 66) is cheap to add, short enough to balance 2 threads.
constexpr int64_t kChunkRows = 8192;
// Bound on the memory of all chunk partials (more rows per chunk beyond it).
constexpr int64_t kPartialBytes = int64_t(8) << 20;

void check_gram_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                     const c10::optional<at::Tensor>& sample_weight) {
  check_defined(op, "input", input);
  check_defined(op, "target", target);
  check_dim(op, "input", input, 2, "(N, in_features)");
  check_dim(op, "target", target, 2, "(N, out_features)");
  check_floating(op, "input", input);
  check_same_dtype(op, "target", target, "input", input);
  check_same_device(op, "target", target, "input", input);
  check_shape(op, "target", target, {input.size(0), target.size(1)}, "(N, out_features) with input's N");
  if (has(sample_weight)) {
    check_same_dtype(op, "sample_weight", *sample_weight, "input", input);
    check_same_device(op, "sample_weight", *sample_weight, "input", input);
    check_shape(op, "sample_weight", *sample_weight, {input.size(0)}, "(N,)");
  }
}

at::Tensor gram_cpu(const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& sample_weight) {
  check_gram_args("gram", input, target, sample_weight);
  const int64_t N = input.size(0), D = input.size(1), O = target.size(1), P = D + 1 + O;
  auto out = at::empty({P, P}, input.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  if (N == 0) {
    std::fill(o, o + P * P, 0.0);
    return out;
  }
  const int fmt = cpu::fmt_index(input.scalar_type());
  const auto& K = cpu::gram_kernels();
  const cpu::GramPlan plan = K.plan[fmt](P);
  const int64_t ld = plan.ld;
  const bool weighted = has(sample_weight);
  cpu::GramArgs a{};
  a.x = input.data_ptr();
  a.sx0 = input.stride(0);
  a.sx1 = input.stride(1);
  a.y = target.data_ptr();
  a.sy0 = target.stride(0);
  a.sy1 = target.stride(1);
  a.w = weighted ? sample_weight->data_ptr() : nullptr;
  a.sw = weighted ? sample_weight->stride(0) : 0;
  a.D = D;
  a.O = O;

  std::vector<double> c(static_cast<size_t>(P));
  K.shift[fmt](a, c.data());

  // Fixed chunks (they depend on N and P only): at least kChunkRows rows, and few enough that the
  // per-chunk float64 partials fit in kPartialBytes (at least 2 chunks: for a huge P the partials
  // then take twice the output's memory).
  const int64_t partial = ld * ld;
  const int64_t max_chunks = std::max<int64_t>(2, kPartialBytes / (8 * partial));
  const int64_t chunk_rows = std::max(kChunkRows, cpu::round_up((N + max_chunks - 1) / max_chunks, 256));
  const int64_t nchunks = (N + chunk_rows - 1) / chunk_rows;
  // Each chunk is summed by one thread into its own partial; the partials are added in chunk
  // order afterwards. (An `omp ordered` reduction instead made every chunk wait for its
  // predecessor's thread: on this shared 2-core machine a descheduled thread cost a 4 ms time
  // slice per chunk, 1M x 64 float32 took 980 ms instead of ~90.)
  std::vector<double> parts(static_cast<size_t>(nchunks * partial));
  auto run_chunk = [&](int64_t k, void* scratch) {
    K.rows[fmt](a, c.data(), k * chunk_rows, std::min(N, (k + 1) * chunk_rows), parts.data() + k * partial, scratch);
  };
  const int nt = static_cast<int>(
      std::min<int64_t>(cpu::threads_for(static_cast<double>(N) * P * P / 2), nchunks));
  if (nt <= 1) {
    std::vector<char> scratch(static_cast<size_t>(plan.scratch_bytes));
    for (int64_t k = 0; k < nchunks; ++k) run_chunk(k, scratch.data());
  } else {
#pragma omp parallel num_threads(nt)
    {
      std::vector<char> scratch(static_cast<size_t>(plan.scratch_bytes));
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < nchunks; ++k) run_chunk(k, scratch.data());
    }
  }
  std::vector<double> total(static_cast<size_t>(partial), 0.0);
  for (int64_t k = 0; k < nchunks; ++k) {  // chunk order: deterministic; upper triangle only
    const double* g = parts.data() + k * partial;
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = i; j < P; ++j) total[i * ld + j] += g[i * ld + j];
  }

  // Undo the shift (G = G' + g c^T + c g^T + s c c^T, c[D] = 0) and mirror the triangle.
  auto up = [&](int64_t i, int64_t j) { return i <= j ? total[i * ld + j] : total[j * ld + i]; };
  const double s = total[D * ld + D];
  for (int64_t i = 0; i < P; ++i) {
    const double gi = up(i, D), ci = c[i];
    for (int64_t j = i; j < P; ++j) {
      double v = total[i * ld + j];
      // (terms with a zero shift skipped: an inf in the data must give inf, not inf * 0 = nan)
      if (c[j] != 0.0) v += gi * c[j];
      if (ci != 0.0) v += ci * up(j, D) + s * ci * c[j];
      o[i * P + j] = v;
      o[j * P + i] = v;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("gram", &gram_cpu); }

}  // namespace fastlin

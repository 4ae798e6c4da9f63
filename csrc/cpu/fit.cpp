// CPU fit: the whole training loop in one call. One FusedTrainer (strides, plan, scratch and
// partials prepared once) runs every step; a full-batch epoch is one fused pass plus the update,
// with no allocation, no ATen call and (below the fork threshold) no thread fork. Shuffled
// mini-batches draw torch.randperm into one preallocated index tensor per epoch and gather rows by
// index inside the tile loop (no copy of x). Steps are those of train_step on the same rows, so the
// iterates are identical to calling train_step on x[rows] in the same order.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "train_step.h"

namespace fastlin {
namespace {

at::Tensor fit_cpu(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                   const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                   int64_t epochs, int64_t batch_size, bool shuffle, int64_t seed, double lr, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  SgdOptions opt{lr, momentum, dampening, weight_decay, nesterov, maximize};
  check_train_args("fit", input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, opt);
  const int64_t N = input.size(0);
  TORCH_CHECK_VALUE(N > 0, "fastlin.fit: input must have at least one row, got shape ", shape_str(input));
  TORCH_CHECK_VALUE(epochs >= 0, "fastlin.fit: epochs must be >= 0, got ", epochs);
  const int64_t bs = (batch_size <= 0 || batch_size >= N) ? N : batch_size;
  const bool shuffled = shuffle && bs < N;
  auto out_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto history = at::full({epochs}, std::numeric_limits<double>::quiet_NaN(), input.options().dtype(at::kDouble));
  double* hist = history.data_ptr<double>();

  FusedTrainer trainer(input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, opt);
  at::Tensor order;
  c10::optional<at::Generator> gen;
  if (shuffled) {
    // The generator torch.randperm(N, generator=torch.Generator().manual_seed(seed)) would use.
    gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    order = at::empty({N}, input.options().dtype(at::kLong));
  }
  bool first = first_step;
  for (int64_t e = 0; e < epochs; ++e) {
    const int64_t* rows = nullptr;
    if (shuffled) {
      at::randperm_out(order, N, gen);
      rows = order.data_ptr<int64_t>();
    }
    double total = 0, weight_total = 0;
    bool ok = true;
    for (int64_t start = 0; start < N; start += bs) {
      const int64_t n = std::min(bs, N - start);
      double wsum = 0;
      const double loss = trainer.step(rows ? rows + start : nullptr, start, n, first, true, &wsum, &ok);
      if (!ok) break;
      first = false;
      total += loss * wsum;
      weight_total += wsum;
    }
    if (!ok) break;
    hist[e] = total / weight_total;
  }
  trainer.finish();
  return history.to(out_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("fit", &fit_cpu); }

}  // namespace fastlin

// CPU fit: the whole training loop in one call, built on train_step_rows.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

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
  auto out_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto history = at::full({epochs}, std::numeric_limits<double>::quiet_NaN(), input.options().dtype(at::kDouble));
  auto hist = history.accessor<double, 1>();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  auto arange = at::arange(N, input.options().dtype(at::kLong));
  bool first = first_step;
  for (int64_t e = 0; e < epochs; ++e) {
    at::Tensor order = (shuffle && bs < N) ? at::randperm(N, gen, input.options().dtype(at::kLong)) : arange;
    double total = 0, weight_total = 0;
    bool ok = true;
    for (int64_t start = 0; start < N && ok; start += bs) {
      at::Tensor rows = bs == N && !(shuffle && bs < N) ? at::Tensor() : order.narrow(0, start, std::min(bs, N - start));
      double wsum = 0;
      double loss = train_step_rows(input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, rows,
                                    opt, first, true, &wsum, &ok);
      if (!ok) break;
      first = false;
      total += loss * wsum;
      weight_total += wsum;
    }
    if (!ok) break;
    hist[e] = total / weight_total;
  }
  return history.to(out_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("fit", &fit_cpu); }

}  // namespace fastlin

// CPU fused train step. (First version: ATen, materialises the residual; the one-pass C++ kernel
// replaces it.)
#include "train_step.h"

#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace fastlin {

void check_train_args(const char* op, const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                      const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                      const SgdOptions& opt) {
  check_dim(op, "input", input, 2, "(N, in_features)");
  check_dim(op, "weight", weight, 2, "(out_features, in_features)");
  check_floating(op, "input", input);
  check_same_dtype(op, "target", target, "input", input);
  auto pt = weight.scalar_type();
  auto xt = input.scalar_type();
  TORCH_CHECK_TYPE(pt == xt || ((xt == at::kBFloat16 || xt == at::kHalf) && pt == at::kFloat), "fastlin.", op,
                   ": weight must have input's dtype (", xt, "), or float32 for bfloat16/float16 input; got ", pt);
  check_same_device(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1), "fastlin.", op, ": weight must have shape (out_features, ",
                    input.size(1), ") to match input's last dimension ", input.size(1), ", got ", shape_str(weight));
  check_target(op, target, input, weight);
  const int64_t O = weight.size(0);
  if (has(bias)) {
    check_same_dtype(op, "bias", *bias, "weight", weight);
    check_same_device(op, "bias", *bias, "weight", weight);
    check_shape(op, "bias", *bias, {O}, "(out_features,)");
  }
  TORCH_CHECK_VALUE(opt.momentum == 0 || has(weight_momentum), "fastlin.", op,
                    ": weight_momentum must be given when momentum != 0");
  TORCH_CHECK_VALUE(opt.momentum == 0 || !has(bias) || has(bias_momentum), "fastlin.", op,
                    ": bias_momentum must be given when momentum != 0 and bias is given");
  if (has(weight_momentum)) {
    check_same_dtype(op, "weight_momentum", *weight_momentum, "weight", weight);
    check_same_device(op, "weight_momentum", *weight_momentum, "weight", weight);
    check_shape(op, "weight_momentum", *weight_momentum, weight.sizes(), "(the shape of weight)");
  }
  if (has(bias_momentum)) {
    TORCH_CHECK_VALUE(has(bias), "fastlin.", op, ": bias_momentum given without bias");
    check_same_dtype(op, "bias_momentum", *bias_momentum, "weight", weight);
    check_same_device(op, "bias_momentum", *bias_momentum, "weight", weight);
    check_shape(op, "bias_momentum", *bias_momentum, {O}, "(out_features,)");
  }
  if (has(sample_weight)) {
    check_same_device(op, "sample_weight", *sample_weight, "input", input);
    check_floating(op, "sample_weight", *sample_weight);
    check_shape(op, "sample_weight", *sample_weight, {input.size(0)}, "(N,)");
  }
  TORCH_CHECK_VALUE(opt.lr >= 0, "fastlin.", op, ": lr must be >= 0, got ", opt.lr);
  TORCH_CHECK_VALUE(opt.momentum >= 0, "fastlin.", op, ": momentum must be >= 0, got ", opt.momentum);
  TORCH_CHECK_VALUE(opt.weight_decay >= 0, "fastlin.", op, ": weight_decay must be >= 0, got ", opt.weight_decay);
  TORCH_CHECK_VALUE(!opt.nesterov || (opt.momentum > 0 && opt.dampening == 0), "fastlin.", op,
                    ": nesterov requires momentum > 0 and dampening == 0");
}

namespace {

// Updates p (and buf) from gradient g following torch.optim.SGD, in the accumulation dtype.
at::Tensor sgd_new_value(const at::Tensor& p, at::Tensor g, const c10::optional<at::Tensor>& buf,
                         const SgdOptions& o, bool first_step, at::Tensor* new_buf) {
  if (o.maximize) g = -g;
  if (o.weight_decay != 0) g = g + o.weight_decay * p;
  if (o.momentum != 0) {
    at::Tensor b = first_step ? g.clone() : buf->to(g.scalar_type()) * o.momentum + (1 - o.dampening) * g;
    *new_buf = b;
    g = o.nesterov ? g + o.momentum * b : b;
  }
  return p - o.lr * g;
}

}  // namespace

double train_step_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                       const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                       const at::Tensor& rows, const SgdOptions& opt, bool first_step, bool check_finite,
                       double* weight_sum, bool* applied) {
  auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = (rows.defined() ? input.index_select(0, rows) : input).to(acc);
  auto y = (rows.defined() ? target.index_select(0, rows) : target).to(acc);
  auto w = weight.to(acc);
  auto r = at::mm(x, w.t());
  if (has(bias)) r.add_(bias->to(acc));
  r.sub_(y);
  const double O = static_cast<double>(weight.size(0));
  at::Tensor denom, rw;
  if (has(sample_weight)) {
    auto sw = (rows.defined() ? sample_weight->index_select(0, rows) : *sample_weight).to(acc);
    denom = sw.sum() * O;
    rw = r * sw.unsqueeze(1);
  } else {
    denom = at::scalar_tensor(static_cast<double>(r.size(0)) * O, r.options());
    rw = r;
  }
  double loss = ((rw * r).sum() / denom).item<double>();
  *weight_sum = (denom / O).item<double>();
  auto g = rw * (2.0 / (denom.item<double>()));
  at::Tensor gw = at::mm(g.t(), x), gb, nwb, nbb;
  auto nw = sgd_new_value(w, gw, weight_momentum, opt, first_step, &nwb);
  at::Tensor nb;
  if (has(bias)) nb = sgd_new_value(bias->to(acc), g.sum(0), bias_momentum, opt, first_step, &nbb);
  bool ok = true;
  if (check_finite) {
    ok = std::isfinite(loss) && nw.isfinite().all().item<bool>() && (!nb.defined() || nb.isfinite().all().item<bool>());
  }
  if (applied) *applied = ok;
  if (!ok) return loss;
  weight.copy_(nw);
  if (nb.defined()) bias->copy_(nb);
  if (nwb.defined()) weight_momentum->copy_(nwb);
  if (nbb.defined()) bias_momentum->copy_(nbb);
  return loss;
}

namespace {

at::Tensor train_step_cpu(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                          const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                          double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                          bool maximize, bool first_step) {
  SgdOptions opt{lr, momentum, dampening, weight_decay, nesterov, maximize};
  check_train_args("train_step", input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, opt);
  TORCH_CHECK_VALUE(input.size(0) > 0, "fastlin.train_step: input must have at least one row, got shape ",
                    shape_str(input));
  double wsum = 0;
  double loss = train_step_rows(input, target, weight, bias, weight_momentum, bias_momentum, sample_weight,
                                at::Tensor(), opt, first_step, false, &wsum, nullptr);
  auto out_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(loss, input.options().dtype(out_t));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("train_step", &train_step_cpu); }

}  // namespace fastlin

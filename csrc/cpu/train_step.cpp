// CPU fused train step: one pass over x (csrc/cpu/kernels/fused_impl.h) computes the residuals,
// the loss, dW and db with per-thread partials reduced in thread order, then the SGD update is
// applied in place. Also the shared glue of fit and linear_mse_loss (FusedPass, FusedTrainer).
#include "train_step.h"

#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

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

cpu::FusedFmt fused_fmt(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::FusedFmt::f32;
    case at::kDouble: return cpu::FusedFmt::f64;
    case at::kBFloat16: return cpu::FusedFmt::bf16;
    case at::kHalf: return cpu::FusedFmt::f16;
    default: TORCH_CHECK_TYPE(false, "fastlin: unsupported dtype ", t);
  }
}

void* AlignedBuffer::get(size_t bytes) {
  if (bytes > cap_ || !mem_) {
    cap_ = std::max<size_t>(bytes, 64);
    mem_.reset(new char[cap_ + 64]);
  }
  auto p = reinterpret_cast<uintptr_t>(mem_.get());
  return reinterpret_cast<void*>((p + 63) & ~static_cast<uintptr_t>(63));
}

namespace {
// A pass runs on T threads only when its estimated single-thread time is >= T * kForkNs.
constexpr double kForkNs = 20000;
// Chunks of rows per thread of a threaded pass (see run()).
constexpr int64_t kChunksPerThread = 4;
}  // namespace

FusedPass::FusedPass(const cpu::FusedProblem& prob)
    : prob_(prob), k_(cpu::fused_kernels()), max_threads_(std::max(1, at::get_num_threads())) {
  // Tuning / testing knobs: force a kernel path or a tile height (results stay deterministic).
  if (const char* s = std::getenv("FASTLIN_FUSED_PATH")) {
    if (!std::strcmp(s, "dot")) prob_.path = cpu::FusedPath::dot;
    if (!std::strcmp(s, "outer")) prob_.path = cpu::FusedPath::outer;
  }
  if (const char* s = std::getenv("FASTLIN_FUSED_TILE_ROWS")) prob_.tile_rows = std::max<int64_t>(1, std::atoll(s));
  k_.plan(prob_);
  // A fork + join costs a few microseconds here, so a pass stays on one thread until its estimated
  // single-thread time is well above that: ~0.12 ns per byte of x streamed from memory (~8 GB/s
  // per core) plus ~0.05 ns per (feature, output) pair of the two products (16 FMAs per cycle at
  // ~3.6 GHz, ~60% of the peak), plus per-row overhead.
  {
    const double esize = prob_.fmt == cpu::FusedFmt::f64 ? 8 : prob_.fmt == cpu::FusedFmt::f32 ? 4 : 2;
    const double per_row = 0.12 * esize * static_cast<double>(prob_.D) +
                           0.05 * static_cast<double>(prob_.D) * static_cast<double>(std::max<int64_t>(prob_.O, 1)) *
                               (prob_.gi ? 1.5 : 1.0) +
                           5.0;
    fork_rows_ = max_threads_ <= 1 ? std::numeric_limits<int64_t>::max()
                                   : std::max<int64_t>(1, static_cast<int64_t>(kForkNs / per_row));
  }
  scratch_stride_ = (k_.scratch_bytes(prob_) + 63) / 64 * 64;
  scratch_.get(scratch_stride_ * static_cast<size_t>(max_threads_));
  ensure_parts(1);
}

void FusedPass::ensure_parts(int chunks) {
  if (chunks <= static_cast<int>(parts_.size())) return;
  const size_t C = static_cast<size_t>(chunks);
  const size_t nw = prob_.want_dw ? static_cast<size_t>(prob_.O * prob_.D) : 0;
  const size_t nb = prob_.want_db ? static_cast<size_t>(prob_.O) : 0;
  // Not zeroed: every pass() starts by clearing its partial.
  part_dw_.reset(new double[std::max<size_t>(1, C * nw)]);
  part_db_.reset(new double[std::max<size_t>(1, C * nb)]);
  parts_.assign(C, cpu::FusedPartial{});
  for (size_t c = 0; c < C; ++c) {
    parts_[c].dw = nw ? part_dw_.get() + c * nw : nullptr;
    parts_[c].db = nb ? part_db_.get() + c * nb : nullptr;
  }
}

// Threads for a pass over n rows: fork_rows_ (set in the constructor) rows per thread at least.
int FusedPass::threads_for(int64_t n) const {
  if (n < fork_rows_) return 1;
  return static_cast<int>(std::min<int64_t>(max_threads_, n / fork_rows_));
}

void FusedPass::run(int64_t n) {
  const int T = threads_for(n);
  // The rows are split into C fixed chunks (C depends only on n and T), handed to the threads
  // dynamically: on a shared machine a thread that gets less CPU takes fewer chunks instead of
  // holding the other one at the join. Each chunk has its own partial sums, reduced in chunk
  // order, so the result does not depend on which thread ran which chunk.
  const int C = T == 1 ? 1
                       : static_cast<int>(std::min<int64_t>(kChunksPerThread * static_cast<int64_t>(T),
                                                            std::max<int64_t>(T, n / fork_rows_)));
  ensure_parts(C);
  char* base = static_cast<char*>(scratch_.get(scratch_stride_ * static_cast<size_t>(max_threads_)));
  if (C == 1) {
    k_.pass(prob_, 0, n, base, parts_[0]);
  } else {
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int c = 0; c < C; ++c) {
      char* scratch = base + scratch_stride_ * static_cast<size_t>(omp_get_thread_num());
      k_.pass(prob_, n * c / C, n * (c + 1) / C, scratch, parts_[c]);
    }
    // Fixed-order reduction into chunk 0's partials.
    cpu::FusedPartial& p0 = parts_[0];
    const int64_t nw = prob_.O * prob_.D;
    for (int c = 1; c < C; ++c) {
      const cpu::FusedPartial& pc = parts_[c];
      if (p0.dw)
        for (int64_t e = 0; e < nw; ++e) p0.dw[e] += pc.dw[e];
      if (p0.db)
        for (int64_t o = 0; o < prob_.O; ++o) p0.db[o] += pc.db[o];
      p0.loss += pc.loss;
      p0.wsum += pc.wsum;
    }
  }
  loss = parts_[0].loss;
  wsum = parts_[0].wsum;
}

namespace {

at::Tensor contiguous_rows(const at::Tensor& t) {
  // Rows at any stride are read in place; only a non-unit column stride forces a copy.
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

at::Tensor contiguous_param(const at::Tensor& t, at::Tensor* user) {
  if (t.is_contiguous()) return t;
  *user = t;
  return t.contiguous();
}

// torch.optim.SGD's update of n values (see the schema of sgd_update_), in the parameter type:
// gradient grad[e] * gscale. Writes p_out / buf_out (which may alias p / buf); returns whether
// every new parameter value is finite.
template <typename T>
bool sgd_values(const T* p, const T* buf, const double* grad, double gscale, int64_t n, const SgdOptions& o,
                bool first_step, T* p_out, T* buf_out) {
  const T lr = static_cast<T>(o.lr), mom = static_cast<T>(o.momentum), wd = static_cast<T>(o.weight_decay);
  const T damp1 = static_cast<T>(1 - o.dampening);
  const bool use_mom = o.momentum != 0, use_wd = o.weight_decay != 0;
  bool finite = true;
  for (int64_t e = 0; e < n; ++e) {
    T g = static_cast<T>(grad[e] * gscale);
    if (o.maximize) g = -g;
    if (use_wd) g = g + wd * p[e];
    if (use_mom) {
      const T b = first_step ? g : mom * buf[e] + damp1 * g;
      buf_out[e] = b;
      g = o.nesterov ? g + mom * b : b;
    }
    const T np = p[e] - lr * g;
    p_out[e] = np;
    finite = finite && std::isfinite(np);
  }
  return finite;
}

}  // namespace

FusedTrainer::FusedTrainer(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                           const c10::optional<at::Tensor>& bias_momentum,
                           const c10::optional<at::Tensor>& sample_weight, const SgdOptions& opt)
    : opt_(opt), N_(input.size(0)), D_(input.size(1)), O_(weight.size(0)) {
  x_ = contiguous_rows(input);
  y_ = contiguous_rows(target);
  w_ = contiguous_param(weight, &w_user_);
  if (has(bias)) b_ = contiguous_param(*bias, &b_user_);
  if (opt.momentum != 0) {
    wm_ = contiguous_param(*weight_momentum, &wm_user_);
    if (b_.defined()) bm_ = contiguous_param(*bias_momentum, &bm_user_);
  }
  cpu::FusedProblem p;
  p.fmt = fused_fmt(input.scalar_type());
  p.D = D_;
  p.O = O_;
  p.x = x_.data_ptr();
  p.x_rs = x_.stride(0);
  p.y = y_.data_ptr();
  p.y_rs = y_.stride(0);
  x_base_ = static_cast<const char*>(x_.data_ptr());
  y_base_ = static_cast<const char*>(y_.data_ptr());
  x_step_ = x_.stride(0) * static_cast<int64_t>(x_.element_size());
  y_step_ = y_.stride(0) * static_cast<int64_t>(y_.element_size());
  if (has(sample_weight)) {
    sw_ = *sample_weight;
    p.sw = sw_.data_ptr();
    p.sw_s = sw_.stride(0);
    p.sw_fmt = fused_fmt(sw_.scalar_type());
    sw_base_ = static_cast<const char*>(sw_.data_ptr());
    sw_step_ = sw_.stride(0) * static_cast<int64_t>(sw_.element_size());
  }
  wp_ = w_.data_ptr();
  bp_ = b_.defined() ? b_.data_ptr() : nullptr;
  wmp_ = wm_.defined() ? wm_.data_ptr() : nullptr;
  bmp_ = bm_.defined() ? bm_.data_ptr() : nullptr;
  p.w = w_.data_ptr();
  p.b = b_.defined() ? b_.data_ptr() : nullptr;
  p.want_dw = true;
  p.want_db = b_.defined();
  pass_ = std::make_unique<FusedPass>(p);
}

template <typename T>
bool FusedTrainer::update(bool first_step, bool check_finite, double gscale) {
  T* w = static_cast<T*>(wp_);
  T* wm = static_cast<T*>(wmp_);
  T* b = static_cast<T*>(bp_);
  T* bm = static_cast<T*>(bmp_);
  const int64_t nw = O_ * D_;
  if (!check_finite) {
    sgd_values<T>(w, wm, pass_->dw(), gscale, nw, opt_, first_step, w, wm);
    if (b) sgd_values<T>(b, bm, pass_->db(), gscale, O_, opt_, first_step, b, bm);
    return true;
  }
  const size_t need = sizeof(T) * static_cast<size_t>(2 * nw + 2 * O_);
  if (newvals_.size() < need) newvals_.resize(need);
  T* cw = reinterpret_cast<T*>(newvals_.data());
  T* cwm = cw + nw;
  T* cb = cwm + nw;
  T* cbm = cb + O_;
  bool ok = sgd_values<T>(w, wm, pass_->dw(), gscale, nw, opt_, first_step, cw, cwm);
  if (b) ok = sgd_values<T>(b, bm, pass_->db(), gscale, O_, opt_, first_step, cb, cbm) && ok;
  if (!ok) return false;
  std::memcpy(w, cw, sizeof(T) * static_cast<size_t>(nw));
  if (wm) std::memcpy(wm, cwm, sizeof(T) * static_cast<size_t>(nw));
  if (b) std::memcpy(b, cb, sizeof(T) * static_cast<size_t>(O_));
  if (bm) std::memcpy(bm, cbm, sizeof(T) * static_cast<size_t>(O_));
  return true;
}

double FusedTrainer::step(const int64_t* rows, int64_t row0, int64_t n, bool first_step, bool check_finite,
                          double* wsum, bool* applied) {
  cpu::FusedProblem& p = pass_->problem();
  p.rows = rows;
  p.x = x_base_ + (rows ? 0 : row0 * x_step_);
  p.y = y_base_ + (rows ? 0 : row0 * y_step_);
  if (sw_base_) p.sw = sw_base_ + (rows ? 0 : row0 * sw_step_);
  pass_->run(n);
  const double O = static_cast<double>(O_);
  const double loss = pass_->loss / (O * pass_->wsum);
  *wsum = pass_->wsum;
  const double gscale = 2.0 / (O * pass_->wsum);
  bool ok = !check_finite || std::isfinite(loss);
  if (ok) {
    ok = w_.scalar_type() == at::kDouble ? update<double>(first_step, check_finite, gscale)
                                         : update<float>(first_step, check_finite, gscale);
  }
  if (applied) *applied = ok;
  return loss;
}

void FusedTrainer::finish() {
  if (w_user_.defined()) w_user_.copy_(w_);
  if (b_user_.defined()) b_user_.copy_(b_);
  if (wm_user_.defined()) wm_user_.copy_(wm_);
  if (bm_user_.defined()) bm_user_.copy_(bm_);
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
  FusedTrainer trainer(input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, opt);
  double wsum = 0;
  const double loss = trainer.step(nullptr, 0, input.size(0), first_step, false, &wsum, nullptr);
  trainer.finish();
  auto out_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::scalar_tensor(loss, input.options().dtype(out_t));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CPU, m) { m.impl("train_step", &train_step_cpu); }

}  // namespace fastlin

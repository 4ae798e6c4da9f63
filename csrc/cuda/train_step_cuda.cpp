// CUDA glue of train_step and fit.
//
// train_step: two launches, no host sync. (1) The row pass streams x once: residuals, the loss,
// the weight sum and dW/db partials, one partial per block. (2) finalize sums the partials in a
// fixed order and applies torch.optim.SGD's update to weight, bias and the momentum buffers in
// place, and writes the loss. Outputs wider than 16 (or very long rows) compute the same partial
// sums with ATen/cuBLAS (materialising the (N, O) residual) and then use the same finalize.
//
// fit: a host loop of launches with no host sync (capturable in a CUDA graph when nothing is
// shuffled). Per step: row pass over the batch's rows (gathered by index from the epoch's
// torch.randperm, drawn on the device from a CUDA generator seeded with `seed`), finalize into a
// staging buffer, and fit_commit, which applies the step only if the loss and every new parameter
// are finite and otherwise sets a device-side "stopped" flag that makes every later kernel return
// at once. The per-epoch history is accumulated on the device.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/train_step.h"  // fastlin::check_train_args, fastlin::SgdOptions (shared with the CPU)
#include "glue.h"

namespace fastlin {
namespace {

namespace fc = ::fastlin::cuda;
using namespace ::fastlin::cuda_glue;

// Elements of temporaries per row chunk of the ATen path (256 MB of float32): the residuals (rows x O)
// and, where the batch is gathered by index or widened to the accumulation dtype, the rows' copy
// (rows x D). FASTLIN_CUDA_ATEN_CHUNK_ELEMS overrides it (read once per call, in make_problem; tests
// use it to reach several chunks cheaply). The first H200 run chunked by 2^22 elements of x whatever
// the temporaries: 256 chunks of ~10 small launches for a 4M x 256 batch, 41 ms at O = 16.
constexpr int64_t kAtenChunkElems = int64_t(1) << 26;

// Everything about one train_step / fit problem that does not change from step to step.
struct Problem {
  at::Tensor x;  // input with contiguous columns (rows_view)
  int64_t ldx = 0;
  at::Tensor target, weight, bias, wm, bm, sw;  // sw: sample weights in the accumulation dtype, contiguous
  int64_t N = 0, D = 0, O = 0;
  fc::DType xt = fc::DType::F32, pt = fc::DType::F32;
  at::ScalarType acc = at::kFloat;
  bool vec_ok = false;
  fc::SgdOpts opt;
  cudaStream_t stream = nullptr;
  int64_t aten_chunk = kAtenChunkElems;  // elements of temporaries per row chunk of the ATen path

  int64_t E() const { return O * D + O; }
};

Problem make_problem(const char* op, const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                     const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                     double lr, double momentum, double dampening, double weight_decay, bool nesterov, bool maximize) {
  Problem p;
  p.N = input.size(0);
  p.D = input.size(1);
  p.O = weight.size(0);
  p.xt = dtype_of(input);
  p.pt = dtype_of(weight);
  p.acc = acc_scalar_type(weight.scalar_type());
  p.x = rows_view(input, &p.ldx);
  p.vec_ok = rows_vec_ok(p.xt, p.x, p.ldx, p.D, true);
  p.target = target;
  p.weight = weight;
  if (has(bias)) p.bias = *bias;
  // The buffers are used only when momentum != 0 (torch.optim.SGD's rule).
  if (momentum != 0 && has(weight_momentum)) p.wm = *weight_momentum;
  if (momentum != 0 && has(bias) && has(bias_momentum)) p.bm = *bias_momentum;
  if (has(sample_weight)) p.sw = sample_weight->to(p.acc).contiguous();
  p.opt.lr = lr;
  p.opt.momentum = momentum;
  p.opt.dampening = dampening;
  p.opt.weight_decay = weight_decay;
  p.opt.nesterov = nesterov ? 1 : 0;
  p.opt.maximize = maximize ? 1 : 0;
  p.stream = current_stream();
  p.aten_chunk = std::max<int64_t>(1, env_count(op, "FASTLIN_CUDA_ATEN_CHUNK_ELEMS", kAtenChunkElems));
  return p;
}

// bfloat16 pieces of a float32 tensor t, concatenated along dim: kPieces tensors of t's shape whose
// sum is t exactly (each piece is the rest of t rounded to bf16: 3 x 8 significand bits cover
// float32's 24, and bf16 has float32's exponent range).
constexpr int64_t kPieces = 3;
at::Tensor bf16_pieces(const at::Tensor& t, int64_t dim) {
  std::vector<at::Tensor> parts;
  at::Tensor rest = t;
  for (int64_t i = 0; i < kPieces; ++i) {
    parts.push_back(rest.to(at::kBFloat16));
    if (i + 1 < kPieces) rest = rest - parts.back().to(at::kFloat);
  }
  return at::cat(parts, dim);
}

// The row pass plan for a batch of nrows (not ok: use the ATen partial sums, G = 1).
fc::RowPassPlan step_plan(const Problem& p, int64_t nrows) { return plan_rows(p.xt, p.vec_ok, p.O, p.D, nrows); }

// Partial sums of one step over the batch rows (rows[0..nrows) when rows is defined, else
// row0..row0+nrows) into part (G, E) / part_s (G, 2).
void step_partials(const Problem& p, const fc::RowPassPlan& plan, const at::Tensor& rows, int64_t row0,
                   int64_t nrows, at::Tensor& part, at::Tensor& part_s, const int* stopped) {
  if (plan.ok) {
    fc::RowPassArgs a;
    a.nrows = nrows;
    a.row0 = row0;
    a.rows = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
    a.O = static_cast<int>(p.O);
    a.D = static_cast<int>(p.D);
    a.x = p.x.data_ptr();
    a.ldx = p.ldx;
    a.y = p.target.data_ptr();
    a.ys0 = p.target.stride(0);
    a.ys1 = p.target.stride(1);
    a.sw = p.sw.defined() ? p.sw.data_ptr() : nullptr;
    a.w = p.weight.data_ptr();
    a.ws0 = p.weight.stride(0);
    a.ws1 = p.weight.stride(1);
    if (p.bias.defined()) {
      a.b = p.bias.data_ptr();
      a.bs0 = p.bias.stride(0);
    }
    a.param_f32 = p.pt == fc::DType::F32 ? 1 : 0;
    a.src = fc::kSrcDots;
    a.load_x = 1;
    a.acc_w = 1;
    a.acc_b = p.bias.defined() ? 1 : 0;
    a.acc_loss = 1;
    a.part = part.data_ptr();
    a.part_s = part_s.data_ptr<double>();
    a.stopped = stopped;
    C10_CUDA_CHECK(fc::rowpass_launch(p.xt, plan, a, p.stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // ATen/cuBLAS: the same sums in the accumulation dtype (loss and weight sums in float64), G = 1,
  // over row chunks in a fixed order, so the temporaries (the gathered or widened rows, the
  // residuals) stay under p.aten_chunk elements whatever the batch size.
  //
  // A bfloat16 x is not widened: its products run on the tensor cores as bf16 x bf16 -> float32
  // GEMMs against bf16 pieces of the float32 operands (bf16_pieces: three pieces sum to a float32
  // value exactly, and a product of two bf16 values is exact in float32), so the sums are those of
  // float32 products with float32 accumulation, and x is read twice at 2 bytes an element (the
  // widened path reads and writes a float32 copy, then reads it twice: 9.5 ms for 4M x 256, O = 16,
  // on an H200 against 1.6 ms for stock eager's bf16 GEMMs). float16 keeps the widened path: its
  // 5-bit exponent cannot hold the small pieces of a float32 value.
  at::Tensor part0 = part.select(0, 0);
  at::Tensor ps0 = part_s.select(0, 0);
  part0.zero_();
  ps0.zero_();
  at::Tensor gw = part0.narrow(0, 0, p.O * p.D).view({p.O, p.D});
  const bool split = p.x.scalar_type() == at::kBFloat16;
  const at::Tensor wa = p.weight.to(p.acc);
  const at::Tensor wp = split ? bf16_pieces(wa, 0) : at::Tensor();  // (3 O, D)
  const at::Tensor ba = p.bias.defined() ? p.bias.to(p.acc) : at::Tensor();
  const bool copies_rows = rows.defined() || (!split && p.x.scalar_type() != p.acc);
  // temporaries per row, in elements: the residuals (and, split, the 3 O products and pieces)
  const int64_t per_row = (split ? 8 * p.O : p.O) + (copies_rows ? p.D : 0);
  const int64_t chunk = std::max<int64_t>(1, p.aten_chunk / std::max<int64_t>(1, per_row));
  for (int64_t c0 = 0; c0 < nrows; c0 += chunk) {
    const int64_t n = std::min(chunk, nrows - c0);
    const at::Tensor idx = rows.defined() ? rows.narrow(0, c0, n) : at::Tensor();
    const at::Tensor x = idx.defined() ? p.x.index_select(0, idx) : p.x.narrow(0, row0 + c0, n);
    const at::Tensor y = idx.defined() ? p.target.index_select(0, idx) : p.target.narrow(0, row0 + c0, n);
    const at::Tensor xa = split ? x : x.to(p.acc);
    at::Tensor r = split ? at::mm(x, wp.t(), at::kFloat).view({n, kPieces, p.O}).sum(1) : at::mm(xa, wa.t());
    if (ba.defined()) r.add_(ba);
    r.sub_(y.to(p.acc));
    at::Tensor rw = r;
    if (p.sw.defined()) {
      const at::Tensor sw = idx.defined() ? p.sw.index_select(0, idx) : p.sw.narrow(0, row0 + c0, n);
      rw = r * sw.unsqueeze(1);
      ps0.narrow(0, 1, 1).add_(sw.sum(at::kDouble).reshape({1}));
    } else {
      ps0.narrow(0, 1, 1).add_(static_cast<double>(n));
    }
    ps0.narrow(0, 0, 1).add_((rw * r).sum(at::kDouble).reshape({1}));
    if (split) {
      gw.add_(at::mm(bf16_pieces(rw, 1).t(), x, at::kFloat).view({kPieces, p.O, p.D}).sum(0));
    } else {
      gw.addmm_(rw.t(), xa);
    }
    if (p.bias.defined()) part0.narrow(0, p.O * p.D, p.O).add_(rw.sum(0));
  }
}

// Finalize arguments common to train_step (kFinUpdate) and fit (kFinStage).
fc::FinalizeArgs update_args(const Problem& p, int mode, const at::Tensor& part, const at::Tensor& part_s, int G,
                             bool first_step) {
  fc::FinalizeArgs f;
  f.mode = mode;
  f.pt = p.pt;
  f.part = part.data_ptr();
  f.part_s = part_s.data_ptr<double>();
  f.G = G;
  f.O = static_cast<int>(p.O);
  f.D = static_cast<int>(p.D);
  f.need_totals = 1;
  f.w = p.weight.data_ptr();
  f.ws0 = p.weight.stride(0);
  f.ws1 = p.weight.stride(1);
  if (p.bias.defined()) {
    f.b = p.bias.data_ptr();
    f.bs0 = p.bias.stride(0);
  }
  if (p.wm.defined()) {
    f.wm = p.wm.data_ptr();
    f.wms0 = p.wm.stride(0);
    f.wms1 = p.wm.stride(1);
  }
  if (p.bm.defined()) {
    f.bm = p.bm.data_ptr();
    f.bms0 = p.bm.stride(0);
  }
  f.opt = p.opt;
  f.opt.first_step = first_step ? 1 : 0;
  return f;
}

void check_sizes(const char* op, const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK_VALUE(input.size(0) > 0, "fastlin.", op, ": input must have at least one row, got shape ",
                    shape_str(input));
  check_int_range(op, "in_features", input.size(1));
  check_int_range(op, "out_features", weight.size(0));
  check_int_range(op, "out_features * in_features", weight.size(0) * input.size(1) + weight.size(0));
  check_cuda(op, "input", input);
}

at::Tensor train_step_cuda(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                           const c10::optional<at::Tensor>& bias_momentum,
                           const c10::optional<at::Tensor>& sample_weight, double lr, double momentum,
                           double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const char* op = "train_step";
  SgdOptions opt{lr, momentum, dampening, weight_decay, nesterov, maximize};
  check_train_args(op, input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, opt);
  check_sizes(op, input, weight);
  const c10::cuda::CUDAGuard guard(input.device());
  const Problem p = make_problem(op, input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, lr,
                                 momentum, dampening, weight_decay, nesterov, maximize);
  const at::TensorOptions acc_opts = input.options().dtype(p.acc);
  if (p.O == 0) {  // no outputs: the loss is 0 / 0 and there is nothing to update
    return at::full({}, std::numeric_limits<double>::quiet_NaN(), acc_opts);
  }
  const fc::RowPassPlan plan = step_plan(p, p.N);
  const int G = plan.ok ? plan.G : 1;
  at::Tensor part = at::empty({G, p.E()}, acc_opts);
  at::Tensor part_s = at::empty({G, 2}, acc_opts.dtype(at::kDouble));
  at::Tensor loss = at::empty({}, acc_opts);
  step_partials(p, plan, at::Tensor(), 0, p.N, part, part_s, nullptr);
  fc::FinalizeArgs f = update_args(p, fc::kFinUpdate, part, part_s, G, first_step);
  f.loss_out = loss.data_ptr();
  C10_CUDA_CHECK(fc::finalize_launch(f, p.stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor fit_cuda(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& weight_momentum,
                    const c10::optional<at::Tensor>& bias_momentum, const c10::optional<at::Tensor>& sample_weight,
                    int64_t epochs, int64_t batch_size, bool shuffle, int64_t seed, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const char* op = "fit";
  SgdOptions opt{lr, momentum, dampening, weight_decay, nesterov, maximize};
  check_train_args(op, input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, opt);
  check_sizes(op, input, weight);
  TORCH_CHECK_VALUE(epochs >= 0, "fastlin.fit: epochs must be >= 0, got ", epochs);
  const c10::cuda::CUDAGuard guard(input.device());
  const Problem p = make_problem(op, input, target, weight, bias, weight_momentum, bias_momentum, sample_weight, lr,
                                 momentum, dampening, weight_decay, nesterov, maximize);
  const int64_t N = p.N;
  const int64_t bs = (batch_size <= 0 || batch_size >= N) ? N : batch_size;
  const bool shuffled = shuffle && bs < N;
  const auto out_t = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions dev = input.options();
  at::Tensor history = at::full({epochs}, std::numeric_limits<double>::quiet_NaN(), dev.dtype(at::kDouble));
  if (epochs == 0 || p.O == 0) return history.to(out_t);  // O == 0: every loss is 0 / 0, nothing applies

  // At most two batch sizes: bs and the last, shorter batch.
  const int64_t last = N - (N - 1) / bs * bs;
  const fc::RowPassPlan plan_bs = step_plan(p, bs);
  const fc::RowPassPlan plan_last = last == bs ? plan_bs : step_plan(p, last);
  const int gmax = std::max(plan_bs.ok ? plan_bs.G : 1, plan_last.ok ? plan_last.G : 1);
  const at::TensorOptions acc_opts = dev.dtype(p.acc);
  at::Tensor part = at::empty({gmax, p.E()}, acc_opts);
  at::Tensor part_s = at::empty({gmax, 2}, dev.dtype(at::kDouble));
  at::Tensor staging = at::empty({2, p.E()}, acc_opts);
  const int64_t nflags = fc::finalize_grid(static_cast<int>(p.O), static_cast<int>(p.D));
  at::Tensor flags = at::empty({nflags}, dev.dtype(at::kInt));
  at::Tensor state = at::zeros({4}, dev.dtype(at::kDouble));  // epoch loss*weight, epoch weight, step loss, step weight
  at::Tensor stopped = at::zeros({1}, dev.dtype(at::kInt));
  const int* stopped_ro = stopped.data_ptr<int>();

  c10::optional<at::Generator> gen;
  if (shuffled) {
    gen = at::make_generator<at::CUDAGeneratorImpl>(input.device().index());
    gen->set_current_seed(static_cast<uint64_t>(seed));
  }

  fc::CommitArgs c;
  c.pt = p.pt;
  c.O = static_cast<int>(p.O);
  c.D = static_cast<int>(p.D);
  c.w = p.weight.data_ptr();
  c.ws0 = p.weight.stride(0);
  c.ws1 = p.weight.stride(1);
  if (p.bias.defined()) {
    c.b = p.bias.data_ptr();
    c.bs0 = p.bias.stride(0);
  }
  if (p.wm.defined()) {
    c.wm = p.wm.data_ptr();
    c.wms0 = p.wm.stride(0);
    c.wms1 = p.wm.stride(1);
  }
  if (p.bm.defined()) {
    c.bm = p.bm.data_ptr();
    c.bms0 = p.bm.stride(0);
  }
  c.staging = staging.data_ptr();
  c.flags = flags.data_ptr<int>();
  c.nflags = static_cast<int>(nflags);
  c.state = state.data_ptr<double>();
  c.stopped = stopped.data_ptr<int>();
  c.history = history.data_ptr<double>();

  int64_t step_index = 0;
  for (int64_t e = 0; e < epochs; ++e) {
    // A fresh permutation every epoch, in torch.randperm's order for this generator.
    const at::Tensor perm = shuffled ? at::randperm(N, gen, dev.dtype(at::kLong)) : at::Tensor();
    for (int64_t start = 0; start < N; start += bs, ++step_index) {
      const int64_t nrows = std::min(bs, N - start);
      const fc::RowPassPlan& plan = nrows == bs ? plan_bs : plan_last;
      const at::Tensor rows = shuffled ? perm.narrow(0, start, nrows) : at::Tensor();
      step_partials(p, plan, rows, start, nrows, part, part_s, stopped_ro);
      // first_step applies to the first step only: after it the buffers exist (or the loop ended).
      fc::FinalizeArgs f = update_args(p, fc::kFinStage, part, part_s, plan.ok ? plan.G : 1,
                                       first_step && step_index == 0);
      f.staging = staging.data_ptr();
      f.flags = flags.data_ptr<int>();
      f.state = state.data_ptr<double>();
      f.stopped = stopped_ro;
      C10_CUDA_CHECK(fc::finalize_launch(f, p.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      c.epoch = e;
      c.epoch_end = start + bs >= N ? 1 : 0;
      C10_CUDA_CHECK(fc::fit_commit_launch(c, p.stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return history.to(out_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CUDA, m) {
  m.impl("train_step", &train_step_cuda);
  m.impl("fit", &fit_cuda);
}

}  // namespace fastlin

// Every fastlin op is declared here, once. Device implementations register against these
// schemas with TORCH_LIBRARY_IMPL(fastlin, CPU|CUDA, m) in csrc/cpu/*.cpp and csrc/cuda/*.cpp;
// fake (meta) implementations live in fastlin/ops.py. The Triton backend registers the same
// signatures under the namespace fastlin_triton (fastlin/triton/).
//
// Conventions shared by all schemas:
//  * `input` is 2-D (N, D); the Python layer flattens leading dimensions. `weight` is (O, D),
//    `bias` is (O,), `target` is (N, O).
//  * `reduction` is "mean" | "sum" ("none" only where stated).
//  * Gradients that the caller does not need are masked off with `output_mask` and returned
//    as empty (0,)-shaped tensors, so every op has a fixed number of tensor outputs.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

extern "C" {
// Importing fastlin._C loads this library, which runs the TORCH_LIBRARY registrations below.
// The module itself is empty on purpose: there are no pybind functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastlin, m) {
  // The instruction set the CPU kernels of this process run (csrc/cpu/isa.h): generic | avx2 |
  // avx512 | avx512_bf16, the best this CPU has under the FASTLIN_CPU_ISA cap. fastlin.info().
  m.def("cpu_isa() -> str", [] { return std::string(fastlin::cpu::isa_name(fastlin::cpu::cpu_isa())); });

  // y = input @ weight.T + bias            input (N, D), weight (O, D), bias (O,) -> (N, O)
  m.def("linear(Tensor input, Tensor weight, Tensor? bias) -> Tensor");
  // grad_input = grad_output @ weight (N, D); grad_weight = grad_output.T @ input (O, D);
  // grad_bias = grad_output.sum(0) (O,). output_mask = [input, weight, bias].
  m.def(
      "linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask)"
      " -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // MSE over tensors of any (equal) shape. reduction: "none" | "mean" | "sum".
  m.def("mse_loss(Tensor input, Tensor target, str reduction) -> Tensor");
  // d loss / d input, already multiplied by grad_output (a scalar, or input-shaped for "none").
  // d loss / d target is its negative.
  m.def("mse_loss_backward(Tensor grad_output, Tensor input, Tensor target, str reduction) -> Tensor");

  // loss = reduce((input @ weight.T + bias - target)^2) over N*O elements, reduction "mean" | "sum",
  // computed in one pass over `input` without materialising the (N, O) prediction, together with
  // the gradients of that loss (grad_output = 1) selected by output_mask = [input, weight, bias,
  // target]. Backward only rescales them by grad_output. loss is a 0-d tensor in input's dtype.
  m.def(
      "linear_mse_loss(Tensor input, Tensor weight, Tensor? bias, Tensor target, str reduction,"
      " bool[4] output_mask) -> (Tensor loss, Tensor grad_input, Tensor grad_weight, Tensor grad_bias,"
      " Tensor grad_target)");

  // torch.optim.SGD's update for every parameter of a group, in place:
  //   g = grad (negated if maximize) + weight_decay * p
  //   if momentum != 0: buf = g if first_step else momentum * buf + (1 - dampening) * g
  //                     g = g + momentum * buf if nesterov else buf
  //   p -= lr * g
  // momentum_buffers is empty when momentum == 0, else one buffer per parameter (written, not
  // read, when first_step).
  m.def(
      "sgd_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr,"
      " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
      " bool first_step) -> ()");

  // One full-batch training step of y ~ input @ weight.T + bias under the mean squared error,
  // fused: one pass over `input` computes the residuals, the loss, dW and db, then applies the
  // SGD update above to weight, bias and their momentum buffers in place. Returns the loss
  // evaluated before the update (0-d, float32 for reduced-precision inputs, else input's dtype).
  //   input (N, D), target (N, O); weight (O, D), bias (O,) and the buffers in the parameter dtype;
  //   sample_weight (N,): loss = sum_i w_i sum_o r_io^2 / (O * sum_i w_i).
  m.def(
      "train_step(Tensor input, Tensor target, Tensor(a!) weight, Tensor(b!)? bias,"
      " Tensor(c!)? weight_momentum, Tensor(d!)? bias_momentum, Tensor? sample_weight, float lr,"
      " float momentum, float dampening, float weight_decay, bool nesterov, bool maximize,"
      " bool first_step) -> Tensor");

  // `epochs` passes of train_step over the data: full batch when batch_size <= 0 or >= N, else
  // mini-batches of batch_size rows (last one shorter) in the order of
  // torch.randperm(N, generator=<generator on input's device seeded with `seed`>) drawn afresh
  // each epoch when `shuffle`, else in row order (a full batch ignores `shuffle`). Returns the per-epoch loss history (epochs,),
  // each entry the mean of that epoch's step losses weighted by each step's rows (or sum of
  // sample weights). A step whose loss is non-finite, or whose update would make a parameter
  // non-finite, is not applied and ends the loop: weight, bias and buffers keep the values they
  // had before it, and that epoch's entry and all later ones are NaN. (train_step itself applies
  // whatever it computes, like torch.)
  m.def(
      "fit(Tensor input, Tensor target, Tensor(a!) weight, Tensor(b!)? bias,"
      " Tensor(c!)? weight_momentum, Tensor(d!)? bias_momentum, Tensor? sample_weight, int epochs,"
      " int batch_size, bool shuffle, int seed, float lr, float momentum, float dampening,"
      " float weight_decay, bool nesterov, bool maximize, bool first_step) -> Tensor");

  // The augmented Gram matrix of the data, in one pass over `input`: with Z = [input, 1, target]
  // (N, P), P = D + 1 + O, returns Z^T diag(sample_weight) Z, a symmetric (P, P) float64 matrix
  // (float64 accumulation whatever the input dtype). Its blocks are X^T W X, X^T w, X^T W Y,
  // sum(w), w^T Y and Y^T W Y: everything the normal equations (and the training loss of any
  // (weight, bias)) need. Row chunks of one dataset may be summed. sample_weight (N,) defaults
  // to ones; its values are not checked (negative weights give an indefinite matrix).
  m.def("gram(Tensor input, Tensor target, Tensor? sample_weight) -> Tensor");
}

namespace {
// torch.autocast: aten's ops carry autocast kernels that cast their arguments; a fastlin op computes
// at its inputs' dtypes whatever the caller's autocast state (fastlin.functional applies torch's
// rules in front of linear and mse_loss, as differentiable casts). Without this guard the ATen
// calls inside a kernel would be autocast behind its back: the CUDA glue's float32 matrix products
// (at::mm on float32 copies, O > 16) would run in bfloat16. Nothing of this runs while autocast is
// off: the Autocast keys are then not in the dispatch key set.
void run_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kOps[] = {"linear",          "linear_backward", "mse_loss",
                                "mse_loss_backward", "linear_mse_loss", "sgd_update_",
                                "train_step",        "fit",             "gram"};

void register_without_autocast(torch::Library& m) {
  for (const char* name : kOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_without_autocast>());
  }
}
}  // namespace

TORCH_LIBRARY_IMPL(fastlin, AutocastCPU, m) { register_without_autocast(m); }
TORCH_LIBRARY_IMPL(fastlin, AutocastCUDA, m) { register_without_autocast(m); }

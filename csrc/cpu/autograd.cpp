// Autograd kernels (dispatch key Autograd, so for every device) of fastlin::linear and
// fastlin::mse_loss: C++ graph nodes whose backward calls fastlin::linear_backward and
// fastlin::mse_loss_backward through the dispatcher.
//
// Why in C++: fastlin.nn.Linear / MSELoss on the native backends call these ops directly
// (fastlin/functional.py). A Python torch.autograd.Function costs ~10 us per forward and again
// per backward node; these cost ~1 us, which is most of the per-step time of the seed's
// N = 100 loop (issue 3's >= 3x target). Same semantics as fastlin/autograd.py's
// LinearFunction / MSELossFunction, which remain the path of the other backends and of
// torch.compile: only the tensors backward needs are saved, masked-off gradients are not
// computed, and a masked-off input reaches linear_backward as a zero-storage stand-in.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <memory>
#include <type_traits>

#include "checks.h"

namespace fastlin {
namespace {

using torch::autograd::variable_list;

// The owning pointer of a graph node: std::shared_ptr<Node> up to torch 2.12, c10::intrusive_ptr<Node>
// from 2.13 on (the GPU machines run 2.11, CI runs 2.13). Edge::function names whichever it is.
using NodePtr = decltype(torch::autograd::Edge::function);
template <typename T>
auto make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>();
  } else {
    return c10::make_intrusive<T>();
  }
}

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
using LinearBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, std::array<bool, 3>);
using MseSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view);
using MseBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view);
using SgdSig = void(at::TensorList, at::TensorList, at::TensorList, double, double, double, double, bool, bool, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
const c10::TypedOperatorHandle<LinearSig>& linear_op() {
  static const auto op = find_op<LinearSig>("fastlin::linear");
  return op;
}
const c10::TypedOperatorHandle<LinearBwdSig>& linear_backward_op() {
  static const auto op = find_op<LinearBwdSig>("fastlin::linear_backward");
  return op;
}
const c10::TypedOperatorHandle<MseSig>& mse_op() {
  static const auto op = find_op<MseSig>("fastlin::mse_loss");
  return op;
}
const c10::TypedOperatorHandle<SgdSig>& sgd_op() {
  static const auto op = find_op<SgdSig>("fastlin::sgd_update_");
  return op;
}
const c10::TypedOperatorHandle<MseBwdSig>& mse_backward_op() {
  static const auto op = find_op<MseBwdSig>("fastlin::mse_loss_backward");
  return op;
}

// A tensor with the given shape and g's dtype/device but one element of storage: what
// linear_backward gets for an input whose gradient is masked off (it never reads it).
at::Tensor stand_in(const at::Tensor& g, int64_t rows, int64_t cols) {
  return at::empty({}, g.options()).expand({rows, cols});
}

// Hand-written graph nodes (what PyTorch's generated VariableType code does) rather than
// torch::autograd::Function: Function::apply allocates input/output metadata, a context map and
// view bookkeeping per call (1.6 us of a 3.2 us forward, measured); these record only the edges
// and the saved tensors.
struct LinearBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x_, w_;
  int64_t d_ = 0;  // in_features (for stand-ins when neither tensor is saved)
  bool x_saved_ = false, w_saved_ = false;

  std::string name() const override { return "fastlin::LinearBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    w_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& g = grads[0];
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2)};
    variable_list out(3);
    if (!g.defined() || !(mask[0] || mask[1] || mask[2])) return out;
    // grad_input reads weight, grad_weight reads input: the other may be a stand-in.
    at::Tensor x = x_saved_ ? x_.unpack() : stand_in(g, g.size(0), d_);
    at::Tensor w = w_saved_ ? w_.unpack() : stand_in(g, g.size(1), d_);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gw, gb] = linear_backward_op().call(g, x, w, mask);
    if (mask[0]) out[0] = std::move(gi);
    if (mask[1]) out[1] = std::move(gw);
    if (mask[2]) out[2] = std::move(gb);
    return out;
  }
};

constexpr const char* kReductions[3] = {"none", "mean", "sum"};

struct MseLossBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable input_, target_;
  int reduction_ = 1;  // index into kReductions

  std::string name() const override { return "fastlin::MseLossBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    target_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(2);
    const bool need_input = task_should_compute_output(0), need_target = task_should_compute_output(1);
    if (!grads[0].defined() || !(need_input || need_target)) return out;
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor g = mse_backward_op().call(grads[0], input_.unpack(), target_.unpack(), kReductions[reduction_]);
    if (need_target) out[1] = g.neg();
    if (need_input) out[0] = std::move(g);
    return out;
  }
};

at::Tensor linear_autograd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  at::Tensor y;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = linear_op().call(input, weight, bias);
  }
  if (!torch::autograd::compute_requires_grad(input, weight, bias)) return y;
  auto node = make_node<LinearBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
  // grad_weight needs input, grad_input needs weight. A leaf (data, a parameter) is saved
  // whenever it exists anyway (no memory kept alive, no stand-in to build); a non-leaf only
  // when its gradient partner needs it, like fastlin/autograd.py.
  const bool need_x = input.requires_grad(), need_w = weight.requires_grad();
  node->d_ = input.size(1);
  if (need_w || input.is_leaf()) {
    node->x_ = torch::autograd::SavedVariable(input, /*is_output=*/false);
    node->x_saved_ = true;
  }
  if (need_x || weight.is_leaf()) {
    node->w_ = torch::autograd::SavedVariable(weight, /*is_output=*/false);
    node->w_saved_ = true;
  }
  torch::autograd::set_history(y, NodePtr(node));
  return y;
}

at::Tensor mse_loss_autograd(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction) {
  at::Tensor loss;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    loss = mse_op().call(input, target, reduction);  // checks `reduction`
  }
  if (!torch::autograd::compute_requires_grad(input, target)) return loss;
  auto node = make_node<MseLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  node->reduction_ = reduction == "none" ? 0 : reduction == "mean" ? 1 : 2;
  node->input_ = torch::autograd::SavedVariable(input, /*is_output=*/false);
  node->target_ = torch::autograd::SavedVariable(target, /*is_output=*/false);
  torch::autograd::set_history(loss, NodePtr(node));
  return loss;
}

// sgd_update_ is not differentiable; without a kernel here the Autograd key runs PyTorch's
// generic not-implemented fallback (~1.5 us per call on the seed's two 1-element parameters,
// a quarter of optimizer.step()). This one does what that fallback amounts to for an optimizer
// update: run the kernel and bump the version counters of the tensors written in place, so
// autograd still detects a parameter modified after being saved for backward.
void sgd_update_autograd(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    sgd_op().call(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step);
  }
  for (const auto& p : params) torch::autograd::impl::bump_version(p);
  for (const auto& b : bufs) torch::autograd::impl::bump_version(b);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("mse_loss", &mse_loss_autograd);
  m.impl("sgd_update_", &sgd_update_autograd);
}

}  // namespace fastlin

// Autograd kernels (dispatch key Autograd, so for every device) of fastlin::linear and
// fastlin::mse_loss: C++ torch::autograd::Functions whose backward calls fastlin::linear_backward
// and fastlin::mse_loss_backward through the dispatcher.
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
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>

#include "checks.h"

namespace fastlin {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
using LinearBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, std::array<bool, 3>);
using MseSig = at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view);
using MseBwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view);

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
const c10::TypedOperatorHandle<MseBwdSig>& mse_backward_op() {
  static const auto op = find_op<MseBwdSig>("fastlin::mse_loss_backward");
  return op;
}

// A tensor with the given shape and g's dtype/device but one element of storage: what
// linear_backward gets for an input whose gradient is masked off (it never reads it).
at::Tensor stand_in(const at::Tensor& g, at::IntArrayRef shape) { return at::empty({}, g.options()).expand(shape); }

struct LinearFn : public torch::autograd::Function<LinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = linear_op().call(input, weight, bias);
    // grad_input needs weight, grad_weight needs input: keep only those alive.
    const bool need_w = weight.requires_grad(), need_x = input.requires_grad();
    ctx->save_for_backward({need_w ? input : at::Tensor(), need_x ? weight : at::Tensor()});
    if (!need_w) ctx->saved_data["x_shape"] = input.sizes();
    if (!need_x) ctx->saved_data["w_shape"] = weight.sizes();
    ctx->saved_data["has_bias"] = has(bias);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grads[0];
    at::Tensor x = saved[0].defined() ? saved[0] : stand_in(g, ctx->saved_data["x_shape"].toIntVector());
    at::Tensor w = saved[1].defined() ? saved[1] : stand_in(g, ctx->saved_data["w_shape"].toIntVector());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [gi, gw, gb] = linear_backward_op().call(g, x, w, mask);
    return {mask[0] ? gi : at::Tensor(), mask[1] ? gw : at::Tensor(), mask[2] ? gb : at::Tensor()};
  }
};

struct MseFn : public torch::autograd::Function<MseFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor loss = mse_op().call(input, target, reduction);
    ctx->save_for_backward({input, target});
    ctx->saved_data["reduction"] = std::string(reduction);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor g = mse_backward_op().call(grads[0], saved[0], saved[1], reduction);
    return {need_input ? g : at::Tensor(), need_target ? g.neg() : at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return LinearFn::apply(input, weight, bias);
}

at::Tensor mse_loss_autograd(const at::Tensor& input, const at::Tensor& target, c10::string_view reduction) {
  return MseFn::apply(input, target, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, Autograd, m) {
  m.impl("linear", &linear_autograd);
  m.impl("mse_loss", &mse_loss_autograd);
}

}  // namespace fastlin

// Input checks shared by the CPU and CUDA glue. Every message names the op, the argument and what
// was expected, e.g. "fastlin.linear: weight must have shape (O, 3) to match input (N, 3); got (2, 4)".
// Checks run before any output is written, so a failed check leaves parameters and buffers untouched.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace fastlin {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "(";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << (t.dim() == 1 ? ",)" : ")");
  return os.str();
}

inline void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "fastlin.", op, ": ", name, " must be a tensor, got None");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "fastlin.", op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
                    shape_str(t));
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, "fastlin.", op, ": ",
                   name, " must be float32, float64, bfloat16 or float16, got ", s);
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "fastlin.", op, ": ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "fastlin.", op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                        const char* why) {
  if (t.sizes() == expected) return;
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < expected.size(); ++i) os << (i ? ", " : "") << expected[i];
  os << (expected.size() == 1 ? ",)" : ")");
  TORCH_CHECK_VALUE(false, "fastlin.", op, ": ", name, " must have shape ", os.str(), " ", why, ", got ",
                    shape_str(t));
}

inline void check_reduction(const char* op, c10::string_view reduction, bool allow_none) {
  bool ok = reduction == "mean" || reduction == "sum" || (allow_none && reduction == "none");
  TORCH_CHECK_VALUE(ok, "fastlin.", op, ": reduction must be ", allow_none ? "'none', 'mean' or 'sum'" : "'mean' or 'sum'",
                    ", got '", std::string(reduction), "'");
}

// input (N, D), weight (O, D), bias (O,) or undefined: dims, dtypes and devices agree.
inline void check_linear_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  check_dim(op, "input", input, 2, "(N, in_features)");
  check_dim(op, "weight", weight, 2, "(out_features, in_features)");
  check_floating(op, "input", input);
  check_same_dtype(op, "weight", weight, "input", input);
  check_same_device(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(weight.size(1) == input.size(1), "fastlin.", op, ": weight must have shape (out_features, ",
                    input.size(1), ") to match input's last dimension ", input.size(1), ", got ", shape_str(weight));
  if (bias.has_value() && bias->defined()) {
    check_dim(op, "bias", *bias, 1, "(out_features,)");
    check_same_dtype(op, "bias", *bias, "input", input);
    check_same_device(op, "bias", *bias, "input", input);
    check_shape(op, "bias", *bias, {weight.size(0)}, "to match weight's out_features");
  }
}

// target (N, O) for input (N, D) and weight (O, D).
inline void check_target(const char* op, const at::Tensor& target, const at::Tensor& input, const at::Tensor& weight) {
  check_same_device(op, "target", target, "input", input);
  check_shape(op, "target", target, {input.size(0), weight.size(0)},
              "(N, out_features) to match input's rows and weight's out_features; fastlin never broadcasts a target");
}

// mse_loss / mse_loss_backward: input of any floating shape, target of exactly that shape.
inline void check_mse_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                           c10::string_view reduction) {
  check_reduction(op, reduction, /*allow_none=*/true);
  check_floating(op, "input", input);
  check_same_dtype(op, "target", target, "input", input);
  check_same_device(op, "target", target, "input", input);
  check_shape(op, "target", target, input.sizes(), "(the shape of input; fastlin never broadcasts a target)");
}

// mse_loss_backward's grad_output: input's dtype and device; one value (any shape holding one
// element), else broadcastable to input's shape (torch's rule; the gradient always has input's shape).
inline void check_mse_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input) {
  check_same_dtype(op, "grad_output", grad_output, "input", input);
  check_same_device(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK_VALUE(grad_output.numel() == 1 || at::is_expandable_to(grad_output.sizes(), input.sizes()), "fastlin.",
                    op, ": grad_output must be a scalar or broadcastable to input's shape ", shape_str(input),
                    ", got shape ", shape_str(grad_output));
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace fastlin

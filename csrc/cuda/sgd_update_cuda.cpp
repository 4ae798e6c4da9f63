// CUDA glue of sgd_update_: every parameter of the list in one multi-tensor launch (sgd_update.cu;
// one launch per 64 tensors). Parameters, gradients and buffers that are dense with one common
// layout are updated in place; any other tensor goes through a contiguous copy that is written
// back afterwards (both stream-ordered, no host sync).
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "glue.h"

namespace fastlin {
namespace {

namespace fc = ::fastlin::cuda;
using namespace ::fastlin::cuda_glue;

// The multi-tensor kernel's launch shape: the defaults of SgdLaunchCfg, or the environment's
// FASTLIN_CUDA_SGD_CHUNK / FASTLIN_CUDA_SGD_BLOCKS_PER_SM (0 = even split / one full wave; read at
// each call, so bench/gpu_bench.py can compare shapes in one process). Results do not depend on it.
fc::SgdLaunchCfg sgd_launch_cfg() {
  fc::SgdLaunchCfg c;
  c.chunk = env_count("sgd_update_", "FASTLIN_CUDA_SGD_CHUNK", c.chunk);
  c.blocks_per_sm =
      static_cast<int>(std::min<int64_t>(env_count("sgd_update_", "FASTLIN_CUDA_SGD_BLOCKS_PER_SM", c.blocks_per_sm), 64));
  return c;
}

void sgd_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const char* op = "sgd_update_";
  TORCH_CHECK_VALUE(grads.size() == params.size(), "fastlin.", op, ": grads must have one tensor per parameter (",
                    params.size(), "), got ", grads.size());
  TORCH_CHECK_VALUE(momentum == 0 ? bufs.empty() : bufs.size() == params.size(), "fastlin.", op,
                    ": momentum_buffers must be empty when momentum == 0, else one per parameter (", params.size(),
                    "), got ", bufs.size());
  if (params.empty()) return;
  const fc::SgdLaunchCfg cfg = sgd_launch_cfg();
  // Every check before the first launch: a failed check leaves every tensor as it was.
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string pi = "params[" + std::to_string(i) + "]";
    const std::string gi = "grads[" + std::to_string(i) + "]";
    check_floating(op, pi.c_str(), params[i]);
    check_cuda(op, pi.c_str(), params[i]);
    check_same_device(op, pi.c_str(), params[i], "params[0]", params[0]);
    check_same_dtype(op, gi.c_str(), grads[i], pi.c_str(), params[i]);
    check_same_device(op, gi.c_str(), grads[i], pi.c_str(), params[i]);
    check_shape(op, gi.c_str(), grads[i], params[i].sizes(), "(the shape of its parameter)");
    if (!bufs.empty()) {
      const std::string bi = "momentum_buffers[" + std::to_string(i) + "]";
      check_same_dtype(op, bi.c_str(), bufs[i], pi.c_str(), params[i]);
      check_same_device(op, bi.c_str(), bufs[i], pi.c_str(), params[i]);
      check_shape(op, bi.c_str(), bufs[i], params[i].sizes(), "(the shape of its parameter)");
    }
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<fc::SgdTensorRef> refs;
  std::vector<at::Tensor> keep;                                 // copies that must outlive the launch
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (destination, updated copy)
  refs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    at::Tensor pu = p, gu = grads[i], bu = bufs.empty() ? at::Tensor() : bufs[i];
    const bool same_layout = p.is_non_overlapping_and_dense() && gu.strides() == p.strides() &&
                             (!bu.defined() || bu.strides() == p.strides());
    if (!same_layout) {
      pu = p.contiguous();
      gu = gu.contiguous();
      if (bu.defined()) bu = bu.contiguous();
      if (!pu.is_same(p)) write_back.emplace_back(p, pu);
      if (bu.defined() && !bu.is_same(bufs[i])) write_back.emplace_back(bufs[i], bu);
      keep.push_back(pu);
      keep.push_back(gu);
      if (bu.defined()) keep.push_back(bu);
    }
    fc::SgdTensorRef r;
    r.p = pu.data_ptr();
    r.g = gu.data_ptr();
    r.buf = bu.defined() ? bu.data_ptr() : nullptr;
    r.n = p.numel();
    r.dt = dtype_of(p);
    refs.push_back(r);
  }
  if (refs.empty()) return;
  fc::SgdOpts o;
  o.lr = lr;
  o.momentum = momentum;
  o.dampening = dampening;
  o.weight_decay = weight_decay;
  o.nesterov = nesterov ? 1 : 0;
  o.maximize = maximize ? 1 : 0;
  o.first_step = first_step ? 1 : 0;
  C10_CUDA_CHECK(fc::sgd_update_launch(refs.data(), static_cast<int>(refs.size()), o, num_sms(), current_stream(), cfg));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (auto& wb : write_back) wb.first.copy_(wb.second);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlin, CUDA, m) { m.impl("sgd_update_", &sgd_update_cuda); }

}  // namespace fastlin

"""Entry points to the fastlin ops and their fake (meta) implementations.

Each function here picks the backend (fastlin.backends) for the device of its first tensor and
calls the registered op (torch.ops.fastlin.* for cpp/cuda, torch.ops.fastlin_triton.* for Triton)
or the reference. Nothing above this module knows which backend ran. Signatures and semantics are
those of the schemas in csrc/ops.cpp: 2-D input (N, D), weight (O, D), bias (O,), target (N, O).
"""

from __future__ import annotations

import torch

from fastlin import _checks as C
from fastlin import backends, reference

_cache: dict[tuple[str, str, str], object] = {}
_native_cache: dict[tuple, bool] = {}

# The registered ops of fastlin._C, bound once (None without the extension). On the native
# backends (cpp, cuda) linear and mse_loss carry C++ autograd kernels (csrc/cpu/autograd.cpp),
# so fastlin.functional calls them directly: no Python autograd.Function on the hot path.
native_linear = None
native_mse_loss = None
native_sgd_update_ = None


def is_native(backend: str | None, device: torch.device, op: str | None = None) -> bool:
    """Whether ``backend`` on ``device`` runs op ``op`` as a torch.ops.fastlin.* op (cpp, cuda). Cached
    per (backend, process default, device, op); raises like backends.resolve for a bad/unavailable
    backend."""
    if backend is not None and not isinstance(backend, str):
        backends.resolve(backend, device)  # raises the clear error
    key = (backend, backends._default, device, op)
    r = _native_cache.get(key)
    if r is None:
        r = _native_cache[key] = backends.resolve(backend, device, op) in ("cpp", "cuda")
    return r


_cpu_memo: dict = {}
_CPU = torch.device("cpu")


def cpu_native(backend: str | None) -> bool:
    """is_native(backend, cpu) for the hot path: one dict lookup (no device object, no key tuple;
    torch.device.type alone costs ~0.3 us), re-resolved when the process default changes."""
    m = _cpu_memo.get(backend) if backend is None or type(backend) is str else None
    if m is not None and m[0] is backends._default:
        return m[1]
    r = is_native(backend, _CPU)
    _cpu_memo[backend] = (backends._default, r)
    return r


_any_autocast = torch._C._is_any_autocast_enabled


def _autocast_types() -> frozenset:
    out = set()
    for t in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla"):
        try:
            if torch.amp.is_autocast_available(t):
                out.add(t)
        except RuntimeError:
            pass
    return frozenset(out)


# The device types torch.autocast knows, asked once at import: dynamo cannot trace
# torch.amp.is_autocast_available in torch 2.11 (13 torch.compile tests failed on the H200 with it).
AUTOCAST_DEVICE_TYPES = _autocast_types()


def _autocast_off(fn, device_type: str):
    """fn run with torch.autocast off for ``device_type``: the reference's float32 matrix products
    (and the torch ops inside the Triton launchers) would otherwise be cast to the autocast dtype.
    A fastlin op computes at its inputs' dtypes; fastlin.functional applies torch's autocast rules
    in front of it. The C++ ops get the same guard from csrc/ops.cpp."""
    # While dynamo traces too, whatever the autocast state then (the guard goes into the graph):
    # _any_autocast is left to eager calls, and without the guard a compiled call's float32 products
    # were autocast (compiled and eager results differed; H200 and CPU, session 11).
    if device_type not in AUTOCAST_DEVICE_TYPES:  # (meta tensors, for one)
        return fn

    def run(*args):
        if torch.compiler.is_compiling() or _any_autocast():
            with torch.autocast(device_type, enabled=False):
                return fn(*args)
        return fn(*args)

    return run


def impl(name: str, backend: str | None, device: torch.device, dtype=None, out_features=None):
    """The callable implementing op ``name`` for tensors on ``device`` under ``backend`` (``auto``
    on CUDA picks by the input dtype and out_features too, where given)."""
    which = backends.resolve(backend, device, name, dtype, out_features)
    key = (name, which, device.type)
    fn = _cache.get(key)
    if fn is None:
        if which == "reference":
            fn = _autocast_off(getattr(reference, name), device.type)
        elif which == "triton":
            import fastlin.triton  # noqa: F401  (registers torch.ops.fastlin_triton.*)

            fn = _autocast_off(getattr(torch.ops.fastlin_triton, name), device.type)
        else:
            fn = getattr(torch.ops.fastlin, name)
        # Not while dynamo traces: a write to this module-level dict inside an autograd.Function
        # that torch.compile traces is an "unsafe side effect" graph break (fullgraph=True fails).
        if not torch.compiler.is_compiling():
            _cache[key] = fn
    return fn


def _onepass_impl(name: str, backend, input, weight):
    """impl() for the one-pass ops: on CUDA, auto goes by the input dtype and out_features too (not
    asked on the CPU: those reads cost ~0.45 us a call, 8% of a tiny train_step there)."""
    if input.is_cuda:
        width = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
        return impl(name, backend, input.device, input.dtype, width)
    return impl(name, backend, input.device)


def linear(input, weight, bias=None, *, backend=None):
    """input (N, D), weight (O, D), bias (O,) or None -> (N, O)."""
    return impl("linear", backend, input.device)(input, weight, bias)


def linear_backward(grad_output, input, weight, output_mask, *, backend=None):
    """-> (grad_input (N, D), grad_weight (O, D), grad_bias (O,)); masked-off outputs are empty (0,)."""
    return impl("linear_backward", backend, input.device)(grad_output, input, weight, list(output_mask))


def mse_loss(input, target, reduction="mean", *, backend=None):
    return impl("mse_loss", backend, input.device)(input, target, reduction)


def mse_loss_backward(grad_output, input, target, reduction="mean", *, backend=None):
    return impl("mse_loss_backward", backend, input.device)(grad_output, input, target, reduction)


def linear_mse_loss(
    input, weight, bias, target, reduction="mean", output_mask=(True, True, True, True), *, backend=None
):
    """-> (loss, grad_input, grad_weight, grad_bias, grad_target), gradients for grad_output = 1."""
    return _onepass_impl("linear_mse_loss", backend, input, weight)(
        input, weight, bias, target, reduction, list(output_mask)
    )


def sgd_update_(
    params,
    grads,
    momentum_buffers,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    first_step=False,
    *,
    backend=None,
) -> None:
    if not params:
        return
    impl("sgd_update_", backend, params[0].device)(
        list(params),
        list(grads),
        list(momentum_buffers),
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        bool(first_step),
    )


def train_step(
    input,
    target,
    weight,
    bias=None,
    weight_momentum=None,
    bias_momentum=None,
    sample_weight=None,
    *,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    first_step=False,
    backend=None,
) -> torch.Tensor:
    """One fused SGD step on the MSE of input (N, D) against target (N, O); returns the loss (0-d)."""
    return _onepass_impl("train_step", backend, input, weight)(
        input,
        target,
        weight,
        bias,
        weight_momentum,
        bias_momentum,
        sample_weight,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        bool(first_step),
    )


def fit(
    input,
    target,
    weight,
    bias=None,
    weight_momentum=None,
    bias_momentum=None,
    sample_weight=None,
    *,
    epochs,
    batch_size=0,
    shuffle=True,
    seed=0,
    lr,
    momentum=0.0,
    dampening=0.0,
    weight_decay=0.0,
    nesterov=False,
    maximize=False,
    first_step=False,
    backend=None,
) -> torch.Tensor:
    """`epochs` fused passes over the data; returns the per-epoch loss history (epochs,)."""
    return _onepass_impl("fit", backend, input, weight)(
        input,
        target,
        weight,
        bias,
        weight_momentum,
        bias_momentum,
        sample_weight,
        int(epochs),
        int(batch_size),
        bool(shuffle),
        int(seed),
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(maximize),
        bool(first_step),
    )


def gram(input, target, sample_weight=None, *, backend=None) -> torch.Tensor:
    """Z^T diag(sample_weight) Z for Z = [input, 1, target]: float64 (D + 1 + O, D + 1 + O)."""
    which = backends.resolve(backend, input.device)
    if which != "reference" and not _has_gram_kernel(which):
        which = "reference"
    return impl("gram", which, input.device)(input, target, sample_weight)


def _has_gram_kernel(which: str) -> bool:
    # The C++ CPU kernel; the GPU backends have none and run the reference (chunked float64
    # GEMMs on the device).
    return (
        which == "cpp"
        and backends.extension_loaded()
        and torch._C._dispatch_has_kernel_for_dispatch_key("fastlin::gram", "CPU")
    )


# ---------------------------------------------------------------------------------------------
# Fake implementations: shapes and dtypes only, with the same shape checks as the kernels.


def register_fakes(ns: str) -> None:
    """Register the fake implementations for the ops of namespace ``ns``: "fastlin" (the C++ ops'
    schemas, when fastlin._C loaded) or "fastlin_triton" (the Triton ops, whose default fake is
    their launcher run on fake tensors: its host arithmetic on the batch size, int(N) in the grid
    and the plan, pinned a dynamic batch to its example value, so torch.export of a model on them
    failed with "Constraints violated (n)"). Same signatures, same fakes: the Triton ops mirror
    csrc/ops.cpp's schemas."""

    def loss_dtype(input):
        return torch.float64 if input.dtype == torch.float64 else torch.float32

    @_fake(ns, "linear")
    def _(input, weight, bias):
        C.check_linear_args("linear", input, weight, bias)
        return input.new_empty((input.shape[0], weight.shape[0]))

    @_fake(ns, "linear_backward")
    def _(grad_output, input, weight, output_mask):
        C.check_linear_args("linear_backward", input, weight, None)
        torch._check(grad_output.shape == (input.shape[0], weight.shape[0]))
        # Masked-off outputs are distinct empty tensors (the kernels never return aliases).
        return (
            input.new_empty(input.shape if output_mask[0] else (0,)),
            input.new_empty(weight.shape if output_mask[1] else (0,)),
            input.new_empty((weight.shape[0],) if output_mask[2] else (0,)),
        )

    @_fake(ns, "mse_loss")
    def _(input, target, reduction):
        C.check_mse_args("mse_loss", input, target, reduction)
        return input.new_empty(input.shape if reduction == "none" else ())

    @_fake(ns, "mse_loss_backward")
    def _(grad_output, input, target, reduction):
        C.check_mse_args("mse_loss_backward", input, target, reduction)
        C.check_mse_grad_output("mse_loss_backward", grad_output, input)
        return input.new_empty(input.shape)

    @_fake(ns, "linear_mse_loss")
    def _(input, weight, bias, target, reduction, output_mask):
        C.check_linear_args("linear_mse_loss", input, weight, bias)
        C.check_target("linear_mse_loss", target, input, weight)
        C.check_reduction("linear_mse_loss", reduction, allow_none=False)

        def e():  # one per masked output: outputs must not alias each other (opcheck checks)
            return input.new_empty((0,))

        return (
            input.new_empty(()),
            input.new_empty(input.shape) if output_mask[0] else e(),
            input.new_empty(weight.shape) if output_mask[1] else e(),
            input.new_empty((weight.shape[0],)) if output_mask[2] else e(),
            input.new_empty(target.shape) if output_mask[3] else e(),
        )

    @_fake(ns, "sgd_update_")
    def _(
        params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step
    ):
        C.check_sgd_update_args("sgd_update_", params, grads, momentum_buffers, momentum)

    @_fake(ns, "train_step")
    def _(
        input,
        target,
        weight,
        bias,
        weight_momentum,
        bias_momentum,
        sample_weight,
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        first_step,
    ):
        C.check_train_args(
            "train_step",
            input,
            target,
            weight,
            bias,
            weight_momentum,
            bias_momentum,
            sample_weight,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        )
        return input.new_empty((), dtype=loss_dtype(input))

    @_fake(ns, "fit")
    def _(
        input,
        target,
        weight,
        bias,
        weight_momentum,
        bias_momentum,
        sample_weight,
        epochs,
        batch_size,
        shuffle,
        seed,
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        maximize,
        first_step,
    ):
        C.check_train_args(
            "fit",
            input,
            target,
            weight,
            bias,
            weight_momentum,
            bias_momentum,
            sample_weight,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        )
        return input.new_empty((epochs,), dtype=loss_dtype(input))

    @_fake(ns, "gram")
    def _(input, target, sample_weight):
        C.check_gram_args("gram", input, target, sample_weight)
        p = input.shape[1] + 1 + target.shape[1]
        return input.new_empty((p, p), dtype=torch.float64)


def _fake(ns: str, name: str):
    """register_fake for ns::name, or a no-op when that namespace has no such op (no Triton gram)."""
    if not hasattr(getattr(torch.ops, ns), name):
        return lambda fn: fn
    return torch.library.register_fake(f"{ns}::{name}")


if backends.extension_loaded():  # the schemas exist only when fastlin._C loaded
    register_fakes("fastlin")
    # The OpOverloads' C++ callables (OpOverload.__call__ is exactly `self._op(*args)`; calling
    # it directly saves a Python frame per op on the hot path).
    native_linear = torch.ops.fastlin.linear.default._op
    native_mse_loss = torch.ops.fastlin.mse_loss.default._op
    native_sgd_update_ = torch.ops.fastlin.sgd_update_.default._op

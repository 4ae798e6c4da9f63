"""fastlin.optim.SGD: torch.optim.SGD with one fused update per parameter group and device."""

from __future__ import annotations

import torch
from torch.optim import optimizer as _topt

from fastlin import _checks as C
from fastlin import ops

_profiler_enabled = torch._C._autograd._profiler_enabled
_is_compiling = torch.compiler.is_compiling

__all__ = ["SGD"]


def _scalar(v) -> float:
    # A tensor lr/weight_decay is read on the host; on a CPU tensor that is free, on a CUDA tensor
    # it is a device sync (the kernels take the value as a float).
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class SGD(torch.optim.SGD):
    """Drop-in for torch.optim.SGD: same signature, validation, param_groups keys, state
    (``state[p]["momentum_buffer"]``) and state_dict, so either can load the other's state.

    ``foreach`` is accepted and ignored (the update is already one fused call per group and
    device). ``fused=True`` and ``differentiable=True`` are torch-specific modes and raise.
    ``backend`` picks the implementation (None: the default)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
        backend: str | None = None,
    ):
        if differentiable:
            raise ValueError("fastlin.optim.SGD: differentiable=True is not supported; use torch.optim.SGD")
        if fused:
            raise ValueError(
                "fastlin.optim.SGD: fused=True selects torch's own fused kernel; fastlin's update is "
                "always fused, leave fused unset"
            )
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=False,
            fused=fused,
        )
        self.backend = backend

    def step(self, closure=None):
        """Perform a single optimization step (closure: re-evaluates the model, returns the loss)."""
        # torch wraps an Optimizer's step in profile_hook_step (record_function + hook loops,
        # ~3 us a call); `hooked = True` below opts out of that, and the wrapped version runs
        # only when a hook is registered or the profiler is on, so hooks and traces are unchanged.
        # Under torch.compile dynamo traces the wrapped version, like torch's own optimizers.
        if (
            _is_compiling()
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or _topt._global_optimizer_pre_hooks
            or _topt._global_optimizer_post_hooks
            or _profiler_enabled()
        ):
            return self._hooked_step(closure)
        return self._step(closure)

    step.hooked = True  # type: ignore[attr-defined]  (see step: torch must not wrap it again)

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if _is_compiling():
            with torch.no_grad():
                self._update_all()
            return loss
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() without its context-manager frames
        try:
            self._update_all()
        finally:
            torch._C._set_grad_enabled(prev)
        return loss

    def _update_all(self) -> None:
        # Every update call of every group is planned, and checked when there is more than one,
        # before the first one writes: a bad input anywhere leaves every group untouched.
        calls: list = []
        for group in self.param_groups:
            self._plan_group(group, calls)
        if len(calls) > 1:
            for ps, gs, bs, _, momentum, *_ in calls:
                C.check_sgd_update_args("sgd_update_", ps, gs, bs, momentum)
        state = self.state
        for ps, gs, bs, first, momentum, lr, dampening, wd, nesterov, maximize, native in calls:
            if native:  # the registered op directly: no wrapper, no list copies
                ops.native_sgd_update_(ps, gs, bs, lr, momentum, dampening, wd, nesterov, maximize, first)
            else:
                ops.sgd_update_(
                    ps, gs, bs, lr, momentum, dampening, wd, nesterov, maximize, first, backend=self.backend
                )
            if momentum != 0:  # only after a successful update: a failed check leaves state as it was
                for p, b in zip(ps, bs):
                    state[p]["momentum_buffer"] = b

    _hooked_step = torch.optim.Optimizer.profile_hook_step(_step)

    def _native(self, p) -> bool:
        if _is_compiling():  # dynamo traces ops.sgd_update_ (no module-level caches written)
            return False
        if p.is_cpu:
            return ops.cpu_native(self.backend)
        return ops.is_native(self.backend, p.device, "sgd_update_")

    def _plan_group(self, group, calls: list) -> None:
        """Append this group's update calls: one per (device, first_step) subset (the op updates a
        list on one device; parameters without a momentum buffer yet start theirs from their
        gradient)."""
        momentum = float(group["momentum"])
        opts = (
            _scalar(group["lr"]),
            float(group["dampening"]),
            _scalar(group["weight_decay"]),
            bool(group["nesterov"]),
            bool(group["maximize"]),
        )
        if momentum == 0:  # common case: every gradient on one device -> one call, two lists
            ps, gs = [], []
            device = None
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        "fastlin.optim.SGD: sparse gradients are not supported; use torch.optim.SGD"
                    )
                if device is None:
                    device = p.device
                elif p.device != device:
                    break
                ps.append(p)
                gs.append(grad)
            else:
                if ps:
                    calls.append((ps, gs, [], False, 0.0, *opts, self._native(ps[0])))
                return
        subsets: dict[tuple, tuple[list, list, list]] = {}
        state = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    "fastlin.optim.SGD: sparse gradients are not supported; use torch.optim.SGD"
                )
            buf = None
            first = False
            if momentum != 0:
                buf = state[p].get("momentum_buffer")
                if buf is None:
                    first = True
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
            key = (p.device, first)
            sub = subsets.get(key)
            if sub is None:
                sub = subsets[key] = ([], [], [])
            sub[0].append(p)
            sub[1].append(grad)
            if buf is not None:
                sub[2].append(buf)
        for (_, first), (ps, gs, bs) in subsets.items():
            calls.append((ps, gs, bs, first, momentum, *opts, self._native(ps[0])))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (torch.optim.Optimizer.zero_grad; same semantics)."""
        if (
            set_to_none and not _is_compiling() and not _profiler_enabled()
        ):  # torch's loop minus record_function (~2 us)
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        super().zero_grad(set_to_none)

"""fastlin.optim.SGD: torch.optim.SGD with one fused update per parameter group and device."""

from __future__ import annotations

import torch

from fastlin import _checks as C
from fastlin import ops

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

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, backend: str | None = None):
        if differentiable:
            raise ValueError("fastlin.optim.SGD: differentiable=True is not supported; use torch.optim.SGD")
        if fused:
            raise ValueError(
                "fastlin.optim.SGD: fused=True selects torch's own fused kernel; fastlin's update is "
                "always fused, leave fused unset"
            )
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=False, fused=fused)
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step (closure: re-evaluates the model, returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every update call of every group is planned and checked before the first one writes, so
        # a bad input in a later group leaves the earlier groups untouched too.
        calls = []
        for group in self.param_groups:
            momentum = group["momentum"]
            opts = dict(
                lr=_scalar(group["lr"]), momentum=momentum, dampening=group["dampening"],
                weight_decay=_scalar(group["weight_decay"]), nesterov=group["nesterov"],
                maximize=group["maximize"], backend=self.backend,
            )
            # One call per (device, first_step) subset: the op updates a list on one device, and
            # parameters without a momentum buffer yet start theirs from their gradient.
            subsets: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("fastlin.optim.SGD: sparse gradients are not supported; use torch.optim.SGD")
                buf = None
                first = False
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        first = True
                        buf = torch.empty_like(p, memory_format=torch.preserve_format)
                ps, gs, bs = subsets.setdefault((p.device, first), ([], [], []))
                ps.append(p)
                gs.append(p.grad)
                if buf is not None:
                    bs.append(buf)
            calls += [(ps, gs, bs, first, momentum, opts) for (_, first), (ps, gs, bs) in subsets.items()]
        if len(calls) > 1:  # check every call before the first one writes anything
            for ps, gs, bs, _, momentum, _ in calls:
                C.check_sgd_update_args("sgd_update_", ps, gs, bs, momentum)
        for ps, gs, bs, first, momentum, opts in calls:
            ops.sgd_update_(ps, gs, bs, first_step=first, **opts)
            if momentum != 0:  # only after a successful update: a failed check leaves state as it was
                for p, b in zip(ps, bs):
                    self.state[p]["momentum_buffer"] = b
        return loss

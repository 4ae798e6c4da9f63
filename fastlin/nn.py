"""nn.Module drop-ins: same constructors, initialisation (same RNG draws) and state_dict keys as
torch.nn; forward runs the fastlin ops."""

from __future__ import annotations

import torch

from fastlin import functional as F

__all__ = ["Linear", "MSELoss", "LinearMSELoss"]

_MISSING = object()
_is_compiling = torch.compiler.is_compiling


class Linear(torch.nn.Linear):
    """torch.nn.Linear with fastlin's kernels. ``backend`` picks the implementation (None: the default)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if type(self) is Linear and not _is_compiling():
            # self.weight goes through Module.__getattr__ (~0.6 us each, a fifth of the seed's
            # forward); for a plain Linear it returns exactly these entries. Subclasses
            # (parametrize) and removed parameters (prune) take the attribute path.
            p = self._parameters
            w, b = p.get("weight", _MISSING), p.get("bias", _MISSING)
            if w is not _MISSING and b is not _MISSING:
                return F._linear(input, w, b, self.backend)
        return F._linear(input, self.weight, self.bias, self.backend)  # F.linear without its kwargs layer


class MSELoss(torch.nn.MSELoss):
    """torch.nn.MSELoss with fastlin's kernels; a target whose shape differs from input's raises."""

    def __init__(
        self, size_average=None, reduce=None, reduction: str = "mean", *, backend: str | None = None
    ):
        super().__init__(size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r = self.reduction
        if r == "mean" or r == "sum" or r == "none":
            return F._mse_loss(input, target, r, self.backend)  # F.mse_loss minus its argument handling
        return F.mse_loss(input, target, reduction=r, backend=self.backend)


class LinearMSELoss(Linear):
    """A Linear layer whose forward takes (input, target) and returns the MSE of its prediction,
    fused: one pass over input, no (N, out_features) prediction for "mean"/"sum"."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        reduction: str = "mean",
        backend: str | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype, backend=backend)
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.linear_mse_loss(input, self.weight, self.bias, target, self.reduction, backend=self.backend)

    def predict(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}"

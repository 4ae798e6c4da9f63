"""FusedLinearRegressor: a linear model trained by fastlin's fused SGD step, with an sklearn-style API.

    reg = fastlin.FusedLinearRegressor(1, 1, lr=0.01)
    reg.fit(x, y, epochs=1000)          # x (N, D), y (N,) or (N, O): tensors or numpy arrays
    reg.predict(torch.tensor([[4.0]]))  # -> (1,) when fit saw a 1-D y, else (1, O)
    reg.score(x_test, y_test)           # R^2, sklearn's definition
    fastlin.FusedLinearRegressor(D, O, solver="normal", alpha=1.0).fit(x, y)   # exact ridge, one pass
    reg.partial_fit(x_chunk, y_chunk)   # streaming: Gram sums (normal) or one fused step (sgd)
    reg.fit(loader, epochs=3)           # an iterable / DataLoader of (x, y[, sample_weight]) batches

Training never builds an autograd graph: ``step`` is one ``fastlin.ops.train_step`` call (one pass
over x: loss, gradients and torch.optim.SGD's update in place) and ``fit`` is ``fastlin.ops.fit``
(the whole loop in one call, or a few calls when it reports progress). The optimizer state
(momentum buffers, and whether the first step has been taken) lives in the module, so
``state_dict`` / ``load_state_dict`` save and restore training exactly.

Exact solvers (solver="normal" | "lstsq", see fastlin.solvers). "normal" sums the augmented Gram
matrix of the data (``ops.gram``, float64) and solves it; the sum is kept in the model (``_gram``,
saved in state_dict's extra state) so ``partial_fit`` continues a stream after a reload. Parameters
are written, rounded to their dtype, only after a solve succeeded. Under torch.distributed the Gram
matrices are summed over ranks before the solve. "lstsq" solves all the data at once (no streaming).

Shapes of y. ``y`` is (N, out_features), or (N,) when out_features == 1, which is reshaped to
(N, 1) on purpose (never broadcast: any other shape raises, naming y and the expected shape).
Like scikit-learn, ``predict`` returns (N,) when the last ``fit``/``step`` saw a 1-D y, else
(N, out_features); ``forward`` always returns (..., out_features) like ``torch.nn.Linear``.

Shuffled mini-batch fits and chunking. ``fastlin.ops.fit`` draws each epoch's order with
``torch.randperm(N, generator=g)`` from a generator ``g`` seeded once per call. So that a fit
reporting progress (several op calls) follows exactly the iterates of one that does not, a
shuffled fit always runs in blocks of ``B = fit_block_epochs(N, D)`` epochs (a function of the
data shape only), block ``b`` being one op call seeded with ``block_seed(seed, b)``; progress
chunks are whole blocks. Full-batch and unshuffled fits do not depend on a seed and run as one
op call (or any split into chunks, which gives the same iterates since the op is deterministic).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from fastlin import _checks as C
from fastlin import backends, distributed, ops, solvers
from fastlin import functional as F

__all__ = ["FusedLinearRegressor", "fit_block_epochs", "block_seed"]

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def block_seed(seed: int, block: int) -> int:
    """Seed of the op call that runs block ``block`` of a shuffled fit seeded with ``seed``.

    splitmix64 of (seed, block): distinct, well-mixed seeds for consecutive blocks, in [0, 2^63)."""
    z = ((seed & _MASK64) + (block + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def fit_block_epochs(n_rows: int, n_features: int) -> int:
    """Epochs per op call of a shuffled fit: about 2^20 elements of x per call (so the ~10 us cost
    of a call stays near 1% of it), 1..1024 epochs. Depends on the data shape only, so a fit's
    iterates never depend on timing or on whether it shows progress."""
    return max(1, min(1024, (1 << 20) // max(1, n_rows * n_features)))


# A fit whose estimated cost is below this many "element-visits" runs as one call without timing
# a first chunk: rows*features per epoch plus ~4096 per step for the fixed cost of a step. Even
# the first ATen version of the op does 2^24 of these in well under 2 s here.
_SMALL_FIT_WORK = 1 << 24
_SOLVERS = ("sgd", "normal", "lstsq")
_PROGRESS_SECONDS = 2.0  # show a bar by default when the fit is estimated to take longer
_CHUNK_SECONDS = 0.25  # with a bar, one op call per this much work


def _is_array_like(v) -> bool:
    return hasattr(v, "__array__") or isinstance(v, (list, tuple, float, int))


class FusedLinearRegressor(torch.nn.Module):
    """Linear regression y ~ x @ weight.T + bias trained with torch.optim.SGD's update on the MSE.

    Args:
        in_features: D, columns of x.  out_features: O, columns of y.  bias: learn a bias.
        lr, momentum, dampening, weight_decay, nesterov: torch.optim.SGD's options and semantics,
            validated like torch.optim.SGD, except that lr must be > 0.
        backend: "auto" | "cpp" | "cuda" | "triton" | "reference" (see fastlin.backends).
        solver: "sgd" (fused SGD steps, the default) | "normal" (exact, normal equations from one Gram
            pass; streams with partial_fit) | "lstsq" (exact, torch.linalg.lstsq in float64).
        alpha: ridge penalty of the exact solvers, alpha ||weight||^2 on the summed (weighted) squared
            error like sklearn's Ridge; never on the bias. (weight_decay stays the SGD knob.)
        device, dtype: of the parameters (like torch.nn.Linear).

    Parameters ``weight`` (O, D) and ``bias`` (O,) are initialised exactly like
    ``torch.nn.Linear(in_features, out_features, bias)`` (same RNG draws).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        bias: bool = True,
        *,
        lr: float = 0.01,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        backend: str = "auto",
        solver: str = "sgd",
        alpha: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = "fastlin.FusedLinearRegressor"
        for arg, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        # torch.optim.SGD's validation, with lr > 0: a zero learning rate trains nothing.
        if isinstance(lr, torch.Tensor):
            raise TypeError(f"{name}: lr must be a Python float, got a tensor")
        if not lr > 0:
            raise ValueError(f"{name}: lr must be > 0, got {lr}")
        if not momentum >= 0:
            raise ValueError(f"{name}: momentum must be >= 0, got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
        if not math.isfinite(dampening):
            raise ValueError(f"{name}: dampening must be finite, got {dampening}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{name}: nesterov requires momentum > 0 and dampening == 0")
        if not all(math.isfinite(v) for v in (lr, momentum, weight_decay)):
            raise ValueError(f"{name}: lr, momentum and weight_decay must be finite")
        if solver not in _SOLVERS:
            choices = ", ".join(map(repr, _SOLVERS))
            raise ValueError(f"{name}: solver must be one of {choices}, got {solver!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not (math.isfinite(alpha) and alpha >= 0)
        ):
            raise ValueError(f"{name}: alpha must be a finite float >= 0, got {alpha!r}")
        backend = backends._validate(backend)
        self.solver, self.alpha = solver, float(alpha)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)
        self.backend = backend
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        if self.weight.dtype not in C.FLOAT_DTYPES:
            raise TypeError(
                f"{name}: dtype must be float32, float64, bfloat16 or float16, got {self.weight.dtype}"
            )
        # The optimizer state: momentum buffers (written, not read, by the first step).
        if momentum != 0:
            self.register_buffer("weight_momentum", torch.zeros_like(self.weight, requires_grad=False))
            self.register_buffer(
                "bias_momentum", torch.zeros_like(self.bias, requires_grad=False) if bias else None
            )
        else:
            self.register_buffer("weight_momentum", None)
            self.register_buffer("bias_momentum", None)
        self._first_step = True
        self._gram: torch.Tensor | None = None  # exact solvers: the summed Gram matrix of the data seen
        self._n_seen = 0  # rows behind _gram
        self._stream_dtype: torch.dtype | None = None  # dtype of the x chunks streamed since the last fit
        self._y_1d: bool | None = None  # whether the last fit/step saw a 1-D y (the shape predict returns)
        backends.resolve(backend, self.weight.device)  # an unavailable backend fails here, not mid-fit
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise like torch.nn.Linear (same RNG draws) and forget the optimizer state."""
        torch.nn.Linear.reset_parameters(self)  # uses only self.weight and self.bias
        with torch.no_grad():
            if self.weight_momentum is not None:
                self.weight_momentum.zero_()
            if self.bias_momentum is not None:
                self.bias_momentum.zero_()
        self._first_step = True
        self._gram, self._n_seen, self._stream_dtype = None, 0, None

    # -- state --------------------------------------------------------------------------------

    def get_extra_state(self):
        # Host-side training state, saved in state_dict under "_extra_state". The exact solvers'
        # statistics travel here (not as buffers) because they exist only after a normal-solver
        # fit/partial_fit: "gram" is the (D + 1 + O, D + 1 + O) float64 sum of the Gram matrices of
        # every chunk seen (or None), so partial_fit resumes exactly after load_state_dict.
        state = {"first_step": self._first_step, "y_1d": self._y_1d}
        if self._gram is not None or self._stream_dtype is not None:
            sd = None if self._stream_dtype is None else str(self._stream_dtype).replace("torch.", "")
            state.update(gram=self._gram, n_samples_seen=self._n_seen, stream_dtype=sd)
        return state

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "first_step" not in state:
            raise ValueError(f"fastlin.FusedLinearRegressor: unexpected extra state {state!r}")
        gram = state.get("gram")
        P = self.in_features + 1 + self.out_features
        if gram is not None and (not isinstance(gram, torch.Tensor) or tuple(gram.shape) != (P, P)):
            raise ValueError(
                f"fastlin.FusedLinearRegressor: the saved Gram matrix must have shape ({P}, {P}) "
                f"(in_features + 1 + out_features), got {getattr(gram, 'shape', type(gram).__name__)}"
            )
        sd = state.get("stream_dtype")
        self._first_step = bool(state["first_step"])
        self._y_1d = state.get("y_1d")
        if gram is not None:
            gram = gram.to(device=self.weight.device, dtype=torch.float64, copy=True)
        self._gram = gram
        self._n_seen = int(state.get("n_samples_seen", 0))
        self._stream_dtype = None if sd is None else getattr(torch, sd)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, "
        s += f"bias={self.bias is not None}, lr={self.lr}"
        for k, default in (("momentum", 0.0), ("dampening", 0.0), ("weight_decay", 0.0), ("nesterov", False)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.solver != "sgd":
            s += f", solver={self.solver!r}"
        if self.alpha != 0:
            s += f", alpha={self.alpha}"
        return s

    # -- inputs -------------------------------------------------------------------------------

    def _x(self, method: str, x, *, allow_low_precision: bool) -> torch.Tensor:
        """x -> a 2-D (N, in_features) tensor on the parameters' device, in their dtype (or kept in
        bf16/fp16 when allowed and the parameters are float32, as train_step accepts)."""
        w = self.weight
        if not isinstance(x, torch.Tensor):
            if not _is_array_like(x):
                raise TypeError(
                    f"fastlin.FusedLinearRegressor.{method}: x must be a tensor or an array, "
                    f"got {type(x).__name__}"
                )
            x = torch.as_tensor(x)
        if x.dim() != 2:
            hint = "; for one feature use x.reshape(-1, 1)" if x.dim() == 1 and self.in_features == 1 else ""
            raise ValueError(
                f"fastlin.FusedLinearRegressor.{method}: x must be 2-D (N, {self.in_features}) "
                f"(in_features={self.in_features}), got shape {C.shape_str(x.shape)}{hint}"
            )
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"fastlin.FusedLinearRegressor.{method}: x must have shape (N, {self.in_features}) "
                f"(in_features={self.in_features}), got {C.shape_str(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError(
                f"fastlin.FusedLinearRegressor.{method}: x must have at least one row, "
                f"got shape {C.shape_str(x.shape)}"
            )
        want = w.dtype
        if allow_low_precision and x.dtype in C.LOW_PRECISION and want == torch.float32:
            want = x.dtype
        if x.dtype != want or x.device != w.device:
            x = x.to(device=w.device, dtype=want)
        return x

    def _y(
        self, method: str, y, x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, bool]:
        """y (N,) [out_features == 1] or (N, out_features) -> ((N, out_features) tensor like x, was 1-D)."""
        if not isinstance(y, torch.Tensor):
            if not _is_array_like(y):
                raise TypeError(
                    f"fastlin.FusedLinearRegressor.{method}: y must be a tensor or an array, "
                    f"got {type(y).__name__}"
                )
            y = torch.as_tensor(y)
        n, O = x.shape[0], self.out_features
        one_d = y.dim() == 1
        if one_d and O == 1 and y.shape[0] == n:
            y = y.reshape(n, 1)
        elif tuple(y.shape) != (n, O):
            want = f"({n},) or ({n}, 1)" if O == 1 else f"({n}, {O})"
            raise ValueError(
                f"fastlin.FusedLinearRegressor.{method}: y must have shape {want} (x's {n} rows, "
                f"out_features={O}); fastlin never broadcasts y, got {C.shape_str(y.shape)}"
            )
        dtype = x.dtype if dtype is None else dtype
        if y.dtype != dtype or y.device != x.device:
            y = y.to(device=x.device, dtype=dtype)
        return y, one_d

    def _sample_weight(self, method: str, sample_weight, x: torch.Tensor) -> torch.Tensor | None:
        if sample_weight is None:
            return None
        sw = sample_weight if isinstance(sample_weight, torch.Tensor) else torch.as_tensor(sample_weight)
        if tuple(sw.shape) != (x.shape[0],):
            raise ValueError(
                f"fastlin.FusedLinearRegressor.{method}: sample_weight must have shape "
                f"({x.shape[0]},) (one weight per row of x), got {C.shape_str(sw.shape)}"
            )
        want = self.weight.dtype  # the accumulation dtype of the step: no rounding of the weights to bf16
        if sw.dtype != want or sw.device != x.device:
            sw = sw.to(device=x.device, dtype=want)
        return sw

    def _opts(self) -> dict:
        return dict(
            lr=self.lr,
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
            backend=self.backend,
        )

    # -- inference ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), like torch.nn.Linear (differentiable)."""
        return F.linear(x, self.weight, self.bias, backend=self.backend)

    @torch.no_grad()
    def predict(self, x) -> torch.Tensor:
        """x (N, in_features) tensor or array -> (N,) if the last fit/step saw a 1-D y, else
        (N, out_features)."""
        x = self._x("predict", x, allow_low_precision=False)
        out = ops.linear(x, self.weight, self.bias, backend=self.backend)  # 2-D, no autograd: the op itself
        return out.reshape(-1) if self._y_1d and self.out_features == 1 else out

    @torch.no_grad()
    def score(self, x, y, sample_weight=None) -> float:
        """R^2 of the prediction, sklearn.metrics.r2_score's definition: per output 1 - SS_res / SS_tot
        (1.0 when both are 0, 0.0 when only SS_tot is), averaged uniformly over outputs."""
        return self.evaluate(x, y, sample_weight=sample_weight)["r2"]

    @torch.no_grad()
    def evaluate(self, x, y, sample_weight=None) -> dict:
        """{"mse": mean squared error over all N*O elements, "r2": score(x, y)}, computed in float64."""
        x = self._x("evaluate", x, allow_low_precision=False)
        y, _ = self._y("evaluate", y, x, dtype=torch.float64)
        pred = ops.linear(x, self.weight, self.bias, backend=self.backend).to(torch.float64)
        sw = self._sample_weight("evaluate", sample_weight, x)
        w = (
            torch.ones(x.shape[0], 1, dtype=torch.float64, device=x.device)
            if sw is None
            else sw.to(torch.float64).reshape(-1, 1)
        )
        ss_res = (w * (y - pred).square()).sum(0)
        mean = (w * y).sum(0) / w.sum()
        ss_tot = (w * (y - mean).square()).sum(0)
        ss_res_h, ss_tot_h = ss_res.tolist(), ss_tot.tolist()
        r2 = []
        for res, tot in zip(ss_res_h, ss_tot_h):
            if tot != 0:
                r2.append(1.0 - res / tot)
            else:  # sklearn's force_finite: a constant target is perfectly predicted or not at all
                r2.append(1.0 if res == 0 else 0.0)
        mse = float(sum(ss_res_h) / (float(w.sum()) * self.out_features))
        return {"mse": mse, "r2": float(sum(r2) / len(r2))}

    # -- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, x, y, sample_weight=None) -> torch.Tensor:
        """One fused SGD step on the MSE of x (N, in_features) against y (N,) or (N, out_features).

        Returns the loss before the update (0-d tensor, float32 or float64; no host sync). Like
        torch's optimizer it applies whatever it computes: non-finite data gives non-finite
        parameters (``fit`` checks every step instead)."""
        x = self._x("step", x, allow_low_precision=True)
        y, one_d = self._y("step", y, x)
        sw = self._sample_weight("step", sample_weight, x)
        loss = ops.train_step(
            x,
            y,
            self.weight,
            self.bias,
            self.weight_momentum,
            self.bias_momentum,
            sw,
            first_step=self._first_step,
            **self._opts(),
        )
        # Plain attributes through __dict__: nn.Module.__setattr__ costs ~2 us each, more than the
        # whole op on the seed's data.
        self.__dict__.update(_first_step=False, _y_1d=one_d, n_features_in_=self.in_features)
        return loss

    @torch.no_grad()
    def fit(
        self,
        x,
        y=None,
        *,
        epochs: int = 1000,
        batch_size: int | None = None,
        shuffle: bool = True,
        seed: int | None = None,
        sample_weight=None,
        progress: bool | None = None,
    ) -> FusedLinearRegressor:
        """Train for ``epochs`` passes over x (N, in_features) against y (N,) or (N, out_features).

        batch_size: None (or >= N) for full-batch steps, else mini-batches of that many rows (the
            last one shorter), in a shuffled order per epoch when ``shuffle``. seed: of the shuffle
            (None: drawn from torch's default generator, so torch.manual_seed makes it repeatable).
        sample_weight: (N,) per-row weights of the loss.
        progress: a tqdm bar with the loss; None shows it when the fit is estimated to take > ~2 s.

        Continues from the current parameters and optimizer state (call reset_parameters() for a
        fresh start). Sets loss_history_ (epochs,) CPU tensor, the mean loss of each epoch,
        n_iter_ (epochs run), n_features_in_, seed_ (the shuffle seed used, None if unshuffled).

        Raises FloatingPointError, naming the epoch and the first non-finite row of x / y /
        sample_weight if there is one, when a step's loss or updated parameters would be
        non-finite; the parameters and momentum then keep their values from before that step.
        Under torch.distributed (a process group of more than one rank, see fastlin.distributed):
        x, y, sample_weight are this rank's shard and the fit equals one process fitting the
        concatenated shards; rank 0's model is broadcast first; batch_size is rows per rank per
        step, each rank shuffling its own shard (seed shared); sample_weight must be >= 0; no
        progress bar. Details in fastlin.distributed.fit_sgd.

        Exact solvers (solver="normal" | "lstsq"): one solve on all the data, ignoring epochs,
        batch_size, shuffle, seed and progress; see ``_fit_exact``.

        Batches: ``fit(batches, epochs=...)`` with y omitted takes an iterable (a list, a generator,
        a torch.utils.data.DataLoader) of (x, y) or (x, y, sample_weight) batches; see ``_fit_batches``.

        Returns self."""
        if distributed.is_active() and y is not None and getattr(self, "solver", "sgd") == "sgd":
            return distributed.fit_sgd(
                self,
                x,
                y,
                epochs=epochs,
                batch_size=batch_size,
                shuffle=shuffle,
                seed=seed,
                sample_weight=sample_weight,
            )
        name = "fastlin.FusedLinearRegressor.fit"
        C.check_fit_loop_args(name, epochs, batch_size, seed)
        if y is None:
            return self._fit_batches(x, epochs=epochs, sample_weight=sample_weight)
        if self.solver != "sgd":
            return self._fit_exact(x, y, sample_weight)
        x = self._x("fit", x, allow_low_precision=True)
        y, one_d = self._y("fit", y, x)
        sw = self._sample_weight("fit", sample_weight, x)
        n = x.shape[0]
        bs = 0 if batch_size is None or batch_size >= n else batch_size
        shuffled = bool(shuffle) and bs != 0
        if shuffled and seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        run_seed = (seed & _MASK63) if shuffled else 0
        args = (x, y, self.weight, self.bias, self.weight_momentum, self.bias_momentum, sw)
        opts = self._opts()
        # Only a fit that starts with first_step (momentum buffers not yet live) and stops in its
        # first epoch needs to know whether any of its steps was applied: compare the parameters
        # (a step that changes neither, an exactly zero update, counts as not applied).
        snapshot = None
        if self._first_step and self.momentum != 0 and bs != 0:
            snapshot = [p.clone() for p in (self.weight, self.bias) if p is not None]
        steps_per_epoch = 1 if bs == 0 else -(-n // bs)
        block = fit_block_epochs(n, self.in_features) if shuffled else None
        parts: list[torch.Tensor] = []
        done = 0
        bar = None
        failed_at = None

        def run(k: int) -> bool:
            """Run epochs [done, done + k) (k a multiple of the block, or the rest); False on a NaN."""
            nonlocal done, failed_at
            if shuffled:
                calls = []
                b0 = done // block
                e = done
                while e < done + k:
                    calls.append((min(block, epochs - e), block_seed(run_seed, b0 + len(calls))))
                    e += calls[-1][0]
            else:
                calls = [(k, 0)]
            for n_ep, s in calls:
                h = ops.fit(
                    *args,
                    epochs=n_ep,
                    batch_size=bs,
                    shuffle=shuffled,
                    seed=s,
                    first_step=self.__dict__["_first_step"],
                    **opts,
                ).cpu()
                parts.append(h)
                # The op fills the failing epoch and all later ones with NaN: the last entry tells.
                hn = h.numpy()
                if math.isnan(hn[-1]):
                    first_bad = int(np.argmax(np.isnan(hn)))
                    failed_at = done + first_bad
                    params = [p for p in (self.weight, self.bias) if p is not None]
                    if first_bad > 0 or (
                        snapshot is not None and not all(map(torch.equal, snapshot, params))
                    ):
                        self.__dict__["_first_step"] = False
                    done += n_ep
                    return False
                self.__dict__["_first_step"] = False
                done += n_ep
            return True

        try:
            if epochs > 0:
                work = epochs * (n * self.in_features + 4096 * steps_per_epoch)
                if progress is False or (progress is None and work <= _SMALL_FIT_WORK):
                    run(epochs)
                else:
                    # A small first chunk, timed, to estimate the rest (and to start the bar).
                    k0 = block if shuffled else max(1, _SMALL_FIT_WORK // max(1, work // epochs))
                    k0 = min(k0, epochs)
                    t0 = time.perf_counter()
                    ok = run(k0)
                    per_epoch = (time.perf_counter() - t0) / k0
                    if ok and done < epochs:
                        if progress or per_epoch * (epochs - done) > _PROGRESS_SECONDS:
                            bar = _make_bar(epochs, done, parts)
                        if bar is None:
                            run(epochs - done)
                        else:
                            chunk = max(1, int(_CHUNK_SECONDS / max(per_epoch, 1e-9)))
                            if shuffled:  # whole blocks, so the iterates do not depend on the chunking
                                chunk = max(1, chunk // block) * block
                            while done < epochs:
                                ok = run(min(chunk, epochs - done))
                                bar.n = done
                                if ok:
                                    bar.set_postfix(loss=f"{float(parts[-1][-1]):.6g}", refresh=False)
                                bar.refresh()
                                if not ok:
                                    break
        finally:
            if bar is not None:
                bar.close()

        if len(parts) == 1:
            hist = parts[0]
        else:
            hist = (
                torch.cat(parts)
                if parts
                else torch.empty(0, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            )
        n_iter = epochs if failed_at is None else failed_at
        self.__dict__.update(
            n_features_in_=self.in_features,
            _y_1d=one_d,
            seed_=seed if shuffled else None,
            loss_history_=hist[:n_iter] if failed_at is not None else hist,
            n_iter_=n_iter,
        )
        if failed_at is not None:
            raise _non_finite_error(failed_at, epochs, x, y, sw, self)
        return self

    # -- exact solvers and streaming ----------------------------------------------------------

    def _exact_inputs(self, method: str, x, y, sample_weight):
        """x, y, sample_weight -> tensors in the parameters' dtype (x never kept in bf16/fp16 under
        float32 parameters, unlike the sgd path: ops.gram wants x, y and the weights in one dtype,
        and rounding the sample weights to bf16 would change the problem)."""
        x = self._x(method, x, allow_low_precision=False)
        y, one_d = self._y(method, y, x)
        sw = self._sample_weight(method, sample_weight, x)
        return x, y, sw, one_d

    def _global_gram(self, method: str, compute) -> torch.Tensor:
        """compute() -> this process's Gram matrix; under torch.distributed, the sum over ranks."""
        if not distributed.is_active():
            return compute()
        op, what = f"FusedLinearRegressor.{method}", "in_features (-1: that rank rejected its own data)"
        try:
            G = compute()
        except Exception:
            # This rank's data was rejected: take part in the check with -1 so every other rank
            # raises too instead of waiting in the all_reduce, then raise our own error.
            try:
                distributed.check_same(op, what, -1)
            except ValueError:
                pass
            raise
        # Same shapes on every rank before summing (a mismatch raises on every rank, none hangs).
        distributed.check_same(op, what, self.in_features)
        distributed.check_same(op, "out_features", self.out_features)
        distributed.all_reduce_sum_(G)  # every rank solves the same global normal equations
        return G

    def _solve_and_write(self, G: torch.Tensor) -> tuple[float, dict]:
        """Solve from the Gram matrix G, then (only then) write weight/bias in the parameters'
        dtype. -> (training loss of the written parameters, solve info)."""
        fi = self.bias is not None
        W, b, info = solvers.solve_gram(G, self.in_features, alpha=self.alpha, fit_intercept=fi)
        self._write_params(W, b)
        return float(solvers.gram_loss(G, self.in_features, self.weight, self.bias)), info

    def _write_params(self, W: torch.Tensor, b: torch.Tensor) -> None:
        if not (bool(torch.isfinite(W).all()) and bool(torch.isfinite(b).all())):
            raise FloatingPointError(
                "fastlin.FusedLinearRegressor: the exact solve gave non-finite parameters (non-finite or "
                "overflowing data); the model is unchanged"
            )
        self.weight.copy_(W.to(self.weight.dtype))
        if self.bias is not None:
            self.bias.copy_(b.to(self.bias.dtype))

    def _set_fit_attrs(self, loss: float, x_dtype: torch.dtype, one_d: bool, **extra) -> None:
        hist_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
        self.__dict__.update(
            n_features_in_=self.in_features,
            _y_1d=one_d,
            seed_=None,
            loss_history_=torch.tensor([loss], dtype=hist_dtype),
            n_iter_=1,
            **extra,
        )

    def _fit_exact(self, x, y, sample_weight) -> FusedLinearRegressor:
        """solver="normal": one ops.gram pass over x, then solvers.solve_gram (Cholesky, or the
        minimum-norm eigen solve with an IllConditionedWarning). solver="lstsq": solvers.lstsq on
        the centred, weighted data in float64 (the accurate reference; single process only).

        Starts afresh (forgets chunks streamed by partial_fit; keeps this fit's Gram matrix so that
        partial_fit can continue). Sets loss_history_ = [training MSE of the final parameters],
        n_iter_ = 1, n_samples_seen_, solve_info_."""
        if self.solver == "lstsq":
            x, y, sw, one_d = self._exact_inputs("fit", x, y, sample_weight)
            if distributed.is_active():
                raise NotImplementedError(
                    "fastlin.FusedLinearRegressor.fit: solver='lstsq' needs all the data in one process; "
                    "under torch.distributed use solver='normal' (Gram matrices summed over ranks)"
                )
            fi = self.bias is not None
            W, b = solvers.lstsq(x, y, sample_weight=sw, alpha=self.alpha, fit_intercept=fi)
            self._write_params(W, b)
            loss = F.linear(x, self.weight, self.bias, backend=self.backend).double() - y.double()
            w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if sw is None else sw.double()
            loss = float((w[:, None] * loss.square()).sum() / (w.sum() * self.out_features))
            self._gram, self._n_seen, self._stream_dtype = None, 0, None
            info = {"method": "lstsq"}
            self._set_fit_attrs(loss, x.dtype, one_d, n_samples_seen_=x.shape[0], solve_info_=info)
            return self
        got = {}

        def local():  # validation inside: a rank rejecting its data still joins the check (no hang)
            got["x"], y_, sw, got["one_d"] = self._exact_inputs("fit", x, y, sample_weight)
            return ops.gram(got["x"], y_, sw, backend=self.backend)

        G = self._global_gram("fit", local)
        x, one_d = got["x"], got["one_d"]
        loss, info = self._solve_and_write(G)
        self._gram, self._n_seen, self._stream_dtype = G, x.shape[0], None
        self._set_fit_attrs(loss, x.dtype, one_d, n_samples_seen_=x.shape[0], solve_info_=info)
        return self

    @torch.no_grad()
    def partial_fit(self, x, y, sample_weight=None) -> FusedLinearRegressor:
        """Train on one more chunk x (n, in_features), y (n,) or (n, out_features), sample_weight (n,).

        solver="normal": adds the chunk's Gram matrix to the running sum (kept in the model and in
        its state_dict) and re-solves, so after any number of chunks the model equals one ``fit``
        on their concatenation. solver="sgd": one fused SGD step on the chunk (ops.train_step).
        solver="lstsq" raises: it solves on all the data at once and keeps no statistics.

        Every chunk must have the dtype of the first one since the last fit / reset_parameters().
        A rejected chunk (shape, dtype, non-finite data) raises before anything is updated.
        Sets loss_history_ = [training MSE over all chunks seen] (normal) or [the step's loss before
        the update] (sgd). Returns self."""
        name = "fastlin.FusedLinearRegressor.partial_fit"
        if self.solver == "lstsq":
            raise ValueError(
                f"{name}: solver='lstsq' needs all the data at once (it never forms the Gram matrix); "
                "use solver='normal' to stream chunks, or fit(x, y) with all the data"
            )
        xt = x if isinstance(x, torch.Tensor) else None
        in_dtype = xt.dtype if xt is not None else None

        def check_dtype():
            if xt is not None and self._stream_dtype is not None and xt.dtype != self._stream_dtype:
                raise TypeError(
                    f"{name}: x has dtype {xt.dtype} but the earlier chunks had {self._stream_dtype}; every "
                    f"chunk must have the same dtype (convert it with x.to({self._stream_dtype}))"
                )

        if self.solver == "sgd":
            check_dtype()
            x = self._x("partial_fit", x, allow_low_precision=True)
            y, one_d = self._y("partial_fit", y, x)
            sw = self._sample_weight("partial_fit", sample_weight, x)
            loss = self._checked_step("partial_fit", x, y, sw)
            self._stream_dtype = in_dtype or self._stream_dtype
            self._set_fit_attrs(loss, x.dtype, one_d)
            return self
        got = {}

        def local():  # validation inside: a rank rejecting its chunk still joins the check (no hang)
            check_dtype()
            got["x"], y_, sw, got["one_d"] = self._exact_inputs("partial_fit", x, y, sample_weight)
            return ops.gram(got["x"], y_, sw, backend=self.backend)

        G = self._global_gram("partial_fit", local)
        x, one_d = got["x"], got["one_d"]
        total = G if self._gram is None else self._gram.to(G.device) + G
        loss, info = self._solve_and_write(total)  # raises before writing anything
        self._gram, self._n_seen = total, self._n_seen + x.shape[0]
        self._stream_dtype = in_dtype or self._stream_dtype
        self._set_fit_attrs(loss, x.dtype, one_d, n_samples_seen_=self._n_seen, solve_info_=info)
        return self

    def _checked_step(self, method: str, x, y, sw) -> float:
        """One fused step (ops.train_step) that is undone, with a FloatingPointError, when its loss
        or the updated parameters are non-finite. -> the loss before the update."""
        state = [self.weight, self.bias, self.weight_momentum, self.bias_momentum]
        state = [t for t in state if t is not None]
        saved = [t.clone() for t in state]
        loss = ops.train_step(
            x,
            y,
            self.weight,
            self.bias,
            self.weight_momentum,
            self.bias_momentum,
            sw,
            first_step=self._first_step,
            **self._opts(),
        )
        lv = float(loss)
        if not (math.isfinite(lv) and all(bool(torch.isfinite(t).all()) for t in state)):
            for t, v in zip(state, saved):
                t.copy_(v)
            culprits = [
                (n, r)
                for n, t in (("x", x), ("y", y), ("sample_weight", sw))
                if (r := _first_non_finite_row(t)) is not None
            ]
            msg = f"fastlin.FusedLinearRegressor.{method}: non-finite loss or update"
            if culprits:
                msg += "; first non-finite rows: " + ", ".join(f"{n}[{r}]" for n, r in culprits)
            else:
                msg += f"; the data is finite, so the step diverged: lower lr (now {self.lr})"
            raise FloatingPointError(msg + ". The parameters and momentum are unchanged.")
        self.__dict__["_first_step"] = False
        return lv

    def _batches(self, data, index: int, batch, first_dtype):
        """One batch (x, y) or (x, y, w) -> converted tensors; errors name the batch."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            got = type(batch).__name__
            got += f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise TypeError(
                f"fastlin.FusedLinearRegressor.fit: batch {index} must be a tuple (x, y) or "
                f"(x, y, sample_weight), got {got}"
            )
        bx = batch[0]
        if isinstance(bx, torch.Tensor) and first_dtype is not None and bx.dtype != first_dtype:
            raise TypeError(
                f"fastlin.FusedLinearRegressor.fit: x of batch {index} has dtype {bx.dtype} but batch 0 had "
                f"{first_dtype}; every batch must have the same dtype"
            )
        method = f"fit (batch {index})"
        sw_in = batch[2] if len(batch) == 3 else None
        if self.solver == "sgd":
            x = self._x(method, bx, allow_low_precision=True)
            y, one_d = self._y(method, batch[1], x)
            return x, y, self._sample_weight(method, sw_in, x), one_d
        return self._exact_inputs(method, bx, batch[1], sw_in)

    def _fit_batches(self, data, *, epochs: int, sample_weight) -> FusedLinearRegressor:
        """fit on an iterable of (x, y) or (x, y, sample_weight) batches (DataLoader, list, generator).

        solver="normal": one pass summing each batch's Gram matrix, then one solve (epochs ignored);
        the model changes only after the whole pass succeeded. solver="sgd": ``epochs`` passes, one
        fused step per batch (iterating ``data`` afresh each epoch, so a one-shot iterator needs
        epochs == 1); loss_history_ holds each epoch's mean step loss weighted by the batch's rows
        (or sum of sample weights), like fit. A bad batch raises before its step; steps already
        taken stay. solver="lstsq" raises (it needs all the data in memory)."""
        name = "fastlin.FusedLinearRegressor.fit"
        if sample_weight is not None:
            raise ValueError(
                f"{name}: with batches, give sample weights inside them as (x, y, sample_weight)"
            )
        if isinstance(data, torch.Tensor) or hasattr(data, "__array__"):
            raise ValueError(
                f"{name}: y is required when x is an array (or pass an iterable of (x, y) batches as x)"
            )
        try:
            first_iter = iter(data)
        except TypeError:
            raise TypeError(
                f"{name}: x must be a tensor/array (with y) or an iterable of (x, y[, sample_weight]) "
                f"batches, got {type(data).__name__}"
            ) from None
        one_shot = first_iter is data
        if self.solver == "lstsq":
            raise ValueError(
                f"{name}: solver='lstsq' needs all the data in memory: call fit(x, y), or use "
                "solver='normal' to fit from batches"
            )
        if self.solver == "normal":
            first_dtype, one_d, rows = None, None, 0

            def accumulate():
                nonlocal first_dtype, one_d, rows
                G = None
                for i, batch in enumerate(first_iter):
                    x, y, sw, one_d = self._batches(data, i, batch, first_dtype)
                    first_dtype = first_dtype or _dtype_of(batch[0])
                    g = ops.gram(x, y, sw, backend=self.backend)
                    G = g if G is None else G + g
                    rows += x.shape[0]
                if G is None:
                    raise ValueError(f"{name}: the iterable of batches is empty")
                return G

            G = self._global_gram("fit", accumulate)
            loss, info = self._solve_and_write(G)
            self._gram, self._n_seen, self._stream_dtype = G, rows, None
            hd = first_dtype or self.weight.dtype
            self._set_fit_attrs(loss, hd, one_d, n_samples_seen_=rows, solve_info_=info)
            return self
        # sgd
        if one_shot and epochs > 1:
            raise ValueError(
                f"{name}: {type(data).__name__} is a one-shot iterator and cannot be read for {epochs} "
                "epochs; pass a re-iterable (a list, a DataLoader) or epochs=1"
            )
        hist, first_dtype, one_d = [], None, None
        for e in range(epochs):
            it = first_iter if e == 0 else iter(data)
            total = weight = 0.0
            nb = 0
            for i, batch in enumerate(it):
                x, y, sw, one_d = self._batches(data, i, batch, first_dtype)
                first_dtype = first_dtype or _dtype_of(batch[0])
                try:
                    loss = self._checked_step(f"fit (epoch {e}, batch {i})", x, y, sw)
                except FloatingPointError:
                    self.__dict__.update(loss_history_=torch.tensor(hist, dtype=torch.float64), n_iter_=e)
                    raise
                wt = float(x.shape[0]) if sw is None else float(sw.double().sum())
                total, weight, nb = total + loss * wt, weight + wt, nb + 1
            if nb == 0:
                where = f" in epoch {e}" if e else ""
                raise ValueError(f"{name}: the iterable of batches is empty{where}")
            hist.append(total / weight)
        hist_dtype = torch.float64 if first_dtype == torch.float64 else torch.float32
        self.__dict__.update(
            n_features_in_=self.in_features,
            _y_1d=one_d,
            seed_=None,
            loss_history_=torch.tensor(hist, dtype=hist_dtype),
            n_iter_=epochs,
        )
        return self


def _dtype_of(t):
    return t.dtype if isinstance(t, torch.Tensor) else None


def _make_bar(total: int, done: int, parts):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; without it the fit simply runs silently
        return None
    bar = tqdm(total=total, initial=done, unit="epoch", desc="fastlin fit", leave=False, dynamic_ncols=True)
    if parts and parts[-1].numel():
        bar.set_postfix(loss=f"{float(parts[-1][-1]):.6g}")
    return bar


def _first_non_finite_row(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else None


def _non_finite_error(epoch: int, epochs: int, x, y, sw, model) -> FloatingPointError:
    # Only now, after the op stopped, look for the culprit: one extra pass over the data, on failure only.
    culprits = []
    for name, t in (("x", x), ("y", y), ("sample_weight", sw)):
        row = _first_non_finite_row(t)
        if row is not None:
            culprits.append((name, row))
    msg = (
        f"fastlin.FusedLinearRegressor.fit: non-finite loss or update at epoch {epoch} (0-based, of {epochs})"
    )
    if culprits:
        msg += "; first non-finite rows: " + ", ".join(f"{n}[{r}]" for n, r in culprits)
        msg += ". Remove or impute them"
    else:
        msg += f"; the data is finite, so the fit diverged: lower lr (now {model.lr})"
    msg += ". The parameters and momentum keep their values from before that step (the last finite ones)."
    err = FloatingPointError(msg)
    err.epoch = epoch
    err.rows = dict(culprits)
    return err

"""Exact linear least squares and ridge regression from one pass over x.

    G = fastlin.ops.gram(x, y, sample_weight)         # (P, P) float64, Z = [x, 1, y], P = D + 1 + O
    W, b, info = fastlin.solvers.solve_gram(G, D, alpha=1.0)      # W (O, D), b (O,) float64
    Ws, bs = fastlin.ridge_path(x, y, [0.1, 1.0, 10.0])           # (K, O, D), (K, O): one pass, one eigh

The model: minimise  sum_i w_i ||y_i - W x_i - b||^2 + alpha ||W||_F^2  (sklearn's Ridge objective;
alpha = 0 is LinearRegression). The intercept is never penalised: like sklearn we centre with the
weighted means xm = X^T w / sum(w), ym = Y^T w / sum(w), solve the centred system

    (Sxx + alpha I) W^T = Sxy,   Sxx = X^T W X - sum(w) xm xm^T,   Sxy = X^T W Y - sum(w) xm ym^T

and set b = ym - W xm. All of it comes from the blocks of the augmented Gram matrix (see csrc/ops.cpp),
so the data is read once. fit_intercept=False uses the X and Y blocks as they are (b = 0).

Numerics (float64 throughout, whatever the data dtype; the Gram is accumulated in float64):
- Centring from the Gram subtracts sum(w) xm xm^T from X^T W X: a feature whose mean is m times its
  standard deviation loses ~log10(m^2) digits of its centred second moment (sklearn centres the data
  instead). Data with |mean| / std up to ~1e3 still solves to ~1e-9 here.
- Solving the normal equations squares the condition number of the (centred, weighted) data; the
  "lstsq" path (torch.linalg.lstsq on the centred data) does not, and is the accurate reference.

Solve and fallback criterion (``solve_gram``): the system matrix A = Sxx + alpha I is Jacobi-scaled,
As = S A S with S = diag(A)^-1/2 (so feature units do not matter), and Cholesky-factorised, As = L L^T.
The fast path is taken when the factorisation succeeds and rcond_est = (min diag L / max diag L)^2 > rcond
(rcond_est is the exact reciprocal condition number for a diagonal As and an upper bound of it in
general: cheap, O(D), and it catches a (near-)duplicated or constant column, whose pivot collapses to
~sqrt(eps)). Otherwise we fall back to an eigendecomposition of A itself (unscaled, so that the answer is
the minimum-norm solution in the user's coordinates, as lstsq and sklearn's LinearRegression give):
A = V diag(lam) V^T, eigen-directions with lam <= rcond * lam_max are dropped (pseudo-inverse), and an
``IllConditionedWarning`` says so, with the condition number lam_max / lam_min. The default
rcond = 1e2 * D * eps(float64) (2.2e-14 * D): above the rounding noise of a float64 Gram (eps times the
largest eigenvalue, times the growth of the accumulation and of the eigensolver's backward error, ~D)
and far below any direction that carries information in double precision.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from fastlin import _checks as C
from fastlin import ops

__all__ = [
    "IllConditionedWarning",
    "SolveInfo",
    "default_rcond",
    "solve_gram",
    "solve_normal",
    "gram_loss",
    "ridge_path",
    "lstsq",
]


class IllConditionedWarning(RuntimeWarning):
    """The normal equations were (numerically) singular or ill-conditioned: the solver fell back to
    an eigendecomposition and returned the minimum-norm solution."""


class SolveInfo(dict):
    """What ``solve_gram`` did: {"method": "cholesky" | "eigh", "rcond_est": float, "cond": float | None,
    "rank": int}. cond (lam_max / lam_min of A, inf if lam_min <= 0) and rank are exact only on the
    eigh path; on the Cholesky path rank = D and cond is None."""


# Below this many rows/columns the dense solves run on one CPU thread. The OpenMP pool is pure cost
# at this size: measured on a busy 2-core machine, solve_gram at D = 64 took 7.9 ms with 2 threads
# (aten::tril inside cholesky_ex waiting ~8 ms on a descheduled pool thread) and 0.18 ms with 1.
_ONE_THREAD_BELOW = 512


@contextlib.contextmanager
def _one_thread(size: int, device: torch.device):
    """torch.set_num_threads(1) around small CPU solves (restored after; ~0.4 us per switch).
    Process-global, like every set_num_threads: another Python thread running torch ops at the
    same moment would briefly run single-threaded too."""
    n = torch.get_num_threads()
    if device.type != "cpu" or size >= _ONE_THREAD_BELOW or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def default_rcond(n_features: int) -> float:
    """Relative eigenvalue cutoff of the normal-equation solvers: 100 * D * eps(float64)."""
    return 100.0 * max(1, n_features) * torch.finfo(torch.float64).eps


def _check_gram(op: str, G: torch.Tensor, n_features: int) -> int:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"fastlin.{op}: gram must be a tensor, got {type(G).__name__}")
    if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1:
        raise ValueError(f"fastlin.{op}: n_features must be a positive int, got {n_features!r}")
    P = n_features + 2
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] < P:
        raise ValueError(
            f"fastlin.{op}: gram must be square (D + 1 + O, D + 1 + O) with D = n_features = {n_features} "
            f"and O >= 1, got shape {C.shape_str(G.shape)}"
        )
    return G.shape[0] - n_features - 1


def _check_alpha(op: str, alpha, name: str = "alpha") -> float:
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(
                f"fastlin.{op}: {name} must be a number, got a tensor of shape {C.shape_str(alpha.shape)}"
            )
        alpha = float(alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"fastlin.{op}: {name} must be a float >= 0, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"fastlin.{op}: {name} must be a finite float >= 0, got {alpha}")
    return float(alpha)


def _centred_blocks(G: torch.Tensor, D: int, fit_intercept: bool):
    """-> (Sxx (D, D), Sxy (D, O), Syy (O, O), xm (D,), ym (O,), sum_w) from the Gram, float64.

    xm, ym are zeros without intercept."""
    G = G.to(torch.float64)
    XX, Xs, XY = G[:D, :D], G[:D, D], G[:D, D + 1 :]
    sw, sY, YY = G[D, D], G[D, D + 1 :], G[D + 1 :, D + 1 :]
    if not fit_intercept:
        z = G.new_zeros(D), G.new_zeros(YY.shape[0])
        return XX, XY, YY, z[0], z[1], sw
    if not bool(sw > 0):
        raise ValueError(
            f"fastlin.solvers: the sum of the sample weights must be > 0 to fit an intercept, got {float(sw)}"
        )
    xm, ym = Xs / sw, sY / sw
    Sxx = XX - torch.outer(Xs, xm)
    Sxy = XY - torch.outer(Xs, ym)
    Syy = YY - torch.outer(sY, ym)
    Sxx = 0.5 * (Sxx + Sxx.T)  # exact symmetry for cholesky/eigh
    return Sxx, Sxy, Syy, xm, ym, sw


def _eigh_solve(A, B, rcond, *, alpha: float = 0.0):
    """Minimum-norm solution of (A + alpha I) X = B through A's eigendecomposition; directions with
    lam + alpha <= rcond * (lam_max + alpha) are dropped. -> (X, cond, rank)."""
    lam, V = torch.linalg.eigh(A)
    lam = lam + alpha
    top = lam[-1].clamp_min(0)
    keep = lam > rcond * top
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
    X = V @ (inv[:, None] * (V.T @ B))
    lo = float(lam[0])
    cond = float(top) / lo if lo > 0 else math.inf
    return X, cond, int(keep.sum())


def solve_gram(
    G: torch.Tensor,
    n_features: int,
    *,
    alpha: float = 0.0,
    fit_intercept: bool = True,
    rcond: float | None = None,
    warn: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """Ridge / least-squares solution from an augmented Gram matrix (see the module docstring).

    G: (D + 1 + O, D + 1 + O) = Z^T diag(w) Z with Z = [X, 1, Y] (``fastlin.ops.gram``; row chunks
    summed). n_features: D. alpha: ridge strength >= 0 on W only. rcond: relative eigenvalue cutoff
    (default ``default_rcond(D)``), also the Cholesky acceptance threshold.

    Returns (W (O, D), b (O,), info), float64, on G's device; b is zeros without intercept. Warns
    ``IllConditionedWarning`` (with the condition number) when it falls back to the eigen solve.
    """
    with _one_thread(
        G.shape[0] if isinstance(G, torch.Tensor) else 0, getattr(G, "device", torch.device("cpu"))
    ):
        return _solve_gram(G, n_features, alpha, fit_intercept, rcond, warn)


def _solve_gram(G, n_features, alpha, fit_intercept, rcond, warn):
    op = "solvers.solve_gram"
    O = _check_gram(op, G, n_features)
    alpha = _check_alpha(op, alpha)
    D = n_features
    rcond = default_rcond(D) if rcond is None else float(rcond)
    if not bool(torch.isfinite(G).all()):
        raise ValueError(
            f"fastlin.{op}: the Gram matrix has non-finite entries (non-finite x, y or sample_weight)"
        )
    Sxx, Sxy, _, xm, ym, _ = _centred_blocks(G, D, fit_intercept)
    A = Sxx + alpha * torch.eye(D, dtype=Sxx.dtype, device=Sxx.device) if alpha else Sxx
    d = torch.diagonal(A)
    info = SolveInfo(method="cholesky", rcond_est=0.0, cond=None, rank=D)
    Wt = None
    if bool((d > 0).all()):
        s = d.rsqrt()
        L, bad = torch.linalg.cholesky_ex(s[:, None] * A * s[None, :])
        if int(bad) == 0:
            dl = torch.diagonal(L)
            info["rcond_est"] = float((dl.min() / dl.max()) ** 2)
            if info["rcond_est"] > rcond:
                Wt = s[:, None] * torch.cholesky_solve(s[:, None] * Sxy, L)
    if Wt is None:
        Wt, cond, rank = _eigh_solve(Sxx, Sxy, rcond, alpha=alpha)
        info.update(method="eigh", cond=cond, rank=rank)
        if warn:
            warnings.warn(
                f"fastlin: ill-conditioned normal equations (condition number {cond:.3g}, D = {D}, "
                f"alpha = {alpha}); solved by eigendecomposition, returning the minimum-norm solution "
                f"(rank {rank}, eigenvalues below {rcond:.1e} x the largest dropped)",
                IllConditionedWarning,
                stacklevel=3,
            )
    W = Wt.T.contiguous()
    b = ym - W @ xm if fit_intercept else torch.zeros(O, dtype=torch.float64, device=G.device)
    return W, b, info


def gram_loss(
    G: torch.Tensor, n_features: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Training MSE of (weight (O, D), bias (O,) or None) on the data whose Gram is G, without
    another pass: sum_i w_i ||y_i - W x_i - b||^2 / (sum(w) * O), the loss ``train_step`` reports.
    float64 0-d tensor. Computed around the weighted means, so it is accurate to ~eps * ||Y - ym||^2."""
    O = _check_gram("solvers.gram_loss", G, n_features)
    with _one_thread(G.shape[0], G.device):
        return _gram_loss(G, n_features, O, weight, bias)


def _gram_loss(G, n_features, O, weight, bias):
    D = n_features
    Sxx, Sxy, Syy, xm, ym, sw = (
        _centred_blocks(G, D, True) if bool(G[D, D] > 0) else _centred_blocks(G, D, False)
    )
    W = weight.detach().to(device=G.device, dtype=torch.float64)
    b = torch.zeros(O, dtype=torch.float64, device=G.device) if bias is None else bias.detach().to(W)
    # sum w ||(y - ym) - W (x - xm) + (ym - W xm - b)||^2 = centred part + sum(w) ||ym - W xm - b||^2
    centred = torch.trace(Syy) - 2 * torch.sum(W.T * Sxy) + torch.sum((W @ Sxx) * W)
    shift = ym - W @ xm - b
    total = centred.clamp_min(0) + sw * shift.square().sum()
    return total / (sw * O)


def _as_xy(op: str, x, y, sample_weight):
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    if x.dim() != 2:
        raise ValueError(f"fastlin.{op}: x must be 2-D (N, D), got shape {C.shape_str(x.shape)}")
    if y.dim() == 1:
        y = y.reshape(-1, 1)
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"fastlin.{op}: y must have shape ({x.shape[0]},) or ({x.shape[0]}, O) (x's rows), "
            f"got {C.shape_str(y.shape)}"
        )
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.shape[0] == 0:
        raise ValueError(f"fastlin.{op}: x must have at least one row, got shape {C.shape_str(x.shape)}")
    if y.dtype != x.dtype or y.device != x.device:
        y = y.to(dtype=x.dtype, device=x.device)
    if sample_weight is not None:
        sw = sample_weight if isinstance(sample_weight, torch.Tensor) else torch.as_tensor(sample_weight)
        if tuple(sw.shape) != (x.shape[0],):
            raise ValueError(
                f"fastlin.{op}: sample_weight must have shape ({x.shape[0]},) (one per row of x), "
                f"got {C.shape_str(sw.shape)}"
            )
        sample_weight = sw.to(dtype=x.dtype, device=x.device)
    return x, y, sample_weight


def solve_normal(x, y, *, sample_weight=None, alpha: float = 0.0, fit_intercept: bool = True, backend=None):
    """One Gram pass over x (N, D) and a ``solve_gram``: -> (W (O, D), b (O,), info), float64."""
    x, y, sw = _as_xy("solvers.solve_normal", x, y, sample_weight)
    return solve_gram(
        ops.gram(x, y, sw, backend=backend), x.shape[1], alpha=alpha, fit_intercept=fit_intercept
    )


def ridge_path(
    x, y, alphas, *, sample_weight=None, fit_intercept: bool = True, backend=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ridge model per alpha from a single ``ops.gram`` pass over x and one eigendecomposition.

    x: (N, D); y: (N,) or (N, O); alphas: K values >= 0 (sequence or 1-D tensor); sample_weight: (N,).
    With Sxx = V diag(lam) V^T (centred feature block), W_k^T = V diag(1 / (lam + alpha_k)) V^T Sxy;
    directions with lam + alpha_k <= rcond * (lam_max + alpha_k) are dropped (the minimum-norm
    solution at alpha_k = 0 for a singular design, with an IllConditionedWarning).

    Returns (weights (K, O, D), biases (K, O)), float64 on x's device."""
    op = "ridge_path"
    if isinstance(alphas, torch.Tensor):
        if alphas.dim() > 1:
            raise ValueError(f"fastlin.{op}: alphas must be 1-D, got shape {C.shape_str(alphas.shape)}")
        alphas = alphas.reshape(-1).tolist()
    elif isinstance(alphas, (int, float)):
        alphas = [alphas]
    elif not isinstance(alphas, Sequence) and not hasattr(alphas, "__array__"):
        raise TypeError(f"fastlin.{op}: alphas must be a sequence of floats, got {type(alphas).__name__}")
    alphas = [_check_alpha(op, a, "alphas") for a in list(alphas)]
    if not alphas:
        raise ValueError(f"fastlin.{op}: alphas must hold at least one value")
    x, y, sw = _as_xy(op, x, y, sample_weight)
    D, O = x.shape[1], y.shape[1]
    G = ops.gram(x, y, sw, backend=backend)
    with _one_thread(G.shape[0], G.device):
        return _ridge_path_from_gram(op, G, D, O, alphas, fit_intercept)


def _ridge_path_from_gram(op, G, D, O, alphas, fit_intercept):
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"fastlin.{op}: non-finite values in x, y or sample_weight")
    Sxx, Sxy, _, xm, ym, _ = _centred_blocks(G, D, fit_intercept)
    lam, V = torch.linalg.eigh(Sxx)
    proj = V.T @ Sxy  # (D, O)
    rcond = default_rcond(D)
    a = torch.tensor(alphas, dtype=torch.float64, device=G.device)  # (K,)
    shifted = lam[None, :] + a[:, None]  # (K, D)
    top = shifted[:, -1:].clamp_min(0)
    keep = shifted > rcond * top
    inv = torch.where(
        keep, 1.0 / torch.where(keep, shifted, torch.ones_like(shifted)), torch.zeros_like(shifted)
    )
    Wt = torch.einsum("ij,kj,jo->kio", V, inv, proj)  # (K, D, O)
    W = Wt.transpose(1, 2).contiguous()  # (K, O, D)
    if not bool(keep.all()):
        dropped = [alphas[k] for k in range(len(alphas)) if not bool(keep[k].all())]
        lo = float(lam[0])
        cond = float(lam[-1]) / lo if lo > 0 else math.inf
        warnings.warn(
            f"fastlin.ridge_path: singular or ill-conditioned design (condition number of the centred "
            f"feature block {cond:.3g}); minimum-norm solutions for alphas {dropped}",
            IllConditionedWarning,
            stacklevel=3,
        )
    b = (
        ym[None, :] - W @ xm
        if fit_intercept
        else torch.zeros(len(alphas), O, dtype=torch.float64, device=G.device)
    )
    return W, b


def lstsq(x, y, *, sample_weight=None, alpha: float = 0.0, fit_intercept: bool = True):
    """Accurate reference: ``torch.linalg.lstsq`` on the weighted, centred data in float64.

    Solves min ||sqrt(w) * ((y - ym) - (x - xm) W^T)||^2 + alpha ||W||^2 (ridge as sqrt(alpha) I rows
    appended), b = ym - W xm. Minimum-norm for rank-deficient designs on the CPU (driver "gelsd",
    singular values below D * eps * s_max dropped; warns if the rank is < D); on CUDA torch only has
    "gels", which needs full rank. Makes a float64 copy of x: (N, D) * 8 bytes.

    Returns (W (O, D), b (O,)), float64."""
    op = "solvers.lstsq"
    alpha = _check_alpha(op, alpha)
    x, y, sw = _as_xy(op, x, y, sample_weight)
    xd, yd = x.to(torch.float64), y.to(torch.float64)
    D, O = xd.shape[1], yd.shape[1]
    w = None if sw is None else sw.to(torch.float64)
    if w is not None and bool((w < 0).any()):
        raise ValueError(f"fastlin.{op}: sample_weight must be >= 0 for lstsq (it takes sqrt(w))")
    if fit_intercept:
        if w is None:
            xm, ym = xd.mean(0), yd.mean(0)
        else:
            tot = w.sum()
            if not bool(tot > 0):
                raise ValueError(
                    f"fastlin.{op}: the sum of the sample weights must be > 0 to fit an intercept"
                )
            xm, ym = (w @ xd) / tot, (w @ yd) / tot
        xd, yd = xd - xm, yd - ym
    if w is not None:
        r = w.sqrt()[:, None]
        xd, yd = xd * r, yd * r
    if alpha:
        eye = torch.eye(D, dtype=torch.float64, device=xd.device) * math.sqrt(alpha)
        xd = torch.cat([xd, eye])
        yd = torch.cat([yd, yd.new_zeros(D, O)])
    if xd.device.type == "cpu":
        res = torch.linalg.lstsq(xd, yd, rcond=D * torch.finfo(torch.float64).eps, driver="gelsd")
        if int(res.rank) < D:
            warnings.warn(
                f"fastlin.{op}: rank-deficient design (rank {int(res.rank)} < D = {D}); returning the "
                f"minimum-norm solution",
                IllConditionedWarning,
                stacklevel=2,
            )
    else:
        res = torch.linalg.lstsq(xd, yd)
    W = res.solution[:D].T.contiguous()
    b = ym - W @ xm if fit_intercept else torch.zeros(O, dtype=torch.float64, device=W.device)
    return W, b

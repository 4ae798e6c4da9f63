"""Data parallelism over torch.distributed for fastlin's training loops.

When a default process group is initialised (more than one rank), FusedLinearRegressor treats each
rank's data as one shard of a dataset: every rank computes fused local statistics (Gram blocks, or
loss and gradient sums), they are summed with ``all_reduce``, and every rank applies the same
update, so the model equals a single process trained on the concatenated shards. gloo on the CPU,
NCCL on GPUs; no transport of fastlin's own.

    torchrun --nproc_per_node=2 -m fastlin demo --distributed

Rules every collective here follows: each rank validates its own input locally, then one
``all_gather_object`` shares the outcome (and the values that must agree), and either every rank
raises (the same error text) or every rank goes on; so a bad shard on one rank is an error on
every rank, never a hang. ``local()`` switches the data parallelism off in a block (for a
single-process fit while a process group exists).

A new data-parallel code path follows the same pattern (see ``fit_sgd``): validate locally inside
``try``, then ``gather_checked(op, error_or_None, info, same=keys)`` on every rank, and only then
the collectives of the computation (e.g. ``all_reduce_sum_`` of a Gram matrix).

Only ``fit`` is data parallel: ``FusedLinearRegressor.step`` stays a local step on this rank's
rows (use ``fit(x, y, epochs=1)`` for one global full-batch step).
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.distributed as dist

from fastlin import _checks as C

__all__ = ["is_active", "local", "all_reduce_sum_", "check_same", "gather_checked", "fit_sgd"]

_state = threading.local()


@contextlib.contextmanager
def local():
    """Inside this block fastlin ignores the process group: fits are single-process on this
    rank's data (``is_active()`` is False)."""
    prev = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = prev


def is_active() -> bool:
    """Whether a default process group is initialised with more than one rank (and not inside
    ``local()``)."""
    return (
        not getattr(_state, "off", False)
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sums each tensor over the ranks, in place (no-op on a single process)."""
    if not is_active():
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def check_same(op: str, what: str, value: int, device: torch.device | str = "cpu") -> None:
    """Raises the same ValueError on every rank when ``value`` differs between ranks (one small
    all_gather; every rank takes part, so none is left waiting)."""
    if not is_active():
        return
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    values = [int(v.item()) for v in every]
    if len(set(values)) != 1:
        raise ValueError(
            f"fastlin.{op}: every rank must have the same {what}; got {values} on ranks 0..{len(values) - 1}"
        )


def gather_checked(
    op: str, error: BaseException | None, info: dict, same: tuple[str, ...] = ()
) -> list[dict]:
    """One all_gather_object of (this rank's local validation error or None, ``info``); then, on
    every rank alike: when any rank failed, raise the first failing rank's error (same builtin type
    and text, naming that rank; chained from the local error where there is one); else raise
    ValueError when a key of ``same`` differs between ranks. Returns every rank's ``info`` (list
    indexed by rank).

    Call it on every rank, including the one whose validation failed: that is what keeps the others
    from waiting forever in the next collective."""
    world = dist.get_world_size()
    mine = (None if error is None else (type(error).__name__, str(error)), info)
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    failed = [(r, e) for r, (e, _) in enumerate(every) if e is not None]
    if failed:  # every rank raises the same text: the first failing rank's error
        r, (kind, msg) = failed[0]
        cls = {
            "ValueError": ValueError,
            "TypeError": TypeError,
            "FloatingPointError": FloatingPointError,
        }.get(kind, RuntimeError)
        raise cls(f"{msg} (raised on rank {r} of {world}; every rank raised)") from error
    infos = [i for _, i in every]
    bad = [k for k in same if len({repr(i[k]) for i in infos}) != 1]
    if bad:
        parts = "; ".join(f"{k}: {[i[k] for i in infos]}" for k in bad)
        raise ValueError(
            f"fastlin.{op}: every rank must have the same {', '.join(bad)}; got, on ranks "
            f"0..{world - 1}, {parts}"
        )
    return infos


# --------------------------------------------------------------------------------------------
# FusedLinearRegressor.fit, solver "sgd", over a process group.

# What every rank must agree on before the first collective of the loop.
_SAME = (
    "in_features",
    "out_features",
    "bias",
    "dtype",
    "device_type",
    "epochs",
    "batch_size",
    "shuffle",
    "seed_given",
    "sample_weight",
    "lr",
    "momentum",
    "dampening",
    "weight_decay",
    "nesterov",
)


def fit_sgd(reg, x, y, *, epochs, batch_size, shuffle, seed, sample_weight):
    """Data-parallel ``FusedLinearRegressor.fit`` (sgd): each rank's x (N_r, D), y (N_r,) or
    (N_r, O), sample_weight (N_r,) is its shard; the result equals one process fitting the
    concatenation of the shards.

    Semantics (documented on FusedLinearRegressor.fit):
    - Rank 0's parameters, momentum buffers and first-step flag are broadcast first (as
      DistributedDataParallel does), so every rank starts from and ends with the same model.
    - Each global step: every rank computes, in one fused pass over its rows, the sums
      sum(sw * r^2), sum(2 sw r x), sum(2 sw r) (``ops.linear_mse_loss(reduction="sum")``); one
      all_reduce of a single flat buffer [loss sum, weight sum, grad_weight, grad_bias]; division by
      the global weight sum * O gives the gradient of the global mean loss; then the same
      ``ops.sgd_update_`` (torch.optim.SGD's semantics, momentum included) on every rank.
    - batch_size is rows per rank per step. None, or >= the largest shard: full batch (one step per
      epoch over all rows of all ranks). Else an epoch has ceil(max_r N_r / batch_size) steps; step
      s takes rows [s*bs, (s+1)*bs) of each rank's order (a shorter shard contributes fewer, or no,
      rows to its last steps), and the step is the single-process step on the union of those rows.
      With shuffle, each rank's order per epoch is ``torch.randperm(N_r, generator=g_r)`` with g_r
      seeded once per fit with ``block_seed(seed, rank)``; the seed is shared (rank 0 draws it when
      seed is None).
    - sample_weight: weights must be >= 0 (the weighted sums come from the same fused op on
      rows scaled by sqrt(sample_weight), an extra copy of the shard); all ranks give it or none.
    - bf16/fp16 x is cast to the parameters' dtype. No progress bar.
    - A non-finite loss or update: every rank raises FloatingPointError (the decision is taken on
      the all-reduced buffer, identical on every rank) with the parameters and momentum from before
      that step, naming the first non-finite rows of each rank's shard.
    """
    from fastlin import ops
    from fastlin.regressor import _MASK63, _first_non_finite_row, block_seed

    name = "fastlin.FusedLinearRegressor.fit"
    rank, world = dist.get_rank(), dist.get_world_size()
    error = None
    prepared = None
    drawn_seed = None
    try:
        C.check_fit_loop_args(name, epochs, batch_size, seed)
        xx = reg._x("fit", x, allow_low_precision=False)
        yy, one_d = reg._y("fit", y, xx)
        sw = reg._sample_weight("fit", sample_weight, xx)
        if sw is not None and not bool((sw >= 0).all()):
            raise ValueError(
                f"{name}: under torch.distributed sample_weight must be >= 0 (and not NaN), "
                f"got a negative or NaN weight at row {int(torch.nonzero(~(sw >= 0))[0, 0])}"
            )
        prepared = (xx, yy, one_d, sw)
        if seed is None and shuffle:
            drawn_seed = int(torch.randint(0, 2**62, ()))
    except (ValueError, TypeError) as e:
        error = e
    info = dict(
        in_features=reg.in_features,
        out_features=reg.out_features,
        bias=reg.bias is not None,
        dtype=str(reg.weight.dtype),
        device_type=reg.weight.device.type,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=bool(shuffle),
        seed_given=seed is not None,
        seed=seed if seed is not None else drawn_seed,
        sample_weight=sample_weight is not None,
        lr=reg.lr,
        momentum=reg.momentum,
        dampening=reg.dampening,
        weight_decay=reg.weight_decay,
        nesterov=reg.nesterov,
        rows=None if prepared is None else prepared[0].shape[0],
        first_step=reg._first_step,
    )
    infos = gather_checked("FusedLinearRegressor.fit", error, info, _SAME)
    if len({i["seed"] for i in infos}) != 1 and infos[0]["seed_given"]:
        raise ValueError(f"{name}: every rank must pass the same seed; got {[i['seed'] for i in infos]}")
    xx, yy, one_d, sw = prepared
    ns = [i["rows"] for i in infos]
    n, O, D = xx.shape[0], reg.out_features, reg.in_features
    big = max(ns)
    bs = 0 if batch_size is None or batch_size >= big else batch_size
    shuffled = bool(shuffle) and bs != 0
    seed = infos[0]["seed"] if shuffled else seed
    run_seed = (seed & _MASK63) if shuffled else 0

    # Everyone starts from rank 0's model (parameters, momentum, whether the first step was taken).
    w, b = reg.weight, reg.bias
    params = [p for p in (w, b) if p is not None]
    bufs = [t for t in (reg.weight_momentum, reg.bias_momentum) if t is not None]
    with torch.no_grad():
        for t in params + bufs:
            dist.broadcast(t.data, src=0)
    first = bool(infos[0]["first_step"])

    # Rows the op reads: with sample weights, sqrt(w)-scaled rows and the bias as an extra column
    # of x and weight, so that the unweighted fused op returns the weighted sums.
    has_b = b is not None
    if sw is not None:
        sq = sw.sqrt().unsqueeze(1)
        xo = torch.cat([xx * sq, sq.to(xx.dtype)], 1) if has_b else xx * sq
        yo = yy * sq
    else:
        xo, yo = xx, yy
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    OD = O * D
    buf = torch.zeros(2 + OD + (O if has_b else 0), dtype=acc, device=w.device)
    g_w = buf[2 : 2 + OD].view(O, D)
    g_b = buf[2 + OD :] if has_b else None
    grads = [g_w] + ([g_b] if has_b else [])
    if acc != w.dtype:  # bf16/fp16 parameters: the update reads gradients of their dtype
        grads_upd = [torch.empty_like(p) for p in params]
    else:
        grads_upd = grads
    opts = dict(
        lr=reg.lr,
        momentum=reg.momentum,
        dampening=reg.dampening,
        weight_decay=reg.weight_decay,
        nesterov=reg.nesterov,
        backend=reg.backend,
    )
    mask = (False, True, has_b and sw is None, False)
    gen = None
    if shuffled:
        gen = torch.Generator(device=xx.device)
        gen.manual_seed(block_seed(run_seed, rank))
    steps = 1 if bs == 0 else -(-big // bs)
    # Global rows of each step of an epoch (host ints; the unweighted denominators).
    step_rows = [sum(ns)] if bs == 0 else [sum(max(0, min(bs, r - s * bs)) for r in ns) for s in range(steps)]
    state = params + bufs
    backup = [torch.empty_like(t) for t in state]  # the last finite model, restored on a failure
    ep_loss = torch.zeros((), dtype=torch.float64, device=w.device)
    ep_w = torch.zeros((), dtype=torch.float64, device=w.device)
    grad_sums = buf[2:]
    hist = torch.full((epochs,), math.nan, dtype=torch.float64)
    failed_at = None
    with torch.no_grad():
        for e in range(epochs):
            order = torch.randperm(n, generator=gen, device=xx.device) if shuffled else None
            ep_loss.zero_()
            ep_w.zero_()
            for s in range(steps):
                lo, hi = (0, n) if bs == 0 else (min(n, s * bs), min(n, (s + 1) * bs))
                if hi > lo:
                    if bs == 0:
                        xb, yb, swb = xo, yo, sw
                    elif order is None:
                        xb, yb, swb = xo[lo:hi], yo[lo:hi], None if sw is None else sw[lo:hi]
                    else:
                        idx = order[lo:hi]
                        xb, yb, swb = xo[idx], yo[idx], None if sw is None else sw[idx]
                    if sw is None:
                        loss, _, gw, gb, _ = ops.linear_mse_loss(
                            xb, w, b, yb, "sum", mask, backend=reg.backend
                        )
                        g_w.copy_(gw)
                        if has_b:
                            g_b.copy_(gb)
                    else:
                        wa = torch.cat([w, b.unsqueeze(1)], 1) if has_b else w
                        loss, _, gw, _, _ = ops.linear_mse_loss(
                            xb, wa, None, yb, "sum", mask, backend=reg.backend
                        )
                        g_w.copy_(gw[:, :D])
                        if has_b:
                            g_b.copy_(gw[:, D])
                        buf[1] = swb.sum()
                    buf[0] = loss
                else:  # this rank's shard has no rows left for this step: it adds zeros
                    buf.zero_()
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                ep_loss += buf[0]
                # Gradient of the global mean loss over wsum * O elements (the op's sums carry the 2).
                if sw is None:  # the global row count is known on the host
                    ep_w += step_rows[s]
                    grad_sums.div_(float(step_rows[s] * O))
                else:
                    ep_w += buf[1]
                    grad_sums.div_(buf[1] * O)
                torch._foreach_copy_(backup, state)
                if grads_upd is not grads:
                    for gu, g in zip(grads_upd, grads):
                        gu.copy_(g)
                ops.sgd_update_(params, grads_upd, bufs, first_step=first, **opts)
                # One host read per step: the loss and the updated parameters all finite?
                ok = torch.isfinite(torch.cat([buf[:1]] + [p.reshape(-1).to(acc) for p in params])).all()
                if not bool(ok):  # same buffer, same update on every rank: the same decision everywhere
                    torch._foreach_copy_(state, backup)
                    failed_at = e
                    break
                first = False
            if failed_at is not None:
                break
            hist[e] = float(ep_loss / (ep_w * O))
    hdtype = torch.float64 if xx.dtype == torch.float64 else torch.float32
    n_iter = epochs if failed_at is None else failed_at
    reg.__dict__.update(
        _first_step=first,
        n_features_in_=D,
        _y_1d=one_d,
        seed_=seed if shuffled else None,
        loss_history_=hist[:n_iter].to(hdtype),
        n_iter_=n_iter,
    )
    if failed_at is None:
        return reg
    # Every rank is here together: share where each shard's non-finite rows are.
    culprits = []
    for nm, t in (("x", xx), ("y", yy), ("sample_weight", sw)):
        row = _first_non_finite_row(t)
        if row is not None:
            culprits.append((nm, row))
    every: list = [None] * world
    dist.all_gather_object(every, culprits)
    msg = (
        f"{name}: non-finite loss or update at epoch {failed_at} (0-based, of {epochs}) of a {world}-rank fit"
    )
    found = [f"rank {r}: " + ", ".join(f"{nm}[{row}]" for nm, row in c) for r, c in enumerate(every) if c]
    if found:
        msg += "; first non-finite rows of each shard: " + "; ".join(found) + ". Remove or impute them"
    else:
        msg += f"; the data is finite on every rank, so the fit diverged: lower lr (now {reg.lr})"
    msg += ". The parameters and momentum keep their values from before that step (the last finite ones)."
    err = FloatingPointError(msg)
    err.epoch = failed_at
    err.rows = dict(culprits)  # this rank's shard
    err.rows_by_rank = [dict(c) for c in every]
    raise err

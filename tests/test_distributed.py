"""Data parallelism over torch.distributed: 2 gloo processes on this machine against one process.

One world of 2 ranks runs every check (process start-up dominates: ~3 s of the ~10 s), each rank
saving its results; the tests below compare them with single-process runs made here, in this
process. A hang (a rank left waiting in a collective) fails the fixture by its timeout instead of
blocking the suite. The worker is this file run as a script:
``python tests/test_distributed.py RANK WORLD PORT OUTDIR``.

Closeness claimed: float64 data-parallel fits equal one process to 1e-10 relative (the sums are
merely split in two and added; measured ~1e-15), far inside the issue's 1e-6 target; float32 to
1e-5 (per-rank partial sums round differently from one pass; measured ~1e-7).
"""

from __future__ import annotations

import inspect
import math
import os
import socket
import subprocess
import sys
import traceback

import torch

TIMEOUT_S = 180  # a healthy run takes ~10 s on 2 busy cores; a hang must fail, not block CI
SHARDS = (41, 62)  # uneven shards: the mini-batch steps run one shard dry before the other
N_ALL = sum(SHARDS)
D, O = 3, 2
SGD_CASES = {
    "plain": dict(lr=0.05),
    "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
}
MINIBATCH = dict(epochs=4, batch_size=8, seed=1234)
TOL64, TOL32 = 1e-10, 1e-5


def _data(dtype=torch.float64, seed=0, n=N_ALL):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(O, D, generator=g, dtype=torch.float64)
    y = x @ w.T + 0.5 + 0.1 * torch.randn(n, O, generator=g, dtype=torch.float64)
    sw = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return x.to(dtype), y.to(dtype), sw.to(dtype)


def _shard(t, rank):
    lo = sum(SHARDS[:rank])
    return t[lo : lo + SHARDS[rank]]


def _model(dtype=torch.float64, d=D, **opts):
    import fastlin

    torch.manual_seed(7)
    return fastlin.FusedLinearRegressor(d, O, dtype=dtype, **opts)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------
# The worker: every check of one 2-rank world.


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    import fastlin

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res: dict = {}

    def case(name, fn):
        try:
            res[name] = ("ok", fn())
        except Exception as e:  # recorded; the test asserts on it
            res[name] = ("raised", type(e).__name__, str(e), traceback.format_exc())

    x, y, sw = (_shard(t, rank) for t in _data())
    for key, opts in SGD_CASES.items():
        case(f"full-{key}", lambda opts=opts: _fit_out(_model(**opts).fit(x, y, epochs=30)))
    x32, y32, _ = (_shard(t, rank) for t in _data(torch.float32))
    case("full-float32", lambda: _fit_out(_model(torch.float32, lr=0.05).fit(x32, y32, epochs=30)))
    case(
        "bf16-x",
        lambda: _fit_out(_model(torch.float32, lr=0.05).fit(x32.bfloat16(), y32.bfloat16(), epochs=30)),
    )
    case("minibatch", lambda: _fit_out(_model(**SGD_CASES["momentum"]).fit(x, y, **MINIBATCH)))
    case(
        "minibatch-unshuffled",
        lambda: _fit_out(_model(lr=0.05).fit(x, y, epochs=3, batch_size=8, shuffle=False)),
    )
    case("weighted", lambda: _fit_out(_model(**SGD_CASES["momentum"]).fit(x, y, epochs=30, sample_weight=sw)))
    case("weighted-minibatch", lambda: _fit_out(_model(lr=0.05).fit(x, y, sample_weight=sw, **MINIBATCH)))
    # Bad input on one rank only: every rank must raise, and the world must go on afterwards.
    case(
        "mismatch-model",
        lambda: _model(d=D + rank).fit(
            torch.randn(5, D + rank, dtype=torch.float64), torch.randn(5, O, dtype=torch.float64), epochs=2
        ),
    )
    case(
        "mismatch-x",
        lambda: _model().fit(
            torch.randn(5, D + rank, dtype=torch.float64), torch.randn(5, O, dtype=torch.float64), epochs=2
        ),
    )
    case("mismatch-epochs", lambda: _model().fit(x, y, epochs=2 + rank))
    case("mismatch-dtype", lambda: _model(torch.float64 if rank == 0 else torch.float32).fit(x, y, epochs=2))

    def own_init_and_seed():
        # Each rank initialises differently and draws its own seed: rank 0's model and seed win.
        torch.manual_seed(100 + rank)
        m = fastlin.FusedLinearRegressor(D, O, dtype=torch.float64, lr=0.05)
        m.fit(x, y, epochs=2, batch_size=8)
        return {**_fit_out(m), "seed": m.seed_}

    case("own-init-seed", own_init_and_seed)

    def nonfinite():
        m = _model(lr=0.05)
        m.fit(x, y, epochs=2)
        before = _params(m)
        yb = y.clone()
        if rank == 1:
            yb[5, 0] = math.nan
        try:
            m.fit(x, yb, epochs=3)
        except FloatingPointError as e:
            after = _params(m)
            return {
                "msg": str(e),
                "unchanged": all(torch.equal(before[k], after[k]) for k in before),
                "n_iter": m.n_iter_,
            }
        raise AssertionError("no FloatingPointError")

    case("nonfinite", nonfinite)
    case("ddp", lambda: _ddp(rank))
    case("normal", lambda: _normal(x, y) if _has_solver() else None)
    case("after-errors", lambda: _fit_out(_model(lr=0.05).fit(x, y, epochs=2)))  # the world still works
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _fit_out(m):
    return {"params": _params(m), "history": m.loss_history_.clone(), "n_iter": m.n_iter_}


def _has_solver() -> bool:
    import fastlin

    return "solver" in inspect.signature(fastlin.FusedLinearRegressor.__init__).parameters


def _normal(x, y, sample_weight=None):
    return _params(_model(solver="normal").fit(x, y, sample_weight=sample_weight))


DDP_STEPS, DDP_BATCH = 15, 16


def _ddp_batches(rank=None):
    """Per-step batches of DDP_BATCH rows per rank (all ranks' rows when rank is None)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(DDP_STEPS):
        xb = torch.randn(2 * DDP_BATCH, 4, generator=g, dtype=torch.float64)
        yb = xb @ torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64).T + 1
        sl = slice(None) if rank is None else slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
        out.append((xb[sl], yb[sl]))
    return out


def _ddp_models(kind):
    import fastlin

    torch.manual_seed(11)
    if kind == "fused":  # LinearMSELoss: forward(x, target) -> loss, one fused pass
        m = fastlin.nn.LinearMSELoss(4, 1, dtype=torch.float64)
        return m, None, fastlin.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if kind == "fastlin":
        m = fastlin.nn.Linear(4, 1, dtype=torch.float64)
        return (
            m,
            fastlin.nn.MSELoss(),
            fastlin.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True),
        )
    m = torch.nn.Linear(4, 1, dtype=torch.float64)
    return m, torch.nn.MSELoss(), torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def _train(model, crit, opt, batches):
    for xb, yb in batches:
        opt.zero_grad()
        (model(xb, yb) if crit is None else crit(model(xb), yb)).backward()
        opt.step()


def _ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for kind in ("fastlin", "fused", "torch"):
        for bucket_view in (False, True):
            m, crit, _ = _ddp_models(kind)
            dm = DDP(m, gradient_as_bucket_view=bucket_view)
            opt = _ddp_models(kind)[2].__class__(dm.parameters(), lr=0.05, momentum=0.9, nesterov=True)
            _train(dm, crit, opt, _ddp_batches(rank))
            out[(kind, bucket_view)] = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return out


# ----------------------------------------------------------------------------------------------
# The tests (parent process).

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), "2", str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"2-rank world did not finish in {TIMEOUT_S} s (a rank hung in a collective)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _ok(world, name):
    outs = []
    for r in range(2):
        got = world[r][name]
        assert got[0] == "ok", f"rank {r} {name}: {got[1]}: {got[2]}\n{got[3]}"
        outs.append(got[1])
    return outs


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _assert_same_on_ranks_and_close(outs, ref, tol):
    p0, p1 = outs[0]["params"], outs[1]["params"]
    for k in p0:  # every rank ends with the very same model, bit for bit
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    for k in ref:
        assert _rel(p0[k], ref[k]) <= tol, f"{k}: rel error {_rel(p0[k], ref[k]):.2e} > {tol}"


@pytest.mark.parametrize("key", list(SGD_CASES))
def test_full_batch_equals_single_process(world, key):
    x, y, _ = _data()
    ref = _model(**SGD_CASES[key]).fit(x, y, epochs=30)
    outs = _ok(world, f"full-{key}")
    _assert_same_on_ranks_and_close(outs, _params(ref), TOL64)
    assert _rel(outs[0]["history"], ref.loss_history_) <= TOL64
    assert outs[0]["n_iter"] == 30


def test_full_batch_float32(world):
    x, y, _ = _data(torch.float32)
    ref = _model(torch.float32, lr=0.05).fit(x, y, epochs=30)
    _assert_same_on_ranks_and_close(_ok(world, "full-float32"), _params(ref), TOL32)


def test_low_precision_x_is_cast_to_the_parameters_dtype(world):
    # bf16 -> float32 is exact, so one process on the float32 copy is the reference; float32 sums.
    x, y, _ = _data(torch.float32)
    x, y = x.bfloat16().float(), y.bfloat16().float()
    ref = _model(torch.float32, lr=0.05).fit(x, y, epochs=30)
    _assert_same_on_ranks_and_close(_ok(world, "bf16-x"), _params(ref), TOL32)


def _global_batches(epochs, bs, shuffle, seed):
    """The rows (indices into the concatenated data) of every global step: step s of an epoch is
    rows [s*bs, (s+1)*bs) of each rank's order, rank r's order being randperm(N_r) from a generator
    seeded with block_seed(seed, r) (fastlin.distributed.fit_sgd's documented semantics)."""
    from fastlin.regressor import block_seed

    gens = [torch.Generator().manual_seed(block_seed(seed, r)) for r in range(2)]
    steps = -(-max(SHARDS) // bs)
    for _ in range(epochs):
        orders = [
            torch.randperm(n, generator=g) if shuffle else torch.arange(n) for n, g in zip(SHARDS, gens)
        ]
        for s in range(steps):
            yield torch.cat([o[s * bs : (s + 1) * bs] + sum(SHARDS[:r]) for r, o in enumerate(orders)])


def _reference_minibatch(model, x, y, sw, epochs, bs, shuffle, seed):
    """Single-process steps (fastlin's fused train_step) on the global batches of the 2-rank fit."""
    for rows in _global_batches(epochs, bs, shuffle, seed):
        model.step(x[rows], y[rows], None if sw is None else sw[rows])
    return model


@pytest.mark.parametrize(
    "name, opts, shuffle, weighted",
    [
        ("minibatch", SGD_CASES["momentum"], True, False),
        ("minibatch-unshuffled", dict(lr=0.05), False, False),
        ("weighted-minibatch", dict(lr=0.05), True, True),
    ],
)
def test_minibatch_equals_single_process_on_global_batches(world, name, opts, shuffle, weighted):
    x, y, sw = _data()
    epochs = MINIBATCH["epochs"] if shuffle else 3
    ref = _reference_minibatch(
        _model(**opts), x, y, sw if weighted else None, epochs, 8, shuffle, MINIBATCH["seed"]
    )
    outs = _ok(world, name)
    _assert_same_on_ranks_and_close(outs, _params(ref), TOL64)
    assert outs[0]["n_iter"] == epochs


def test_sample_weight_full_batch(world):
    x, y, sw = _data()
    ref = _model(**SGD_CASES["momentum"]).fit(x, y, epochs=30, sample_weight=sw)
    outs = _ok(world, "weighted")
    _assert_same_on_ranks_and_close(outs, _params(ref), TOL64)
    assert _rel(outs[0]["history"], ref.loss_history_) <= TOL64


@pytest.mark.parametrize(
    "name, words",
    [
        ("mismatch-model", ["in_features", "[3, 4]"]),
        ("mismatch-x", ["x must have shape (N, 3)", "rank 1"]),
        ("mismatch-epochs", ["epochs", "[2, 3]"]),
        ("mismatch-dtype", ["dtype", "torch.float64", "torch.float32"]),
    ],
)
def test_mismatched_input_raises_on_every_rank(world, name, words):
    for r in range(2):
        got = world[r][name]
        assert got[0] == "raised" and got[1] == "ValueError", f"rank {r}: {got}"
        for w in words:
            assert w in got[2], f"rank {r}: {w!r} not in {got[2]!r}"


def test_non_finite_raises_on_every_rank_and_restores(world):
    outs = _ok(world, "nonfinite")
    for o in outs:
        assert o["unchanged"], "parameters changed by the failing fit"
        assert o["n_iter"] == 0
        assert "rank 1: y[5]" in o["msg"]


def test_rank0_model_and_seed_are_shared(world):
    import fastlin

    outs = _ok(world, "own-init-seed")
    assert outs[0]["seed"] == outs[1]["seed"] is not None
    x, y, _ = _data()
    torch.manual_seed(100)  # rank 0's initialisation
    ref = fastlin.FusedLinearRegressor(D, O, dtype=torch.float64, lr=0.05)
    ref = _reference_minibatch(ref, x, y, None, 2, 8, True, outs[0]["seed"])
    _assert_same_on_ranks_and_close(outs, _params(ref), TOL64)


def test_world_usable_after_errors(world):
    x, y, _ = _data()
    ref = _model(lr=0.05).fit(x, y, epochs=2)
    _assert_same_on_ranks_and_close(_ok(world, "after-errors"), _params(ref), TOL64)


def test_ddp_fastlin_modules_match_stock_torch(world):
    # fastlin.nn.Linear + MSELoss, and the fused LinearMSELoss, with fastlin.optim.SGD under DDP
    outs = _ok(world, "ddp")
    m, crit, opt = _ddp_models("torch")
    _train(m, crit, opt, _ddp_batches())  # one process, the concatenated batch (equal shards: same mean)
    single = m.state_dict()
    for r in range(2):
        for bucket_view in (False, True):
            stock = outs[r][("torch", bucket_view)]
            for kind in ("fastlin", "fused"):
                got = outs[r][(kind, bucket_view)]
                for k in single:
                    assert torch.equal(got[k], outs[0][(kind, bucket_view)][k]), (
                        f"rank {r} {kind} {k} differs"
                    )
                    assert _rel(got[k], stock[k]) <= TOL64, f"{kind} {k}: fastlin vs torch under DDP"
                    assert _rel(got[k], single[k]) <= TOL64, f"{kind} {k}: DDP vs one process"


def test_normal_solver_equals_single_process(world):
    if not _has_solver():
        pytest.skip("FusedLinearRegressor does not accept solver= (the normal solver is on another branch)")
    x, y, _ = _data()
    single = _normal(x, y)
    outs = _ok(world, "normal")
    for k in single:
        assert torch.equal(outs[0][k], outs[1][k]), f"{k} differs between ranks"
        assert _rel(outs[0][k], single[k]) <= 1e-6, f"{k}: rel error {_rel(outs[0][k], single[k]):.2e}"


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


def test_demo_distributed_under_torchrun():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            "-m",
            "fastlin",
            "demo",
            "--distributed",
            "--epochs",
            "200",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 ranks (gloo), training rows per rank [40, 40] of 80" in proc.stdout
    assert "matches the single-process fit" in proc.stdout, proc.stdout
    rows = {ln[:22].strip(): ln[22:].split() for ln in proc.stdout.splitlines() if ln.endswith(" ms")}
    assert rows["2-rank fit"][:5] == rows["1-process fit"][:5]  # weight, bias, MSE, R^2, f(4) as printed


def test_demo_distributed_needs_torchrun(monkeypatch):
    from fastlin import demo

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="run it under torchrun"):
        demo.main(["--distributed"])

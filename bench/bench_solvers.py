"""Exact solvers: fastlin's normal equations vs scikit-learn and torch.linalg.lstsq, plus time to a
target loss for fused SGD vs the normal solver.

    python -m bench.bench_solvers            # 1048576 x 64 float32, 262144 x 64 float64 (~10 min here)
    python -m bench.bench_solvers --quick    # 131072 rows, fewer repeats (< 1 min)

Per case (x (N, D), y (N,) = x w + b + noise, features with small non-zero means, scales 0.8..1.25):
  * times, interleaved rounds with the harness (median of repeats): fastlin.ops.gram alone (the one
    pass over x), solvers.solve_gram alone (from a ready Gram matrix),
    FusedLinearRegressor(solver="normal").fit (gram + Cholesky solve + writing the parameters), the
    same with alpha=1, sklearn LinearRegression and Ridge(alpha=1), torch.linalg.lstsq on [x, 1] in
    x's dtype (the ones column is built outside the timing, which flatters it), and fastlin's
    float64 lstsq reference; and the one-read time of x, measured in the same rounds ("limit: read",
    harness.Limits);
  * the error of each solution: ||w - w_ref|| / ||w_ref|| (weights and bias together) against a float64
    lstsq (gelsd) solution of the same data.
Time to target: target = (1 + 1e-3) x the normal solver's training MSE; full-batch fused SGD
(FusedLinearRegressor.fit, lr = 1 / L, L = 2 lambda_max of the data's second-moment matrix, the
largest step for which gradient descent is monotone; taken from the Gram matrix, i.e. tuned with
knowledge SGD would not have) and shuffled mini-batch SGD (batch 65536, lr = 0.5 / L): the epochs
until the loss reaches the target (fits of 5 epochs, stopping once there), then the median time of
replaying exactly that many epochs (same calls and seeds; the timing includes the reset to the
initial parameters, a negligible load_state_dict).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import fastlin
from bench.harness import Contender, Limits, fmt_seconds, format_table, machine_info, measure
from fastlin import solvers


def make_data(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Well-conditioned on purpose (scales 0.8..1.25, small means): the fair case for SGD, whose
    # epochs to a target grow with the condition number; the exact solvers do not care.
    scale = 0.8 + 0.45 * torch.rand(d, generator=g, dtype=torch.float64)
    mean = 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.empty(n, d, dtype=dtype)
    y = torch.empty(n, dtype=dtype)
    for i in range(0, n, 1 << 16):  # in chunks: no float64 copy of the whole x
        xs = torch.randn(min(1 << 16, n - i), d, generator=g, dtype=torch.float64) * scale + mean
        x[i : i + xs.shape[0]] = xs.to(dtype)
        y[i : i + xs.shape[0]] = (
            xs @ w + 0.7 + 0.5 * torch.randn(xs.shape[0], generator=g, dtype=torch.float64)
        ).to(dtype)
    return x, y


def rel_err(W, b, ref):
    got = torch.cat(
        [
            torch.as_tensor(W, dtype=torch.float64).reshape(-1),
            torch.as_tensor(b, dtype=torch.float64).reshape(-1),
        ]
    )
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))


def solver_case(n, d, dtype, repeats, log):
    x, y = make_data(n, d, dtype)
    Wr, br = solvers.lstsq(x, y)  # the float64 reference (gelsd on the float64 copy)
    ref = torch.cat([Wr.reshape(-1), br.reshape(-1)])
    Wr1, br1 = solvers.lstsq(x, y, alpha=1.0)
    ref_ridge = torch.cat([Wr1.reshape(-1), br1.reshape(-1)])
    xn, yn = x.numpy(), y.numpy()
    x1 = torch.cat([x, torch.ones(n, 1, dtype=dtype)], dim=1)
    lim = Limits.measure(sample=x, dtypes=(dtype,))
    G = fastlin.ops.gram(x, y[:, None])
    out = {}

    def normal(alpha):
        def run(r):
            reg = fastlin.FusedLinearRegressor(d, 1, solver="normal", alpha=alpha, dtype=dtype).fit(x, y)
            out[f"normal{alpha}"] = (reg.weight.detach(), reg.bias.detach())

        return run

    def sk(alpha):
        from sklearn.linear_model import LinearRegression, Ridge

        def run(r):
            est = (LinearRegression() if alpha == 0 else Ridge(alpha=alpha)).fit(xn, yn)
            out[f"sk{alpha}"] = (est.coef_, est.intercept_)

        return run

    def torch_lstsq(r):
        sol = torch.linalg.lstsq(x1, y[:, None]).solution
        out["torch_lstsq"] = (sol[:d, 0], sol[d:, 0])

    def fl_lstsq(r):
        out["fl_lstsq"] = solvers.lstsq(x, y)

    contenders = [
        Contender("fastlin ops.gram (one pass)", lambda r: fastlin.ops.gram(x, y[:, None])),
        Contender("fastlin solve_gram only", lambda r: solvers.solve_gram(G, d)),
        Contender("fastlin normal", normal(0.0)),
        Contender("fastlin normal alpha=1", normal(1.0)),
        Contender("sklearn LinearRegression", sk(0.0)),
        Contender("sklearn Ridge alpha=1", sk(1.0)),
        Contender(f"torch.linalg.lstsq [x,1] {str(dtype)[6:]}", torch_lstsq),
        Contender("fastlin lstsq (float64 gelsd)", fl_lstsq),
        *lim.probes()[:1],
    ]
    stats = measure(contenders, repeats=repeats, warmup=1, log=log)
    lim.update(stats)
    read_t = stats["limit: read"].median
    errs = {
        "fastlin normal": rel_err(*out["normal0.0"], ref),
        "fastlin normal alpha=1": rel_err(*out["normal1.0"], ref_ridge),
        "sklearn LinearRegression": rel_err(*out["sk0.0"], ref),
        "sklearn Ridge alpha=1": rel_err(*out["sk1.0"], ref_ridge),
        f"torch.linalg.lstsq [x,1] {str(dtype)[6:]}": rel_err(*out["torch_lstsq"], ref),
        "fastlin lstsq (float64 gelsd)": rel_err(*out["fl_lstsq"], ref),
    }
    sk_t = stats["sklearn LinearRegression"].median
    rows = []
    for c in contenders:
        s = stats[c.name]
        rows.append(
            [
                c.name,
                fmt_seconds(s.median),
                fmt_seconds(s.min),
                f"{s.median / read_t:.3g}x",
                f"{sk_t / s.median:.3g}x",
                f"{errs[c.name]:.2e}" if c.name in errs else "",
            ]
        )
    title = (
        f"N={n} D={d} {str(dtype)[6:]}  x = {x.nbytes / 2**20:.0f} MiB, one read "
        f"{fmt_seconds(read_t)} ({lim.read_bandwidth / 1e9:.3g} GB/s), median of {repeats}"
    )
    table = format_table(
        ["contender", "median", "min", "x one read", "vs sklearn LR", "rel err vs f64 lstsq"], rows
    )
    return title + "\n" + table, x, y


def time_to_target(x, y, repeats, log, max_epochs):
    n, d = x.shape
    dtype = x.dtype
    normal = fastlin.FusedLinearRegressor(d, 1, solver="normal", dtype=dtype)
    t_normal = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        normal.fit(x, y)
        t_normal.append(time.perf_counter() - t0)
    best = float(normal.loss_history_[0])
    target = best * (1 + 1e-3)
    G = normal._gram  # the data's Gram matrix, for the Lipschitz constant of the MSE gradient
    A = G[: d + 1, : d + 1] / G[d, d]
    ev = torch.linalg.eigvalsh(A)
    L = 2 * float(ev[-1])
    log(f"  condition number of E[z z^T], z = [x, 1]: {float(ev[-1] / ev[0]):.3g}")
    rows = [["normal (exact)", "1 pass", fmt_seconds(sorted(t_normal)[len(t_normal) // 2]), f"{best:.6g}"]]
    for label, kw in (
        ("sgd full batch, lr=1/L", dict(lr=1 / L)),
        ("sgd batch 65536 shuffled, lr=0.5/L", dict(lr=0.5 / L, batch_size=65536)),
    ):
        bs = kw.pop("batch_size", None)
        torch.manual_seed(0)
        reg = fastlin.FusedLinearRegressor(d, 1, dtype=dtype, **kw)
        init = {k: v.clone() for k, v in reg.state_dict().items() if k != "_extra_state"}

        def run(stop=None, chunk=5, reg=reg, init=init, bs=bs):
            """Fit in calls of `chunk` epochs (call k seeded k) from the initial state, until the
            loss reaches the target (-> epochs) or `stop` epochs were run (the timed replay)."""
            reg.load_state_dict({**init, "_extra_state": {"first_step": True, "y_1d": True}})
            done = 0
            while done < (stop or max_epochs):
                e = min(chunk, (stop or max_epochs) - done)
                reg.fit(x, y, epochs=e, batch_size=bs, seed=done // chunk, progress=False)
                if stop is None:
                    # loss_history_[j] = mean loss over epoch j's steps (full batch: the loss before
                    # its step); the first epoch under the target, plus one: conservative by <= 1.
                    below = (reg.loss_history_ <= target).nonzero()
                    if below.numel():
                        return done + int(below[0, 0]) + 1
                done += e
            return None

        hit = run()
        if hit is None:
            rows.append([label, f"> {max_epochs} epochs", "not reached", f"{reg.evaluate(x, y)['mse']:.6g}"])
            continue
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(stop=hit)
            ts.append(time.perf_counter() - t0)
        final = reg.evaluate(x, y)["mse"]
        rows.append([label, f"{hit} epochs", fmt_seconds(sorted(ts)[len(ts) // 2]), f"{final:.6g}"])
        log(f"  {label}: {hit} epochs")
    title = (
        f"time to training MSE <= {target:.6g} (= (1 + 1e-3) x the exact optimum), "
        f"N={n} D={d} {str(dtype)[6:]}"
    )
    return title + "\n" + format_table(["method", "work", "median time", "final MSE"], rows)


def _cpu_backend():
    return fastlin.backends.resolve(None, torch.device("cpu"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="131072 rows, 3 repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=300)
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    n32 = 131072 if args.quick else 1048576
    n64 = 131072 if args.quick else 262144

    def log(msg):
        print(msg, flush=True)

    info = machine_info()
    log(
        f"# fastlin solvers bench  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  cpu: {info['cpu']}, "
        f"{info['threads']} threads, torch {info['torch']}, load avg {info['load_average']:.2f}"
    )
    log(
        "# ops.gram backend: "
        + ("cpp kernel" if fastlin.ops._has_gram_kernel(_cpu_backend()) else "reference")
    )
    warnings.simplefilter("ignore", category=UserWarning)
    t32, x, y = solver_case(n32, 64, torch.float32, repeats, log)
    log(t32 + "\n")
    log(time_to_target(x, y, repeats, log, args.max_epochs) + "\n")
    del x, y
    t64, _, _ = solver_case(n64, 64, torch.float64, repeats, log)
    log(t64)


if __name__ == "__main__":
    main()

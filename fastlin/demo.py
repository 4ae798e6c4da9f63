"""python -m fastlin demo: the seed's linear regression (y = 3x + 2 + noise) end to end, with
fastlin.FusedLinearRegressor and with the seed's stock PyTorch loop side by side.

Both models start from the same nn.Linear initialisation (the same seed, the same RNG draws) and
train with SGD(lr) on the MSE, full batch, for the same number of epochs; the demo prints each
one's learned weight and bias, test MSE and R^2, the prediction at x = 4, the training time
(median of interleaved repeats) and the speed-up."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

TRUE_W, TRUE_B = 3.0, 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epochs", type=int, default=1000, help="full-batch SGD epochs (default 1000, as the seed)"
    )
    p.add_argument("--n", type=int, default=100, help="samples (default 100, as the seed); 20%% are held out")
    p.add_argument(
        "--seed", type=int, default=0, help="torch.manual_seed for the data and the initialisation"
    )
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01, as the seed)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backend", default="auto", help="fastlin backend: auto, cpp, cuda, triton, reference")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repeats of each training (median; default 5)"
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_data(n: int, seed: int, device: torch.device):
    """The seed's data, x = randn(n, 1), y = 3x + 2 + randn(n, 1), split 80/20 (test >= 1 sample)."""
    torch.manual_seed(seed)
    x = torch.randn(n, 1)
    y = TRUE_W * x + TRUE_B + torch.randn(n, 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, n // 5)
    test, train = perm[:n_test], perm[n_test:]
    return [t.to(device) for t in (x[train], y[train], x[test], y[test])]


def stock_fit(x, y, epochs: int, lr: float, seed: int, device: torch.device):
    """The seed's loop, verbatim apart from the device: nn.Linear + MSELoss + SGD."""
    import torch.nn as nn

    torch.manual_seed(seed + 1)
    model = nn.Linear(1, 1).to(device)
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        outputs = model(x)
        loss = criterion(outputs, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return model, time.perf_counter() - t0


def fastlin_fit(x, y, epochs: int, lr: float, seed: int, device: torch.device, backend: str):
    import fastlin

    torch.manual_seed(seed + 1)  # the same draws as nn.Linear(1, 1) above
    reg = fastlin.FusedLinearRegressor(1, 1, lr=lr, backend=backend, device=device)
    _sync(device)
    t0 = time.perf_counter()
    reg.fit(x, y, epochs=epochs, progress=False)
    _sync(device)
    return reg, time.perf_counter() - t0


def _metrics(pred: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    pred, y = pred.double(), y.double()
    mse = float((pred - y).square().mean())
    ss_tot = float((y - y.mean()).square().sum())
    r2 = 1 - float((pred - y).square().sum()) / ss_tot if ss_tot else float("nan")
    return mse, r2


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.1 else f"{s * 1e3:.1f} ms"


def run(args) -> int:
    import fastlin

    if args.n < 2:
        raise SystemExit("fastlin demo: --n must be >= 2 (a train and a test sample)")
    if args.epochs < 1 or args.repeats < 1:
        raise SystemExit("fastlin demo: --epochs and --repeats must be >= 1")
    device = torch.device(args.device)
    backend = fastlin.backends.resolve(None if args.backend == "auto" else args.backend, device)
    x_tr, y_tr, x_te, y_te = make_data(args.n, args.seed, device)
    print(f"fastlin demo: the seed's linear regression, y = {TRUE_W:g}x + {TRUE_B:g} + noise")
    print(
        f"data: n={args.n} ({x_tr.shape[0]} train / {x_te.shape[0]} test), seed {args.seed}; "
        f"{args.epochs} full-batch SGD epochs, lr={args.lr:g}; device {device}, fastlin backend {backend}, "
        f"{torch.get_num_threads()} threads"
    )

    # Interleaved repeats, each from the same initialisation: drift on a busy machine hits both.
    # The first round also warms up (allocator, thread pools, code), so a repeat beyond 1 is untimed.
    t_stock, t_fast = [], []
    for r in range(args.repeats + (1 if args.repeats > 1 else 0)):
        model, ts = stock_fit(x_tr, y_tr, args.epochs, args.lr, args.seed, device)
        reg, tf = fastlin_fit(x_tr, y_tr, args.epochs, args.lr, args.seed, device, backend)
        if r > 0 or args.repeats == 1:
            t_stock.append(ts)
            t_fast.append(tf)
    ts, tf = statistics.median(t_stock), statistics.median(t_fast)

    with torch.no_grad():
        four = torch.tensor([[4.0]], device=device)
        s_mse, s_r2 = _metrics(model(x_te), y_te)
        s_pred = model(four).item()
        s_w, s_b, f_w, f_b = (t.item() for t in (model.weight, model.bias, reg.weight, reg.bias))
    ev = reg.evaluate(x_te, y_te)  # {"mse", "r2"}, R^2 as sklearn.metrics.r2_score
    f_pred = reg.predict(four).item()
    rows = [
        ("stock PyTorch loop", s_w, s_b, s_mse, s_r2, s_pred, ts),
        ("fastlin fit", f_w, f_b, ev["mse"], ev["r2"], f_pred, tf),
    ]
    print()
    print(
        f"{'':<20}{'weight':>9}{'bias':>9}{'test MSE':>10}{'test R^2':>10}{'f(4)':>9}"
        f"{'train time (median of ' + str(len(t_stock)) + ')':>30}"
    )
    for name, w, b, mse, r2, p4, t in rows:
        print(f"{name:<20}{w:>9.4f}{b:>9.4f}{mse:>10.4f}{r2:>10.4f}{p4:>9.4f}{_ms(t):>30}")
    diff = max(abs(s_w - f_w), abs(s_b - f_b))
    print()
    print(f"speed-up: {ts / tf:.1f}x (fastlin fit vs the stock loop, same {args.epochs} epochs)")
    print(
        f"same model: max |difference| of weight and bias = {diff:.1e}; true f(4) = {TRUE_W * 4 + TRUE_B:g}"
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlin demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))

"""python -m fastlin demo: runs end to end and prints every section, with both models agreeing."""

import os
import re
import subprocess
import sys

import pytest

from fastlin import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(out: str) -> dict:
    rows = {}
    for name in ("stock PyTorch loop", "fastlin fit"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        w, b, mse, r2, p4 = (float(v) for v in line[len(name) :].split()[:5])
        rows[name] = {"weight": w, "bias": b, "mse": mse, "r2": r2, "f4": p4}
    return rows


def _check(out: str, epochs: int):
    for section in (
        "fastlin demo",
        "train / ",
        "weight",
        "bias",
        "test MSE",
        "test R^2",
        "f(4)",
        "train time",
        "stock PyTorch loop",
        "fastlin fit",
        "speed-up:",
        "same model",
    ):
        assert section in out, f"missing {section!r} in:\n{out}"
    assert f"{epochs} full-batch SGD epochs" in out
    rows = _rows(out)
    s, f = rows["stock PyTorch loop"], rows["fastlin fit"]
    for k in s:  # same init, same data, same SGD: the printed 4-decimal figures agree
        assert s[k] == pytest.approx(f[k], abs=2e-4), (k, out)
    assert float(re.search(r"speed-up: ([0-9.]+)x", out).group(1)) > 0
    return rows


def test_demo_module_entry_point():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "fastlin", "demo", "--epochs", "300", "--repeats", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _check(proc.stdout, 300)
    # 300 epochs at lr 0.01 on y = 3x + 2 + noise get most of the way: the fit is a real one.
    assert 2.0 < rows["fastlin fit"]["weight"] < 4.0 and rows["fastlin fit"]["r2"] > 0.5


def test_demo_flags(capsys):
    assert (
        demo.main(
            [
                "--epochs",
                "20",
                "--n",
                "50",
                "--seed",
                "3",
                "--repeats",
                "2",
                "--backend",
                "reference",
                "--lr",
                "0.05",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    _check(out, 20)
    assert "n=50 (40 train / 10 test), seed 3" in out and "backend reference" in out and "median of 2" in out


def test_demo_rejects_bad_flags():
    with pytest.raises(SystemExit, match="--n must be >= 2"):
        demo.main(["--n", "1"])

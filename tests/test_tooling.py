"""The GPU check's own tooling, on the CPU: a device lease is short (15 minutes) and a bug in the
bench or in its diagnostics would waste it. bench/gpu_bench.py --dry-run (Triton interpreter, tiny
sizes), bench/gpu_profile.py's summary of an Nsight Compute CSV, and the FASTLIN_FAIL_LOG hook of
tests/conftest.py that bench/gpu_check.sh reads when a run is cut short. Also the bench harness's
choice of the read limit (bench/harness.py), which every CPU figure in bench/RESULTS.md divides by."""

import json
import os
import re
import subprocess
import sys
import types

import conftest
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_dry_run(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "--dry-run"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "gpu_bench_table.txt").read_text()
    for case in (
        "train_step N=4096 D=32 O=1 fp32",
        "train_step N=4096 D=32 O=8 bf16",
        "train_step N=4096 D=32 O=8 fp16",
        "linear_mse_loss N=4096 D=32 O=1 fp32",
        "linear_mse_loss N=4096 D=32 O=16 bf16",
        "sgd_update_",
    ):
        assert case in table, f"{case!r} missing from the table:\n{table}"
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {row["case"]: row for row in data["rows"]}
    step = rows["train_step N=4096 D=32 O=1 fp32"]
    assert {"eager", "triton"} <= set(step["results"]), step["results"].keys()
    # every contender's one-step update was checked against float64, and is float32-accurate
    assert step["update_error"] and max(step["update_error"].values()) < 1e-5, step["update_error"]
    # sgd_update_'s launch shapes were timed (Triton's in the dry run) and are in the table
    sgd = next(row for case, row in rows.items() if case.startswith("sgd_update_"))
    assert {"triton 1024/4", "triton 4096/8"} <= set(sgd["launch_shapes"]), sgd.get("launch_shapes")
    assert "launch shapes" in table and "triton 1024/4" in table
    # the Triton programs-per-SM variants of the O = 1 steps are timed and listed under the table
    assert "triton:pps3" in step["results"] and "variants" in table
    # and bf16 O = 1 times both one-output paths the autotuner chooses between, each float32-accurate
    b16 = rows["train_step N=4096 D=32 O=1 bf16"]
    # (and PACK_DEFER, PACK's experiment for the next GPU run)
    for v in ("triton:pack", "triton:fma", "triton:packdefer"):
        assert v in b16["results"] and v in table, b16["results"].keys()
        assert b16["update_error"][v] < 1e-5, b16["update_error"]


def test_gpu_profile_summary(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import gpu_profile
    finally:
        sys.path.pop(0)
    head = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [
        ("0", "_onepass_kernel", "gpu__time_duration.sum", "usecond", "251.30"),
        ("0", "_onepass_kernel", "dram__throughput.avg.pct_of_peak_sustained_elapsed", "%", "91.2"),
        ("1", "sgd_multi_kernel", "launch__registers_per_thread", "register/thread", "74"),
    ]
    csv = tmp_path / "ncu.csv"
    csv.write_text(
        "==PROF== Connected to process 1\n"
        + head
        + "".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows)
    )
    gpu_profile.summarize(str(csv))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["id", "kernel", "time"]
    first = out[1].split()
    assert first[:4] == ["0", "_onepass_kernel", "251.30", "91.2"]
    assert out[2].split()[:2] == ["1", "sgd_multi_kernel"] and "74" in out[2].split()
    assert out[3].startswith("units: time usecond")


def test_fail_log_hook(tmp_path, monkeypatch):
    log = tmp_path / "failures.log"
    monkeypatch.setattr(conftest, "_FAIL_LOG", str(log))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    text = "def test_x():\n>       assert 1 == 2\nE       assert 1 == 2\n\ntests/t.py:2: AssertionError"
    failed = types.SimpleNamespace(failed=True, nodeid="tests/t.py::test_x", when="call", longreprtext=text)
    passed = types.SimpleNamespace(failed=False, nodeid="tests/t.py::test_y", when="call", longreprtext="")
    conftest.pytest_runtest_logreport(passed)
    assert not log.exists()
    conftest.pytest_runtest_logreport(failed)
    assert log.read_text() == "tests/t.py::test_x (call)\n    E       assert 1 == 2\n"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # workers leave it to the controller
    conftest.pytest_runtest_logreport(failed)
    assert log.read_text().count("test_x") == 1


def test_read_limit_is_the_fastest_read(monkeypatch):
    """The CPU bench's read limit: the fastest candidate of the first timings, and the read of the
    case's x timed beside it in the same rounds when x is far larger than the cache (the contenders
    read x; another buffer can read faster or slower); the faster of the two there counts. Every
    timing is faked to 1 s, so the bytes decide: the 8 MiB buffer wins the first timings."""
    sys.path.insert(0, ROOT)
    from bench import harness

    monkeypatch.setattr(harness, "cache_bytes", lambda: 1 << 20)  # 1 MiB "cache": 4 MiB x is far larger
    monkeypatch.setattr(harness, "time_once", lambda fn, device="cpu": 1.0)
    x = torch.randn(1024, 1024)
    x_read = "torch.sum(x (1024, 1024) float32)"
    lim = harness.Limits.measure("cpu", sample=x, buffer_bytes=8 << 20, repeats=2)
    assert lim.details["read: " + x_read] == x.nbytes
    assert lim.read_method.startswith("torch.sum(float32 buffer") and lim.read_bandwidth == 8 << 20
    names = [c.name for c in lim.probes()]
    assert names == ["limit: read", "limit: gemm", "limit: read of x"]

    stats = {n: harness.Stats.of([1.0]) for n in names}
    lim.update(stats)  # the same time for both reads: the buffer's 8 MiB still win
    assert lim.read_bandwidth == 8 << 20 and lim.details["read of x (interleaved median)"] == x.nbytes
    stats["limit: read of x"] = harness.Stats.of([0.25])  # x now reads at 16 MiB/s: it counts
    lim.update(stats)
    assert lim.read_method == x_read and lim.read_bandwidth == 4 * x.nbytes
    stats["limit: read of x"] = harness.Stats.of([1.0])  # and an update without x ahead: the buffer's
    lim.update(stats)
    assert lim.read_method.startswith("torch.sum(float32 buffer") and lim.read_bandwidth == 8 << 20

    # x as the first timings' winner (a 16 MiB x): no second read probe
    big = torch.randn(4096, 1024)
    lim = harness.Limits.measure("cpu", sample=big, buffer_bytes=8 << 20, repeats=2)
    assert lim.read_method == "torch.sum(x (4096, 1024) float32)"
    assert [c.name for c in lim.probes()] == ["limit: read", "limit: gemm"]

    small = torch.randn(16, 16)  # cache-resident: its read is no candidate
    lim = harness.Limits.measure("cpu", sample=small, buffer_bytes=8 << 20, repeats=2)
    assert not any("torch.sum(x" in k for k in lim.details)
    assert [c.name for c in lim.probes()] == ["limit: read", "limit: gemm"]


def test_bench_dtypes_runs(capsys):
    """bench/bench_dtypes.py (quoted in bench/RESULTS.md) end to end on a tiny x: both tables, a row
    per dtype."""
    sys.path.insert(0, ROOT)
    from bench import bench_dtypes

    n = torch.get_num_threads()
    try:
        assert bench_dtypes.main(["--elems", "10", "--dims", "3", "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "train_step (cpp) against torch.sum" in out and "fastlin (cpp) against torch" in out
    words = " ".join(out.split())
    for dt in ("float32", "bfloat16", "float16"):
        assert f"341x3x1 {dt}" in words  # 2^10 // 3 rows
        assert f"{dt} mse_loss" in words


def test_triton_sass_counts_the_tile_loop():
    """bench/triton_sass.py compiles the one-pass kernel for sm_90a (no GPU) and counts its tile
    loop: the packed bf16 path must come out well under the FMA path's instructions per byte (the
    claim behind PACK in bench/RESULTS.md), and every config must report a loop."""
    pytest.importorskip("triton")
    out = {}
    for pack in ("on", "off"):
        r = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "triton_sass.py"), "--pack", pack],
            cwd=ROOT,
            env=dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        out[pack] = [float(v) for v in re.findall(r"([0-9.]+) warp instructions per byte", r.stdout)]
        assert out[pack], r.stdout
        assert all("PACK=1" in ln for ln in r.stdout.splitlines()[1:]) == (pack == "on"), r.stdout
    assert out["on"][0] * 2 < min(out["off"]), out

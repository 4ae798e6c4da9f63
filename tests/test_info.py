"""fastlin.info() / `python -m fastlin info`, the fallback when fastlin._C cannot be loaded, and
backend selection by FASTLIN_BACKEND and backend=."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

import fastlin

BACKENDS = ("reference", "cpp", "cuda", "triton")
ISAS = ["generic", "avx2", "avx512", "avx512_bf16"]  # csrc/cpu/isa.h, lowest first


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTLIN_BACKEND", "OMP_NUM_THREADS")}
    env.update(extra)
    return env


def _start(code: str, **env) -> subprocess.Popen:
    """A fresh interpreter (the import-time behaviour is what is tested) running code."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{err}"
    return out, err


def test_info_reports_versions_threads_and_backends():
    buf = io.StringIO()
    report = fastlin.info(file=buf)
    text = buf.getvalue()
    assert Version(report["fastlin"]) == Version(fastlin.__version__)
    assert Version(report["torch"]) == Version(torch.__version__)
    assert report["threads"] == torch.get_num_threads() >= 1
    assert report["default_backend"] == fastlin.backends.default()
    assert set(report["backends"]) == set(BACKENDS)
    assert report["backends"]["reference"] == {"available": True, "reason": ""}
    for name, st in report["backends"].items():
        assert st["available"] == fastlin.backends.status()[name][0]
        if not st["available"]:
            assert st["reason"], f"{name} unavailable without a reason"
            assert f"{name}" in text and st["reason"] in text
        assert name in text
    assert f"fastlin {fastlin.__version__}" in text and f"torch {torch.__version__}" in text
    assert f"{report['threads']} threads" in text
    # the extension built in this checkout: the cpp backend runs here
    assert report["backends"]["cpp"]["available"], report["backends"]["cpp"]["reason"]
    assert report["cpu_isa"] in ISAS and f"kernels {report['cpu_isa']}" in text


def test_info_reports_the_capped_cpu_isa():
    # FASTLIN_CPU_ISA caps the kernels' instruction set (tests/test_cpu_isa.py runs the kernels so);
    # info names the one the process runs: the cap, or the CPU's best when that is lower.
    best = fastlin.info(file=io.StringIO())["cpu_isa"]
    for cap in ISAS:
        proc = subprocess.run(
            [sys.executable, "-m", "fastlin", "info"],
            env=_env(FASTLIN_CPU_ISA=cap),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        want = ISAS[min(ISAS.index(cap), ISAS.index(best))]
        assert f"kernels {want}" in proc.stdout, (cap, proc.stdout)


def test_python_m_fastlin_info_in_a_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-m", "fastlin", "info"],
        env=_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"fastlin {fastlin.__version__}" in out
    assert "1 threads" in out and "OMP_NUM_THREADS=1" in out
    for name in BACKENDS:
        assert name in out
    assert "cpp        available" in out
    assert "default backend: auto" in out
    assert "fastlin._C could not be loaded" not in proc.stderr


NO_EXTENSION = """
    import json, sys, warnings
    sys.modules["fastlin._C"] = None  # `from fastlin import _C` now raises ImportError
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning fastlin emits, not once per location
        import fastlin
        import fastlin.backends, fastlin.nn, fastlin.optim
        torch.manual_seed(0)
        m = fastlin.nn.Linear(3, 2)
        x, y = torch.randn(5, 3), torch.randn(5, 2)
        out = m(x)
        loss = fastlin.nn.MSELoss()(out, y)
        loss.backward()
        fused = fastlin.nn.LinearMSELoss(3, 2)
        fused.load_state_dict(m.state_dict())
        fused_loss = fused(x, y)
        opt = fastlin.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        opt.step()
        import io
        report = fastlin.info(file=io.StringIO())
        fastlin.backends.status(); fastlin.backends.extension_loaded()
        try:
            fastlin.functional.linear(x, m.weight, backend="cpp")
            explicit = None
        except RuntimeError as e:
            explicit = str(e)
    ref = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, fused.weight, fused.bias), y)
    print(json.dumps({
        "warnings": [[w.category.__name__, str(w.message)] for w in caught if "fastlin" in str(w.message)],
        "resolved": fastlin.backends.resolve(None, torch.device("cpu")),
        "extension_loaded": fastlin.backends.extension_loaded(),
        "cpp": report["backends"]["cpp"], "reference": report["backends"]["reference"],
        "linear_err": (out - torch.nn.functional.linear(x, fused.weight, fused.bias)).abs().max().item(),
        "fused_err": abs(fused_loss.item() - ref.item()),
        "has_grad": m.weight.grad is not None and "momentum_buffer" in opt.state[m.weight],
        "explicit": explicit,
    }))
"""


def test_import_without_extension_falls_back_to_reference_and_warns_once():
    out, _ = _finish(_start(NO_EXTENSION))
    r = json.loads(out.strip().splitlines()[-1])
    assert len(r["warnings"]) == 1, r["warnings"]
    category, message = r["warnings"][0]
    assert category == "RuntimeWarning"
    assert "fastlin._C could not be loaded" in message and "reference backend" in message
    assert "pip install --no-build-isolation -e ." in message  # says how to fix it
    assert r["resolved"] == "reference" and r["extension_loaded"] is False
    assert r["reference"] == {"available": True, "reason": ""}
    assert r["cpp"]["available"] is False and "fastlin._C could not be loaded" in r["cpp"]["reason"]
    assert r["linear_err"] < 1e-6 and r["fused_err"] < 1e-6 and r["has_grad"]
    assert r["explicit"] and "backend 'cpp' is not available" in r["explicit"]


ENV_CHECK = """
    import io, json, torch, fastlin
    x, w = torch.randn(5, 3), torch.randn(2, 3)
    buf = io.StringIO()
    report = fastlin.info(file=buf)
    try:
        fastlin.functional.linear(x, w)
        error = None
    except Exception as e:
        error = [type(e).__name__, str(e)]
    resolved = None if error else fastlin.backends.resolve(None, torch.device("cpu"))
    print(json.dumps({"default": fastlin.backends.default(), "text": buf.getvalue(),
                      "threads": report["threads"], "resolved": resolved, "error": error}))
"""


def _unavailable_backend():
    for name in ("cuda", "triton", "cpp"):
        ok, why = fastlin.backends.status()[name]
        if not ok:
            return name, why
    return None, None


def test_fastlin_backend_environment_variable():
    unavailable, why = _unavailable_backend()
    procs = {
        "reference": _start(ENV_CHECK, FASTLIN_BACKEND="reference", OMP_NUM_THREADS="1"),
        "REFERENCE ": _start(ENV_CHECK, FASTLIN_BACKEND="REFERENCE "),  # case and blanks do not matter
        "bogus": _start(ENV_CHECK, FASTLIN_BACKEND="bogus"),
    }
    if unavailable:
        procs[unavailable] = _start(ENV_CHECK, FASTLIN_BACKEND=unavailable)
    res = {k: json.loads(_finish(p)[0].strip().splitlines()[-1]) for k, p in procs.items()}
    r = res["reference"]
    assert r["default"] == "reference" and r["resolved"] == "reference" and r["error"] is None
    assert "default backend: reference" in r["text"] and r["threads"] == 1
    assert res["REFERENCE "]["resolved"] == "reference"
    kind, msg = res["bogus"]["error"]
    assert kind == "ValueError" and "backend must be one of" in msg and "'bogus'" in msg
    if unavailable:
        kind, msg = res[unavailable]["error"]
        assert kind == "RuntimeError" and f"backend {unavailable!r} is not available" in msg and why in msg


def test_backend_argument_and_set_default():
    x, w = torch.randn(5, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlin.backends.set_default("fastest")
    old = fastlin.backends.default()
    try:
        fastlin.backends.set_default("reference")
        assert fastlin.backends.resolve(None, torch.device("cpu")) == "reference"
        assert fastlin.backends.resolve("cpp", torch.device("cpu")) == "cpp"  # backend= beats the default
    finally:
        fastlin.backends.set_default(old)
    assert fastlin.backends.resolve("auto", torch.device("cpu")) == "cpp"
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlin.nn.Linear(3, 2, backend="fastest")(x)
    unavailable, why = _unavailable_backend()
    if unavailable:
        with pytest.raises(RuntimeError, match=f"backend '{unavailable}' is not available"):
            fastlin.functional.linear(x, w, backend=unavailable)


def test_extension_uses_the_shared_cxx_runtime():
    """fastlin._C depends on the shared libstdc++ (the one torch runs with) and carries no copy of
    the C++ runtime: built by a g++ that linked libstdc++ statically, every failed input check
    segfaulted inside that copy's ostream (on the GPU machines; setup.py's LINK)."""
    ok, why = fastlin.backends.status()["cpp"]
    if not ok:
        pytest.skip(f"backend cpp unavailable: {why}")
    import shutil

    import fastlin._C as ext

    readelf, nm = shutil.which("readelf"), shutil.which("nm")
    if not (sys.platform.startswith("linux") and readelf and nm):
        pytest.skip("needs Linux with binutils (readelf, nm)")
    dyn = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dyn, f"{ext.__file__} does not depend on the shared libstdc++:\n{dyn}"
    syms = subprocess.run([nm, ext.__file__], capture_output=True, text=True, check=True).stdout
    inside = [ln for ln in syms.splitlines() if " T _ZNSo9_M_insert" in ln or " W _ZNSo9_M_insert" in ln]
    assert not inside, f"{ext.__file__} defines the C++ runtime's ostream itself: {inside[:3]}"


def test_auto_on_cuda_picks_per_op(monkeypatch):
    """auto on CUDA tensors: CUDA C++ first (the H200 measurements behind
    backends._AUTO_CUDA_DEFAULT) except where _AUTO_CUDA_CASES names another order for the op, the
    input dtype and the output width (Triton first for the one-pass ops on bfloat16 with more than
    4 outputs); each falls back to the other GPU backend, then to the reference. (Availability is
    faked: no GPU needed.)"""
    resolve, cuda = fastlin.backends.resolve, torch.device("cuda")
    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    fastlin.backends.status()  # probe first, so the faked entries below are not overwritten

    def available(cuda_ok, triton_ok):
        monkeypatch.setitem(fastlin.backends._status, "cuda", (cuda_ok, "faked"))
        monkeypatch.setitem(fastlin.backends._status, "triton", (triton_ok, "faked"))

    ops = ("train_step", "fit", "linear_mse_loss", "sgd_update_", "linear", "mse_loss", None)
    available(True, True)
    assert [resolve("auto", cuda, op) for op in ops] == ["cuda"] * len(ops)
    onepass = ("train_step", "fit", "linear_mse_loss")
    for op in ops:
        for dtype, width in ((bf16, 16), (bf16, 5), (bf16, 4), (bf16, 1), (f32, 16), (f16, 16), (None, 16)):
            want = "triton" if op in onepass and dtype == bf16 and width > 4 else "cuda"
            assert resolve("auto", cuda, op, dtype, width) == want, (op, dtype, width)
    # an explicit backend is never overridden
    assert resolve("cuda", cuda, "train_step", bf16, 16) == "cuda"
    available(True, False)
    assert {resolve("auto", cuda, op, bf16, 16) for op in ops} == {"cuda"}
    available(False, True)
    assert {resolve("auto", cuda, op, f32, 1) for op in ops} == {"triton"}
    available(False, False)
    assert {resolve("auto", cuda, op, bf16, 16) for op in ops} == {"reference"}
    assert resolve("auto", torch.device("cpu"), "train_step") in ("cpp", "reference")


def test_one_pass_ops_tell_auto_their_dtype_and_width(monkeypatch):
    """ops.train_step / linear_mse_loss / fit choose their implementation through
    ops._onepass_impl, which hands a CUDA input's dtype and out_features to the backend choice (what
    auto's per-case order goes by) and leaves them out on the CPU (those reads cost ~0.45 us a
    call there). No GPU needed: a stand-in says is_cuda, availability is faked."""
    import types

    calls, seen = [], []
    real_impl, real_resolve = fastlin.ops._onepass_impl, fastlin.backends.resolve

    def impl_spy(name, backend, input, weight):
        calls.append(name)
        return real_impl(name, backend, input, weight)

    def resolve_spy(backend, device, op=None, dtype=None, out_features=None):
        seen.append((op, dtype, out_features))
        return real_resolve(backend, device, op, dtype, out_features)

    monkeypatch.setattr(fastlin.ops, "_onepass_impl", impl_spy)
    monkeypatch.setattr(fastlin.backends, "resolve", resolve_spy)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    w, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    fastlin.ops.train_step(x, y, w.clone(), b.clone(), lr=0.1)
    fastlin.ops.linear_mse_loss(x, w, b, y)
    fastlin.ops.fit(x, y, w.clone(), b.clone(), epochs=1, lr=0.1)
    assert calls == ["train_step", "linear_mse_loss", "fit"]
    assert [s for s in seen if s[0] in calls] == [(op, None, None) for op in calls]
    # a CUDA input: dtype and width go to the choice, which is then Triton for bf16 with 16 outputs
    fastlin.backends.status()
    monkeypatch.setitem(fastlin.backends._status, "cuda", (True, "faked"))
    monkeypatch.setitem(fastlin.backends._status, "triton", (True, "faked"))
    cuda_x = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=torch.bfloat16)
    seen.clear()
    real_impl("train_step", "auto", cuda_x, torch.empty(16, 3))
    assert seen == [("train_step", torch.bfloat16, 16)]
    assert real_resolve("auto", cuda_x.device, *seen[0]) == "triton"

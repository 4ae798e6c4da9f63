"""What torch.compile believes each Triton kernel writes, checked without a GPU.

Under torch.compile, torch.library.wrap_triton's functionalization asks torch which arguments a
kernel writes (it compiles the kernel to TTIR and follows every store back to the arguments its
address depends on), clones those arguments before the launch and copies the clones back after it.
Two ways that goes wrong, both seen on an H200 (opcheck's test_aot_dispatch_dynamic: the gradients
of linear_backward / linear_mse_loss came back as garbage whenever grad_bias was not asked for):
1. a written argument shares storage with another argument the kernel touches: a placeholder for an
   absent bias aliased the weight gradient, the analysis counted a store to it, and copying back
   the placeholder's untouched clone overwrote the result;
2. the analysis fails (a first autotune config that does not compile, say), and then every
   argument counts as written: x itself is cloned and copied back at every call.
So, for every launch of every Triton op over the option grid (bias, momentum, sample weights, each
output mask, the FMA and tl.dot paths): the analysis must succeed, x / y / the sample weights /
the gather index are never written, and a written argument shares storage with no other argument
the kernel reads or writes. The analysis needs real Triton (not the interpreter), so the check runs
in a subprocess with TRITON_INTERPRET=0; TTIR is target-independent enough to build for sm_90
without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_triton_kernel_writes_as_torch_compile_sees_them():
    env = dict(os.environ, TRITON_INTERPRET="0", FASTLIN_TRITON_AUTOTUNE="1", PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert "launches checked" in r.stdout, r.stdout[-2000:]


# ------------------------------------------------------------------------------------------------
# the subprocess (TRITON_INTERPRET=0)

# arguments no kernel may write: the data (a clone of x would be a whole extra pass per call)
READ_ONLY = {
    "_onepass_kernel": {"x_ptr", "y_ptr", "w_ptr", "b_ptr", "sw_ptr", "idx_ptr"},
    "_linear_kernel": {"a_ptr", "b_ptr", "bias_ptr"},
}


def _main() -> int:
    import logging

    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class _Driver:  # torch builds the TTIR for the active driver's target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(_Driver())
    from torch._higher_order_ops import triton_kernel_wrap as TKW
    from triton.runtime.autotuner import Autotuner

    import fastlin.triton  # noqa: F401  (registers torch.ops.fastlin_triton)
    from fastlin.triton import _common as K

    failed_analyses = []

    class _Catch(logging.Handler):
        def emit(self, record):
            if "assuming every input is mutated" in record.getMessage():
                failed_analyses.append(record.exc_text or record.getMessage())

    TKW.log.addHandler(_Catch())
    recorded = []
    K.launch = lambda kernel, grid, *a, **k: recorded.append((kernel, a, k))
    K.check_devices = lambda *a, **k: None  # CPU tensors stand in for CUDA ones
    T = torch.ops.fastlin_triton
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g)

    calls = []
    for O, D in ((1, 7), (3, 5), (5, 33)):  # FMA row path, FMA (rows, O, D) path, tl.dot path
        x, y, w, b = r(9, D), r(9, O), r(O, D), r(O)
        go = r(9, O)
        calls.append((f"linear O={O}", lambda x=x, w=w, b=b: T.linear(x, w, b)))
        calls.append((f"linear O={O} no bias", lambda x=x, w=w: T.linear(x, w, None)))
        for m in range(1, 8):
            mask = [bool(m & 1), bool(m & 2), bool(m & 4)]
            calls.append((f"linear_backward O={O} {mask}", partial(T.linear_backward, go, x, w, mask)))
        for m in range(16):
            mask = [bool(m >> i & 1) for i in range(4)]
            for bias in (b, None):
                name = f"linear_mse_loss O={O} {mask} bias={bias is not None}"
                calls.append((name, partial(T.linear_mse_loss, x, w, bias, y, "mean", mask)))
        for bias in (b, None):
            for mom in (0.0, 0.9):
                for sw in (None, torch.rand(9, generator=g) + 0.5):
                    wm = torch.zeros_like(w) if mom else None
                    bm = torch.zeros_like(b) if mom and bias is not None else None
                    calls.append(
                        (
                            f"train_step O={O} bias={bias is not None} momentum={mom} sw={sw is not None}",
                            lambda x=x, y=y, w=w, bias=bias, wm=wm, bm=bm, sw=sw, mom=mom: T.train_step(
                                x, y, w, bias, wm, bm, sw, 0.1, mom, 0.0, 0.0, False, False, False
                            ),
                        )
                    )
    x, y = r(9, 4), r(9, 4)
    for red in ("none", "mean", "sum"):
        calls.append((f"mse_loss {red}", lambda red=red: T.mse_loss(x, y, red)))
        go = r(9, 4) if red == "none" else r(())
        calls.append((f"mse_loss_backward {red}", lambda go=go, red=red: T.mse_loss_backward(go, x, y, red)))
    ps = [r(5, 3), r(4), r(1)]
    for mom in (0.0, 0.9):
        bufs = [torch.zeros_like(p) for p in ps] if mom else []
        calls.append(
            (
                f"sgd_update_ momentum={mom}",
                lambda bufs=bufs, mom=mom: T.sgd_update_(
                    ps, [torch.ones_like(p) for p in ps], bufs, 0.1, mom, 0.0, 0.0, False, False, False
                ),
            )
        )

    problems, seen, n = [], set(), 0
    for label, call in calls:
        recorded.clear()
        call()
        for kernel, args, kwargs in recorded:
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            kw = dict(zip(fn.arg_names, args))
            kw.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
            tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
            alias = tuple(sorted((k, v.untyped_storage().data_ptr()) for k, v in tensors.items()))
            spec = tuple(sorted((k, repr(v)) for k, v in kw.items() if not isinstance(v, torch.Tensor)))
            key = (fn.__name__, spec, tuple(sorted(set(p for _, p in alias))), tuple(k for k, _ in alias))
            if key in seen:
                continue
            seen.add(key)
            n += 1
            failed_analyses.clear()
            if hasattr(TKW, "identify_accessed_tensors"):
                acc = TKW.identify_accessed_tensors(kernel, kw, {}).read_writes
                writes = {d.name for d in acc.writes}
                touched = writes | {d.name for d in acc.reads}
            else:  # torch < 2.13 (the GPU image's 2.11) names the writes only: no aliasing check
                writes = set(TKW.identify_mutated_tensors(kernel, kw, {}))
                touched = set()
            where = f"{label}: {fn.__name__}"
            if failed_analyses:
                problems.append(f"{where}: the write analysis failed, every argument counts as written")
                continue
            bad = writes & READ_ONLY.get(fn.__name__, set())
            if bad:
                problems.append(f"{where}: input(s) {sorted(bad)} count as written")
            for a in sorted(writes):
                sa = tensors[a].untyped_storage().data_ptr()
                for b_, t in tensors.items():
                    if b_ != a and b_ in touched and t.untyped_storage().data_ptr() == sa:
                        problems.append(f"{where}: written {a} shares storage with {b_}, also accessed")
    for p in problems:
        print(p)
    print(f"{n} launches checked, {len(problems)} problems")
    return 1 if problems or n == 0 else 0


if __name__ == "__main__":
    sys.exit(_main())

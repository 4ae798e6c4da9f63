"""fastlin.gram: the augmented Gram matrix Z^T diag(w) Z of Z = [input, 1, target] (csrc/ops.cpp).

The C++ CPU kernel (csrc/cpu/gram.cpp, csrc/cpu/kernels/gram_impl.h) against the chunked float64
oracle (fastlin.reference.gram) over odd shapes, dtypes, layouts and sample weights; symmetry,
determinism across calls and thread counts, accuracy of a solve on data whose mean dwarfs its
spread, bad input, opcheck, and the lower CPU instruction sets in a subprocess."""

import pytest
import torch
from conftest import STATUS, rel_error, run_under_isa

import fastlin
from fastlin import reference

pytestmark = pytest.mark.skipif(not STATUS["cpp"][0], reason=f"backend cpp unavailable: {STATUS['cpp'][1]}")

gram_op = torch.ops.fastlin.gram.default if STATUS["cpp"][0] else None

# Relative error ||G - G_ref|| / ||G_ref|| allowed against the float64 oracle. The oracle reads the
# same input values (it converts them to float64 exactly), so input rounding is not part of the
# error; what is left is the kernel's arithmetic:
#   float64: float64 products and sums; the shift round trip (csrc/cpu/gram.cpp) costs a few ulps
#            of the largest entries: 1e-12 is far above it.
#   float32 / bfloat16 / float16: products and sums in float32 over blocks of at most 128 rows,
#            added into float64 (gram_impl.h): at most 128 * eps32 = 7.6e-6 relative per block in
#            the worst case, ~sqrt(128) * eps32 ~ 7e-7 typically (measured 1e-7..5e-7 here), so
#            2e-6 is a claim, not a slack. Sample weights add one float32 rounding of w * z.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _data(N, D, O, dtype, weighted):
    x = torch.randn(N, D).to(dtype)
    y = torch.randn(N, O).to(dtype)
    w = (torch.rand(N) + 0.5).to(dtype) if weighted else None
    return x, y, w


def _check(x, y, w, dtype):
    out = gram_op(x, y, w)
    ref = reference.gram(x, y, w)
    P = x.shape[1] + 1 + y.shape[1]
    assert out.shape == (P, P) and out.dtype == torch.float64
    assert torch.isfinite(out).all(), "non-finite entries: an unwritten or poisoned element"
    assert torch.equal(out, out.T), "not exactly symmetric"
    err = rel_error(out, ref)
    assert err <= TOL[dtype], f"rel error {err:.2e} > {TOL[dtype]:.0e}"
    return out


@pytest.mark.parametrize("weighted", [False, True], ids=["w", "no_w"][::-1])
@pytest.mark.parametrize("O", [1, 3])
@pytest.mark.parametrize("D", [1, 3, 257])
@pytest.mark.parametrize("N", [0, 1, 7, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matches_reference(dtype, N, D, O, weighted):
    x, y, w = _data(N, D, O, dtype, weighted)
    out = _check(x, y, w, dtype)
    if N == 0:
        assert torch.equal(out, torch.zeros_like(out))


def test_gram_float16():
    x, y, w = _data(4097, 17, 2, torch.float16, True)
    _check(x, y, w, torch.float16)


def test_gram_many_chunks():
    # More rows than one chunk (8192) and one block: partials added in chunk order.
    for dtype in (torch.float32, torch.float64):
        x, y, w = _data(20000, 33, 2, dtype, True)
        _check(x, y, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_layouts(dtype):
    N, D, O = 4097, 19, 3
    base = torch.randn(N, 2 * D).to(dtype)
    t_store = torch.randn(D, N).to(dtype)
    y_wide = torch.randn(N, 2 * O).to(dtype)
    w_wide = (torch.rand(2 * N) + 0.5).to(dtype)
    xs = {
        "cols_stride2": base[:, ::2],  # row stride 2D, column stride 2
        "transposed": t_store.T,  # column-major: stride (1, N)
        "rows_stride2": torch.randn(2 * N, D).to(dtype)[::2],  # unit columns, row stride 2D
        "general": torch.randn(2 * N, 3 * D).to(dtype)[::2, ::3],
        "expanded": torch.randn(1, D).to(dtype).expand(N, D),  # stride (0, 1)
    }
    ys = {
        "contiguous": torch.randn(N, O).to(dtype),
        "cols_stride2": y_wide[:, ::2],
        "transposed": torch.randn(O, N).to(dtype).T,
    }
    for xn, x in xs.items():
        for yn, y in ys.items():
            for w in (None, w_wide[::2]):
                try:
                    _check(x, y, w, dtype)
                except AssertionError as e:
                    raise AssertionError(f"x {xn}, y {yn}, weighted {w is not None}: {e}") from None


def test_gram_empty_feature_or_target_blocks():
    for N, D, O in [(5, 0, 1), (5, 2, 0), (9000, 0, 2), (3, 0, 0)]:
        x, y, w = _data(N, D, O, torch.float32, True)
        _check(x, y, w, torch.float32)


def test_gram_non_finite_row0():
    # Row 0 is the shift: an inf there must not poison the other statistics (its shift entry is
    # replaced by 0): the same entries are finite as in the oracle, and those agree.
    x, y, _ = _data(300, 3, 1, torch.float32, False)
    x[0, 1] = float("inf")
    out, ref = gram_op(x, y, None), reference.gram(x, y, None)
    assert torch.equal(out.isfinite(), ref.isfinite())
    assert out[1, 1] == float("inf")
    fin = ref.isfinite()
    assert rel_error(out[fin], ref[fin]) <= TOL[torch.float32]


def test_gram_integer_weights_repeat_rows():
    # sample_weight = ones must give exactly the unweighted matrix's values up to rounding, and
    # integer weights must equal repeating rows.
    x, y, _ = _data(1000, 5, 2, torch.float64, False)
    w = torch.randint(0, 4, (1000,)).double()
    rep = w.long()
    g_w = gram_op(x, y, w)
    g_rep = gram_op(x.repeat_interleave(rep, 0), y.repeat_interleave(rep, 0), None)
    assert rel_error(g_w, g_rep) < 1e-13
    assert rel_error(gram_op(x, y, torch.ones(1000, dtype=torch.float64)), gram_op(x, y, None)) < 1e-14


def test_gram_deterministic_and_thread_count_independent():
    # Promise (csrc/cpu/gram.cpp): fixed row chunks summed each by one thread and added in chunk
    # order, so any thread count gives bit-identical results within one ISA.
    x, y, w = _data(40000, 30, 2, torch.float32, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gram_op(x, y, w)
        torch.set_num_threads(max(2, n))
        a = gram_op(x, y, w)
        b = gram_op(x, y, w)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
    assert torch.equal(a, one)


def _solve(G, D):
    # Normal equations of [X 1] w = y from the augmented Gram (float64).
    A = G[: D + 1, : D + 1]
    B = G[: D + 1, D + 1 :]
    return torch.linalg.solve(A, B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gram_solve_accuracy_large_mean(dtype):
    # x = 100 + randn: a float32 Gram without the shift carries the centred statistics in the
    # last ~4 digits of mean^2 = 1e4 (measured: solved weights off by ~1e-1 relative). The
    # kernel's shift (row 0) keeps the solved weights within 1e-4 of the float64 solve of the same
    # (rounded) data; measured ~1e-6 for float32.
    N, D = 50000, 8
    x = (100.0 + torch.randn(N, D, dtype=torch.float64)).to(dtype)
    true_w = torch.randn(D, 1, dtype=torch.float64)
    y = (x.double() @ true_w + 3.0 + 0.1 * torch.randn(N, 1, dtype=torch.float64)).to(dtype)
    sol = _solve(gram_op(x, y, None), D)
    ref = _solve(reference.gram(x, y, None), D)
    err = rel_error(sol, ref)
    assert err < 1e-4, f"solved weights rel error {err:.2e}"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(5), torch.randn(5, 1), None), "fastlin.gram: input must be 2-D"),
        (lambda: (torch.randn(5, 2), torch.randn(5), None), "fastlin.gram: target must be 2-D"),
        (
            lambda: (torch.randn(5, 2), torch.randn(4, 1), None),
            r"fastlin.gram: target must have shape \(5, 1\)",
        ),
        (
            lambda: (torch.randn(5, 2), torch.randn(5, 1).double(), None),
            "fastlin.gram: target must have the dtype",
        ),
        (
            lambda: (torch.randint(0, 3, (5, 2)), torch.randint(0, 3, (5, 1)), None),
            "fastlin.gram: input must be float32, float64",
        ),
        (
            lambda: (torch.randn(5, 2), torch.randn(5, 1), torch.rand(4)),
            r"fastlin.gram: sample_weight must have shape \(5,\)",
        ),
        (
            lambda: (torch.randn(5, 2), torch.randn(5, 1), torch.rand(5, 1)),
            r"fastlin.gram: sample_weight must have shape \(5,\)",
        ),
        (
            lambda: (torch.randn(5, 2), torch.randn(5, 1), torch.rand(5).double()),
            "fastlin.gram: sample_weight must have the dtype",
        ),
    ],
)
def test_gram_bad_input(make, match):
    x, y, w = make()
    # The C++ kernel and the Python twin (reference / fake impl) raise the same message.
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        gram_op(x, y, w)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        reference.gram(x, y, w)


def test_gram_entry_point_uses_kernel():
    x, y, w = _data(300, 4, 2, torch.float32, True)
    out = fastlin.ops.gram(x, y, w, backend="cpp")
    assert torch.equal(out, gram_op(x, y, w))
    assert rel_error(fastlin.ops.gram(x, y, w, backend="reference"), out) < TOL[torch.float32]


def test_gram_opcheck():
    for N, D, O, dtype, weighted in [
        (7, 3, 1, torch.float32, False),
        (33, 5, 2, torch.float64, True),
        (0, 2, 1, torch.float32, True),
    ]:
        x, y, w = _data(N, D, O, dtype, weighted)
        torch.library.opcheck(gram_op, (x, y, w))


# Run in a subprocess per lower ISA (the ISA is fixed per process; the in-process tests cover the
# best one). A plain script, not pytest: the pytest + conftest start-up took ~20 s per ISA here.
_ISA_SCRIPT = r"""
import torch, fastlin._C  # registers the ops
from fastlin import reference
torch.manual_seed(0)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}
def check(x, y, w, what):
    out = torch.ops.fastlin.gram(x, y, w)
    ref = reference.gram(x, y, w)
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    assert torch.equal(out, out.T) and torch.isfinite(out).all(), what
    assert err <= TOL[x.dtype], f"{what}: rel error {err:.2e}"
for dt in TOL:
    for N, D, O in [(1, 1, 1), (7, 3, 3), (4097, 67, 3), (20000, 9, 2)]:
        for weighted in (False, True):
            x, y = torch.randn(N, 2 * D).to(dt), torch.randn(N, O).to(dt)
            w = (torch.rand(N) + 0.5).to(dt) if weighted else None
            check(x[:, :D].contiguous(), y, w, f"{dt} {N} {D} {O} {weighted} contiguous")
            check(x[:, ::2], y, w, f"{dt} {N} {D} {O} {weighted} strided")
            check(x[:, :D].T.contiguous().T, y.T.contiguous().T, w, f"{dt} {N} {D} {O} {weighted} transposed")
print("ISA OK")
"""


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_gram_on_isa(isa):
    rc, out, report = run_under_isa(isa, ["-c", _ISA_SCRIPT], timeout=600)
    assert rc == 0 and "ISA OK" in out, report

"""The one-pass row kernel shared by linear_backward (grad_weight, grad_bias), linear_mse_loss,
train_step and fit, and the small fixed-order reduce kernel that follows it.

_onepass_kernel: a persistent grid of P programs (a few per SM, fixed by the device so the
workspace is sized before the launch) x ceil(O / BLOCK_O) output blocks. Program p takes the row
tiles p, p + P, p + 2P, ... of x (BLOCK_N rows each; by index when GATHER, for shuffled
mini-batches). Per tile it reads x once and computes the residual r = x W^T + b - y (or loads a
given gradient g, GIVEN_G), the weighted squared error, and the contributions g^T x and sum(g) to
dW and db, accumulated in fp32 registers (fp64 for fp64 input) across its tiles. At the end it
writes its partials: ws_w (P, O, D), ws_b (P, O), ws_loss (P * NOB,), ws_wsum (P,). Optionally it
also writes per-row outputs (linear_mse_loss): grad_input = scale * r W, grad_target = -scale * r.

Two code paths by O:
  * O <= 4 (BLOCK_O <= 4), and always for fp64: plain FMAs on a broadcast (BLOCK_N, BLOCK_O, BLOCK_D)
    product; the dW accumulator keeps the row axis and is reduced once at the end, so a tile costs
    one row reduction (the dot x_i . w) and no column reduction. Exact fp32, no tensor cores.
  * O > 4: tl.dot for x W^T and g^T x with BLOCK_O >= 16 (tl.dot's minimum), input_precision from
    fastlin.triton settings ("ieee" by default). A bfloat16 x (SPLIT) stays bfloat16: each float32
    operand it meets (W, the residuals) goes in as three bf16 pieces that sum to it exactly, so every
    product is exact and the sums are float32, on the bf16 tensor cores whatever the precision setting.
    A float16 x takes the same path at "ieee" precision, as two bf16 pieces that sum to it
    exactly, at twice the dots (on the FMA-lowered "ieee" dot it ran at 5% of its read limit on an
    H200); "tf32" / "tf32x3" keep their float32 dots. Each tile's dW product starts from zero and is
    added to a float32 sum outside the tensor core, whose accumulation rounds toward zero (chained
    over a program's tiles, bf16 O = 16 measured 3.4e-5 of the update against float64 at N = 4M, fp32
    2.5e-7; PACK's measured fix, below).
  * O = 1 with a bfloat16 x (PACK; on sm_90 and later the pick without autotuning, the autotuner
    also times the FMA path): the 2-D path with both products on the tensor cores. The three bf16
    pieces of w (and of the residuals) are the first columns of one 16-wide bf16 operand, so a tile
    takes two bf16 dots (exact products; wgmma on sm_90a) instead of per-row FMAs and 32-lane
    shuffle reductions: about a third of the warp instructions per byte of x in the sm_90a SASS.
    Each tile's dW product is added to a float32 sum outside the tensor core (see the tile loop).
Rows wider than MAX_BLOCK_D columns are walked in BLOCK_D chunks (ONE_CHUNK=False): a first loop
computes the residual, a second one re-reads the (cache-hot) tile and accumulates dW in the
program's own workspace slice (read-modify-write by its owner only: deterministic).

The FMA-path products go through _common.fma_mm / fma_mm_nt, which handle a shared axis of block
size 1 (BLOCK_O = 1 on the chunked path, BLOCK_D = 1 for D = 1) without a size-1 reduction: Triton
3.6 on an H200 got those ~8x wrong.

_reduce_kernel: one launch over the O*D weight elements and the O bias elements. Each program
sums the P partials of its elements in a fixed order (chunks of BLOCK_P, tree-summed), so results
are bit-identical run to run (no atomics). MODE 0 writes the gradients, MODE 1 applies
torch.optim.SGD's update in place, MODE 2 (fit) writes the updated values to a staging buffer and
a per-program "all finite" flag; _commit_kernel then applies them only when every flag is set and
otherwise raises the device-side "stopped" flag that every later kernel of the fit honours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastlin.triton import _common as K
from fastlin.triton._common import cast_out, fma_mm, fma_mm_nt, is_finite, scalar

# ---------------------------------------------------------------------------------------------
# autotuning: BLOCK_N, num_warps, NUM_STAGES and (bf16 x, one output) PACK; everything else is
# fixed by the shapes on the host.


# PACK tiles (rows, warps, stages), best first. Warp instructions of the sm_90a tile loop per byte of
# x (bf16, D = 256; python bench/triton_sass.py): 64 x 4 0.044, 32 x 4 0.068, 64 x 8 0.088, against
# the FMA path's 0.116-0.148 (0.135 / 0.147 for 32 x 8 / 16 x 8 with 6 stages). Both dots read x
# from shared memory (wgmma), so registers hold little beyond the accumulators: 64 x 4 x 3 stages
# takes 128 registers and 108.5 KB of shared memory (two programs fit an SM's 227 KB).
PACK_TILES = ((64, 4, 3), (32, 4, 6), (64, 8, 3))
PACK_COLS = tl.constexpr(16)  # columns of the packed operand (tl.dot's minimum): 3 used


def _onepass_configs():
    if K.INTERPRET:  # one config per path: the prune keeps one, so no benchmarking (slow there)
        return [
            triton.Config({"BLOCK_N": 64, "NUM_STAGES": 1, "PACK": p}, num_warps=4) for p in (False, True)
        ]
    configs = [
        triton.Config({"BLOCK_N": bn, "NUM_STAGES": s, "PACK": False}, num_warps=w)
        for bn in (1, 2, 4, 8, 16, 32, 64, 128)
        for w in (4, 8)
        for s in (1, 3, 6)
    ]
    configs += [
        triton.Config({"BLOCK_N": bn, "NUM_STAGES": s, "PACK": True}, num_warps=w) for bn, w, s in PACK_TILES
    ]
    # first: a tile legal on every path (tl.dot needs 16 rows). torch.compile's functionalization
    # compiles the first config to find which arguments the kernel writes; one that fails to compile
    # makes it assume every argument is written and clone them all (x included) at every call.
    # The order means nothing else: _prune_onepass sorts what it keeps.
    configs.sort(key=lambda c: (c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["NUM_STAGES"]) != (16, 4, 1))
    return configs


# K.PACK_ONE_OUTPUT -> PACK_MODE: the autotuner picks between the paths / PACK only / never PACK
PACK_AUTO, PACK_ON, PACK_OFF = 0, 1, 2

# the estimate of a config's shared memory (see _unpacked_configs) stays under this; measured sizes of
# the kept configs are checked by bench/triton_compile_check.py
SMEM_PER_PROGRAM = 100 * 1024


def _prune_onepass(configs, named_args, **kwargs):
    """The configs the autotuner times, the heuristic pick first (the only one kept without
    autotuning and under the interpreter): PACK's where it may run (first, the measured faster,
    or alone when forced by K.PACK_ONE_OUTPUT), then _unpacked_configs'."""
    bd, bo, dot = kwargs["BLOCK_D"], kwargs["BLOCK_O"], kwargs["USE_DOT"]
    # PACK (see PACK_TILES): bf16 x, one output, whole rows of 16 or more columns, on sm_90 or later
    # (or the interpreter): for sm_80 Triton 3.6 does not pipeline its tile loop (no cp.async in the
    # PTX). PACK_MODE (from K.PACK_ONE_OUTPUT) says which paths the autotuner may pick.
    mode = kwargs["PACK_MODE"]
    cap = K.device_capability(named_args["x_ptr"].device)
    can_pack = (
        (cap is None or cap >= (9, 0))
        and named_args["x_ptr"].dtype == torch.bfloat16
        and bo == 1
        and not dot
        and kwargs["ONE_CHUNK"]
        and 16 <= bd <= K.MAX_BLOCK_D_DOT
    )
    packed = [c for c in configs if c.kwargs["PACK"]] if can_pack and mode != PACK_OFF else []
    if packed and mode == PACK_ON:
        out = packed
    else:
        unpacked = [c for c in configs if not c.kwargs["PACK"]]
        x = named_args["x_ptr"]
        out = packed + _unpacked_configs(unpacked, x.element_size(), x.dtype == torch.float16, **kwargs)
    return out[:1] if K.INTERPRET or not K.AUTOTUNE else out


def _unpacked_configs(configs, x_bytes, x_fp16, **kwargs):
    """Keep the tiles whose register footprint fits (about 32 fp32 registers per thread for the
    biggest live tile, 64 on the tl.dot path) and whose shared memory lets PROGRAMS_PER_SM programs
    share an SM: per warp count the two largest such tiles with the tile loop software-
    pipelined (NUM_STAGES=3: cp.async prefetch of the next tiles into shared memory, which keeps
    more bytes in flight per SM than registers allow), plus the largest one without (8 warps, FMA path).
    The register budget is counted in fp32 values, so a 2-byte x gets the same tiles with half the
    bytes: NUM_STAGES=6 (2-byte x only) puts as many bytes in flight as 3 stages of fp32 (bf16 O = 1
    with 3 stages: 70% of its read limit on an H200, fp32 94%)."""
    bd, bo, dot = kwargs["BLOCK_D"], kwargs["BLOCK_O"], kwargs["USE_DOT"]
    fits = {}
    for c in configs:
        bn, w, s = c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["NUM_STAGES"]
        if s > 3 and x_bytes > 2:
            continue
        if dot and bn < 16:
            continue
        if not kwargs["ONE_CHUNK"] and bn > 32:  # the chunked path keeps more tiles alive (measured: spills)
            continue
        # fp32 values live per thread: the broadcast (rows, BLOCK_O, BLOCK_D) product on the FMA path
        # (32 per thread); the x tile, W and the dW accumulator on the tl.dot path (64 per thread:
        # ptxas gives 64 registers in all at BLOCK_N=32, 8 warps, D=256, O=16). With the FMA path's
        # 32 only the 16-row, 4-warp, unpipelined tile was left for O=16, D=256: 9% of the copy
        # bandwidth on an H200 (11.2 ms with "ieee", 2.16 ms even with "tf32").
        live = bn * bd + 2 * bo * bd if dot else bn * bo * bd
        # shared memory per program, about: the prefetched x tiles, plus the fp32 operand tile of the
        # dots; PROGRAMS_PER_SM programs must stay resident on an SM (Hopper: 227 KB)
        smem = (s - 1) * bn * bd * x_bytes + (bn * bd * 4 if dot else 0)
        if smem > SMEM_PER_PROGRAM:
            continue
        if live <= (64 if dot else 32) * 32 * w:
            fits.setdefault((w, c.kwargs["NUM_STAGES"]), []).append(c)
    out = []
    for (w, s), cs in sorted(fits.items(), key=lambda kv: (-kv[0][1], -kv[0][0])):  # pipelined, 8 warps first
        cs = sorted(cs, key=lambda c: -c.kwargs["BLOCK_N"])
        if s > 1:
            out += cs[1:2] + cs[:1]  # the second largest first: the heuristic pick without autotuning
        elif w == 8 and not dot:  # (bf16 on the tl.dot path unpipelined: ptxas spills)
            out += cs[:1]
    legal = [c for c in configs if c.kwargs["BLOCK_N"] >= (16 if dot else 1) and c.kwargs["NUM_STAGES"] == 1]
    smallest = min(legal, key=lambda c: (c.kwargs["BLOCK_N"], c.num_warps))
    if not out:  # nothing fits the budget: the smallest legal tile
        out = [smallest]
    elif dot and x_bytes == 4 and smallest not in out:
        # Also a candidate for the autotuner: the smallest unpipelined tile (16 rows, 4 warps), the
        # only config before the budget above, measured faster with "tf32" / "tf32x3" (O = 16,
        # D = 256 on an H200: 2.16 / 4.57 ms against 2.72 / 7.28 ms for the pipelined tiles kept
        # since; "ieee" 11.2 against 10.4 ms).
        out.append(smallest)
    if dot and x_bytes == 2:
        # bf16 x on the tl.dot path (three-piece split, bf16 mma.sync; sm_90a, D = 256, O = 16): ptxas
        # gives 154-210 registers at 8 warps (one program per SM resident) and 164-168 at 4 warps and
        # 16 rows, no spills (two per SM fit): those are candidates too
        out += [
            c
            for c in configs
            if (c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["NUM_STAGES"]) in ((16, 4, 3), (16, 4, 1))
            and c not in out
        ]
    if kwargs["SPLIT"] and x_fp16:
        # float16 x on the tl.dot path (two bf16 pieces, twice the dots): ptxas (sm_90a, D = 256,
        # O = 16) fits the 16-row, 4-warp, 3-stage tile in 255 registers without spills; the tiles
        # above spill 8-724 bytes. (The interpreter has no such tile: its one config stays.)
        one = [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["NUM_STAGES"]) == (16, 4, 3)]
        out = one or out
    return out


@triton.jit
def _tile_rows(t, offs_n, n_rows, BLOCK_N: tl.constexpr, IDX64: tl.constexpr):
    """Row positions of tile t and the tail mask; int64 only when IDX64 (an offset can pass 2^31),
    since 64-bit address arithmetic costs registers in every tile. The rows themselves when not
    gathered; else _gathered maps them. (Kept apart so idx_ptr is no operand of any call without a
    gather: torch.compile's write analysis counts every operand of a call that a stored address
    depends on as written, and the absent idx's placeholder aliases x.)"""
    if IDX64:
        r0 = tl.cast(t, tl.int64) * BLOCK_N + offs_n
    else:
        r0 = t * BLOCK_N + offs_n
    return r0, r0 < n_rows


@triton.jit
def _gathered(r0, mask_n, idx_ptr, IDX64: tl.constexpr):
    rows = tl.load(idx_ptr + r0, mask=mask_n, other=0)
    if not IDX64:
        rows = rows.to(tl.int32)
    return rows


@triton.jit
def _loaded_rows(
    t, offs_n, n_rows, idx_ptr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr, IDX64: tl.constexpr
):
    """The rows of tile t and their mask, gathered when GATHER: for loads only (_tile_rows says why
    stored addresses must not come from a call that takes idx_ptr)."""
    rows, mask_n = _tile_rows(t, offs_n, n_rows, BLOCK_N, IDX64)
    if GATHER:
        rows = _gathered(rows, mask_n, idx_ptr, IDX64)
    return rows, mask_n


@triton.jit
def _tile_col(
    t, offs_n, n_rows, idx_ptr, v_ptr, s_vn, BLOCK_N: tl.constexpr, GATHER: tl.constexpr, IDX64: tl.constexpr
):
    """The (BLOCK_N,) column v[rows of tile t] (0 past the end), for a one-output y or g."""
    rows, mask_n = _loaded_rows(t, offs_n, n_rows, idx_ptr, BLOCK_N, GATHER, IDX64)
    return tl.load(v_ptr + rows * s_vn, mask=mask_n, other=0)


@triton.jit
def _tile_block(
    t,
    offs_n,
    n_rows,
    idx_ptr,
    v_ptr,
    s_vn,
    s_vo,
    offs_o,
    mask_o,
    BLOCK_N: tl.constexpr,
    GATHER: tl.constexpr,
    IDX64: tl.constexpr,
):
    """The (BLOCK_N, BLOCK_O) block v[rows of tile t, outputs offs_o] (0 outside), for y or g."""
    rows, mask_n = _loaded_rows(t, offs_n, n_rows, idx_ptr, BLOCK_N, GATHER, IDX64)
    return tl.load(
        v_ptr + rows[:, None] * s_vn + offs_o[None, :] * s_vo, mask=mask_n[:, None] & mask_o[None, :], other=0
    )


@triton.jit
def _bf16_pieces(v):
    """Three bfloat16 tensors whose sum is the float32 tensor v exactly: each is the rest of v rounded
    to bf16 (3 x 8 significand bits cover float32's 24; bf16 has float32's exponent range)."""
    p1 = v.to(tl.bfloat16)
    rest = v - p1.to(tl.float32)
    p2 = rest.to(tl.bfloat16)
    p3 = (rest - p2.to(tl.float32)).to(tl.bfloat16)
    return p1, p2, p3


@triton.jit
def _fp16_as_bf16_pieces(x):
    """Two bfloat16 tiles whose sum is the float16 tile x exactly: the first is x rounded to bf16 (8 of
    fp16's 11 significand bits), the rest has 3 bits at most, and bf16's exponent range holds both
    (fp16 subnormals included). An infinite x is (inf, 0), as its products must stay inf, not NaN."""
    xf = x.to(tl.float32)
    hi = xf.to(tl.bfloat16)
    hf = hi.to(tl.float32)
    return hi, tl.where(xf == hf, 0.0, xf - hf).to(tl.bfloat16)


@triton.jit
def _pieces_as_rows(v, ROWS: tl.constexpr):
    """(ROWS, len(v)) bfloat16: rows 0, 1, 2 the three bf16 pieces of the float32 vector v (their sum
    is v exactly), the other rows zero."""
    p1, p2, p3 = _bf16_pieces(v)
    j = tl.arange(0, ROWS)[:, None]
    z = tl.zeros_like(p1)[None, :]
    return tl.where(j == 0, p1[None, :], tl.where(j == 1, p2[None, :], tl.where(j == 2, p3[None, :], z)))


@triton.jit
def _dot_bf16(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for bfloat16 a and b, float32 sums. (Triton 3.6's interpreter returns garbage for a
    bf16 tl.dot; there the exact bf16 values go in as float32, the same products.)"""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _dot_split_b(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for a bfloat16 or float16 and b float32 (b in three bf16 pieces, smallest first).
    A float16 a goes in as its two bf16 pieces; the second (at most 2^-9 of a) meets only b's two
    larger pieces: the third (at most 2^-18 of b) would add below 2^-27 of the product a b, under
    float32's own rounding of it."""
    b1, b2, b3 = _bf16_pieces(b)
    if a.dtype == tl.float16:
        a, a_lo = _fp16_as_bf16_pieces(a)
        acc = _dot_bf16(a_lo, b2, acc, INTERPRET)
        acc = _dot_bf16(a_lo, b1, acc, INTERPRET)
    acc = _dot_bf16(a, b3, acc, INTERPRET)
    acc = _dot_bf16(a, b2, acc, INTERPRET)
    return _dot_bf16(a, b1, acc, INTERPRET)


@triton.jit
def _dot_split_a(a, b, acc, INTERPRET: tl.constexpr):
    """acc + a @ b for a float32 and b bfloat16 or float16 (_dot_split_b with the roles swapped)."""
    a1, a2, a3 = _bf16_pieces(a)
    if b.dtype == tl.float16:
        b, b_lo = _fp16_as_bf16_pieces(b)
        acc = _dot_bf16(a2, b_lo, acc, INTERPRET)
        acc = _dot_bf16(a1, b_lo, acc, INTERPRET)
    acc = _dot_bf16(a3, b, acc, INTERPRET)
    acc = _dot_bf16(a2, b, acc, INTERPRET)
    return _dot_bf16(a1, b, acc, INTERPRET)


@triton.autotune(
    configs=_onepass_configs(),
    key=[
        "D",
        "O",
        "BLOCK_D",
        "BLOCK_O",
        "USE_DOT",
        "SPLIT",
        "ONE_CHUNK",
        "GATHER",
        "GIVEN_G",
        "NEED_GX",
        "NEED_GT",
        "PRECISION",
        "PACK_MODE",
        "PACK_DEFER",
    ],
    prune_configs_by={"early_config_prune": _prune_onepass},
    # the interpreter: two configs (one per path) and a prune that keeps one; Triton's autotuner
    # still times that one, which needs a GPU driver: a no-op timing instead
    do_bench=(lambda kernel_call, quantiles: [0.0, 0.0, 0.0]) if K.INTERPRET else None,
)
# n_rows changes with every batch (fit's last one is shorter) and only bounds loops and masks:
# not specialised, so it never triggers a recompile.
@triton.jit(do_not_specialize=["n_rows"])
def _onepass_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    sw_ptr,
    idx_ptr,
    flag_ptr,
    gx_ptr,
    gt_ptr,
    ws_w_ptr,
    ws_b_ptr,
    ws_loss_ptr,
    ws_wsum_ptr,
    n_rows,
    D,
    O,
    s_xn,
    s_xd,
    s_yn,
    s_yo,
    s_wo,
    s_wd,
    s_b,
    s_sw,
    s_gxn,
    s_gxd,
    s_gtn,
    s_gto,
    row_scale: tl.float64,
    HAS_BIAS: tl.constexpr,
    HAS_SW: tl.constexpr,
    GATHER: tl.constexpr,
    GIVEN_G: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    NEED_GW: tl.constexpr,
    NEED_GB: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GT: tl.constexpr,
    USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    IDX64: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    AHEAD: tl.constexpr,
    PACK: tl.constexpr,
    PACK_MODE: tl.constexpr,  # (an autotune key only: which paths the prune offers)
    PACK_DEFER: tl.constexpr,  # PACK: each tile's dW product subtracted in the next tile (see below)
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    pid_o = tl.program_id(1)
    NOB = tl.num_programs(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_tiles = tl.cdiv(n_rows, BLOCK_N)
    if HAS_FLAG:  # fit: once a step was refused, every later kernel of the loop is a no-op
        n_tiles = tl.where(tl.load(flag_ptr) != 0, 0, n_tiles)
    scale = scalar(row_scale, ACC)
    ws_row = tl.cast(pid, tl.int64) * O * D  # this program's slice of ws_w

    if ONE_CHUNK and BLOCK_O == 1 and not USE_DOT:  # (PACK: only here)
        # ---- O = 1, the linear-regression case: 2-D tiles only. x is read once into registers; the
        # dW accumulator has the tile's shape, so a tile costs one row reduction (x_i . w) and FMAs.
        mask_d = offs_d < D
        if not GIVEN_G:
            w1 = tl.load(w_ptr + offs_d * s_wd, mask=mask_d, other=0).to(ACC)  # (BLOCK_D,)
            if PACK:  # (the pieces are loop-invariant)
                w3 = _pieces_as_rows(w1, PACK_COLS)  # (PACK_COLS, BLOCK_D) bf16
            if HAS_BIAS:
                b1 = tl.load(b_ptr).to(ACC)
        if PACK:  # dW^T in its pieces' columns: x^T @ G3 keeps D as the dot's long side (wgmma's M)
            acc_w = tl.zeros((BLOCK_D, PACK_COLS), ACC)
            if PACK_DEFER and not GIVEN_G:
                prev = tl.zeros((BLOCK_D, PACK_COLS), ACC)  # the previous tile's dW product
        else:
            acc_w = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        acc_b = tl.zeros((BLOCK_N,), ACC)
        acc_l = tl.zeros((BLOCK_N,), ACC)
        acc_s = tl.zeros((BLOCK_N,), ACC)
        # y (or the given g) and the sample weights: the software pipeliner prefetches the tile's
        # loads through cp.async (NUM_STAGES - 1 tiles ahead, in shared memory), which moves 4 bytes
        # at least, so a 2-byte y stayed a synchronous load in the middle of every tile (sm_90a SASS:
        # LDG.E.U16 after the barrier), its DRAM latency on the critical path. With AHEAD (a 2-byte
        # y or weight) they are loaded one iteration early, in registers, and in flight during the
        # previous tile; wider ones ride in the cp.async pipeline with x (float32: 99% of the read
        # limit on an H200). (Two tiles ahead in registers made the pipeliner drop x's prefetch.)
        if AHEAD:
            v_next = _tile_col(pid, offs_n, n_rows, idx_ptr, y_ptr, s_yn, BLOCK_N, GATHER, IDX64)
            if HAS_SW and not GIVEN_G:
                sw_next = _tile_col(pid, offs_n, n_rows, idx_ptr, sw_ptr, s_sw, BLOCK_N, GATHER, IDX64)
        for t in tl.range(pid, n_tiles, P, num_stages=NUM_STAGES):
            rows, mask_n = _tile_rows(t, offs_n, n_rows, BLOCK_N, IDX64)
            if GATHER:
                rows = _gathered(rows, mask_n, idx_ptr, IDX64)
            if AHEAD:
                v = v_next.to(ACC)
                v_next = _tile_col(t + P, offs_n, n_rows, idx_ptr, y_ptr, s_yn, BLOCK_N, GATHER, IDX64)
            else:
                v = tl.load(y_ptr + rows * s_yn, mask=mask_n, other=0).to(ACC)
            if HAS_SW and not GIVEN_G:
                if AHEAD:
                    sw = sw_next.to(ACC)
                    sw_next = _tile_col(t + P, offs_n, n_rows, idx_ptr, sw_ptr, s_sw, BLOCK_N, GATHER, IDX64)
                else:
                    sw = tl.load(sw_ptr + rows * s_sw, mask=mask_n, other=0).to(ACC)
            if NEED_GW or not GIVEN_G:  # (grad_bias alone from a given gradient never reads x)
                x = tl.load(
                    x_ptr + rows[:, None] * s_xn + offs_d[None, :] * s_xd,
                    mask=mask_n[:, None] & mask_d[None, :],
                    other=0,
                )
                if not PACK:  # (PACK multiplies the bf16 tile itself)
                    x = x.to(ACC)
            if GIVEN_G:
                g = v
            else:
                if PACK:  # x @ W3^T: the pieces' products in columns 0..2, summed
                    pred3 = _dot_bf16(x, tl.trans(w3), tl.zeros((BLOCK_N, PACK_COLS), ACC), INTERPRET)
                    if PACK_DEFER and NEED_GW:
                        # the previous tile's product joins the sum here, while this tile's dot runs
                        # (after the dW dot the subtraction sat between its wait and the next
                        # tile's cp.async issues in the sm_90a SASS); the same sums in the same order
                        acc_w -= prev
                    r = tl.sum(pred3, axis=1) - v
                else:
                    r = tl.sum(x * w1[None, :], axis=1) - v
                if HAS_BIAS:
                    r = r + b1
                r = tl.where(mask_n, r, 0)  # tail rows would otherwise carry the bias
                if HAS_SW:
                    g = r * sw
                    acc_s += sw
                else:
                    g = r
                acc_l += g * r
                if NEED_GT:
                    tl.store(
                        gt_ptr + rows * s_gtn,
                        cast_out(-(g * scale), gt_ptr.dtype.element_ty, INTERPRET),
                        mask=mask_n,
                    )
                if NEED_GX:
                    tl.store(
                        gx_ptr + rows[:, None] * s_gxn + offs_d[None, :] * s_gxd,
                        cast_out((g * scale)[:, None] * w1[None, :], gx_ptr.dtype.element_ty, INTERPRET),
                        mask=mask_n[:, None] & mask_d[None, :],
                    )
            if NEED_GW:
                if PACK:  # x^T @ G3, G3 (BLOCK_N, PACK_COLS) holding g's three pieces
                    # The tile's product starts from zero and joins acc_w by a float32 subtraction
                    # of -x^T G3 (Triton folds dot(a, b, 0) + acc into dot(a, b, acc)): a tensor
                    # core's accumulation rounds toward zero, a bias that grew with the k-steps into
                    # one accumulator (N = 4M on an H200: 1.7e-5 relative on the update, FMA 5.7e-8).
                    g3 = tl.trans(_pieces_as_rows(-g, PACK_COLS))
                    if PACK_DEFER and not GIVEN_G:
                        prev = _dot_bf16(tl.trans(x), g3, tl.zeros_like(acc_w), INTERPRET)
                    else:
                        acc_w -= _dot_bf16(tl.trans(x), g3, tl.zeros_like(acc_w), INTERPRET)
                else:
                    acc_w += g[:, None] * x
            if NEED_GB:
                acc_b += g
        if NEED_GW:
            if PACK and PACK_DEFER and not GIVEN_G:
                acc_w -= prev  # the last tile's
            tl.store(ws_w_ptr + ws_row + offs_d, tl.sum(acc_w, axis=1 if PACK else 0), mask=mask_d)
        if NEED_GB:
            tl.store(ws_b_ptr + pid, tl.sum(acc_b, axis=0))
        loss_part = tl.sum(acc_l, axis=0)
        wsum_part = tl.sum(acc_s, axis=0)
    else:
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_o = offs_o < O
        if HAS_BIAS and not GIVEN_G:
            b = tl.load(b_ptr + offs_o * s_b, mask=mask_o, other=0).to(ACC)
        acc_b = tl.zeros((BLOCK_N, BLOCK_O), ACC)
        acc_l = tl.zeros((BLOCK_N, BLOCK_O), ACC)
        acc_s = tl.zeros((BLOCK_N,), ACC)
        if ONE_CHUNK:
            # ---- the whole row fits one tile: x is read once into registers, W stays there too ----
            mask_d = offs_d < D
            if not GIVEN_G:
                w = tl.load(
                    w_ptr + offs_o[:, None] * s_wo + offs_d[None, :] * s_wd,
                    mask=mask_o[:, None] & mask_d[None, :],
                    other=0,
                ).to(ACC)  # (BLOCK_O, BLOCK_D)
            if USE_DOT:
                acc_w = tl.zeros((BLOCK_O, BLOCK_D), ACC)
            else:
                acc_w = tl.zeros((BLOCK_N, BLOCK_O, BLOCK_D), ACC)
            # y (or the given g) and the sample weights as on the O = 1 path: with AHEAD (2-byte
            # ones, which cp.async cannot prefetch) one tile ahead in registers, else in the pipeline
            if AHEAD:
                v_next = _tile_block(
                    pid, offs_n, n_rows, idx_ptr, y_ptr, s_yn, s_yo, offs_o, mask_o, BLOCK_N, GATHER, IDX64
                )
                if HAS_SW and not GIVEN_G:
                    sw_next = _tile_col(pid, offs_n, n_rows, idx_ptr, sw_ptr, s_sw, BLOCK_N, GATHER, IDX64)
            for t in tl.range(pid, n_tiles, P, num_stages=NUM_STAGES):
                rows, mask_n = _tile_rows(t, offs_n, n_rows, BLOCK_N, IDX64)
                if GATHER:
                    rows = _gathered(rows, mask_n, idx_ptr, IDX64)
                m2 = mask_n[:, None] & mask_o[None, :]
                if AHEAD:
                    v = v_next.to(ACC)
                    v_next = _tile_block(
                        t + P,
                        offs_n,
                        n_rows,
                        idx_ptr,
                        y_ptr,
                        s_yn,
                        s_yo,
                        offs_o,
                        mask_o,
                        BLOCK_N,
                        GATHER,
                        IDX64,
                    )
                else:
                    yp = y_ptr + rows[:, None] * s_yn + offs_o[None, :] * s_yo
                    v = tl.load(yp, mask=m2, other=0).to(ACC)
                if HAS_SW and not GIVEN_G:
                    if AHEAD:
                        sw = sw_next.to(ACC)
                        sw_next = _tile_col(
                            t + P, offs_n, n_rows, idx_ptr, sw_ptr, s_sw, BLOCK_N, GATHER, IDX64
                        )
                    else:
                        sw = tl.load(sw_ptr + rows * s_sw, mask=mask_n, other=0).to(ACC)
                if NEED_GW or not GIVEN_G:
                    x = tl.load(
                        x_ptr + rows[:, None] * s_xn + offs_d[None, :] * s_xd,
                        mask=mask_n[:, None] & mask_d[None, :],
                        other=0,
                    )
                    if not SPLIT:
                        x = x.to(ACC)
                if GIVEN_G:
                    g = v
                else:
                    if SPLIT:  # (W's pieces are loop-invariant: the compiler hoists them)
                        pred = _dot_split_b(x, tl.trans(w), tl.zeros((BLOCK_N, BLOCK_O), ACC), INTERPRET)
                    elif USE_DOT:
                        pred = tl.dot(x, tl.trans(w), input_precision=PRECISION, out_dtype=ACC)
                    else:
                        pred = fma_mm_nt(x, w, BLOCK_D)
                    r = pred - v
                    if HAS_BIAS:
                        r = r + b[None, :]
                    r = tl.where(m2, r, 0)  # tail rows would otherwise carry the bias
                    if HAS_SW:
                        g = r * sw[:, None]
                        acc_s += sw
                    else:
                        g = r
                    acc_l += g * r
                    if NEED_GT:
                        tl.store(
                            gt_ptr + rows[:, None] * s_gtn + offs_o[None, :] * s_gto,
                            cast_out(-(g * scale), gt_ptr.dtype.element_ty, INTERPRET),
                            mask=m2,
                        )
                    if NEED_GX:
                        if USE_DOT:
                            gx = tl.dot(g, w, input_precision=PRECISION, out_dtype=ACC)
                        else:
                            gx = fma_mm(g, w, BLOCK_O)
                        tl.store(
                            gx_ptr + rows[:, None] * s_gxn + offs_d[None, :] * s_gxd,
                            cast_out(gx * scale, gx_ptr.dtype.element_ty, INTERPRET),
                            mask=mask_n[:, None] & mask_d[None, :],
                        )
                if NEED_GW:
                    if SPLIT:  # the tile's product from zero, joined to acc_w in float32 (as PACK's)
                        acc_w -= _dot_split_a(tl.trans(-g), x, tl.zeros((BLOCK_O, BLOCK_D), ACC), INTERPRET)
                    elif USE_DOT:
                        acc_w += tl.dot(tl.trans(g), x, input_precision=PRECISION, out_dtype=ACC)
                    else:
                        acc_w += g[:, :, None] * x[:, None, :]
                if NEED_GB:
                    acc_b += g
            if NEED_GW:
                if USE_DOT:
                    part = acc_w
                else:
                    part = tl.sum(acc_w, axis=0)
                tl.store(
                    ws_w_ptr + ws_row + offs_o[:, None] * D + offs_d[None, :],
                    part,
                    mask=mask_o[:, None] & mask_d[None, :],
                )
        else:
            # ---- wide rows: residual over D chunks, then a second (cache-hot) walk for dW / grad_input.
            # The dW partial lives in this program's workspace slice (read-modify-write by its owner).
            if NEED_GW:
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + offs_d
                    tl.store(
                        ws_w_ptr + ws_row + offs_o[:, None] * D + dd[None, :],
                        tl.zeros((BLOCK_O, BLOCK_D), ACC),
                        mask=mask_o[:, None] & (dd < D)[None, :],
                    )
                # the zeros must be visible to whichever thread of this program first adds to them
                tl.debug_barrier()
            for t in range(pid, n_tiles, P):
                rows, mask_n = _tile_rows(t, offs_n, n_rows, BLOCK_N, IDX64)
                if GATHER:
                    rows = _gathered(rows, mask_n, idx_ptr, IDX64)
                m2 = mask_n[:, None] & mask_o[None, :]
                if GIVEN_G:
                    g = tl.load(y_ptr + rows[:, None] * s_yn + offs_o[None, :] * s_yo, mask=m2, other=0).to(
                        ACC
                    )
                else:
                    pred = tl.zeros((BLOCK_N, BLOCK_O), ACC)
                    for d0 in range(0, D, BLOCK_D):
                        dd = d0 + offs_d
                        mask_d = dd < D
                        x = tl.load(
                            x_ptr + rows[:, None] * s_xn + dd[None, :] * s_xd,
                            mask=mask_n[:, None] & mask_d[None, :],
                            other=0,
                        )
                        if not SPLIT:
                            x = x.to(ACC)
                        w = tl.load(
                            w_ptr + offs_o[:, None] * s_wo + dd[None, :] * s_wd,
                            mask=mask_o[:, None] & mask_d[None, :],
                            other=0,
                        ).to(ACC)
                        if SPLIT:
                            pred = _dot_split_b(x, tl.trans(w), pred, INTERPRET)
                        elif USE_DOT:
                            pred += tl.dot(x, tl.trans(w), input_precision=PRECISION, out_dtype=ACC)
                        else:
                            pred += fma_mm_nt(x, w, BLOCK_D)
                    y = tl.load(y_ptr + rows[:, None] * s_yn + offs_o[None, :] * s_yo, mask=m2, other=0).to(
                        ACC
                    )
                    r = pred - y
                    if HAS_BIAS:
                        r = r + b[None, :]
                    r = tl.where(m2, r, 0)
                    if HAS_SW:
                        sw = tl.load(sw_ptr + rows * s_sw, mask=mask_n, other=0).to(ACC)
                        g = r * sw[:, None]
                        acc_s += sw
                    else:
                        g = r
                    acc_l += g * r
                    if NEED_GT:
                        tl.store(
                            gt_ptr + rows[:, None] * s_gtn + offs_o[None, :] * s_gto,
                            cast_out(-(g * scale), gt_ptr.dtype.element_ty, INTERPRET),
                            mask=m2,
                        )
                if NEED_GW or NEED_GX:
                    for d0 in range(0, D, BLOCK_D):
                        dd = d0 + offs_d
                        mask_d = dd < D
                        if NEED_GW:
                            x = tl.load(
                                x_ptr + rows[:, None] * s_xn + dd[None, :] * s_xd,
                                mask=mask_n[:, None] & mask_d[None, :],
                                other=0,
                            )
                            if not SPLIT:
                                x = x.to(ACC)
                            if SPLIT:
                                c = _dot_split_a(tl.trans(g), x, tl.zeros((BLOCK_O, BLOCK_D), ACC), INTERPRET)
                            elif USE_DOT:
                                c = tl.dot(tl.trans(g), x, input_precision=PRECISION, out_dtype=ACC)
                            else:
                                c = tl.sum(g[:, :, None] * x[:, None, :], axis=0)
                            wp = ws_w_ptr + ws_row + offs_o[:, None] * D + dd[None, :]
                            wm = mask_o[:, None] & mask_d[None, :]
                            tl.store(wp, tl.load(wp, mask=wm, other=0) + c, mask=wm)
                        if NEED_GX and not GIVEN_G:
                            w = tl.load(
                                w_ptr + offs_o[:, None] * s_wo + dd[None, :] * s_wd,
                                mask=mask_o[:, None] & mask_d[None, :],
                                other=0,
                            ).to(ACC)
                            if USE_DOT:
                                gx = tl.dot(g, w, input_precision=PRECISION, out_dtype=ACC)
                            else:
                                gx = fma_mm(g, w, BLOCK_O)
                            tl.store(
                                gx_ptr + rows[:, None] * s_gxn + dd[None, :] * s_gxd,
                                cast_out(gx * scale, gx_ptr.dtype.element_ty, INTERPRET),
                                mask=mask_n[:, None] & mask_d[None, :],
                            )
                if NEED_GB:
                    acc_b += g
        if NEED_GB:
            tl.store(ws_b_ptr + tl.cast(pid, tl.int64) * O + offs_o, tl.sum(acc_b, axis=0), mask=mask_o)
        loss_part = tl.sum(tl.sum(acc_l, axis=1), axis=0)
        wsum_part = tl.sum(acc_s, axis=0)

    if not GIVEN_G:
        tl.store(ws_loss_ptr + pid * NOB + pid_o, loss_part)
        if HAS_SW:
            tl.store(ws_wsum_ptr + pid, wsum_part, mask=pid_o == 0)


# ---------------------------------------------------------------------------------------------


@triton.jit
def _sum_partials(ptr, n, BLOCK_P: tl.constexpr, ACC: tl.constexpr):
    """Sum of ptr[0:n] in a fixed order: chunks of BLOCK_P, each tree-summed."""
    acc = tl.zeros((BLOCK_P,), ACC)
    for p0 in range(0, n, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(ptr + pp, mask=pp < n, other=0).to(ACC)
    return tl.sum(acc, axis=0)


# The reduce/commit kernels touch O*D + O elements: nothing to gain from specialising their sizes
# and strides, and every distinct value would be another compile.
@triton.jit(do_not_specialize=["P", "NL", "O", "D", "NWB", "s_wo", "s_wd", "s_b", "s_wmo", "s_wmd", "s_bm"])
def _reduce_kernel(
    ws_w_ptr,
    ws_b_ptr,
    ws_loss_ptr,
    ws_wsum_ptr,
    w_ptr,
    b_ptr,
    wm_ptr,
    bm_ptr,
    loss_ptr,
    stage_ptr,
    ok_ptr,
    flag_ptr,
    stats_ptr,
    P,
    NL,
    O,
    D,
    NWB,
    s_wo,
    s_wd,
    s_b,
    s_wmo,
    s_wmd,
    s_bm,
    n_rows: tl.float64,
    grad_scale: tl.float64,
    loss_div: tl.float64,
    lr: tl.float64,
    momentum: tl.float64,
    dampening: tl.float64,
    weight_decay: tl.float64,
    MODE: tl.constexpr,
    TRAIN_LOSS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_SW: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    HAS_WD: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    HAS_FLAG: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_SW:  # every program reduces the sample-weight total itself, in the same order
        wsum = _sum_partials(ws_wsum_ptr, P, BLOCK_P, ACC)
    else:
        wsum = scalar(n_rows, ACC)
    denom = wsum * O
    offs = tl.arange(0, BLOCK)
    OD = tl.cast(O, tl.int64) * D
    # Stores reach only the parameters that exist: the bias/weight choice is made at run time only
    # when both do. torch.compile's functionalization clones (and copies back) every argument a
    # store can reach, and the absent ones' placeholders alias real outputs (see run_reduce).
    if HAS_W and HAS_B:
        is_b = pid >= NWB
    else:
        is_b: tl.constexpr = HAS_B  # (a plain assignment would make it a run-time value)
    if HAS_W or HAS_B:  # (neither: the loss alone)
        if is_b:  # bias elements
            e = tl.cast(pid - NWB, tl.int64) * BLOCK + offs
            mask = e < O
            ws_ptr = ws_b_ptr + e
            ws_stride = tl.cast(O, tl.int64)
            p_ptrs = b_ptr + e * s_b
            m_ptrs = bm_ptr + e * s_bm
            st = OD + e
        else:  # weight elements, row-major over (O, D)
            e = tl.cast(pid, tl.int64) * BLOCK + offs
            mask = e < OD
            o = e // D
            d = e % D
            ws_ptr = ws_w_ptr + e
            ws_stride = OD
            p_ptrs = w_ptr + o * s_wo + d * s_wd
            m_ptrs = wm_ptr + o * s_wmo + d * s_wmd
            st = e
        acc = tl.zeros((BLOCK,), ACC)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + tl.arange(0, BLOCK_P)
            v = tl.load(
                ws_ptr[None, :] + tl.cast(pp[:, None], tl.int64) * ws_stride,
                mask=(pp < P)[:, None] & mask[None, :],
                other=0,
            )
            acc += tl.sum(v, axis=0)

        if MODE == 0:
            tl.store(
                p_ptrs, cast_out(acc * scalar(grad_scale, ACC), p_ptrs.dtype.element_ty, INTERPRET), mask=mask
            )
        else:
            g = acc * (2.0 / denom)
            p = tl.load(p_ptrs, mask=mask, other=0).to(ACC)
            if MAXIMIZE:
                g = -g
            if HAS_WD:
                g = g + scalar(weight_decay, ACC) * p
            if HAS_MOMENTUM:
                if FIRST_STEP:
                    buf = g
                else:
                    buf = (
                        tl.load(m_ptrs, mask=mask, other=0).to(ACC) * scalar(momentum, ACC)
                        + scalar(1.0 - dampening, ACC) * g
                    )
                if NESTEROV:
                    g = g + scalar(momentum, ACC) * buf
                else:
                    g = buf
            new_p = p - scalar(lr, ACC) * g
            if MODE == 1:
                tl.store(p_ptrs, cast_out(new_p, p_ptrs.dtype.element_ty, INTERPRET), mask=mask)
                if HAS_MOMENTUM:
                    tl.store(m_ptrs, cast_out(buf, m_ptrs.dtype.element_ty, INTERPRET), mask=mask)
            else:
                n_tot = OD + O
                tl.store(stage_ptr + st, new_p, mask=mask)
                if HAS_MOMENTUM:
                    tl.store(stage_ptr + n_tot + st, buf, mask=mask)
                ok = tl.min(tl.where(mask, is_finite(new_p), True).to(tl.int32), axis=0)
                if HAS_FLAG:
                    ok = tl.where(tl.load(flag_ptr) != 0, 0, ok)
                if pid == 0:
                    loss = _sum_partials(ws_loss_ptr, NL, BLOCK_P, ACC) / denom
                    ok = tl.where(is_finite(loss), ok, 0)
                    tl.store(stats_ptr, loss)
                    tl.store(stats_ptr + 1, wsum)
                tl.store(ok_ptr + pid, ok)
    if WRITE_LOSS:
        if pid == 0:
            total = _sum_partials(ws_loss_ptr, NL, BLOCK_P, ACC)
            if TRAIN_LOSS:
                loss = total / denom
            else:
                loss = total / scalar(loss_div, ACC)
            tl.store(loss_ptr, cast_out(loss, loss_ptr.dtype.element_ty, INTERPRET))


@triton.jit(
    do_not_specialize=[
        "n_ok",
        "epoch",
        "is_last",
        "O",
        "D",
        "NWB",
        "s_wo",
        "s_wd",
        "s_b",
        "s_wmo",
        "s_wmd",
        "s_bm",
    ]
)
def _commit_kernel(
    stage_ptr,
    ok_ptr,
    n_ok,
    w_ptr,
    b_ptr,
    wm_ptr,
    bm_ptr,
    flag_ptr,
    stats_ptr,
    hacc_ptr,
    hist_ptr,
    epoch,
    is_last,
    O,
    D,
    NWB,
    s_wo,
    s_wd,
    s_b,
    s_wmo,
    s_wmd,
    s_bm,
    HAS_B: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_OK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    ko = tl.arange(0, BLOCK_OK)
    ok = tl.min(tl.load(ok_ptr + ko, mask=ko < n_ok, other=1), axis=0) != 0
    offs = tl.arange(0, BLOCK)
    OD = tl.cast(O, tl.int64) * D
    if HAS_B:  # as in _reduce_kernel: no store through b_ptr / bm_ptr without a bias
        is_b = pid >= NWB
    else:
        is_b: tl.constexpr = False
    if is_b:
        e = tl.cast(pid - NWB, tl.int64) * BLOCK + offs
        mask = (e < O) & ok
        p_ptrs = b_ptr + e * s_b
        m_ptrs = bm_ptr + e * s_bm
        st = OD + e
    else:
        e = tl.cast(pid, tl.int64) * BLOCK + offs
        mask = (e < OD) & ok
        o = e // D
        d = e % D
        p_ptrs = w_ptr + o * s_wo + d * s_wd
        m_ptrs = wm_ptr + o * s_wmo + d * s_wmd
        st = e
    tl.store(
        p_ptrs,
        cast_out(tl.load(stage_ptr + st, mask=mask, other=0), p_ptrs.dtype.element_ty, INTERPRET),
        mask=mask,
    )
    if HAS_MOMENTUM:
        v = tl.load(stage_ptr + OD + O + st, mask=mask, other=0)
        tl.store(m_ptrs, cast_out(v, m_ptrs.dtype.element_ty, INTERPRET), mask=mask)
    if pid == 0:
        if ok:
            loss = tl.load(stats_ptr).to(tl.float64)
            wsum = tl.load(stats_ptr + 1).to(tl.float64)
            tot = tl.load(hacc_ptr) + loss * wsum
            wt = tl.load(hacc_ptr + 1) + wsum
            if is_last != 0:
                tl.store(hist_ptr + epoch, (tot / wt).to(hist_ptr.dtype.element_ty))
                tot = tot * 0.0
                wt = wt * 0.0
            tl.store(hacc_ptr, tot)
            tl.store(hacc_ptr + 1, wt)
        else:
            tl.store(flag_ptr, 1)


# ---------------------------------------------------------------------------------------------
# host side


WORKSPACE_BYTES = 64 << 20


@dataclass
class Plan:
    """Tile shapes fixed on the host for one (N, D, O, dtype, device) problem."""

    P: int  # persistent programs
    NOB: int  # output blocks (second grid axis)
    BLOCK_O: int
    BLOCK_D: int
    USE_DOT: bool
    # bf16 x on the tl.dot path, and fp16 x at "ieee" precision (as two bf16 pieces): float32
    # operands as three bf16 pieces (exact products)
    SPLIT: bool
    ONE_CHUNK: bool
    acc: torch.dtype


def plan(n_rows: int, D: int, O: int, dtype: torch.dtype, device: torch.device) -> Plan:
    acc = K.acc_dtype(dtype)
    use_dot = O > 4 and acc == torch.float32
    if use_dot:
        # W (BLOCK_O, BLOCK_D) and the dW accumulator stay in registers next to the x tile
        bo = min(max(16, K.next_pow2(O)), max(16, K.MAX_BLOCK_O))
        cap, chunk = min(K.MAX_BLOCK_D_DOT, 8192 // bo), min(K.MAX_BLOCK_D_DOT, 2048 // bo)
        one = K.next_pow2(D) <= cap
        bd = max(16, K.next_pow2(D) if one else chunk)
    else:
        # fp32: O = 1 uses 2-D tiles (ROW1 path), O = 2..4 a (rows, BLOCK_O, BLOCK_D) broadcast; fp64
        # (gradcheck's dtype) the same with a quarter of the columns, since every value takes two registers
        bo = min(K.next_pow2(O), 4)
        cap = K.MAX_BLOCK_D // bo if acc == torch.float32 else max(1, K.MAX_BLOCK_D // 4 // bo)
        one = K.next_pow2(D) <= cap
        bd = K.next_pow2(D) if one else cap
    # the programs' row tiles: at least 16 rows each on the GPU, so tiny batches use few programs
    P = K.persistent_programs(device, K.cdiv(max(n_rows, 1), 16 if device.type == "cuda" else 64))
    # the (P, O, D) partials stay under WORKSPACE_BYTES (wide layers get fewer, longer programs)
    P = max(1, min(P, WORKSPACE_BYTES // max(1, O * D * (8 if acc == torch.float64 else 4))))
    return Plan(
        P=P,
        NOB=K.cdiv(max(O, 1), bo),
        BLOCK_O=bo,
        BLOCK_D=bd,
        USE_DOT=use_dot,
        SPLIT=use_dot
        and (dtype == torch.bfloat16 or (dtype == torch.float16 and K.input_precision() == "ieee")),
        ONE_CHUNK=D <= bd,
        acc=acc,
    )


@dataclass
class Workspace:
    w: torch.Tensor  # (P, O, D) partial dW
    b: torch.Tensor  # (P, O) partial db
    loss: torch.Tensor  # (P * NOB,) partial sum of weighted squared residuals
    wsum: torch.Tensor  # (P,) partial sum of sample weights


def workspace(pl: Plan, O: int, D: int, device, need_w=True, need_b=True) -> Workspace:
    a = pl.acc
    return Workspace(
        w=torch.empty((pl.P, O, D) if need_w else (1,), dtype=a, device=device),
        b=torch.empty((pl.P, O) if need_b else (1,), dtype=a, device=device),
        loss=torch.empty((pl.P * pl.NOB,), dtype=a, device=device),
        wsum=torch.empty((pl.P,), dtype=a, device=device),
    )


def _needs_int64(*ts) -> bool:
    """Whether an element offset into any of these tensors can reach 2^31 (then rows are int64)."""
    for t in ts:
        if (
            t is not None
            and t.numel()
            and sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31 - 1
        ):
            return True
    return False


def run_onepass(
    pl: Plan,
    ws: Workspace,
    x,
    y,
    w,
    b,
    *,
    n_rows,
    sw=None,
    idx=None,
    flag=None,
    gx=None,
    gt=None,
    row_scale=1.0,
    given_g=False,
    need_gw=True,
    need_gb=True,
) -> None:
    """Launch _onepass_kernel. x (rows, D) or the full x with idx (rows,) row indices; y (rows, O)
    target (or the given gradient when given_g); gx (rows, D) / gt (rows, O) optional outputs."""
    D, O = x.shape[1], (w.shape[0] if not given_g else y.shape[1])
    dummy = x
    K.launch(
        _onepass_kernel,
        (pl.P, pl.NOB),
        x,
        y,
        w if w is not None else dummy,
        b if b is not None else dummy,
        sw if sw is not None else dummy,
        idx if idx is not None else dummy,
        flag if flag is not None else dummy,
        gx if gx is not None else dummy,
        gt if gt is not None else dummy,
        ws.w,
        ws.b,
        ws.loss,
        ws.wsum,
        n_rows,
        D,
        O,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        w.stride(0) if w is not None else 0,
        w.stride(1) if w is not None else 0,
        b.stride(0) if b is not None else 0,
        sw.stride(0) if sw is not None else 0,
        gx.stride(0) if gx is not None else 0,
        gx.stride(1) if gx is not None else 0,
        gt.stride(0) if gt is not None else 0,
        gt.stride(1) if gt is not None else 0,
        float(row_scale),
        HAS_BIAS=b is not None,
        HAS_SW=sw is not None,
        GATHER=idx is not None,
        GIVEN_G=given_g,
        HAS_FLAG=flag is not None,
        NEED_GW=need_gw,
        NEED_GB=need_gb,
        NEED_GX=gx is not None,
        NEED_GT=gt is not None,
        USE_DOT=pl.USE_DOT,
        SPLIT=pl.SPLIT,
        ONE_CHUNK=pl.ONE_CHUNK,
        IDX64=_needs_int64(x, y, idx, sw, gx, gt),
        ACC=K.tl_acc(pl.acc),
        PRECISION=K.input_precision(),
        INTERPRET=K.INTERPRET,
        # y / sample weights narrower than cp.async's 4 bytes: loaded a tile ahead in registers
        AHEAD=min(y.element_size(), sw.element_size() if sw is not None else 4) < 4,
        PACK_MODE={None: PACK_AUTO, True: PACK_ON, False: PACK_OFF}[K.PACK_ONE_OUTPUT],
        PACK_DEFER=K.PACK_DEFER,
        BLOCK_D=pl.BLOCK_D,
        BLOCK_O=pl.BLOCK_O,
    )


REDUCE_BLOCK = 64  # elements per program of the reduce kernel: O*D = 256 -> 4 programs + 1 for the bias


def _block_p(P: int) -> int:
    return min(K.next_pow2(P), 64)


def reduce_grid(O: int, D: int, has_w: bool, has_b: bool) -> tuple[int, int]:
    nwb = K.cdiv(O * D, REDUCE_BLOCK) if has_w else 0
    nbb = K.cdiv(O, REDUCE_BLOCK) if has_b else 0
    return nwb, max(1, nwb + nbb)


def run_reduce(
    pl: Plan,
    ws: Workspace,
    O: int,
    D: int,
    *,
    mode: int,
    out_w=None,
    out_b=None,
    wm=None,
    bm=None,
    loss=None,
    train_loss=False,
    loss_div=1.0,
    grad_scale=1.0,
    n_rows=0,
    has_sw=False,
    opts=None,
    stage=None,
    ok=None,
    flag=None,
    stats=None,
) -> None:
    """Launch _reduce_kernel (see the module docstring for the modes). opts: SGD options dict."""
    nwb, grid = reduce_grid(O, D, out_w is not None, out_b is not None)
    o = opts or {}
    ref = ws.w
    wt = out_w if out_w is not None else ref
    bt = out_b if out_b is not None else wt
    wmt = wm if wm is not None else wt
    bmt = bm if bm is not None else bt

    def st(t, i):
        return t.stride(i) if t is not None else 0

    K.launch(
        _reduce_kernel,
        (grid,),
        ws.w,
        ws.b,
        ws.loss,
        ws.wsum,
        wt,
        bt,
        wmt,
        bmt,
        loss if loss is not None else ref,
        stage if stage is not None else ref,
        ok if ok is not None else ref,
        flag if flag is not None else ref,
        stats if stats is not None else ref,
        pl.P,
        pl.P * pl.NOB,
        O,
        D,
        nwb,
        st(out_w, 0),
        st(out_w, 1),
        st(out_b, 0),
        st(wm, 0),
        st(wm, 1),
        st(bm, 0),
        float(n_rows),
        float(grad_scale),
        float(loss_div),
        float(o.get("lr", 0.0)),
        float(o.get("momentum", 0.0)),
        float(o.get("dampening", 0.0)),
        float(o.get("weight_decay", 0.0)),
        MODE=mode,
        TRAIN_LOSS=train_loss,
        HAS_W=out_w is not None,
        HAS_B=out_b is not None,
        HAS_SW=has_sw,
        HAS_MOMENTUM=o.get("momentum", 0.0) != 0,
        HAS_WD=o.get("weight_decay", 0.0) != 0,
        NESTEROV=bool(o.get("nesterov", False)),
        MAXIMIZE=bool(o.get("maximize", False)),
        FIRST_STEP=bool(o.get("first_step", False)),
        HAS_FLAG=flag is not None,
        WRITE_LOSS=loss is not None,
        ACC=K.tl_acc(pl.acc),
        BLOCK=REDUCE_BLOCK,
        BLOCK_P=_block_p(pl.P),
        INTERPRET=K.INTERPRET,
        num_warps=4,
    )


def run_commit(
    pl: Plan,
    O: int,
    D: int,
    *,
    stage,
    ok,
    n_ok,
    w,
    b,
    wm,
    bm,
    flag,
    stats,
    hacc,
    hist,
    epoch,
    is_last,
    has_momentum,
) -> None:
    nwb, grid = reduce_grid(O, D, True, b is not None)
    bt = b if b is not None else w
    wmt = wm if wm is not None else w
    bmt = bm if bm is not None else bt
    K.launch(
        _commit_kernel,
        (grid,),
        stage,
        ok,
        n_ok,
        w,
        bt,
        wmt,
        bmt,
        flag,
        stats,
        hacc,
        hist,
        epoch,
        int(is_last),
        O,
        D,
        nwb,
        w.stride(0),
        w.stride(1),
        b.stride(0) if b is not None else 0,
        wm.stride(0) if wm is not None else 0,
        wm.stride(1) if wm is not None else 0,
        bm.stride(0) if bm is not None else 0,
        HAS_B=b is not None,
        HAS_MOMENTUM=has_momentum,
        BLOCK=REDUCE_BLOCK,
        BLOCK_OK=K.next_pow2(n_ok),
        INTERPRET=K.INTERPRET,
        num_warps=4,
    )


def nan() -> float:
    return math.nan

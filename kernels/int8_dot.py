"""int8 x int8 matmul on CPU dot-product instructions, rows in register blocks, rescaled to float.

The kernel behind quantize-int8's `MatMulInteger` and its rescale on CPUs that add four byte
products into an int32 lane in one instruction (edgecc.kernels.int4_dot.isa): x86 AVX-512 VNNI
(`vpdpbusd`, 64 unsigned x 64 signed bytes into 16 lanes) and Armv8.2 dotprod (`sdot`, 16 x 16
signed bytes into 4 lanes). Without one, kernels.int8 widens each byte and multiplies in int32:
one product an instruction lane where these give four.

  y[m, n] = (sum_k x[m, k] w[k, n]) * sx[m] * sw[n] + b[n]

x int8 [M, K] (M symbolic), sx float32 [M] (each row's scale), w int8 [K, N] with sw its
per-column scales: quantize-int8's MatMulInteger, Cast, Mul, Mul (and a Gemm's Add) in one
kernel, so the int32 sums never leave registers.

Layout (pack): int8 [P, K/4, t, 4], P = ceil(N/t) panels of t columns (zero padded); byte
[p, g, j, i] is w[4g + i, pt + j]. One vector load gives `lanes` columns x 4 k: the operand of one
dot instruction. t is kernels.int8.panel_width (four accumulator vectors); K % 4 == 0.

vpdpbusd multiplies unsigned by signed bytes. x is signed, so the kernel feeds x + 128 (a bit
flip) and starts each accumulator at -128 * sum_k w[k, n], a per-column constant stored with
the weights. The sums are exact: quantize-int8 clips to [-127, 127], and 255 * 127 * K stays in
int32 for K < 66,000.

Schedule (kernels.dense's micro-kernel): parallel over panels; a block of `rows` rows
(dense.block_rows) x t columns accumulates in registers across K, each weight vector loaded once
for all the rows; leftover rows, and a decode step's single row, one at a time.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

import functools

import numpy as np

from edgecc.kernels.int8 import ACCUMULATOR_VECTORS, pack_panels

KERNEL_ATTR = "edgecc.int8_dot"
GROUP = 4  # k per dot-product lane
LANES = {"avx512vnni": 16, "dotprod": 4}  # int32 lanes of one instruction's accumulator
FLIP = -0x7F7F7F80  # 0x80808080 as int32: xor flips the sign bit of four bytes (x + 128)


def fits(K: int, tile: int, isa: str) -> bool:
    """Whether the kernel takes a K-deep weight in panels of `tile` on `isa`."""
    return K % GROUP == 0 and tile % LANES[isa] == 0


def block_rows(tile: int) -> int:
    """Rows a block computes at once: kernels.dense.block_rows for 32 vector registers (both ISAs
    have 32)."""
    from edgecc.kernels.dense import rows_for

    return rows_for(32, ACCUMULATOR_VECTORS, tile)


def pack(w: np.ndarray, tile: int) -> np.ndarray:
    """int8 [K, N] -> int8 [ceil(N/tile), K/4, tile, 4] (see the module docstring)."""
    if w.dtype != np.int8 or w.ndim != 2 or w.shape[0] % GROUP:
        raise ValueError(f"int8_dot.pack takes int8 [K, N] with K % {GROUP} == 0, got {w.dtype} {w.shape}")
    panels = pack_panels(w, tile)  # [P, K, t]
    P, K, t = panels.shape
    return np.ascontiguousarray(panels.reshape(P, K // GROUP, GROUP, t).transpose(0, 1, 3, 2))


def unpack(packed: np.ndarray, N: int) -> np.ndarray:
    """Inverse of pack: int8 [K, N]."""
    P, G, t, _ = packed.shape
    return np.ascontiguousarray(packed.transpose(1, 3, 0, 2).reshape(G * GROUP, P * t)[:, :N])


def column_offsets(w: np.ndarray, tile: int) -> np.ndarray:
    """int32 [P, tile]: -128 * each column's sum, vpdpbusd's starting value (zero padded)."""
    N = w.shape[1]
    sums = np.zeros(-(-N // tile) * tile, np.int64)
    sums[:N] = w.astype(np.int64).sum(axis=0)
    return (-128 * sums).astype(np.int32).reshape(-1, tile)


def padded_columns(values: np.ndarray, N: int, tile: int) -> np.ndarray:
    """A per-column float32 vector (or a scalar for all columns) as [P, tile], zero padded."""
    out = np.zeros(-(-N // tile) * tile, np.float32)
    out[:N] = np.broadcast_to(np.asarray(values, np.float32).reshape(-1), (N,))
    return out.reshape(-1, tile)


def reference(x: np.ndarray, w: np.ndarray, sx: np.ndarray, sw: np.ndarray, bias=None) -> np.ndarray:
    y = (x.astype(np.int64) @ w.astype(np.int64)).astype(np.float64) * sx[:, None] * sw
    return y if bias is None else y + bias


def _step(isa: str, lanes: int, vectors: int):
    """The TVMScript macro adding x[row, 4g .. 4g+3] times panel p's group g into acc[r]."""
    from tvm.script import tirx as T

    if isa == "avx512vnni":
        @T.macro
        def step(x, w, acc, p, g, row, r):
            for v in T.unroll(vectors):
                acc[r, T.ramp(v * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                    "int32x16", "llvm.x86.avx512.vpdpbusd.512", acc[r, T.ramp(v * lanes, 1, lanes)],
                    T.reinterpret("uint8x64", T.broadcast(T.bitwise_xor(
                        T.reinterpret("int32", x.vload([row, g * GROUP], "int8x4")), T.int32(FLIP)), lanes)),
                    w.vload([p, g, v * lanes, 0], "int8x64"))
        return step

    # Operands are written inline: a name bound in TVMScript becomes a buffer, which LLVM then
    # reloads after every accumulator update.
    @T.macro
    def step(x, w, acc, p, g, row, r):
        for v in T.unroll(vectors):
            acc[r, T.ramp(v * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc[r, T.ramp(v * lanes, 1, lanes)],
                w.vload([p, g, v * lanes, 0], "int8x16"),
                T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", x.vload([row, g * GROUP], "int8x4")), lanes)))
    return step


@functools.cache
def primfunc(K: int, panels: int, tile: int, rows: int, isa: str):
    """x int8 [m, K], m symbolic, times the packed weights, rescaled -> float32 [m, panels * tile];
    scheduled as written (see the module docstring). Cached: a model repeats a few shapes."""
    from tvm import tirx
    from tvm.script import tirx as T

    lanes = LANES[isa]
    vectors = tile // lanes
    step = _step(isa, lanes, vectors)
    P, G, t, R = (tirx.IntImm("int64", v) for v in (panels, K // GROUP, tile, rows))
    V, L = vectors, lanes

    if isa == "avx512vnni":
        @T.macro
        def start(acc, offsets, p, r):
            for v in T.unroll(V):
                acc[r, T.ramp(v * L, 1, L)] = offsets[p, T.ramp(v * L, 1, L)]
    else:
        @T.macro
        def start(acc, offsets, p, r):
            for v in T.unroll(V):
                acc[r, T.ramp(v * L, 1, L)] = T.broadcast(T.int32(0), L)

    @T.macro
    def finish(acc, sx, sw, b, y, p, row, r):
        for v in T.unroll(V):
            y[row, T.ramp(p * t + v * L, 1, L)] = (T.Cast(f"float32x{L}", acc[r, T.ramp(v * L, 1, L)]) * T.broadcast(sx[row], L) * sw[p, T.ramp(v * L, 1, L)]
                                                   + b[p, T.ramp(v * L, 1, L)])

    @T.prim_func(private=True)
    def int8_dot(var_x: T.handle, w: T.Buffer((P, G, t, GROUP), "int8"), offsets: T.Buffer((P, t), "int32"),
                 var_sx: T.handle, sw: T.Buffer((P, t), "float32"), b: T.Buffer((P, t), "float32"),
                 var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: tile})
        m = T.int64()
        x = T.match_buffer(var_x, (m, K), "int8")
        sx = T.match_buffer(var_sx, (m,), "float32")
        y = T.match_buffer(var_y, (m, P * t), "float32")
        for p in T.parallel(P):
            acc = T.decl_buffer((R, t), "int32")
            for block in range(m // R):
                for r in T.unroll(R):
                    start(acc, offsets, p, r)
                for g in range(G):
                    for r in T.unroll(R):
                        step(x, w, acc, p, g, block * R + r, r)
                for r in T.unroll(R):
                    finish(acc, sx, sw, b, y, p, block * R + r, r)
            for row in range(m // R * R, m):
                start(acc, offsets, p, 0)
                for g in range(G):
                    step(x, w, acc, p, g, row, 0)
                finish(acc, sx, sw, b, y, p, row, 0)

    return int8_dot


def emit(bb, x, sx, w: np.ndarray, sw: np.ndarray, bias: np.ndarray | None, tile: int, isa: str,
         packed=None):
    """Emit float32 (x int8 [..., K] @ w int8 [K, N]) * sx[..., 1] * sw (+ bias) into `bb`.

    sx: the rows' scales, a Relax expr broadcastable to [..., 1] (a scalar for a static scale);
    sw: per-column scales [N] or a scalar; bias [N] or None. `packed`: pack(w, tile) as a Relax
    constant, when the caller shares it (a tied embedding's lookup reads the same one)."""
    from tvm import relax

    from edgecc.kernels.int8 import over_rows

    K, N = w.shape
    count = -(-N // tile)
    gv = bb.add_func(primfunc(K, count, tile, block_rows(tile), isa), "int8_dot")
    packed = packed if packed is not None else relax.const(pack(w, tile))
    offsets, scales = relax.const(column_offsets(w, tile)), relax.const(padded_columns(sw, N, tile))
    b = relax.const(padded_columns(bias if bias is not None else np.float32(0), N, tile))
    lead = list(x.ty.shape)[:-1]
    rows_sx = bb.normalize(relax.op.reshape(bb.normalize(relax.op.broadcast_to(sx, (*lead, 1))), (-1,)))

    def run(x2):
        m = x2.ty.shape.values[0]
        y = bb.emit(relax.call_tir(gv, [x2, packed, offsets, rows_sx, scales, b],
                                   out_ty=relax.TensorType((m, count * tile), "float32")))
        if N % tile == 0:
            return y
        return bb.normalize(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))

    return over_rows(bb, x, K, N, run)

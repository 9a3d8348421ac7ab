"""int4 weights x int8 activations on CPU dot-product instructions: MatMulNBits with accuracy_level 4.

ONNX Runtime's MatMulNBits `accuracy_level=4` lets the activations be quantized to int8; this is
edgecc's kernel for it on CPUs that add four byte products into an int32 lane in one instruction:
x86 AVX-512 VNNI (`vpdpbusd`: 64 unsigned x 64 signed bytes into 16 lanes) and Armv8.2 dot
product (`sdot`: 16 x 16 signed bytes into 4 lanes; the Raspberry Pi 5's Cortex-A76 has it, the
Pi 4's A72 does not). The nibbles (levels 0..15) are a valid operand as they are, so a weight
costs one mask or shift: no conversion to float, and decoding reads the 4-bit weights at memory
speed (SmolLM2-135M's 576x1536 projection, one row, on VNNI: 16 us against 52 us for the
fp32-dequantizing GEMV).

Numerics, per row m and block b of `block` k (the blocks of the weights):
  x_k ~ sx[m, b] * xq_k,  sx = max|x over the block| / 127,  xq = round(x / sx) in [-127, 127]
  w[k, n] = (q[k, n] - z[b, n]) * s[b, n]
  y[m, n] = sum_b sx[m, b] * (s[b, n] * sum_k xq_k q[k, n]  -  s[b, n] z[b, n] * sum_k xq_k)
The integer dot is exact; `s * z` is folded at compile time (symmetric weights: z = 8, the
offset-binary nibbles of edgecc.kernels.int4).

Layout (pack): uint8 [N/16, K/8, 16, 4]. Byte [t, c, i, j] holds k = 8c + j of output 16t + i in
its low nibble and k = 8c + 4 + j in its high one: 64 bytes give two vpdpbusd operands (low
nibbles, high nibbles) of 16 outputs x 4 k each. Needs N % 16 == 0 and block % 8 == 0. Scales
and s * z are stored tile by tile (pack_meta), so each tile streams two contiguous arrays, as
float16 where they are float16 values (int4.quantize_blockwise makes them so, but for uint8 zero
points): a block of 32 weights then streams 20 bytes, not 24.

One PrimFunc serves any number of rows (symbolic M): rows are quantized first (a prompt's in
parallel, a decode step's one row serially), then 16-output tiles run in parallel; each walks its
contiguous weight stream once per block of ROWS rows, unpacking every group of nibbles once for
all of them, and the rows left over one at a time. SmolLM2's [128, 576] x [576, 1536] on 2 AVX-512
cores: 0.40 ms (570 GOP/s), where one row at a time took 1.2 ms.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

import functools

import numpy as np

from edgecc.kernels.int4 import half_holds

TILE = 16  # outputs per tile: vpdpbusd.512's int32 lanes, four sdot vectors
GROUP = 8  # k per byte group: 4 in the low nibbles, 4 in the high
ISAS = ("avx512vnni", "dotprod")  # LLVM feature names, in order of preference
KERNEL_ATTR = "edgecc.int4_dot"
# Rows that share each unpacked weight group: their accumulators (2 int32 + 1 float vector a row)
# take 12 of the 32 vector registers and 768 bytes of stack (under kernels.dense.STACK_BYTES).
ROWS = 4


def isa(target) -> str | None:
    """The dot-product instructions `target` (a TVM target) has, if any."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return None
    with target:
        return next((f for f in ISAS if codegen.target_has_features(f)), None)


def fits(K: int, N: int, block: int) -> bool:
    return N % TILE == 0 and block % GROUP == 0 and K % block == 0


def pack(levels: np.ndarray) -> np.ndarray:
    """Levels uint8 [K, N] in 0..15 -> uint8 [N/16, K/8, 16, 4] (see module doc)."""
    K, N = levels.shape
    r = levels.reshape(K // GROUP, 2, 4, N // TILE, TILE)  # c, half, j, t, i
    return np.ascontiguousarray((r[:, 0] | (r[:, 1] << 4)).transpose(2, 0, 3, 1))  # t, c, i, j


def pack_meta(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """scales and zero points [K/block, N] -> [N/16, K/block, 2, 16]: per tile, per block, the 16
    scales then the 16 products s * z, so a tile reads one contiguous stream. float16 where every
    value is one (to float32's rounding: s * z is computed), as int4.quantize_blockwise makes
    them but for uint8 zero points; else float32."""
    blocks, N = scales.shape
    both = np.stack([scales, scales * zeros.astype(np.float64)])  # [2, blocks, N]
    half = both.astype(np.float16)
    exact = np.all(half_holds(half, both) & (np.abs(half - both) <= np.abs(both) * 2.0 ** -22))
    both = half if exact else both.astype(np.float32)
    return np.ascontiguousarray(both.reshape(2, blocks, N // TILE, TILE).transpose(2, 1, 0, 3))


def reference(x: np.ndarray, levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
              block: int) -> np.ndarray:
    """numpy (float64) of what the kernel computes: x [M, K], levels [K, N], scales and zeros
    [K/block, N]."""
    M, K = x.shape
    xb = x.astype(np.float64).reshape(M, K // block, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    xq = np.round(xb * np.divide(127, amax, out=np.zeros_like(amax), where=amax > 0))
    w = (levels.reshape(K // block, block, -1) - zeros[:, None, :].astype(np.float64)) * scales[:, None, :]
    return np.einsum("mbk,bkn->mn", xq * amax / 127, w)


def _group_step(isa_name: str):
    """The TVMScript macro that adds one group (8 k of the tile's 16 outputs) into `dot`, the
    tile's two int32 accumulators (low and high nibbles: two chains, so the instruction's
    latency does not bound the loop)."""
    from tvm.script import tirx as T

    if isa_name == "avx512vnni":
        @T.macro
        def step(packed, xq, dot, t, g, m, k, r):
            dot[r, 0, T.ramp(0, 1, TILE)] = T.call_llvm_pure_intrin(
                "int32x16", "llvm.x86.avx512.vpdpbusd.512", dot[r, 0, T.ramp(0, 1, TILE)],
                T.bitwise_and(packed.vload([t, g, 0, 0], "uint8x64"), T.broadcast(T.uint8(15), 64)),
                T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", xq.vload([m, k], "int8x4")), TILE)))
            dot[r, 1, T.ramp(0, 1, TILE)] = T.call_llvm_pure_intrin(
                "int32x16", "llvm.x86.avx512.vpdpbusd.512", dot[r, 1, T.ramp(0, 1, TILE)],
                T.shift_right(packed.vload([t, g, 0, 0], "uint8x64"), T.broadcast(T.uint8(4), 64)),
                T.reinterpret("int8x64", T.broadcast(T.reinterpret("int32", xq.vload([m, k + 4], "int8x4")), TILE)))
        return step

    @T.macro
    def step(packed, xq, dot, t, g, m, k, r):
        # sdot's lane i adds a[4i..4i+3] . b[4i..4i+3]: 16 bytes of the tile are 4 outputs x 4 k.
        for q in T.unroll(TILE // 4):
            dot[r, 0, T.ramp(4 * q, 1, 4)] = T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", dot[r, 0, T.ramp(4 * q, 1, 4)],
                T.reinterpret("int8x16", T.bitwise_and(packed.vload([t, g, 4 * q, 0], "uint8x16"),
                                                       T.broadcast(T.uint8(15), 16))),
                T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", xq.vload([m, k], "int8x4")), 4)))
            dot[r, 1, T.ramp(4 * q, 1, 4)] = T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", dot[r, 1, T.ramp(4 * q, 1, 4)],
                T.reinterpret("int8x16", T.shift_right(packed.vload([t, g, 4 * q, 0], "uint8x16"),
                                                       T.broadcast(T.uint8(4), 16))),
                T.reinterpret("int8x16", T.broadcast(T.reinterpret("int32", xq.vload([m, k + 4], "int8x4")), 4)))
    return step


@functools.cache
def primfunc(K: int, N: int, block: int, isa_name: str, meta_dtype: str = "float32"):
    """The kernel for [M, K] x [K, N] weights in blocks of `block` on `isa_name`, with metadata
    (pack_meta) of `meta_dtype`; M symbolic.
    Cached: a model repeats a few shapes many times (SmolLM2: 4 shapes, 120 matmuls), and
    parsing the TVMScript takes ~85 ms."""
    from tvm.script import tirx as T

    tiles, groups, blocks, per_block = N // TILE, K // GROUP, K // block, block // GROUP
    group_step = _group_step(isa_name)
    R = ROWS

    @T.macro
    def quantize(x, xq, sx, sum_xq, m, b):
        """Block b of row m to int8 levels: its scale, and the sum of its levels."""
        amax = T.alloc_buffer((1,), "float32")
        total = T.alloc_buffer((1,), "int32")
        amax[0] = T.float32(0)
        for k in range(block):
            amax[0] = T.max(amax[0], T.fabs(x[m, b * block + k]))
        sx[m, b] = amax[0] / T.float32(127)
        total[0] = 0
        for k in range(block):
            xq[m, b * block + k] = T.Cast("int8", T.if_then_else(
                amax[0] > T.float32(0), T.round(x[m, b * block + k] * (T.float32(127) / amax[0])), T.float32(0)))
            total[0] = total[0] + T.Cast("int32", xq[m, b * block + k])
        sum_xq[m, b] = T.Cast("float32", total[0])

    @T.macro
    def rows(packed, meta, xq, sx, sum_xq, y, acc, dot, t, m0, count):
        """Rows m0 .. m0 + count - 1 of the tile: each weight group is unpacked once for all."""
        for r in T.unroll(count):
            acc[r, T.ramp(0, 1, TILE)] = T.broadcast(T.float32(0), TILE)
        for b in range(blocks):
            for r in T.unroll(count):
                dot[r, 0, T.ramp(0, 1, TILE)] = T.broadcast(T.int32(0), TILE)
                dot[r, 1, T.ramp(0, 1, TILE)] = T.broadcast(T.int32(0), TILE)
            for c in range(per_block):
                for r in T.unroll(count):
                    group_step(packed, xq, dot, t, b * per_block + c, m0 + r, b * block + c * GROUP, r)
            for r in T.unroll(count):
                acc[r, T.ramp(0, 1, TILE)] = acc[r, T.ramp(0, 1, TILE)] + T.broadcast(sx[m0 + r, b], TILE) * (
                    T.Cast("float32x16", dot[r, 0, T.ramp(0, 1, TILE)] + dot[r, 1, T.ramp(0, 1, TILE)])
                    * T.Cast("float32x16", meta[t, b, 0, T.ramp(0, 1, TILE)])
                    - T.Cast("float32x16", meta[t, b, 1, T.ramp(0, 1, TILE)]) * T.broadcast(sum_xq[m0 + r, b], TILE))
        for r in T.unroll(count):
            y[m0 + r, T.ramp(t * TILE, 1, TILE)] = acc[r, T.ramp(0, 1, TILE)]

    @T.prim_func(private=True, s_tir=True)
    def int4_dot(x_handle: T.handle, packed: T.Buffer((tiles, groups, TILE, 4), "uint8"),
                 meta: T.Buffer((tiles, blocks, 2, TILE), meta_dtype), y_handle: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        x = T.match_buffer(x_handle, (M, K), "float32")
        y = T.match_buffer(y_handle, (M, N), "float32")
        xq = T.alloc_buffer((M, K), "int8")
        sx = T.alloc_buffer((M, blocks), "float32")
        sum_xq = T.alloc_buffer((M, blocks), "float32")
        # A prompt's rows are quantized in parallel (SmolLM2's 128 x 1536 serially: as long as
        # the product); a decode step's one row serially, cheaper than waking the thread pool.
        if M >= R:
            for mb in T.parallel(M * blocks):
                quantize(x, xq, sx, sum_xq, mb // blocks, mb % blocks)
        else:
            for mb in range(M * blocks):
                quantize(x, xq, sx, sum_xq, mb // blocks, mb % blocks)
        for t in T.parallel(tiles):
            # Small buffers of the default scope go on the stack, where LLVM keeps them in
            # registers; "local" ones are heap workspaces that every update goes through (1.7x
            # slower for one row, 1.9x for 128).
            acc = T.alloc_buffer((R, TILE), "float32")
            dot = T.alloc_buffer((R, 2, TILE), "int32")
            for mb in range(M // R):
                rows(packed, meta, xq, sx, sum_xq, y, acc, dot, t, mb * R, R)
            for m in range(M // R * R, M):
                rows(packed, meta, xq, sx, sum_xq, y, acc, dot, t, m, 1)

    # Scheduled by hand; opaque, so FuseOps leaves it whole.
    return (int4_dot.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
            .with_attr(KERNEL_ATTR, block))


def emit(bb, x, levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int, isa_name: str):
    """Emit x [M, K] float32 @ the int4 weights into `bb` for `isa_name`: levels uint8 [K, N]
    (0..15), scales and zeros float32 [K/block, N]. The module stores the packed nibbles, the
    scales and s * z (float16 where they are float16 values: pack_meta)."""
    from tvm import relax

    K, N = levels.shape
    meta = pack_meta(scales, zeros)
    gv = bb.add_func(primfunc(K, N, block, isa_name, str(meta.dtype)), "int4_dot")
    operands = [x, relax.const(pack(levels)), relax.const(meta)]
    return bb.emit(relax.call_tir(gv, operands, relax.TensorType((x.ty.shape[0], N), "float32")))

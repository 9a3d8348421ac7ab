"""Int4 weight-only kernels: blockwise quantization, nibble packing, and a fused dequant-matmul.

Quantization: one scale (and zero point) per block of `block` consecutive rows along K, the
reduction axis, and per output column n. The block must divide K (no padding rule needed).
  symmetric:  s = max|w| / 7, q = round(w / s) in [-7, 7] (int8; -8 is never produced), w ~ q * s
  asymmetric: s = (max - min) / 15, z = round(-min / s), q = round(w / s) + z in [0, 15]
              (uint8), w ~ (q - z) * s; the range is widened to include 0 so z is a valid nibble.
Rounding error is at most s / 2 per element. An all-zero block gets s = 1 (q = 0 or q = z).

Packed layout (pack_int4): uint8 [N, ceil(K / 2)]; row n holds column n of the weights,
  packed[n, j] = nib(2j, n) | nib(2j + 1, n) << 4,  nib = q + 8 for signed q, q for unsigned.
These are exactly the bytes of ONNX Runtime's MatMulNBits B (uint8 [N, K/block, block/2]), and
offset-binary nibbles make the symmetric case "asymmetric with z = 8" (MatMulNBits' default zero
point), so one kernel serves both. Transposed rows make the GEMV reduction contiguous: each
output reads one stream of K/2 bytes, and dlight's GPU GEMV rule recognises the access (it
rejects layouts that tile N). An odd K pads the last high nibble with 0.

Kernel: out[m, n] = sum_k x[m, k] * (nib(k, n) - z[k // block, n]) * s[k // block, n], the
dequantization fused into the reduction. The compiled module's constants are the packed bytes,
scales and zero points: K*N/2 + 4*K*N/block (+ K*N/block) bytes, never fp32 weights.
A static M == 1 gets the GEMV schedule; any other M (static or symbolic) the matmul schedule,
which also runs M == 1 but about 3x slower (benchmarks/gemv.py), so decode graphs want M static.

tvm is imported inside the functions that need it: the numpy half must stay cheap to import.
"""

from __future__ import annotations

import math

import numpy as np

from edgecc.errors import UserError
from edgecc.kernels.common import is_gpu

TILE_N = 32  # output columns per task of the CPU matmul schedule
_SIGNED_OFFSET = 8


def _check_block(K: int, block: int) -> None:
    if block < 1 or K % block:
        raise UserError(f"int4 quantization: block {block} does not divide K = {K}")


def half_holds(half: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Where `half` (x as float16) keeps float16's 11 significant bits of x: a normal number, or
    the 0 that x is."""
    return (np.abs(half) >= np.finfo(np.float16).tiny) & np.isfinite(half) | (x == 0)


def to_half(x: np.ndarray) -> np.ndarray:
    """x as float32 holding the nearest float16 values where half_holds; elsewhere x as it is."""
    half = np.asarray(x, np.float64).astype(np.float16)
    return np.where(half_holds(half, x), half, x).astype(np.float32)


def quantize_blockwise(w: np.ndarray, block: int, symmetric: bool, float_zeros: bool = False):
    """w float [K, N] -> (q, scales float32 [K/block, N], zeros [K/block, N] or None).

    q is int8 in [-8, 7] (symmetric) or uint8 in [0, 15] (asymmetric). Asymmetric zero points
    are uint8 levels, or with `float_zeros` float32: then each block maps its min and max to
    levels 0 and 15 (GGUF's Q4_1 grid: weights already on such a grid come back exact).

    Symmetric and float-zero-point scales are float16 values (to_half), and so are float zero
    points' s * z, the block's min: GGUF's Q4_1 stores both so, and the dot-product kernel
    streams them at 2 bytes (kernels/int4_dot.py); a symmetric block's s * 8 is one with s.
    uint8 zero points keep float32 scales: their s * z needs more bits than float16 has anyway,
    and a rounded s would let round(hi / s) + z reach 16.
    """
    K, N = w.shape
    _check_block(K, block)
    blocks = w.astype(np.float64).reshape(K // block, block, N)
    if symmetric:
        scales = to_half(np.abs(blocks).max(axis=1) / 7)
    elif float_zeros:
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        scales = to_half(np.where(hi > lo, (hi - lo) / 15, 1))
        zeros = (to_half(-lo) / scales).astype(np.float32)
        q = np.clip(np.round(blocks / scales[:, None, :] + zeros[:, None, :]), 0, 15)
        return q.astype(np.uint8).reshape(K, N), scales, zeros
    else:
        lo = np.minimum(blocks.min(axis=1), 0)
        hi = np.maximum(blocks.max(axis=1), 0)
        scales = (hi - lo) / 15
    # Quantize with the float32 scale that is stored, so the s/2 error bound holds for it.
    scales = np.where(scales == 0, 1, scales).astype(np.float32)
    ratio = blocks / scales[:, None, :]
    if symmetric:
        q = np.clip(np.round(ratio), -8, 7).astype(np.int8).reshape(K, N)
        return q, scales, None
    zeros = np.clip(np.round(-lo / scales), 0, 15)
    q = np.clip(np.round(ratio) + zeros[:, None, :], 0, 15).astype(np.uint8).reshape(K, N)
    return q, scales, zeros.astype(np.uint8)


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, block: int):
    """The float32 [K, N] weights that q, scales and zeros stand for."""
    K, N = q.shape
    _check_block(K, block)
    levels = q.astype(np.float32).reshape(K // block, block, N)
    if zeros is not None:
        levels = levels - zeros.astype(np.float32)[:, None, :]
    return (levels * scales[:, None, :]).reshape(K, N)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 [-8, 7] or uint8 [0, 15] values [K, N] -> uint8 [N, ceil(K/2)] (see module doc)."""
    K, N = q.shape
    if q.dtype == np.int8:
        nib = q.astype(np.int16) + _SIGNED_OFFSET
    elif q.dtype == np.uint8:
        nib = q.astype(np.int16)
    else:
        raise TypeError(f"pack_int4 takes int8 or uint8 values, got {q.dtype}")
    if nib.min(initial=0) < 0 or nib.max(initial=0) > 15:
        raise ValueError("pack_int4: values out of int4 range")
    rows = np.zeros((N, -(-K // 2) * 2), np.uint8)
    rows[:, :K] = nib.T
    return rows[:, 0::2] | (rows[:, 1::2] << 4)


def unpack_int4(packed: np.ndarray, K: int, N: int, signed: bool) -> np.ndarray:
    """Inverse of pack_int4: int8 [K, N] if signed else uint8 [K, N]."""
    rows = np.empty((N, 2 * packed.shape[1]), np.uint8)
    rows[:, 0::2] = packed & 15
    rows[:, 1::2] = packed >> 4
    nib = np.ascontiguousarray(rows[:, :K].T)
    return (nib.astype(np.int8) - _SIGNED_OFFSET) if signed else nib


# ---------------------------------------------------------------- TVM kernels

KERNEL_ATTR = "edgecc.kernel"
BLOCK_ATTR = "edgecc.int4_block"


def _int4_matmul_te(x, packed, scales, zeros, block: int, K: int, N: int):
    """Two blocks the schedules work on: int4_dequant [K, N] feeding the int4_matmul reduction."""
    from tvm import te, tirx

    def nibble(k, n):
        byte = packed[n, k // 2]
        return (byte >> ((k % 2) * 4).astype("uint8")) & tirx.const(15, "uint8")

    def zero(b, n):
        if zeros is None:
            return tirx.const(float(_SIGNED_OFFSET), "float32")
        return zeros[b, n].astype("float32")

    weight = te.compute(
        (K, N),
        lambda k, n: (nibble(k, n).astype("float32") - zero(k // block, n)) * scales[k // block, n],
        name="int4_dequant",
    )
    k = te.reduce_axis((0, K), "k")
    return te.compute(
        (x.shape[0], N), lambda m, n: te.sum(x[m, k] * weight[k, n], axis=k), name="int4_matmul"
    )


def emit_int4_matmul(bb, x, packed, scales, zeros, block: int, K: int, N: int):
    """Emit x [M, K] float32 @ int4 weights -> [M, N] float32 into the BlockBuilder `bb`.

    packed/scales/zeros are relax.Constants from pack_int4 and quantize_blockwise (zeros None
    for symmetric). M may be symbolic. A static M == 1 gets the PrimFunc "int4_gemv", anything
    else "int4_matmul"; both compute the same thing and differ in schedule (schedule).
    The PrimFunc is marked opaque to FuseOps so it keeps the two blocks its schedule expects.
    """
    return bb.emit(_int4_call(bb, x, packed, scales, zeros, block, K, N))


def _int4_call(bb, x, packed, scales, zeros, block: int, K: int, N: int):
    """The call_tir of emit_int4_matmul's kernel, its operands checked, not yet emitted."""
    from tvm import tirx

    _check_block(K, block)
    if block % 2:
        raise UserError(f"int4 kernels need an even block (a byte holds two k), got {block}")
    shape = x.ty.shape
    if len(shape) != 2 or not (isinstance(shape[1], tirx.IntImm) and int(shape[1]) == K):
        raise ValueError(f"emit_int4_matmul: x must be [M, {K}], got {list(shape)}")
    if str(x.ty.dtype) != "float32":
        raise ValueError(f"emit_int4_matmul: x must be float32, got {x.ty.dtype}")
    gemv = isinstance(shape[0], tirx.IntImm) and int(shape[0]) == 1
    kind = "int4_gemv" if gemv else "int4_matmul"
    return bb.call_te(
        _int4_matmul_te, x, packed, scales, zeros, block, K, N,
        primfunc_name_hint=kind,
        primfunc_attrs={KERNEL_ATTR: kind, BLOCK_ATTR: block, "op_pattern": 8},  # 8: kOpaque
    )


def emit_int4_linear(bb, x, packed, scales, zeros, block: int, K: int, N: int):
    """emit_int4_matmul, except that symbolic rows get both kernels behind a run-time choice.

    A causal LM compiled for prefill and decode has symbolic rows, which would always take the
    any-M schedule: 2.2x slower than the GEMV schedule for the single row of a decode step. So a
    private Relax function `int4_linear` tests `rows == 1` and calls int4_gemv, else int4_matmul.
    """
    from tvm import relax, tirx

    if isinstance(x.ty.shape[0], tirx.IntImm):
        return emit_int4_matmul(bb, x, packed, scales, zeros, block, K, N)
    m = tirx.Var("m", "int64")
    xd = relax.Var("x", relax.TensorType((m, K), "float32"))
    one = relax.Var("x1", relax.TensorType((1, K), "float32"))
    y_one = relax.Var("y1", relax.TensorType((1, N), "float32"))
    y_then = relax.Var("y", relax.TensorType((m, N), "float32"))
    then = relax.SeqExpr([relax.BindingBlock([
        relax.MatchCast(one, xd, one.ty),
        relax.VarBinding(y_one, _int4_call(bb, one, packed, scales, zeros, block, K, N)),  # int4_gemv
        relax.MatchCast(y_then, y_one, y_then.ty)])], y_then)
    y_else = relax.Var("y", relax.TensorType((m, N), "float32"))
    other = relax.SeqExpr([relax.BindingBlock([  # int4_matmul
        relax.VarBinding(y_else, _int4_call(bb, xd, packed, scales, zeros, block, K, N))])], y_else)
    out = relax.Var("out", relax.TensorType((m, N), "float32"))
    choice = relax.If(relax.prim_value(tirx.EQ(m, tirx.IntImm("int64", 1))), then, other)
    body = relax.SeqExpr([relax.BindingBlock([relax.VarBinding(out, choice)])], out)
    gv = bb.add_func(relax.Function([xd], body, relax.TensorType((m, N), "float32")), "int4_linear")
    return relax.Call(gv, [x])


def _schedule_gemv(sch, mm, x_buffer, block: int) -> None:
    """M == 1: parallel over outputs; each row of packed bytes is one contiguous stream.

    K is walked 2 * lanes at a time: byte j feeds lane j of an even-k and an odd-k vector
    accumulator (rfactor), so the nibble shift is uniform per vector and the bytes load
    contiguously; x is de-interleaved into [2, K/2] once per call for the same reason. The
    dequantization is inlined: every weight is used once, so there is nothing to cache.
    """
    lanes = math.gcd(block, 32) // 2  # 2 * lanes divides block: one scale per vector
    sch.compute_inline(sch.get_sblock("int4_dequant"))
    _, n, k = sch.get_loops(mm)
    k_out, j, t = sch.split(k, [None, lanes, 2])
    sch.reorder(n, k_out, t, j)
    rf = sch.rfactor(sch.fuse(t, j), 0)
    # Sum the 2 * lanes partial sums with vector adds down to 8, then 8 scalar adds: a chain of
    # 32 dependent scalar adds per output is a large share of the time when K is small (576).
    _, eight = sch.split(sch.get_loops(mm)[-1], [None, min(8, 2 * lanes)])
    rf8 = sch.rfactor(eight, 0)
    # Partial sums stay in buffers allocated once per call (a "local" scope would allocate a
    # workspace per output), laid out so that each output's sums are contiguous.
    for block_rv in (rf, rf8):
        sch.transform_layout(block_rv, ("write", 0), lambda lane, i, n: (i, n, lane))
    m, n, k_out, tj = sch.get_loops(rf)
    t, j = sch.split(tj, [2, lanes])
    sch.unroll(t)
    sch.vectorize(j)
    x_pairs = sch.cache_read(rf, x_buffer, "global")
    sch.transform_layout(x_pairs, ("write", 0), lambda i, k: (i, k % 2, k // 2))
    sch.compute_at(x_pairs, m)
    sch.reverse_compute_at(rf8, n)
    sch.reverse_compute_at(mm, n)
    lane8, part = sch.get_loops(rf8)[-2:]
    sch.reorder(part, lane8)
    sch.vectorize(lane8)
    sch.parallel(n)
    sch.decompose_reduction(rf, k_out)


def _schedule_matmul(sch, mm, block: int) -> None:
    """Any M: parallel over 32-column tiles, K walked block by block.

    Each [block, 32] weight tile is dequantized once into a local buffer and reused for every
    row of x, whose FMAs are vectorized over the tile's columns.
    """
    dq = sch.get_sblock("int4_dequant")
    m, n, k = sch.get_loops(mm)
    n_out, n_in = sch.split(n, [None, TILE_N])
    k_out, k_in = sch.split(k, [None, block])
    sch.reorder(n_out, k_out, m, k_in, n_in)
    sch.compute_at(dq, k_out)
    sch.set_scope(dq, 0, "local")
    sch.vectorize(sch.get_loops(dq)[-1])
    sch.vectorize(n_in)
    sch.parallel(n_out)
    # Decompose last: parallel() needs the reduction block whole.
    init = sch.decompose_reduction(mm, k_out)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule(mod, target):
    """Schedule every int4 kernel in `mod` (after the Relax "zero" pipeline) for `target`.

    CPU: the hand schedules above. GPU: dlight's rules (GEMV, Matmul, Fallback), applied to the
    whole module, since every other kernel on a GPU needs thread bindings too. Kernels already
    scheduled are left alone, so applying this twice is harmless.
    """
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import dlight as dl

    if is_gpu(target):
        with target:
            return dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Matmul(), dl.gpu.Fallback())(mod)
    mod = mod.clone()
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None:
            continue
        kind = func.attrs.get(KERNEL_ATTR)  # other edgecc kernels share the attribute
        if kind not in ("int4_gemv", "int4_matmul") or func.attrs.get("tirx.is_scheduled"):
            continue
        block = int(func.attrs[BLOCK_ATTR])
        sch = Schedule(func)
        mm = sch.get_sblock("int4_matmul")
        if kind == "int4_gemv":
            # The update reads x[m, k] * int4_dequant[k, n], in that order.
            _schedule_gemv(sch, mm, sch.get(mm).reads[0].source, block)
        else:
            _schedule_matmul(sch, mm, block)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def linear_module(K: int, N: int, block: int, symmetric: bool, M: int | None = None,
                  weight: np.ndarray | None = None):
    """Relax module `main(x [M, K]) = x @ int4(weight)`, unscheduled; M None means symbolic.

    weight (float32 [K, N]) defaults to a seeded normal matrix.
    """
    from tvm import relax, tirx

    if weight is None:
        weight = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    q, scales, zeros = quantize_blockwise(weight, block, symmetric)
    bb = relax.BlockBuilder()
    rows = tirx.Var("m", "int64") if M is None else M
    x = relax.Var("x", relax.TensorType((rows, K), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = emit_int4_matmul(
                bb, x, relax.const(pack_int4(q)), relax.const(scales),
                None if zeros is None else relax.const(zeros), block, K, N,
            )
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def build_module(K: int, N: int, block: int, symmetric: bool, target, M: int | None = None,
                 weight: np.ndarray | None = None):
    """linear_module compiled for `target`: the "zero" pipeline, schedule, tvm.compile.

    Returns the executable (load it with relax.VirtualMachine, or export_library it).
    """
    import tvm
    from tvm import relax

    with target:
        mod = relax.get_pipeline("zero")(linear_module(K, N, block, symmetric, M, weight))
    return tvm.compile(schedule(mod, target), target=target)

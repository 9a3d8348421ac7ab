"""ONNX Runtime contrib ops (com.microsoft) that TVM 0.27's importer lacks, and the ops edgecc's
passes route to its own kernels (domain edgecc)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.frontend.converters.common import axes_from
from edgecc.frontend.registry import converter
from edgecc.kernels import int4_dot, int8_dot
from edgecc.kernels.bsr import emit_bsr_matmul, to_bsr
from edgecc.kernels.int4 import emit_int4_linear, unpack_int4
from edgecc.kernels.int8 import emit_int8_columns, emit_int8_matmul, over_rows, pack_int8


@converter("SimplifiedLayerNormalization", domain="com.microsoft")
@converter("SimplifiedLayerNormalization")  # ORT also accepts it in the default domain
class SimplifiedLayerNormalization(OnnxOpConverter):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * scale (ORT's contrib op, used by Llama exports)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        data, scale = inputs[0], inputs[1]
        out = relax.op.nn.rms_norm(data, scale, axes_from(data, attr.get("axis", -1)),
                                   attr.get("epsilon", 1e-5))
        return relax.Tuple([out, relax.const(0, "float32")])


@converter("SkipSimplifiedLayerNormalization", domain="com.microsoft")
class SkipSimplifiedLayerNormalization(OnnxOpConverter):
    """RMSNorm of (input + skip [+ bias]); the fourth output is that sum (the residual)."""

    computed_outputs = (0, 3)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        data, skip, scale = inputs[0], inputs[1], inputs[2]
        total = relax.op.add(data, skip)
        if len(inputs) > 3 and inputs[3] is not None:
            total = relax.op.add(total, inputs[3])
        out = relax.op.nn.rms_norm(total, scale, axes_from(total, -1), attr.get("epsilon", 1e-5))
        placeholder = relax.const(0, "float32")
        return relax.Tuple([out, placeholder, placeholder, total])


# An int8 weight's constant in a packed layout, by (weight constant, tile, dot layout): a tied
# embedding's lookup and the LM head read the same one, so the module stores it once. Cleared after
# each import (edgecc.frontend.lower).
PACKED: dict = {}


def packed_int8(w: tvm.ir.Constant, tile: int, dot: bool = False) -> tvm.ir.Constant:
    if (w, tile, dot) not in PACKED:
        pack = int8_dot.pack if dot else pack_int8
        PACKED[(w, tile, dot)] = relax.const(pack(w.value.numpy(), tile))
    return PACKED[(w, tile, dot)]


def _int8_matmul(bb, x, w, tile: int):
    """x int8 [..., K] @ constant int8 w [K, N] -> int32 with edgecc's int8 kernel."""
    K, N = (int(d) for d in w.ty.shape)
    return emit_int8_matmul(bb, x, packed_int8(w, tile), tile, K, N)


def _int8_operands(inputs) -> bool:
    x, w = inputs[0], inputs[1]
    return (isinstance(w, tvm.ir.Constant) and len(w.ty.shape) == 2 and str(w.ty.dtype) == "int8"
            and str(x.ty.dtype) == "int8" and not any(z is not None for z in inputs[2:]))


@converter("MatMulInteger")
class MatMulInteger(OnnxOpConverter):
    """int8 x int8 -> int32 with the operands kept int8.

    TVM's own converter widens both operands to int32 before the matmul, and constant folding
    then stores int8 weights as int32: four bytes a weight. A constant int8 weight without zero
    points (what quantize-int8 emits) goes to edgecc's int8 kernel in ONNX's [K, N] layout;
    other forms keep TVM's conversion.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        if _int8_operands(inputs):
            return _int8_matmul(bb, inputs[0], inputs[1], tile=0)
        return onnx_frontend.MatMulInteger._impl_v10(bb, inputs, attr, params)


@converter("MatMulInt8", domain="edgecc")
class MatMulInt8(OnnxOpConverter):
    """A MatMulInteger that pack-weights gave a layout: the weight is stored in panels of `tile`."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if not _int8_operands(inputs):
            raise ValueError("packed MatMulInteger needs int8 x constant int8 [K, N], no zero points")
        return _int8_matmul(bb, inputs[0], inputs[1], tile=attr["tile"])


@converter("MatMulInt8Dot", domain="edgecc")
class MatMulInt8Dot(OnnxOpConverter):
    """quantize-int8's product and rescale, Cast(MatMulInteger(xq, W), float) * x_scale * w_scale
    (+ bias), on an int8 dot-product instruction set (pack-weights marks it `int8_dot`;
    the lowering gathers the chain into this op): edgecc.kernels.int8_dot. Inputs: xq, W, x_scale,
    w_scale, and optionally bias; W, w_scale and bias constants."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        xq, w, x_scale, w_scale = inputs[:4]
        bias = inputs[4] if len(inputs) > 4 else None
        if not _int8_operands(inputs[:2]) or not all(isinstance(c, tvm.ir.Constant) for c in inputs[3:]):
            raise ValueError("int8 dot product needs int8 x constant int8 [K, N] and constant scales and bias")
        N = int(w.ty.shape[1])
        sw, b = (c.value.numpy().astype(np.float32) if c is not None else None for c in (w_scale, bias))
        if sw.size not in (1, N) or (b is not None and b.size != N):
            raise ValueError(f"int8 dot product: weight scales {list(sw.shape)} and bias must be per column (N = {N})")
        tile, isa = attr["tile"], attr["isa"].decode() if isinstance(attr["isa"], bytes) else attr["isa"]
        return int8_dot.emit(bb, xq, x_scale, w.value.numpy(), sw, b, tile, isa, packed=packed_int8(w, tile, dot=True))


@converter("GatherInt8Columns", domain="edgecc")
class GatherInt8Columns(OnnxOpConverter):
    """Gather(W, ids, axis=1) of a packed MatMulInteger's int8 weight (pack-weights marks it):
    read from the panels the matmul reads (a tied embedding table)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        w, ids = inputs[0], inputs[1]
        if not isinstance(w, tvm.ir.Constant) or str(w.ty.dtype) != "int8" or len(w.ty.shape) != 2:
            raise ValueError("packed column Gather needs a constant int8 [K, N] weight")
        K, N = (int(d) for d in w.ty.shape)
        dot = bool(attr.get("dot", 0))
        return emit_int8_columns(bb, packed_int8(w, attr["tile"], dot), ids, attr["tile"], K, N, dot)


def _nbits_operands(inputs, attr):
    """MatMulNBits' constants in the int4 kernels' terms: packed bytes [N, K/2] (two k per byte),
    scales [K/block, N], zero points [K/block, N] (uint8 levels, float32, or None: symmetric)."""

    K, N, bits, block = attr["K"], attr["N"], attr.get("bits", 4), attr["block_size"]
    b, scales = inputs[1], inputs[2]
    zero_points = inputs[3] if len(inputs) > 3 else None
    extra = [i for i in inputs[4:] if i is not None]
    if bits != 4 or extra or not all(isinstance(v, tvm.ir.Constant) for v in (b, scales)):
        raise ValueError("edgecc lowers MatMulNBits with bits=4, constant B and scales, "
                         "and no g_idx or bias inputs")
    blocks = K // block
    packed = b.value.numpy().reshape(N, K // 2)
    kernel_scales = np.ascontiguousarray(scales.value.numpy().reshape(N, blocks).T)
    if zero_points is None:
        return packed, kernel_scales, None
    given = zero_points.value.numpy() if isinstance(zero_points, tvm.ir.Constant) else None
    if given is None or given.dtype not in (np.uint8, np.float32):
        raise ValueError("edgecc lowers MatMulNBits zero points only as constants, packed "
                         "uint8 or float32")
    if given.dtype == np.float32:
        return packed, kernel_scales, np.ascontiguousarray(given.reshape(N, blocks).T)
    nibbles = given.reshape(N, -1)
    both = np.stack([nibbles & 15, nibbles >> 4], axis=-1).reshape(N, -1)[:, :blocks]
    return packed, kernel_scales, np.ascontiguousarray(both.T).astype(np.uint8)


@converter("MatMulNBits", domain="com.microsoft")
class MatMulNBits(OnnxOpConverter):
    """int4 MatMulNBits (what quantize-int4 emits) -> edgecc's fused dequantize-matmul kernel.

    B's bytes are already the kernel's packed layout ([N, K/2], two k per byte); scales and
    zero points are reordered from ORT's N-major order to the kernel's [K/block, N]. The module
    keeps the nibbles: nothing is dequantized ahead of time.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        K, N, block = attr["K"], attr["N"], attr["block_size"]
        packed, scales, zeros = (v if v is None else relax.const(v) for v in _nbits_operands(inputs, attr))
        return over_rows(bb, inputs[0], K, N,
                         lambda rows: emit_int4_linear(bb, rows, packed, scales, zeros, block, K, N))


@converter("MatMulNBitsDot", domain="edgecc")
class MatMulNBitsDot(OnnxOpConverter):
    """A MatMulNBits with accuracy_level 4 that pack-weights gave the int4 x int8 dot-product
    kernel of an instruction set (`isa`)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        K, N, block = attr["K"], attr["N"], attr["block_size"]
        isa = attr["isa"].decode() if isinstance(attr["isa"], bytes) else attr["isa"]
        packed, scales, zeros = _nbits_operands(inputs, attr)
        levels = unpack_int4(packed, K, N, signed=False)
        if zeros is None:  # symmetric: offset-binary nibbles, zero point 8
            zeros = np.full_like(scales, 8)
        return over_rows(bb, inputs[0], K, N,
                         lambda rows: int4_dot.emit(bb, rows, levels, scales, zeros.astype(np.float32), block,
                                                    isa))


@converter("BlockSparseMatMul", domain="edgecc")
class BlockSparseMatMul(OnnxOpConverter):
    """x @ W with W's zero blocks dropped: BSR storage and edgecc's block-sparse kernel.

    Only the lowering produces this op, from MatMuls the block-sparsity pass marked; W arrives
    as the pruned dense constant and leaves as its nonzero blocks.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, w = inputs
        if not isinstance(w, tvm.ir.Constant):
            raise ValueError("BlockSparseMatMul needs a constant weight")
        weight = w.value.numpy()
        block = (attr["block_rows"], attr["block_cols"])
        data, indices, indptr = to_bsr(weight, block)
        K, N = weight.shape
        return emit_bsr_matmul(bb, x, relax.const(data), relax.const(indices), relax.const(indptr),
                               K, N, block)


def _gelu(x, approximate: str):
    """GELU as elementwise Relax ops, so FastMathTransform (edgecc.backends.tvm_common.prepare) can swap erf
    and tanh for TVM's vectorizable approximations: relax's fused gelu op calls libm's scalar
    erff per element, 22x slower (0.57 vs 0.026 ms for 32x1024 here) and the heaviest kernel of a
    tuned transformer block."""
    def c(v: float):
        return relax.const(v, x.ty.dtype)

    if approximate == "tanh":
        inner = relax.op.multiply(c(0.7978845608028654),
                                  relax.op.add(x, relax.op.multiply(c(0.044715), relax.op.power(x, c(3.0)))))
        return relax.op.multiply(relax.op.multiply(c(0.5), x), relax.op.add(c(1.0), relax.op.tanh(inner)))
    if approximate != "none":
        raise ValueError(f"Gelu approximate='{approximate}' is not 'none' or 'tanh'")
    erf = relax.op.erf(relax.op.multiply(x, c(0.7071067811865476)))
    return relax.op.multiply(relax.op.multiply(c(0.5), x), relax.op.add(c(1.0), erf))


@converter("Gelu", domain="com.microsoft")
@converter("Gelu")
class Gelu(OnnxOpConverter):
    """ONNX Gelu (opset 20, erf or tanh form) and ORT's contrib Gelu (erf form)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _gelu(inputs[0], "none")

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        approximate = attr.get("approximate", b"none")
        return _gelu(inputs[0], approximate.decode() if isinstance(approximate, bytes) else approximate)


@converter("FastGelu", domain="com.microsoft")
class FastGelu(OnnxOpConverter):
    """ORT's contrib FastGelu: the tanh form, with an optional bias added first."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x = inputs[0] if len(inputs) < 2 or inputs[1] is None else bb.normalize(relax.op.add(*inputs[:2]))
        return _gelu(x, "tanh")


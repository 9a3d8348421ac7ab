"""Numeric ONNX ops TVM 0.27's importer lacks: CumProd, LpNormalization, Swish, SwiGLU, Det,
ReverseSequence and BitCast."""

from __future__ import annotations

import numpy as np
from tvm import DataType, relax, te, tirx
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import check_constant_operands, node_name
from edgecc.frontend.registry import converter


@converter("CumProd")
class CumProd(OnnxOpConverter):
    """Cumulative product along a constant axis, inclusive or exclusive, forward or reversed."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v26(cls, bb, inputs, attr, params):
        axis = int(check_constant_operands("CumProd", {1: "axis"}, False, bb, inputs, attr, params)[0].item())
        data, reverse = inputs[0], attr.get("reverse", 0)
        if reverse:
            data = relax.op.flip(data, axis)
        data = relax.op.cumprod(data, axis, exclusive=bool(attr.get("exclusive", 0)))
        return relax.op.flip(data, axis) if reverse else data


@converter("LpNormalization")
class LpNormalization(OnnxOpConverter):
    """x / ||x||_p along an axis, for p = 1 or 2 (all ONNX allows); 0 where the norm is 0."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        x, p = inputs[0], attr.get("p", 2)
        if p not in (1, 2):
            raise UserError(f"node '{node_name(attr)}': LpNormalization with p={p} is not lowered "
                            "(ONNX allows p = 1 or 2)")
        axis = attr.get("axis", -1)
        if p == 1:
            norm = relax.op.sum(relax.op.abs(x), axis, keepdims=True)
        else:
            norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis, keepdims=True))
        zero = relax.const(0, x.ty.dtype)
        return relax.op.where(relax.op.equal(norm, zero), zero, relax.op.divide(x, norm))


def _swish(x, alpha: float):
    """x * sigmoid(alpha * x), in x's dtype."""
    return relax.op.multiply(x, relax.op.sigmoid(relax.op.multiply(relax.const(alpha, x.ty.dtype), x)))


@converter("Swish")
class Swish(OnnxOpConverter):
    """Swish: x * sigmoid(alpha * x) (SiLU when alpha is 1)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        return _swish(inputs[0], attr.get("alpha", 1.0))


@converter("SwiGLU")
class SwiGLU(OnnxOpConverter):
    """SwiGLU: Swish(A) * B, the gated activation of Llama-style MLPs."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v28(cls, bb, inputs, attr, params):
        return relax.op.multiply(_swish(inputs[0], attr.get("alpha", 1.0)), inputs[1])


@converter("Det")
class Det(OnnxOpConverter):
    """Determinants of [*, M, M] by Gaussian elimination with partial pivoting, unrolled over the
    static M. 16-bit floats are eliminated in float32 (their precision loses the product)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        x = inputs[0]
        *batch, m, _ = x.ty.shape.values
        if not isinstance(m, tirx.IntImm):
            raise UserError(f"node '{node_name(attr)}': Det of matrices of symbolic size is not lowered; "
                            "give the matrix dims as numbers")
        dtype = str(x.ty.dtype)
        work = "float32" if dtype in ("float16", "bfloat16") else dtype
        a, rank = relax.op.astype(x, work), len(batch) + 2
        one, zero = relax.const(1, work), relax.const(0, work)
        det = relax.op.ones(batch, work)
        for size in range(int(m), 0, -1):
            # Swap the row of the column's largest magnitude up; a swap negates the determinant.
            column = relax.op.squeeze(relax.op.strided_slice(a, [rank - 1], [0], [1]), [rank - 1])
            pivot_row = relax.op.argmax(relax.op.abs(column), axis=rank - 2, keepdims=True)
            rows = relax.const(np.arange(size), "int64")
            first = relax.op.equal(rows, relax.const(0, "int64"))
            order = relax.op.where(first, pivot_row,
                                   relax.op.where(relax.op.equal(rows, pivot_row), relax.const(0, "int64"), rows))
            order = relax.op.broadcast_to(relax.op.expand_dims(order, -1), [*batch, size, size])
            a = bb.normalize(relax.op.gather_elements(a, order, axis=rank - 2))
            pivot = relax.op.squeeze(relax.op.strided_slice(a, [rank - 2, rank - 1], [0, 0], [1, 1]),
                                     [rank - 2, rank - 1])
            swapped = relax.op.not_equal(relax.op.squeeze(pivot_row, [rank - 2]), relax.const(0, "int64"))
            det = relax.op.multiply(det, relax.op.where(swapped, relax.op.negative(pivot), pivot))
            if size == 1:
                break
            # Eliminate the column below the pivot. A zero pivot means a zero column: the
            # determinant is 0 already, and dividing by 1 instead keeps NaNs out.
            safe = relax.op.where(relax.op.equal(pivot, zero), one, pivot)
            below = relax.op.strided_slice(a, [rank - 2, rank - 1], [1, 0], [size, 1])
            factor = relax.op.divide(below, relax.op.expand_dims(safe, [-2, -1]))
            pivot_rest = relax.op.strided_slice(a, [rank - 2, rank - 1], [0, 1], [1, size])
            rest = relax.op.strided_slice(a, [rank - 2, rank - 1], [1, 1], [size, size])
            a = relax.op.subtract(rest, relax.op.multiply(factor, pivot_rest))
        return relax.op.astype(det, dtype)


@converter("ReverseSequence")
class ReverseSequence(OnnxOpConverter):
    """Reverses the first sequence_lens[i] steps along time_axis of each batch entry i."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return relax.op.reverse_sequence(inputs[0], inputs[1], seq_axis=attr.get("time_axis", 0),
                                         batch_axis=attr.get("batch_axis", 1))


@converter("BitCast")
class BitCast(OnnxOpConverter):
    """The input's bits read as another dtype of the same width. bool is one byte of 0 or 1 in
    ONNX, so to or from bool it is the value cast."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v26(cls, bb, inputs, attr, params):
        x = inputs[0]
        source, target = str(x.ty.dtype), onnx_frontend.get_type(attr["to"])
        if "bool" in (source, target):
            return relax.op.astype(x, target)
        if DataType(source).bits != DataType(target).bits:
            raise UserError(f"node '{node_name(attr)}': BitCast from {source} to {target} changes the "
                            "width, which ONNX does not allow")
        return bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tirx.reinterpret(target, t(*i)),
                                               name="bitcast"), x, primfunc_name_hint="bitcast")

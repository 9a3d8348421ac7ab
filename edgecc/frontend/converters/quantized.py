"""Quantized convolution and matmul (ConvInteger, QLinearConv, QLinearMatMul), which TVM's importer
lacks: computed as ONNX's reference does, on int32 values with the zero points subtracted, then
(for the QLinear ops) requantized in float32 with round-half-to-even and saturation."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.frontend.registry import converter


def _centered(x, zero_point, shape=None):
    """x - zero_point in int32; a 1-D zero point reshaped to `shape` to broadcast along its axis."""
    x = relax.op.astype(x, "int32")
    if zero_point is None:
        return x
    if shape is not None and zero_point.ty.ndim == 1:
        zero_point = relax.op.reshape(zero_point, shape)
    return relax.op.subtract(x, relax.op.astype(zero_point, "int32"))


def _per_channel(value, ndim: int, axis: int):
    """A 1-D per-channel value shaped to broadcast along `axis` of a rank-`ndim` tensor."""
    if value.ty.ndim != 1:
        return value
    return relax.op.reshape(value, [-1 if i == axis else 1 for i in range(ndim)])


def _conv(bb, x, w, bias, attr):
    """TVM's Conv (auto_pad, pads, strides, dilations, group) on int32 operands."""
    return onnx_frontend.Conv._impl_v11(bb, [bb.normalize(x), bb.normalize(w), bias], dict(attr), None)


def _requantize(bb, acc, multiplier, zero_point, dtype: str):
    """round(acc * multiplier) + zero_point, saturated to `dtype` (the zero point's, else the input's).

    The spec's (and ONNX Runtime's) order, as QuantizeLinear's: round half to even, then add the zero
    point; ONNX's reference rounds after adding it, which differs on odd zero points at halves."""
    scaled = relax.op.round(relax.op.multiply(relax.op.astype(acc, "float32"), relax.op.astype(multiplier, "float32")))
    if zero_point is not None:
        scaled = relax.op.add(scaled, relax.op.astype(zero_point, "float32"))
    info = np.iinfo(str(dtype))
    return relax.op.astype(relax.op.clip(scaled, float(info.min), float(info.max)), dtype)


@converter("ConvInteger")
class ConvInteger(OnnxOpConverter):
    """ConvInteger: int32 convolution of (x - x_zero_point) and (w - w_zero_point), the weight's
    zero point per tensor or per output channel."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, w, x_zero, w_zero = inputs[:4]
        w_shape = [-1] + [1] * (w.ty.ndim - 1)
        return _conv(bb, _centered(x, x_zero), _centered(w, w_zero, w_shape), None, attr)


@converter("QLinearConv")
class QLinearConv(OnnxOpConverter):
    """QLinearConv: ConvInteger plus the int32 bias, requantized with x_scale * w_scale / y_scale
    (w_scale and w_zero_point per tensor or per output channel)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero, bias = inputs[:9]
        ndim = w.ty.ndim
        acc = _conv(bb, _centered(x, x_zero), _centered(w, w_zero, [-1] + [1] * (ndim - 1)), bias, attr)
        multiplier = relax.op.divide(relax.op.multiply(x_scale, _per_channel(w_scale, ndim, 1)), y_scale)
        dtype = (y_zero if y_zero is not None else x).ty.dtype
        return _requantize(bb, acc, multiplier, y_zero, dtype)


@converter("QLinearMatMul")
class QLinearMatMul(OnnxOpConverter):
    """QLinearMatMul: int32 matmul of (a - a_zero_point) and (b - b_zero_point), requantized with
    a_scale * b_scale / y_scale (their product in their own dtype, as the reference takes it). Scales
    and zero points broadcast as numpy does: per tensor, or per row as [..., M, 1] and per column."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = inputs[:8]
        acc = relax.op.matmul(_centered(a, a_zero), _centered(b, b_zero))
        multiplier = relax.op.divide(relax.op.multiply(a_scale, b_scale), y_scale)
        dtype = (y_zero if y_zero is not None else a).ty.dtype
        return _requantize(bb, acc, multiplier, y_zero, dtype)

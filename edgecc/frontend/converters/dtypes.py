"""Conversions between element types: Cast, CastLike, QuantizeLinear and DequantizeLinear, with
the types TVM cannot compile (float8, float4, int4, int2) carried as their codes (narrow_types)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.core.verify import UNCOMPILABLE_TYPES
from edgecc.errors import UserError
from edgecc.frontend.converters import narrow_types
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.converters.narrow_types import NARROW, decode, encode, input_type, np_dtype, type_name
from edgecc.frontend.registry import converter


def _cast(bb, x, source: int, to: int, attr):
    """x, of ONNX type `source`, cast to `to` as ONNX's Cast does (saturate, round_mode)."""
    saturate, round_mode = bool(attr.get("saturate", 1)), attr.get("round_mode", b"up").decode()
    if to in UNCOMPILABLE_TYPES:
        raise UserError(f"node '{node_name(attr)}': Cast to {type_name(to)}, which TVM 0.27 cannot compile")
    if source in NARROW:
        return decode(x, source, to, saturate, round_mode)
    if to in NARROW:
        return encode(bb, x, to, saturate, round_mode)
    return None


@converter("Cast")
class Cast(OnnxOpConverter):
    """Cast; to and from the narrow types (float8, float4, int4, int2) on their codes, others by TVM."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        tensor = isinstance(x, relax.Expr) and isinstance(bb.normalize(x).ty, relax.TensorType)
        source = input_type(x, attr, 0) if tensor else None
        if not tensor and attr["to"] in NARROW:
            raise UserError(f"node '{node_name(attr)}': Cast of a shape or scalar to {type_name(attr['to'])} "
                            "is not lowered")
        cast = _cast(bb, x, source, attr["to"], attr)
        return cast if cast is not None else onnx_frontend.Cast._impl_v13(bb, inputs, attr, params)


@converter("CastLike")
class CastLike(OnnxOpConverter):
    """CastLike; to and from the narrow types on their codes, others by TVM."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        x, like = inputs[0], inputs[1]
        if NARROW & set(attr.get(narrow_types.TYPES_ATTR, ())):
            cast = _cast(bb, x, input_type(x, attr, 0), input_type(like, attr, 1), attr)
            if cast is not None:
                return cast
        return onnx_frontend.CastLike._impl_v15(bb, inputs, attr, params)


def _per_element(bb, param, x, axis: int, block_size: int):
    """A scale or zero point broadcastable to x, as ONNX's reference shapes it: a scalar, per
    `axis`, or repeated `block_size` times along it (the last block cut to x's size)."""
    param = bb.normalize(param)
    shape, param_shape = bb.normalize(x).ty.shape.values, param.ty.shape.values
    if not param_shape:
        return param
    if len(param_shape) == 1 and isinstance(param_shape[0], tirx.IntImm) and param_shape[0].value == 1:
        return relax.op.reshape(param, [])
    axis = axis + len(shape) if axis < 0 else axis
    if not block_size:
        return relax.op.reshape(param, [-1 if d == axis else 1 for d in range(len(shape))])
    repeated = relax.op.repeat(param, block_size, axis)
    return relax.op.strided_slice(repeated, [axis], [0], [shape[axis]])


def _quantize(bb, inputs, attr, out_type: int):
    """y = saturate(x / scale + zero_point) (ONNX's reference: the division in the inputs' common
    type or `precision`, the rounding to nearest even, float8 without a zero point)."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis, block = attr.get("axis", 1), attr.get("block_size", 0)
    precision = attr.get("precision", 0)
    dtype = (np_dtype(precision) if precision else
             np.result_type(np.dtype(str(x.ty.dtype)), np.dtype(str(scale.ty.dtype)))).name
    ratio = relax.op.divide(relax.op.astype(x, dtype), relax.op.astype(_per_element(bb, scale, x, axis, block), dtype))
    zp_type = input_type(zero_point, attr, 2) if zero_point is not None else out_type
    if out_type in narrow_types.INTEGER_RANGES:
        wide = "float64" if dtype == "float64" else "float32"  # exact for every zero point
        level = relax.op.astype(relax.op.round(ratio), wide)
        if zero_point is not None:
            zp = decode(zero_point, zp_type, TensorProto.FLOAT) if zp_type in NARROW else zero_point
            level = relax.op.add(level, relax.op.astype(_per_element(bb, zp, x, axis, block), wide))
        low, high = narrow_types.INTEGER_RANGES[out_type]
        level = relax.op.clip(level, low, high)
        return (encode(bb, level, out_type) if out_type in NARROW
                else relax.op.astype(level, np_dtype(out_type).name))
    if out_type == TensorProto.FLOAT4E2M1 and zero_point is not None:
        zp = decode(zero_point, zp_type, TensorProto.FLOAT)
        ratio = relax.op.add(ratio, relax.op.astype(_per_element(bb, zp, x, axis, block), dtype))
    return encode(bb, ratio, out_type, bool(attr.get("saturate", 1)))


@converter("QuantizeLinear")
class QuantizeLinear(OnnxOpConverter):
    """QuantizeLinear; to the narrow types, blocked (block_size) or with `precision` by edgecc,
    others by TVM's converter."""

    computed_outputs = (0,)

    @classmethod
    def get_converter(cls, opset):
        tvm_convert = onnx_frontend.QuantizeLinear.get_converter(opset)

        def convert(bb, inputs, attr, params):
            zero_point = inputs[2] if len(inputs) > 2 else None
            out_type = attr.get("output_dtype") or (
                input_type(zero_point, attr, 2) if zero_point is not None else TensorProto.UINT8)
            if out_type in NARROW or attr.get("block_size", 0) or attr.get("precision", 0):
                return _quantize(bb, inputs, attr, out_type)
            return tvm_convert(bb, inputs, attr, params)

        return convert


def _dequantize(bb, inputs, attr, x_type: int):
    """y = (x - zero_point) * scale, as ONNX's reference: x - zero_point in float32 (float8 and
    float4 take no zero point), the product in its common type with the scale."""
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis, block = attr.get("axis", 1), attr.get("block_size", 0)
    out = np_dtype(attr["output_dtype"]).name if attr.get("output_dtype") else str(scale.ty.dtype)
    diff = decode(x, x_type, TensorProto.FLOAT) if x_type in NARROW else relax.op.astype(x, "float32")
    if zero_point is not None and x_type not in narrow_types.FLOATS:
        zp_type = input_type(zero_point, attr, 2)
        zp = decode(zero_point, zp_type, TensorProto.FLOAT) if zp_type in NARROW else zero_point
        diff = relax.op.subtract(diff, relax.op.astype(_per_element(bb, zp, x, axis, block), "float32"))
    product = np.result_type(np.float32, np.dtype(str(scale.ty.dtype))).name
    y = relax.op.multiply(relax.op.astype(diff, product),
                          relax.op.astype(_per_element(bb, scale, x, axis, block), product))
    return relax.op.astype(y, out)


@converter("DequantizeLinear")
class DequantizeLinear(OnnxOpConverter):
    """DequantizeLinear; of the narrow types or blocked (block_size) by edgecc, others by TVM's
    converter."""

    computed_outputs = (0,)

    @classmethod
    def get_converter(cls, opset):
        tvm_convert = onnx_frontend.DequantizeLinear.get_converter(opset)

        def convert(bb, inputs, attr, params):
            x_type = input_type(inputs[0], attr, 0)
            if x_type in NARROW or attr.get("block_size", 0):
                return _dequantize(bb, inputs, attr, x_type)
            return tvm_convert(bb, inputs, attr, params)

        return convert

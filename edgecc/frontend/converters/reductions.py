"""The Reduce* ops, on TVM's converters: constant axes, bool ReduceMax/ReduceMin, reductions over an
empty set, and ReduceMax/ReduceMin of infinities."""

from __future__ import annotations

import math

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from edgecc.frontend.converters.common import check_constant_operands, constant
from edgecc.frontend.registry import converter

# What each reduction gives over no elements (onnx's reference: the empty-set node cases).
_EMPTY = {"ReduceSum": 0.0, "ReduceL1": 0.0, "ReduceL2": 0.0, "ReduceSumSquare": 0.0, "ReduceProd": 1.0,
          "ReduceMean": math.nan, "ReduceMax": -math.inf, "ReduceMin": math.inf, "ReduceLogSum": -math.inf,
          "ReduceLogSumExp": -math.inf}


def _reduction(op: str) -> type:
    base = onnx_frontend._get_convert_map()[op]
    reduce_min = onnx_frontend._get_convert_map()["ReduceMin"]

    class Reduction(base):
        computed_outputs = (0,)

        @classmethod
        def get_converter(cls, opset):
            convert, indicator_min = base.get_converter(opset), reduce_min.get_converter(opset)

            def reduce(bb, inputs, attr, params):
                check_constant_operands(op, {1: "axes"}, False, bb, inputs, attr, params)
                x = inputs[0]
                dtype = str(x.ty.dtype)
                axes = _axes(inputs, attr, params, len(x.ty.shape))
                dims = x.ty.shape.values
                if axes and any(getattr(dims[a], "value", None) == 0 for a in axes):
                    return _empty(op, dims, axes, attr.get("keepdims", 1), dtype)
                if dtype == "bool":  # TVM has no lowest or highest bool to start max and min from
                    as_int = relax.op.astype(x, "uint8")
                    return relax.op.astype(convert(bb, [as_int, *inputs[1:]], attr, params), "bool")
                out = convert(bb, inputs, attr, params)
                if op not in ("ReduceMax", "ReduceMin") or not dtype.startswith(("float", "bfloat")):
                    return out
                # TVM reduces max from the dtype's lowest finite value (min from the highest), so a
                # row of -inf came back as -3.4e38: Equal(ReduceMax(bias), -inf), how attention
                # finds its fully masked rows, was silently false and those rows became NaN.
                inf = relax.const(_EMPTY[op], dtype)
                is_inf = bb.normalize(relax.op.astype(relax.op.equal(x, inf), dtype))
                all_inf = indicator_min(bb, [is_inf, *inputs[1:]], attr, params)
                return relax.op.where(relax.op.equal(all_inf, relax.const(1, dtype)), inf, out)

            return reduce

    Reduction.__name__ = Reduction.__qualname__ = op
    return Reduction


def _axes(inputs, attr, params, ndim: int) -> list[int] | None:
    """The reduced axes, non-negative; None when the node reduces nothing (noop_with_empty_axes)."""
    given = attr.get("axes")
    if given is None and len(inputs) > 1 and inputs[1] is not None:
        given = constant(inputs[1], params).tolist()
    if not given:
        return None if attr.get("noop_with_empty_axes", 0) else list(range(ndim))
    return sorted(a + ndim if a < 0 else a for a in given)


def _empty(op: str, dims, axes: list[int], keepdims: int, dtype: str):
    """The reduction of no elements: its identity (or NaN, -inf) in the output's shape."""
    shape = [1 if i in axes else d for i, d in enumerate(dims) if keepdims or i not in axes]
    value = _EMPTY[op]
    if dtype == "bool":
        value = value > 0
    elif not dtype.startswith(("float", "bfloat")):
        info = np.iinfo(dtype)
        value = 0 if math.isnan(value) else int(np.clip(value, info.min, info.max))
    return relax.op.broadcast_to(relax.const(value, dtype), shape)


for _op in _EMPTY:
    converter(_op)(_reduction(_op))

"""Conversions between element types."""

from __future__ import annotations

from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.converters.common import node_name
from edgecc.errors import UserError
from edgecc.lower import converter
from edgecc.verify import UNCOMPILABLE_TYPES


@converter("Cast")
class Cast(OnnxOpConverter):
    """TVM's Cast, except to the element types TVM cannot compile (float8, float4, int4, int2),
    where TVM fails inside code generation or when it copies the tensor."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        from onnx import helper

        if attr["to"] in UNCOMPILABLE_TYPES:
            to = helper.tensor_dtype_to_string(attr["to"]).removeprefix("TensorProto.")
            raise UserError(f"node '{node_name(attr)}': Cast to {to}, which TVM 0.27 cannot compile")
        return onnx_frontend.Cast._impl_v13(bb, inputs, attr, params)

"""edgecc's converters for ONNX Runtime contrib ops that TVM 0.27's importer lacks."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.lower import converter


def _axes(data, axis: int) -> list[int]:
    ndim = len(data.ty.shape)
    axis = axis + ndim if axis < 0 else axis
    return list(range(axis, ndim))


@converter("SimplifiedLayerNormalization", domain="com.microsoft")
@converter("SimplifiedLayerNormalization")  # ORT also accepts it in the default domain
class SimplifiedLayerNormalization(OnnxOpConverter):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * scale (ORT's contrib op, used by Llama exports)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        data, scale = inputs[0], inputs[1]
        out = relax.op.nn.rms_norm(data, scale, _axes(data, attr.get("axis", -1)),
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
        out = relax.op.nn.rms_norm(total, scale, _axes(total, -1), attr.get("epsilon", 1e-5))
        placeholder = relax.const(0, "float32")
        return relax.Tuple([out, placeholder, placeholder, total])


@converter("MatMulInteger")
class MatMulInteger(OnnxOpConverter):
    """int8 x int8 -> int32 with the operands kept int8.

    TVM's own converter widens both operands to int32 before the matmul, and constant folding
    then stores int8 weights as int32: four bytes a weight. `matmul(out_dtype="int32")` widens
    each element inside the kernel instead, so the module keeps the int8 weights.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        zero_points = [z for z in inputs[2:] if z is not None]
        if zero_points:  # asymmetric operands: TVM's converter subtracts them after widening
            from tvm.relax.frontend.onnx import onnx_frontend

            return onnx_frontend.MatMulInteger._impl_v10(bb, inputs, attr, params)
        return relax.op.matmul(inputs[0], inputs[1], out_dtype="int32")

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

"""ONNX's RotaryEmbedding (opset 23)."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter


@converter("RotaryEmbedding")
class RotaryEmbedding(OnnxOpConverter):
    """Rotary position embedding of [batch, heads, seq, head] or [batch, seq, heads * head] input,
    as onnx's reference computes it: the first rotary_embedding_dim features (all by default) are
    rotated in pairs, halves or (interleaved) neighbours, by the cos and sin caches, read at
    position_ids when given ([batch, seq, dim / 2] caches when not); the rest pass through.

    TVM's importer has no RotaryEmbedding converter.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        x, cos, sin, positions = inputs[:4]
        shape = list(bb.normalize(x).ty.shape.values)
        if len(shape) == 3:  # [batch, seq, heads * head] -> [batch, seq, heads, head]
            heads = attr.get("num_heads", 0)
            if not heads:
                raise UserError(f"node '{node_name(attr)}': RotaryEmbedding of 3D input needs num_heads")
            x = relax.op.reshape(x, [shape[0], shape[1], heads, shape[2] // heads])
        head = int(bb.normalize(x).ty.shape.values[-1])
        if positions is not None:
            cos, sin = relax.op.take(cos, positions, axis=0), relax.op.take(sin, positions, axis=0)
        # caches are [batch, seq, dim / 2]: a heads axis where x has one
        cos, sin = (relax.op.expand_dims(c, 2 if len(shape) == 3 else 1) for c in (cos, sin))
        dim = attr.get("rotary_embedding_dim", 0) or head
        half = dim // 2

        def features(begin, end, step=1):
            return relax.op.strided_slice(x, [-1], [begin], [end], [step])

        if attr.get("interleaved", 0):
            x1, x2 = features(0, dim, 2), features(1, dim, 2)
        else:
            x1, x2 = features(0, half), features(half, dim)
        real = relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2))
        imag = relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2))
        if attr.get("interleaved", 0):
            pairs = relax.op.stack([real, imag], axis=-1)
            rotated = relax.op.reshape(pairs, list(bb.normalize(pairs).ty.shape.values[:-2]) + [dim])
        else:
            rotated = relax.op.concat([real, imag], axis=-1)
        out = rotated if dim == head else relax.op.concat([rotated, features(dim, head)], axis=-1)
        return relax.op.reshape(out, shape) if len(shape) == 3 else out

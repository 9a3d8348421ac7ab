"""ONNX's preview FlexAttention (ai.onnx.preview, version 1)."""

from __future__ import annotations

import functools

import numpy as np
from onnx import helper
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.converters.control_flow import run_body
from edgecc.frontend.registry import converter


@converter("FlexAttention", domain="ai.onnx.preview")
class FlexAttention(OnnxOpConverter):
    """Scaled dot-product attention over 4D Q, K, V (grouped KV heads repeated) whose scores and
    probabilities may go through user graphs, score_mod and prob_mod, as onnx's reference computes
    it: Q and K scaled by sqrt(scale) in their dtype, the scores in the softmax precision (float32
    for 16-bit inputs), the mods' nodes imported inline on the scores' tensor.
    """

    computed_outputs = (0,)

    @classmethod
    def get_converter(cls, opset):  # the model's opset, for the mods' nodes
        return functools.partial(super().get_converter(opset), opset=opset)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params, opset):
        q, k, v = inputs[:3]
        dtype = str(bb.normalize(q).ty.dtype)
        q_heads, size = (int(d) for d in bb.normalize(q).ty.shape.values[1::2])
        kv_heads = int(bb.normalize(k).ty.shape.values[1])
        if q_heads != kv_heads:
            k, v = (relax.op.repeat(x, q_heads // kv_heads, axis=1) for x in (k, v))
        root = relax.const(np.sqrt(np.float32(attr.get("scale", 1 / np.sqrt(size)))), dtype)
        scores = relax.op.matmul(relax.op.multiply(q, root),
                                 relax.op.permute_dims(relax.op.multiply(k, root), [0, 1, 3, 2]))
        precision = attr.get("softmax_precision")
        if precision:
            compute = helper.tensor_dtype_to_np_dtype(precision).name
        else:
            compute = "float32" if dtype in ("float16", "bfloat16") else dtype
        scores = relax.op.astype(scores, compute)
        scores = cls._mod(bb, attr, "score_mod", scores, params, opset)
        probs = cls._mod(bb, attr, "prob_mod", relax.op.nn.softmax(scores, axis=-1), params, opset)
        return relax.op.astype(relax.op.matmul(probs, relax.op.astype(v, compute)), dtype)

    @classmethod
    def _mod(cls, bb, attr, name: str, x, params, opset: int):
        graph = attr.get(name)
        if graph is None:
            return x
        if len(graph.input) != 1 or len(graph.output) != 1:
            raise UserError(f"node '{node_name(attr)}': FlexAttention's {name} of {len(graph.input)} inputs "
                            f"and {len(graph.output)} outputs is not lowered (one of each is)")
        dtype = str(bb.normalize(x).ty.dtype)
        out = run_body(bb, graph, {graph.input[0].name: x}, params, opset)[0]
        return relax.op.astype(out, dtype)  # the reference reads the mod's output in that dtype

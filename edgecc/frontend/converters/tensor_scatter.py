"""ONNX's TensorScatter (opset 24): a KV cache update."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter


@converter("TensorScatter")
class TensorScatter(OnnxOpConverter):
    """past_cache with update written along `axis` from write_indices[b] on for each batch row b
    (0 when absent), wrapping around the cache in circular mode, as onnx's reference computes it.

    Written as a gather: cache position p of row b takes update's entry p - write_indices[b]
    (modulo the cache length when circular) where that is in [0, update's length), so the update's
    rows need no scatter.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v24(cls, bb, inputs, attr, params):
        past, update, starts = inputs[:3]
        shape = [int(d) for d in bb.normalize(past).ty.shape.values]
        rank = len(shape)
        axis = attr.get("axis", -2) % rank
        mode = attr.get("mode", b"linear").decode()
        if mode not in ("linear", "circular"):
            raise UserError(f"node '{node_name(attr)}': TensorScatter mode '{mode}' is not lowered")
        if axis == 0:
            raise UserError(f"node '{node_name(attr)}': TensorScatter along the batch axis is not lowered")
        length, written = shape[axis], int(bb.normalize(update).ty.shape.values[axis])
        if starts is None:
            starts = relax.op.zeros([shape[0]], "int64")
        # source[b, p]: the update row that cache row p of batch b takes
        positions = relax.const(np.arange(length).reshape(1, length), "int64")
        starts = relax.op.reshape(relax.op.astype(starts, "int64"), [shape[0], 1])
        source = relax.op.subtract(positions, starts)
        if mode == "circular":
            source = relax.op.floor_mod(source, relax.const(length, "int64"))
        taken = relax.op.logical_and(relax.op.greater_equal(source, relax.const(0, "int64")),
                                     relax.op.less(source, relax.const(written, "int64")))
        source = relax.op.clip(source, 0, written - 1)
        lined_up = [shape[0]] + [length if d == axis else 1 for d in range(1, rank)]
        index = relax.op.broadcast_to(relax.op.reshape(source, lined_up), shape)
        taken = relax.op.reshape(taken, lined_up)
        return relax.op.where(taken, relax.op.gather_elements(update, index, axis), past)

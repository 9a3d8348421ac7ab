"""quantize-embeddings: embedding tables stored int8, one scale per row, dequantized on lookup.

A Gather (axis 0) of token ids from a constant float32 table [V, D] becomes a Gather of int8 rows
and of their scales, multiplied after the lookup:

    e = Cast(Gather(table_q, ids), float) * Gather(scales, ids)[..., None]

with scales = max |row| / 127 and table_q = round(table / scale): the symmetric per-row int8
grid, 8.06 bits a weight for D = 576. Only the looked-up rows are read, so the lookup costs a
few rows of bytes however large the vocabulary is. The ONNX ops are standard: ONNX Runtime runs
the result as the reference, and the lowering fuses cast and scale into the lookup.

Tied LM heads. Exporters often write a tied head as its own initializer, the table transposed,
so a model file holds the table twice. When an int8 head (quantize-int8's MatMulInteger, per
output column scales, no SmoothQuant) holds exactly this table's int8 rows, transposed, with
this table's row scales, the lookup reads the head's weight instead, by column:

    e = Cast(Transpose(Gather(W_q, ids, axis=1)), float) * Gather(head scales, ids)[..., None]

and the artifact stores one int8 copy for both. pack-weights marks that Gather
`int8_columns`, so it reads the head's packed panels (edgecc.kernels.int8.emit_int8_columns)
rather than a second, unpacked copy. Run it after quantize-int8, before pack-weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_matrix, node_name

QMAX = 127
TINY = 1e-12


def _row_quantize(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 rows: (table_q [V, D] int8, scales [V] float32)."""
    scales = (np.maximum(np.abs(table).max(axis=1), TINY) / QMAX).astype(np.float32)
    return np.clip(np.rint(table / scales[:, None]), -QMAX, QMAX).astype(np.int8), scales


def _only_use(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0][0]
    return node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _int8_heads(graph: ir.Graph) -> list[tuple[ir.Value, ir.Value]]:
    """(int8 weight [K, N], its column scales [N]) of each MatMulInteger rescaled as quantize-int8
    writes it: MatMulInteger -> Cast -> Mul(x scale) -> Mul(constant [N])."""
    heads = []
    for node in graph:
        if node.op_type != "MatMulInteger" or len(node.inputs) > 2 or constant_matrix(node.inputs[1], np.int8) is None:
            continue
        cast = _only_use(node.outputs[0], "Cast")
        x_scaled = cast and _only_use(cast.outputs[0], "Mul")
        w_scaled = x_scaled and _only_use(x_scaled.outputs[0], "Mul")
        if w_scaled is None:
            continue
        scale = w_scaled.inputs[1]
        n = node.inputs[1].shape[1] if node.inputs[1].shape else None
        if scale.const_value is not None and scale.const_value.shape == ir.Shape([n]):
            heads.append((node.inputs[1], scale))
    return heads


def _tied_head(table: np.ndarray, scales: np.ndarray, table_q: np.ndarray,
               heads: list[tuple[ir.Value, ir.Value]]) -> tuple[ir.Value, ir.Value] | None:
    """The int8 head whose weight is this table's int8 rows, transposed, at this table's scales."""
    for weight, scale in heads:
        if weight.shape != ir.Shape(table.shape[::-1]):
            continue
        if np.allclose(scale.const_value.numpy(), scales, rtol=1e-6, atol=0) and \
                np.array_equal(weight.const_value.numpy().T, table_q):
            return weight, scale
    return None


@register_pass
class QuantizeEmbeddings(Pass):
    name = "quantize-embeddings"
    description = ("embedding tables (Gather of token ids from a constant float table) stored int8 with a "
                   "scale per row; a tied int8 LM head and the table share one copy")
    options = (
        Option("min_weights", int, 65536, "leave tables with fewer weights in float", low=0),
    )
    provides = ("quantized", "compressed-weights")
    # Relative RMS output error --verify accepts from it: per-row int8 is within 1/254 of each
    # row's largest value; the bound is quantize-int8's.
    drift = 0.4
    needs_shapes = True  # the ids' dtype and rank

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        heads = _int8_heads(graph)
        tables = tied = 0
        float_bytes = int8_bytes = 0
        for node in list(graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0):
                continue
            table = constant_matrix(node.inputs[0])
            ids = node.inputs[1]
            if table is None or table.size < self.opts["min_weights"] or ids.shape is None or ids.dtype is None \
                    or not ids.dtype.is_integer():
                continue
            table_q, scales = _row_quantize(table)
            head = _tied_head(table, scales, table_q, heads)
            prefix = f"{node_name(node)}_q8"
            scale_rows = _initializer(graph, f"{prefix}_row_scales", scales[:, None])
            if head is not None:  # read the head's int8 weight [D, V] by column
                columns = ir.node("Gather", [head[0], ids], {"axis": 1}, name=f"{prefix}_columns")
                perm = [*range(1, ids.shape.rank() + 1), 0]
                rows = ir.node("Transpose", [columns.outputs[0]], {"perm": perm}, name=f"{prefix}_rows")
                looked_up = [columns, rows]
                tied += 1
            else:
                rows = ir.node("Gather", [_initializer(graph, f"{prefix}_table", table_q), ids], name=f"{prefix}_rows")
                looked_up = [rows]
                int8_bytes += table_q.nbytes
            cast = ir.node("Cast", [rows.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{prefix}_cast")
            scale = ir.node("Gather", [scale_rows, ids], name=f"{prefix}_scales")
            out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{prefix}_dequantize")
            graph.insert_before(node, [*looked_up, cast, scale, out])
            out.outputs[0].shape, out.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
            name, source = node.outputs[0].name, node.inputs[0]
            node.outputs[0].replace_all_uses_with(out.outputs[0], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            out.outputs[0].name = name  # a graph output keeps its name
            if not source.uses() and graph.initializers.get(source.name) is source:
                del graph.initializers[source.name]  # the float table, now read by nothing
            tables += 1
            float_bytes += table.nbytes
            int8_bytes += scales.nbytes
        stats = {"tables": tables, "tied_to_int8_head": tied, "float_bytes": float_bytes, "int8_bytes": int8_bytes}
        return PassResult(model, tables > 0, stats)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value

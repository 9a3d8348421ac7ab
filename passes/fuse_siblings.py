"""fuse-siblings: MatMuls that read the same input with constant weights become one.

A transformer layer projects one normalized activation several times: queries, keys and values;
an MLP's gate and up projections. Each is its own kernel call reading the same rows. Here the
weights [K, N_i] of all the MatMuls that share an input are concatenated along N into one
[K, sum N_i] initializer, one MatMul computes every projection, and a Split hands each consumer
its columns. The arithmetic is unchanged (each output column is the same dot product), so the
rewrite is exact; what changes is one wider kernel instead of several narrow ones, and for the
quantization passes after it one shared activation to quantize. Decoding SmolLM2-135M this turns
five projections a layer into two.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import aligned_empty, constant_matrix, node_name


def _weight(node: ir.Node) -> np.ndarray | None:
    """The constant float32 [K, N] weight of a MatMul, if it has one a user cannot override."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    return constant_matrix(node.inputs[1])


def _sibling_groups(model: ir.Model) -> list[list[ir.Node]]:
    """Per input value, the MatMuls reading it with a constant weight of the same K (2 or more)."""
    groups: dict[tuple[int, int], list[ir.Node]] = {}
    for node in model.graph:
        weight = _weight(node)
        if weight is not None and node.inputs[0] is not None:
            groups.setdefault((id(node.inputs[0]), weight.shape[0]), []).append(node)
    return [nodes for nodes in groups.values() if len(nodes) > 1]


@register_pass
class FuseSiblings(Pass):
    name = "fuse-siblings"
    description = "MatMuls sharing an input and a constant weight's K -> one MatMul over the concatenated weights + Split"
    options = (
        Option("min_weights", int, 0, "leave groups whose concatenated weight is smaller in separate MatMuls",
               low=0),
    )
    provides = ("fused-siblings",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        merged = groups = 0
        for nodes in _sibling_groups(model):
            weights = [_weight(n) for n in nodes]
            if sum(w.size for w in weights) < self.opts["min_weights"]:
                continue
            first = nodes[0]
            prefix = f"{node_name(first)}_siblings"
            widths = [w.shape[1] for w in weights]
            joined = aligned_empty((weights[0].shape[0], sum(widths)), np.result_type(*weights))
            np.concatenate(weights, axis=1, out=joined)
            concat = ir.Value(name=f"{prefix}_weight", const_value=ir.tensor(joined))
            sizes = ir.Value(name=f"{prefix}_split", const_value=ir.tensor(np.array(widths, np.int64)))
            for value in (concat, sizes):
                model.graph.register_initializer(value)
            matmul = ir.Node("", "MatMul", [first.inputs[0], concat], name=f"{prefix}_matmul")
            split = ir.Node("", "Split", [matmul.outputs[0], sizes], num_outputs=len(nodes), name=f"{prefix}_split",
                            attributes=[ir.AttrInt64("axis", -1)])
            matmul.outputs[0].dtype = ir.DataType.FLOAT
            model.graph.insert_before(first, [matmul, split])
            for node, out in zip(nodes, split.outputs):
                old = node.outputs[0]
                name, out.shape, out.dtype = old.name, old.shape, ir.DataType.FLOAT
                ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
                model.graph.remove(node, safe=True)
                out.name = name  # a graph output keeps its name
            merged += len(nodes)
            groups += 1
        if groups:
            RemoveUnusedNodesPass()(model)  # the separate weights, now unused
        return PassResult(model, groups > 0, {"groups": groups, "matmuls_merged": merged})

"""host-embedding: mark the integer part of the graph (embedding lookups and index arithmetic) for the host.

The Edge TPU computes int8 tensors only; token ids, their Gather into embedding tables and any
integer arithmetic on inputs cannot run there, and a Gather over a 30k-row table is a memory
lookup, not accelerator work. The host part is every node that reads an integer tensor derived
from an integer graph input; its float outputs that the rest of the graph reads are the boundary.
The graph is left whole (so `model.opt.onnx` still runs on the model's own inputs in ONNX
Runtime); the boundary is recorded in the model's metadata under HOST_OUTPUTS_KEY, and the Edge
TPU backend cuts there: the host part becomes `host.onnx`, run in ONNX Runtime, and the TFLite
model's inputs are the boundary tensors.
"""

from __future__ import annotations

import json
from collections import Counter

import onnx_ir as ir

from edgecc.core.pass_base import Pass, PassContext, PassResult, register_pass
from edgecc.errors import UserError

HOST_OUTPUTS_KEY = "edgecc.host_outputs"


def _is_integer(value: ir.Value) -> bool:
    return value.dtype is not None and (value.dtype.is_integer() or value.dtype == ir.DataType.BOOL)


def host_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Nodes reading an integer tensor that derives from an integer graph input."""
    tainted = {v for v in graph.inputs if _is_integer(v)}
    host = []
    for node in graph:  # topological order
        if any(v in tainted for v in node.inputs if v is not None):
            host.append(node)
            tainted.update(out for out in node.outputs if _is_integer(out))
    return host


@register_pass
class HostEmbedding(Pass):
    name = "host-embedding"
    description = "leave embedding lookups and integer index arithmetic to the host (cut the graph there)"
    provides = ("host-cut",)
    needs_shapes = True  # the walk reads every value's dtype

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        host = host_nodes(graph)
        host_set = set(host)
        boundary: list[ir.Value] = []
        for node in host:
            for out in node.outputs:
                read_on_device = any(user not in host_set for user, _ in out.uses()) or out.is_graph_output()
                if not read_on_device:
                    continue
                if _is_integer(out):
                    raise UserError(
                        f"integer tensor '{out.name}' (from {node.op_type} node '{node.name}') "
                        "is read by the device part of the graph; the Edge TPU computes int8 "
                        "activations only"
                    )
                boundary.append(out)
        names = [v.name for v in boundary]
        previous = model.metadata_props.get(HOST_OUTPUTS_KEY)
        if names:
            model.metadata_props[HOST_OUTPUTS_KEY] = json.dumps(names)
        ops = Counter(n.op_type for n in host)
        stats = {
            "host_nodes": len(host),
            "host_ops": ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())),
            "host_outputs": ", ".join(names),
        }
        return PassResult(model, json.dumps(names) != (previous or "[]"), stats)

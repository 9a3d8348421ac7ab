"""Loop and Scan, which TVM's importer lacks: unrolled, their body's nodes imported once per
iteration into the function being built.

An iteration binds the body's inputs to the current values and converts its nodes with the
importer's converters (edgecc's included); names the body does not define are the enclosing
graph's values. Unrolling needs the number of iterations at compile time: a Scan's is the static
length of its scanned axis, a Loop's its constant trip count (a trip count or condition fed at
run time is refused, naming the graph inputs to fix with --const).
"""

from __future__ import annotations

import functools

import numpy as np
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter, onnx_input

from edgecc.errors import UserError
from edgecc.frontend.converters.common import constant, graph_inputs_feeding, node_name
from edgecc.frontend.registry import converter


def run_body(bb, graph, bound: dict, params, opset: int) -> list:
    """The body's outputs for one iteration, with its inputs bound to `bound` ({name: value})."""
    scope = {**params[0], **{name: bb.normalize(value) for name, value in bound.items()}}
    weights = params[1]
    for init in graph.initializer:
        scope[init.name] = relax.const(numpy_helper.to_array(init))
    convert_map = onnx_frontend._get_convert_map()  # the importer's, as edgecc patched it
    for node in graph.node:
        if node.op_type not in convert_map:  # If: the importer converts it itself, only outside bodies
            raise UserError(f"node '{node.name}': {node.op_type} inside a Loop or Scan body is not lowered")
        # the importer's attribute parsing (it reads nothing of the importer)
        attr = onnx_frontend.ONNXGraphImporter._parse_attr(None, node.attribute)
        attr["tvm_custom"] = {"name": node.name, "num_outputs": len(node.output)}
        inputs = onnx_input([scope[name] if name else None for name in node.input])
        out = convert_map[node.op_type].get_converter(opset)(bb, inputs, attr, [scope, weights])
        if isinstance(out, relax.Expr):
            out = bb.normalize(out)
        if not isinstance(out, relax.Tuple) and isinstance(getattr(out, "ty", None), relax.TupleType):
            out = relax.Tuple([bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out.ty.fields))])
        for i, name in enumerate(node.output):
            scope[name] = out[i] if isinstance(out, relax.Tuple) else out
    return [scope[o.name] for o in graph.output]


def _not_constant(bb, attr, what: str, value) -> UserError:
    names = graph_inputs_feeding(bb, value, integers_only=False)
    # with no graph input behind it, the value is computed from constants the simplifier left
    fix = "".join(f"--const {name}=VALUES " for name in names) + "or make it an initializer" if names \
        else "it is computed from constants that were not folded"
    return UserError(f"node '{node_name(attr)}': Loop with its {what} computed at run time is not lowered "
                     f"(it is unrolled); {'fix it with ' if names else ''}{fix}")


class _Unrolled(OnnxOpConverter):
    """A converter whose implementation is also handed the model's opset (for the body's nodes)."""

    computed_outputs = range(1 << 16)  # every output

    @classmethod
    def get_converter(cls, opset):
        return functools.partial(super().get_converter(opset), opset=opset)


@converter("Loop")
class Loop(_Unrolled):
    """Loop with a constant trip count: its body once per iteration, while the condition (constant
    at each step: given, or computed from constants) holds. Carried values flow from one iteration
    to the next; scan outputs are stacked along a new first axis."""

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params, opset):
        trips, cond, carried = inputs[0], inputs[1], list(inputs[2:])
        body = attr["body"]
        if trips is None:
            raise UserError(f"node '{node_name(attr)}': Loop without a trip count is not lowered (it is unrolled)")
        count = constant(trips, params)
        if count is None:
            raise _not_constant(bb, attr, "trip count", trips)
        scans: list[list] = [[] for _ in body.output[1 + len(carried):]]
        for i in range(int(count)):
            if cond is not None:
                going = constant(cond, params)
                if going is None:
                    raise _not_constant(bb, attr, "condition", cond)
                if not going:
                    break
            names = [v.name for v in body.input]
            values = [relax.const(np.int64(i)), cond if cond is not None else relax.const(True)] + carried
            out = run_body(bb, body, dict(zip(names, values)), params, opset)
            cond, carried = out[0], out[1:1 + len(carried)]
            for scan, value in zip(scans, out[1 + len(carried):]):
                scan.append(value)
        if any(not scan for scan in scans):
            raise UserError(f"node '{node_name(attr)}': Loop of no iteration with scan outputs is not lowered")
        outputs = carried + [relax.op.stack(scan, 0) for scan in scans]
        return outputs[0] if len(outputs) == 1 else relax.Tuple(outputs)


@converter("Scan")
class Scan(_Unrolled):
    """Scan over the static length of its scan inputs' axes, in each input's and output's
    direction; opset 8's form (a batch axis first, sequence_lens) is scanned per batch entry."""

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params, opset):
        return cls._scan(bb, list(inputs), attr, params, opset,
                         attr.get("scan_input_directions"), attr.get("scan_input_axes"))

    @classmethod
    def _impl_v8(cls, bb, inputs, attr, params, opset):
        if inputs[0] is not None:
            raise UserError(f"node '{node_name(attr)}': Scan (opset 8) with sequence_lens is not lowered")
        values = [bb.normalize(v) for v in inputs[1:]]
        batch = values[0].ty.shape.values[0]
        if not isinstance(batch, tvm.tirx.IntImm):
            raise UserError(f"node '{node_name(attr)}': Scan (opset 8) over a batch of symbolic size is not lowered")
        per_entry = []
        for b in range(int(batch)):
            entry = [relax.op.squeeze(relax.op.strided_slice(v, [0], [b], [b + 1]), [0]) for v in values]
            out = cls._scan(bb, entry, attr, params, opset, attr.get("directions"), None)
            per_entry.append(list(out) if isinstance(out, relax.Tuple) else [out])
        outputs = [relax.op.stack(list(values), 0) for values in zip(*per_entry)]
        return outputs[0] if len(outputs) == 1 else relax.Tuple(outputs)

    @classmethod
    def _scan(cls, bb, inputs, attr, params, opset, in_directions, in_axes):
        body, n_scan = attr["body"], attr["num_scan_inputs"]
        states, scanned = inputs[:len(inputs) - n_scan], [bb.normalize(v) for v in inputs[len(inputs) - n_scan:]]
        in_directions = in_directions or [0] * n_scan
        in_axes = [a % v.ty.ndim for a, v in zip(in_axes or [0] * n_scan, scanned)]
        lengths = {v.ty.shape.values[a] for v, a in zip(scanned, in_axes)}
        length = lengths.pop()
        if lengths or not isinstance(length, tvm.tirx.IntImm):
            raise UserError(f"node '{node_name(attr)}': Scan over a sequence of symbolic or unequal lengths "
                            "is not lowered (it is unrolled over a static length)")
        length = int(length)
        n_out = len(body.output) - len(states)
        out_directions = attr.get("scan_output_directions") or [0] * n_out
        out_axes = attr.get("scan_output_axes") or [0] * n_out
        names = [v.name for v in body.input]
        scans: list[list] = [[] for _ in range(n_out)]
        for t in range(length):
            elements = [relax.op.squeeze(relax.op.strided_slice(v, [a], [i], [i + 1]), [a])
                        for v, a, d in zip(scanned, in_axes, in_directions) for i in [length - 1 - t if d else t]]
            out = run_body(bb, body, dict(zip(names, states + elements)), params, opset)
            states = out[:len(states)]
            for scan, value in zip(scans, out[len(states):]):
                scan.append(bb.normalize(value))
        if not length and scans:
            raise UserError(f"node '{node_name(attr)}': Scan over an empty sequence is not lowered")
        stacked = []
        for scan, direction, axis in zip(scans, out_directions, out_axes):
            stacked.append(relax.op.stack(scan[::-1] if direction else scan, axis % (scan[0].ty.ndim + 1)))
        outputs = states + stacked
        return outputs[0] if len(outputs) == 1 else relax.Tuple(outputs)


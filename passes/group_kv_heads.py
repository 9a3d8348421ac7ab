"""group-kv-heads: attention reads each shared key/value head once for its group of query heads.

With grouped-query attention, transformers repeats every key and value head for the query heads
that share it (`repeat_kv`: Unsqueeze, Expand, Reshape to [b, kv * r, s, d]), and torch's
exporters keep that copy. While decoding, it is the whole cache copied r times per layer per
token, and the attention MatMuls then read the copy: for SmolLM2 (3 KV heads, 9 query heads) more
traffic than the attention itself. Here each MatMul that reads such a repeat is given the
un-repeated tensor instead, and the query heads of one group are stacked as rows:

    A [b, kv*r, q, k] -> Reshape [b, kv, r*q, k];  MatMul with X [b, kv, k, n] -> [b, kv, r*q, n]
    -> Reshape [b, kv*r, q, n]

which is the same dot products (head h = g * r + i reads KV head g either way), so the rewrite
is exact. Between the repeat and the MatMul, the layout steps torch's SDPA decomposition emits are
followed: Reshapes that regroup only the leading (batch, head) dims, Transposes that permute only
the trailing dims (K transposed), and multiplications by a scalar constant (the scale).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgecc.pass_base import Pass, PassContext, PassResult, register_pass


def _dims(value: ir.Value) -> list | None:
    """The value's dims as ints and symbolic names; None when its shape or any dim is unknown."""
    if value.shape is None:
        return None
    dims = [d if isinstance(d, int) else d.value for d in value.shape.dims]
    return None if any(d is None for d in dims) else dims


def _int_attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def _repeat(node: ir.Node) -> tuple[ir.Value, int] | None:
    """(X, r) when `node` is Expand(Unsqueeze(X, 2)) repeating X [b, kv, s, d] r times into
    [b, kv, r, s, d] (the Reshape merging kv and r may be folded into later ones)."""
    if node.op_type != "Expand" or node.inputs[0] is None:
        return None
    unsqueeze = node.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.inputs[0] is None:
        return None
    axes = _const(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else _int_attr(unsqueeze, "axes")
    x = unsqueeze.inputs[0]
    xd, ed = _dims(x), _dims(node.outputs[0])
    if axes is None or np.asarray(axes).tolist() not in ([2], 2) or None in (xd, ed) or len(xd) != 4:
        return None
    r = ed[2]
    if not isinstance(r, int) or r < 2 or ed[:2] + ed[3:] != xd or not isinstance(xd[1], int):
        return None
    return x, r


def _to_matmul(value: ir.Value) -> tuple[ir.Node, bool, list] | None:
    """From a repeat [b, kv, r, s, d] to the MatMul reading it as [b, kv * r, ...], its second
    operand: that MatMul, whether (s, d) were swapped on the way, and the scalar (op, constant)
    steps to apply."""
    b, kv, r, *trailing = _dims(value)
    leads = ([b, kv, r], [b, kv * r])  # the dims before (s, d) a Reshape may leave, or all merged
    swapped, scalars = False, []
    while True:
        # A Shape of the repeat reads no data (edgecc's import computes it from the dims).
        users = [n for n in value.consumers() if n.op_type != "Shape"]
        if len(users) != 1 or not users[0].outputs or value.is_graph_output():
            return None  # another reader keeps the copy: nothing to gain
        node = users[0]
        dims = _dims(value)
        if node.op_type == "MatMul" and len(node.inputs) == 2 and node.inputs[1] is value:
            return (node, swapped, scalars) if dims[:-2] == leads[1] else None
        out = _dims(node.outputs[0])
        if out is None:
            return None
        if node.op_type == "Reshape":  # regrouping the dims before (s, d) only
            if out[-2:] != trailing or not (len(out) == 3 or out[:-2] in leads):
                return None
        elif node.op_type == "Transpose":
            k = len(out) - 2
            perm = list(_int_attr(node, "perm", None) or [])
            if perm == list(range(k)) + [k + 1, k]:
                trailing, swapped = trailing[::-1], not swapped
            elif perm != list(range(k + 2)):
                return None
        elif node.op_type in ("Mul", "Div") and out == dims:
            other = [v for v in node.inputs if v is not value]
            c = _const(other[0]) if len(other) == 1 else None
            if c is None or c.size != 1 or (node.op_type == "Div" and node.inputs[0] is not value):
                return None
            scalars.append((node.op_type, other[0]))
        else:
            return None
        value = node.outputs[0]


@register_pass
class GroupKVHeads(Pass):
    name = "group-kv-heads"
    description = "attention MatMuls read repeated KV heads (repeat_kv) once per group: queries grouped as rows"
    requires = ("simplified",)
    provides = ("grouped-kv-heads",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        rewritten = 0
        for node in list(model.graph):
            found = _repeat(node)
            if found is None:
                continue
            x, r = found
            path = _to_matmul(node.outputs[0])
            if path is None:
                continue
            matmul, swapped, scalars = path
            a, out = matmul.inputs[0], matmul.outputs[0]
            ad, od = _dims(a), _dims(out)
            if ad is None or od is None or len(ad) != 4 or ad[1] != _dims(x)[1] * r:
                continue
            prefix = matmul.name or out.name
            kv, heads = _dims(x)[1], ad[1]
            steps: list[ir.Node] = []

            def emit(op: str, inputs, **attrs) -> ir.Value:
                n = ir.Node("", op, inputs, attributes=[ir.AttrInt64s(k, v) for k, v in attrs.items()],
                            name=f"{prefix}_grouped_{len(steps)}")
                steps.append(n)
                return n.outputs[0]

            b = x
            if swapped:
                b = emit("Transpose", [b], perm=[0, 1, 3, 2])
            for op, c in scalars:
                b = emit(op, [b, c])
            rows = ir.Value(name=f"{prefix}_grouped_rows", const_value=ir.tensor(np.array([0, kv, -1, 0], np.int64)))
            back = ir.Value(name=f"{prefix}_grouped_heads", const_value=ir.tensor(np.array([0, heads, -1, 0], np.int64)))
            for value in (rows, back):
                model.graph.register_initializer(value)
            grouped = emit("MatMul", [emit("Reshape", [a, rows]), b])
            result = emit("Reshape", [grouped, back])
            model.graph.insert_before(matmul, steps)
            result.shape, result.dtype = out.shape, out.dtype
            name = out.name
            ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
            model.graph.remove(matmul, safe=True)
            result.name = name
            rewritten += 1
        if rewritten:
            RemoveUnusedNodesPass()(model)  # the repeats and their layout steps, now unused
        return PassResult(model, rewritten > 0, {"matmuls": rewritten})

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

from edgecc.core.pass_base import Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_array, node_name
from edgecc.core.static_values import node_axes


def _dims(value: ir.Value) -> list | None:
    """The value's dims as ints and symbolic names; None when its shape or any dim is unknown."""
    if value.shape is None:
        return None
    dims = [d if isinstance(d, int) else d.value for d in value.shape.dims]
    return None if any(d is None for d in dims) else dims


def _repeat(node: ir.Node) -> tuple[ir.Value, int] | None:
    """(X, r) when `node` is Expand(Unsqueeze(X, 2)) repeating X [b, kv, s, d] r times into
    [b, kv, r, s, d] (the Reshape merging kv and r may be folded into later ones)."""
    if node.op_type != "Expand" or node.inputs[0] is None:
        return None
    unsqueeze = node.inputs[0].producer()
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.inputs[0] is None:
        return None
    axes = node_axes(unsqueeze)
    x = unsqueeze.inputs[0]
    xd, ed = _dims(x), _dims(node.outputs[0])
    if axes != [2] or xd is None or len(xd) != 4 or not isinstance(xd[1], int):
        return None
    if ed is None or not isinstance(ed[2], int):  # TorchScript's target shape is computed at run
        # time, and shape inference names its dims afresh: the Reshape merging kv and r says r
        users = [n for n in node.outputs[0].consumers() if n.op_type != "Shape"]
        merged = _dims(users[0].outputs[0]) if len(users) == 1 and users[0].op_type == "Reshape" else None
        if merged is None or len(merged) != 4 or merged[::2] != xd[::2] or merged[3] != xd[3] \
                or not isinstance(merged[1], int) or merged[1] % xd[1]:
            return None
        ed = [xd[0], xd[1], merged[1] // xd[1], *xd[2:]]
    r = ed[2]
    if not isinstance(r, int) or r < 2 or ed[:2] + ed[3:] != xd:
        return None
    return x, r


def _dim(value: ir.Value, axis: int):
    """Dim `axis` of `value`, looked up through Transposes and scalings where shape inference
    lost it (TorchScript's queries: [unk, unk, q, d] after a Transpose of [b, q, h, d])."""
    while True:
        dim = _dims(value)[axis] if _dims(value) is not None else None
        node = value.producer()
        if isinstance(dim, int) or node is None:
            return dim
        if node.op_type == "Transpose":
            axis = list(node.attributes.get_ints("perm", []))[axis]
        elif node.op_type not in ("Mul", "Div") or constant_array(node.inputs[1]) is None or constant_array(node.inputs[1]).size != 1:
            return dim
        value = node.inputs[0]


def _to_matmul(value: ir.Value, x: ir.Value, r: int) -> tuple[ir.Node, bool, list] | None:
    """From a repeat [b, kv, r, s, d] to the MatMul reading it as [b, kv * r, ...], its second
    operand: that MatMul, whether (s, d) were swapped on the way, and the scalar (op, constant)
    steps to apply."""
    b, kv, s, d = _dims(x)
    trailing = [s, d]
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
            return (node, swapped, scalars) if dims is not None and dims[:-2] == leads[1] else None
        out = _dims(node.outputs[0])
        if out is None:
            return None
        if node.op_type == "Reshape":  # regrouping the dims before (s, d) only
            if out[-2:] != trailing or not (len(out) == 3 or out[:-2] in leads):
                return None
        elif node.op_type == "Transpose":
            k = len(out) - 2
            perm = list(node.attributes.get_ints("perm", []))
            if perm == list(range(k)) + [k + 1, k]:
                trailing, swapped = trailing[::-1], not swapped
            elif perm != list(range(k + 2)):
                return None
        elif node.op_type in ("Mul", "Div") and out == dims:
            other = [v for v in node.inputs if v is not value]
            c = constant_array(other[0]) if len(other) == 1 else None
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
            path = found and _to_matmul(node.outputs[0], *found)
            if not path:
                continue
            (x, r), (matmul, swapped, scalars) = found, path
            a, heads = matmul.inputs[0], _dims(x)[1] * r
            a_heads, out_dims = _dims(a) and _dim(a, 1), _dims(matmul.outputs[0])
            if _dims(a) is None or len(_dims(a)) != 4 or out_dims is None or out_dims[1] != heads \
                    or (a_heads != heads if isinstance(a_heads, int) else a.dtype is None):
                continue
            _rewrite(model, matmul, x, r, swapped, scalars, known_heads=isinstance(a_heads, int))
            rewritten += 1
        if rewritten:
            RemoveUnusedNodesPass()(model)  # the repeats and their layout steps, now unused
        return PassResult(model, rewritten > 0, {"matmuls": rewritten})


def _rewrite(model: ir.Model, matmul: ir.Node, x: ir.Value, r: int, swapped: bool, scalars: list,
             known_heads: bool) -> None:
    """MatMul(A, repeat(X)) -> Reshape(MatMul(Reshape(A, [b, kv, r*q, k]), X'), [b, kv*r, q, n]), X'
    being X with the path's transpose and scalings."""
    prefix = node_name(matmul)
    kv = _dims(x)[1]
    steps: list[ir.Node] = []

    def emit(op: str, inputs, **attrs) -> ir.Value:
        n = ir.Node("", op, inputs, attributes=[ir.AttrInt64s(k, v) for k, v in attrs.items()],
                    name=f"{prefix}_grouped_{len(steps)}")
        steps.append(n)
        return n.outputs[0]

    def constant(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"{prefix}_grouped_{name}", const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        return value

    b = x
    if swapped:
        b = emit("Transpose", [b], perm=[0, 1, 3, 2])
    for op, c in scalars:
        b = emit(op, [b, c])
    a = matmul.inputs[0]
    if not known_heads:
        # Unknown to shape inference, and a 1 would broadcast: adding zeros of [1, heads, 1, 1]
        # makes it kv * r either way (TVM's Expand wants static dims).
        a = emit("Add", [a, constant("zeros", np.zeros((1, kv * r, 1, 1), a.dtype.numpy()))])
    grouped = emit("MatMul", [emit("Reshape", [a, constant("rows", np.array([0, kv, -1, 0], np.int64))]), b])
    result = emit("Reshape", [grouped, constant("heads", np.array([0, kv * r, -1, 0], np.int64))])
    model.graph.insert_before(matmul, steps)
    out = matmul.outputs[0]
    result.shape, result.dtype, name = out.shape, out.dtype, out.name
    ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
    model.graph.remove(matmul, safe=True)
    result.name = name

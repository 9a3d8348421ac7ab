"""The fixed values of shape computations, read off the graph without running it.

Exporters compute shapes with Shape, Gather, Concat and arithmetic on them; a pass that rewrites
a head count or a width must know which elements of such a shape tensor are fixed (computed from
constants and static dims alone) and which depend on sizes known only at run time.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecc.core.pass_helpers import Rejected, constant_array, node_name

MAX_EVAL_DEPTH = 16  # how deep the evaluation of a shape computation may go


def static_value(value: ir.Value | None, depth: int = 0) -> np.ndarray | None:
    """The value of a small (shape) tensor when it is fixed: computed from constants and static
    dims alone. None when it depends on run-time sizes or on ops this evaluator does not know."""
    fixed = constant_array(value)
    if fixed is not None or value is None:
        return fixed
    node = value.producer()
    if node is None or depth > MAX_EVAL_DEPTH:
        return None
    op, ins = node.op_type, node.inputs

    def arg(i: int) -> np.ndarray | None:
        return static_value(ins[i], depth + 1) if i < len(ins) and ins[i] is not None else None

    if op == "Shape":
        dims = shape_result(node)
        return None if dims is None or None in dims else np.array(dims, np.int64)
    source = ins[0].producer() if ins and ins[0] is not None else None
    if op == "Gather" and source is not None and source.op_type == "Shape":
        # Picking the static dims of a shape whose other dims are dynamic: torch's size(i).
        dims, index = shape_result(source), arg(1)
        if dims is None or index is None or node.attributes.get_int("axis", 0) != 0:
            return None
        picked = [dims[i] for i in index.reshape(-1).tolist()]
        return None if None in picked else np.array(picked, np.int64).reshape(index.shape)
    if op == "ConstantOfShape":
        shape, attr = arg(0), node.attributes.get("value")
        fill = attr.value.numpy().reshape(-1)[0] if attr is not None else np.float32(0)
        return None if shape is None else np.full(shape.astype(np.int64), fill)
    if op == "Squeeze" or op == "Unsqueeze":
        x, axes = arg(0), node_axes(node)
        if x is None or (op == "Unsqueeze" and axes is None):
            return None
        if op == "Squeeze":
            return np.squeeze(x, axis=None if axes is None else tuple(axes))
        return np.expand_dims(x, tuple(axes))
    args = [arg(i) for i in range(len(ins))]
    if any(a is None for a in args) or not args:
        return None
    if op in ("Identity", "Cast"):
        to = node.attributes.get_int("to", None)
        return args[0] if to is None else args[0].astype(ir.DataType(to).numpy())
    if op == "Concat":
        return np.concatenate([a.reshape(-1) if a.ndim == 0 else a for a in args],
                              axis=node.attributes.get_int("axis", 0))
    if op == "Gather":
        return np.take(args[0], args[1], axis=node.attributes.get_int("axis", 0))
    if op == "Reshape" and not (args[1] == 0).any():
        return args[0].reshape(args[1])
    if op == "Slice" and args[0].ndim == 1:
        starts, ends = args[1].tolist(), args[2].tolist()
        steps = args[4].tolist() if len(args) > 4 else [1]
        return args[0][slice(starts[0], ends[0], steps[0])] if len(starts) == 1 else None
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal,
              "Max": np.maximum, "Min": np.minimum}
    if op in binary and len(args) == 2:
        return binary[op](args[0], args[1])
    if op == "Div" and len(args) == 2:
        a, b = args
        return np.trunc(a / b).astype(a.dtype) if a.dtype.kind in "iu" else a / b
    if op == "Where":
        return np.where(*args)
    return None


def node_axes(node: ir.Node) -> list[int] | None:
    """The axes of Squeeze, Unsqueeze or a Reduce op: its second input (from opset 13; 18 for most
    reductions) or its attribute."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = static_value(node.inputs[1])
        return None if axes is None else axes.reshape(-1).tolist()
    axes = node.attributes.get_ints("axes", None)
    return None if axes is None else list(axes)


def shape_result(shape_node: ir.Node) -> list[int | None] | None:
    """What a Shape node returns: static dims as ints, dynamic ones as None."""
    shape = shape_node.inputs[0].shape
    if shape is None:
        return None
    start, end = shape_node.attributes.get_int("start", 0), shape_node.attributes.get_int("end", None)
    return [d if isinstance(d, int) else None for d in list(shape)[slice(start, end)]]


def static_dims(value: ir.Value) -> list[int | None]:
    """The value's dims: ints where static, None where symbolic; Rejected if its rank is unknown."""
    if value.shape is None:
        raise Rejected(f"the rank of '{value.name}' is unknown")
    return [d if isinstance(d, int) else None for d in value.shape]


def broadcast_dim(x: int | None, y: int | None) -> int | None:
    """Two dims broadcast together; None where that is unknown."""
    return x if x == y or y == 1 else y if x == 1 else None


@dataclasses.dataclass
class ShapePiece:
    """Part of a shape tensor: a Concat input, or the whole tensor when it is not a Concat."""

    value: ir.Value
    ints: np.ndarray | None  # its fixed values, or None when it is computed at run time
    length: int


def shape_pieces(value: ir.Value) -> list[ShapePiece]:
    """A shape tensor cut where its fixed and run-time parts meet; Rejected when its length is
    unknown or all of it is computed at run time by something other than a Concat."""
    fixed = static_value(value)
    if fixed is not None:
        return [ShapePiece(value, fixed.reshape(-1).astype(np.int64), fixed.size)]
    node = value.producer()
    if node is None or node.op_type != "Concat":
        by = f"{node.op_type} '{node_name(node)}'" if node is not None else "a graph input"
        raise Rejected(f"shape '{value.name}' is computed at run time by {by}")
    pieces = []
    for piece in node.inputs:
        fixed = static_value(piece)
        if fixed is not None:
            pieces.append(ShapePiece(piece, fixed.reshape(-1).astype(np.int64), fixed.size))
            continue
        shape = piece.shape
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            raise Rejected(f"shape '{value.name}': the length of its piece '{piece.name}' is unknown")
        pieces.append(ShapePiece(piece, None, shape[0]))
    return pieces


def shape_elements(value: ir.Value) -> list[int | None]:
    """A shape tensor's elements: ints where fixed, None where computed at run time."""
    out: list[int | None] = []
    for p in shape_pieces(value):
        out += p.ints.tolist() if p.ints is not None else [None] * p.length
    return out


def dims_read(shape_node: ir.Node, rank: int) -> set[int]:
    """Which dims of its input a Shape node's result is used for: those its users pick with a
    constant Gather or Slice, or every dim it returns when a user takes the whole shape."""
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", rank)
    start, end = (min(max(i + rank if i < 0 else i, 0), rank) for i in (start, end))
    returned = list(range(start, end))
    shape = shape_node.outputs[0]
    read: set[int] = set()
    for user in shape.consumers():
        args = [static_value(v) if v is not None else None for v in user.inputs[1:]]
        if user.inputs[0] is not shape or any(a is None for a in args):
            return set(returned)
        if user.op_type == "Gather" and user.attributes.get_int("axis", 0) == 0:
            read |= {returned[i] for i in args[0].reshape(-1).tolist()}
        elif (user.op_type == "Slice" and len(args[0]) == 1
              and (len(args) < 3 or args[2].reshape(-1).tolist() in ([0], [-1]))):
            step = args[3].item() if len(args) > 3 else 1
            read |= set(returned[slice(args[0].item(), args[1].item(), step)])
        else:
            return set(returned)
    return read

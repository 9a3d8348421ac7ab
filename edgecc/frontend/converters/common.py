"""Helpers shared by edgecc's converters."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend

from edgecc.errors import UserError


def axes_from(data, axis: int) -> list[int]:
    """The axes from `axis` (negative counts from the end) to the last of `data`."""
    ndim = len(data.ty.shape)
    axis = axis + ndim if axis < 0 else axis
    return list(range(axis, ndim))


def node_name(attr) -> str:
    """The converted node's name, for refusals."""
    return attr["tvm_custom"]["name"] or "<unnamed>"


def constant(value, params):
    """The value of a constant input as a numpy array; None when it is not a constant."""
    value = onnx_frontend.get_constant(value, params)
    return value.value.numpy() if isinstance(value, tvm.ir.GenericConst) else None


def graph_inputs_feeding(bb, expr, integers_only: bool = True) -> list[str]:
    """The graph inputs (integer ones, unless `integers_only` is off) whose values a value computed
    in the function being built depends on, by name (an input whose shape alone is read, through
    shape_of, is not one)."""
    seen, names, todo = set(), set(), [expr]
    while todo:
        for var in relax.analysis.free_vars(todo.pop()):
            if var.name in seen:
                continue
            seen.add(var.name)
            bound = bb.lookup_binding(var)
            if bound is None:  # a parameter of the function: a graph input
                if not integers_only or (isinstance(var.ty, relax.TensorType)
                                         and str(var.ty.dtype).startswith(("int", "uint"))):
                    names.add(var.name)
            elif not (isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.shape_of"):
                todo.append(bound)
    return sorted(names)


def checked(op: str, check) -> type:
    """TVM's converter for `op`, with `check(bb, inputs, attr, params)` run first: it raises a
    UserError naming the node for a form the converter cannot lower."""
    base = onnx_frontend._get_convert_map()[op]

    class Checked(base):
        computed_outputs = range(1 << 16)  # every output: TVM's converter computes them all

        @classmethod
        def get_converter(cls, opset):
            convert = base.get_converter(opset)

            def checked_convert(bb, inputs, attr, params):
                check(bb, inputs, attr, params)
                return convert(bb, inputs, attr, params)

            return checked_convert

    Checked.__name__ = Checked.__qualname__ = op
    return Checked


def constant_operands(op: str, operands: dict[int, str], computed_ok: bool = False) -> type:
    """TVM's converter for `op`, with the inputs `operands` names ({index: what}) required to be
    constants: one fed or computed at run time is refused in one line naming the node, the input
    and, where it comes from graph inputs, the --const that fixes them (edgecc.core.fixed_inputs).
    With `computed_ok`, a value computed from shapes passes (TVM's converter takes it)."""
    return checked(op, lambda bb, inputs, attr, params: check_constant_operands(
        op, operands, computed_ok, bb, inputs, attr, params))


def check_constant_operands(op: str, operands: dict[int, str], computed_ok: bool, bb, inputs, attr,
                            params) -> list:
    """Refuse, as `constant_operands` says, the node whose `operands` are not constants; else their
    values in the order `operands` names them (None where absent, or computed and `computed_ok`)."""
    values = []
    for i, what in operands.items():
        value = inputs[i] if i < len(inputs) else None
        known = None if value is None else constant(value, params)
        values.append(known)
        if value is None or known is not None:
            continue
        given = isinstance(value, relax.Var) and not isinstance(value, relax.DataflowVar)
        if not given and computed_ok:
            continue
        sources = [value.name] if given else graph_inputs_feeding(bb, value)
        source = f"graph input '{value.name}'" if given else "a value computed at run time"
        fix = "".join(f"--const {name}=VALUES " for name in sources)
        raise UserError(f"node '{node_name(attr)}': {op}'s {what} (input {i}) is {source}; edgecc "
                        f"compiles {op} only with constant {what} (fix it with {fix}or make it an "
                        "initializer)")
    return values

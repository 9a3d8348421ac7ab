"""Shape arithmetic of symbolic dims, computed while importing: constants or symbolic dims only.

Torch exports compute shapes at run time. Positions are `Range(0, Gather(Shape(ids), 1))`, a
view is `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1, 64]))`, the attention mask is
built from `past + seq`, `Max(total, window)`, `Equal(shape, -1)` and `Where`. TVM's importer
folds some of these into ShapeExpr and PrimExpr values and hands the rest to tensor ops that
reject them, or turns them into run-time tensors whose shape it no longer knows.

Here every integer value that such arithmetic produces is known as an array of TIR integer
expressions over the model's symbolic dims (`ShapeValues`): a shape op whose inputs all have
such values (Shape, Gather, Slice, Concat, Unsqueeze, Reshape, Add, Max, Equal, Where, Cast, ...)
computes its result at import time. The importer itself is handed an int64 tensor built from
those expressions, so tensor ops that read a shape value see an ordinary tensor; the ops that
consume a shape (Reshape, Expand, ConstantOfShape, Range, Tile, Slice) are handed the
value itself, as a constant, a PrimExpr or a ShapeExpr, so their outputs keep symbolic shapes.
Anything else goes to the converter the importer would have used.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import onnx
import tvm
from tvm import relax, tirx

from edgecc.core import lm_signature
from edgecc.errors import UserError
from edgecc.frontend.converters.common import graph_inputs_feeding

# Above this many elements an integer constant is data, not a shape.
_MAX_ELEMENTS = 64


def _cmp(fn):
    return fn, "bool"


_ELEMENTWISE: dict[str, tuple[Callable, str | None]] = {
    "Add": (lambda a, b: a + b, None),
    "Sub": (lambda a, b: a - b, None),
    "Mul": (lambda a, b: a * b, None),
    "Div": (tirx.truncdiv, None),   # ONNX integer Div truncates
    "Mod": (tirx.floormod, None),   # fmod=0: the sign of the divisor
    "Max": (tirx.max, None),
    "Min": (tirx.min, None),
    "Equal": _cmp(lambda a, b: a == b),
    "Less": _cmp(lambda a, b: a < b),
    "LessOrEqual": _cmp(lambda a, b: a <= b),
    "Greater": _cmp(lambda a, b: a > b),
    "GreaterOrEqual": _cmp(lambda a, b: a >= b),
    "And": _cmp(tirx.And),
    "Or": _cmp(tirx.Or),
}

# op -> the input positions that are shapes, sizes or bounds: handed over as values, not tensors.
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4), "Unsqueeze": (1,), "Squeeze": (1,),
}

_SHAPE_OPS = {*_ELEMENTWISE, "Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze",
              "Reshape", "Where", "Cast", "Neg", "Not", "Identity"}

WRAPPED_OPS = _SHAPE_OPS | set(SHAPE_OPERANDS)


class Value:
    """An integer or boolean array whose elements are TIR expressions (IntImm when known)."""

    def __init__(self, elements: np.ndarray, dtype: str):
        self.elements, self.dtype = elements, dtype

    @property
    def constant(self) -> np.ndarray | None:
        if all(isinstance(e, tirx.IntImm) for e in self.elements.flat):
            return np.array([int(e) for e in self.elements.flat], self.dtype).reshape(self.elements.shape)
        return None


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _int64(expr):
    return expr if _dtype(expr) == "int64" else tirx.Cast("int64", expr)


def _map(fn, *arrays) -> np.ndarray:
    """`fn` element by element over broadcast object arrays; a 0-d result stays an array."""
    return _array(np.frompyfunc(fn, len(arrays), 1)(*np.broadcast_arrays(*arrays)))


def _array(result) -> np.ndarray:
    """numpy hands back a lone element for a 0-d object result: make it an array again."""
    if isinstance(result, np.ndarray):
        return result
    out = np.empty((), dtype=object)
    out[()] = result
    return out


def _elements(values, dtype: str, shape=None) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [tirx.const(int(v), dtype) if isinstance(v, (int, np.integer, bool, np.bool_)) else v
              for v in values]
    return out.reshape(shape if shape is not None else (len(values),))


class ShapeValues:
    """The converters of one import: the values of the shape arithmetic seen so far."""

    def __init__(self):
        self._known: dict[relax.Expr, Value] = {}  # TVM objects hash and compare by identity
        self._analyzer = tvm.sym.Analyzer()
        self._bounded: set = set()

    def wrap(self, op_type: str, original) -> "_Wrapped":
        return _Wrapped(self, op_type, original)

    # -- values in and out of the importer -------------------------------------------------
    def value_of(self, expr) -> Value | None:
        """The integer value of an importer expression, when it is a shape value or a constant."""
        if expr is None:
            return None
        if expr in self._known:
            return self._known[expr]
        if isinstance(expr, tvm.ir.GenericConst):  # weights are not read: dtype and size first
            size = math.prod(int(d) for d in expr.ty.shape.values)
            if not str(expr.ty.dtype).startswith(("int", "uint", "bool")) or size > _MAX_ELEMENTS:
                return None
            array = expr.value.numpy()
            return Value(_elements(array.ravel().tolist(), str(array.dtype), array.shape), str(array.dtype))
        if isinstance(expr, relax.ShapeExpr):
            return Value(_elements(list(expr.values), "int64"), "int64")
        if tvm.ir.is_prim_expr(expr):  # a dim, as TVM's Gather of a ShapeExpr returns it
            return Value(_elements([expr], _dtype(expr), ()), _dtype(expr))
        return None

    def dims_of(self, expr) -> list | None:
        """The dims of a tensor whose rank Relax knows, each dim a TIR expression."""
        shape = getattr(expr.ty, "shape", None)
        if not isinstance(shape, relax.ShapeExpr):
            return None
        for dim in shape.values:  # dims are sizes: tell the analyzer they are never negative
            for var in tvm.tirx.analysis.undefined_vars(dim):
                if var not in self._bounded:
                    self._bounded.add(var)
                    self._analyzer.update(var, tvm.sym.ConstIntBound(0, tvm.sym.ConstIntBound.POS_INF))
        return list(shape.values)

    def tensor(self, bb, value: Value):
        """The importer's view of a value: a constant, or an int64 tensor built from its dims."""
        constant = value.constant
        if constant is not None:
            return relax.const(constant, value.dtype)
        flat = [_int64(e) for e in value.elements.flat]
        out = bb.normalize(relax.op.shape_to_tensor(relax.ShapeExpr(flat)))
        if value.dtype != "int64":
            out = bb.normalize(relax.op.astype(out, value.dtype))
        if value.elements.ndim != 1:
            out = bb.normalize(relax.op.reshape(out, list(value.elements.shape)))
        self._known[out] = value
        return out

    def operand(self, value: Value):
        """A shape operand as the consuming converter wants it: constant, PrimExpr or ShapeExpr."""
        constant = value.constant
        if constant is not None:
            return relax.const(constant, value.dtype)
        flat = [_int64(e) for e in value.elements.flat]
        return flat[0] if value.elements.ndim == 0 else relax.ShapeExpr(flat)

    def quotient(self, dims: list, known: list):
        """prod(dims) / prod(known), the factors they share cancelled first: the simplifier alone
        leaves `b * (p + s) * 64 // (p * 16 + s * 16)`, a shape no kernel compiles."""
        dims, divisor = list(dims), []
        for k in known:
            same = next((i for i, d in enumerate(dims) if self._analyzer.can_prove(d == k)), None)
            if same is None:
                divisor.append(k)
            else:
                dims.pop(same)
        return self._analyzer.simplify(tirx.floordiv(math.prod(dims, start=tirx.const(1, "int64")),
                                                     math.prod(divisor, start=tirx.const(1, "int64"))))

    def align(self, bb, args: list) -> list | None:
        """The operands of a broadcasting op with the dims Relax cannot prove equal made equal.

        ONNX broadcasts a dim only from 1: two other dims must be equal at run time. A sliding-
        window layer's scores are [.., min(window_past, 7) + seq] (its cache sliced to the
        window), its mask [.., window_past + seq]: equal for every cache the graph accepts, but
        Relax cannot know, and the sum's shape is lost. Each operand is cast to the first
        operand's dim there (a run-time check); None when no operand needs it.
        """
        proves = self._analyzer.can_prove
        shapes = [self.dims_of(a) if isinstance(getattr(a, "ty", None), relax.TensorType) else None
                  for a in args]
        rank = max((len(s) for s in shapes if s is not None), default=0)
        target: list = [None] * rank
        for s in shapes:
            for axis, dim in enumerate(s or [], start=rank - len(s or [])):
                if target[axis] is None and not proves(dim == 1):
                    target[axis] = dim
        aligned, changed = list(args), False
        for i, s in enumerate(shapes):
            if s is None:
                continue
            want = [d if target[a] is None or proves(d == 1) or proves(d == target[a])
                    else target[a] for a, d in enumerate(s, start=rank - len(s))]
            if any(not w.same_as(d) for w, d in zip(want, s)):
                aligned[i] = bb.match_cast(args[i], relax.TensorType(want, args[i].ty.dtype))
                changed = True
        return aligned if changed else None

    def simplify(self, elements: np.ndarray) -> np.ndarray:
        out = np.empty(elements.shape, dtype=object)
        for i, e in np.ndenumerate(elements):
            out[i] = self._analyzer.simplify(e)
        return out


class _Wrapped:
    """An op's converter in the importer's map, with shape values computed before it is called."""

    def __init__(self, values: ShapeValues, op_type: str, original):
        self.values, self.op_type, self.original = values, op_type, original

    def get_converter(self, opset: int):
        return functools.partial(self._convert, self.original.get_converter(opset))

    def _convert(self, fallback, bb, inputs, attr, params):
        values = self.values
        node = attr["tvm_custom"]["name"] or "<unnamed>"
        if self.op_type in _SHAPE_OPS:
            result = _evaluate(values, self.op_type, inputs, attr)
            if result is not None:
                result.elements = values.simplify(result.elements)
                return values.tensor(bb, result)
        operands = SHAPE_OPERANDS.get(self.op_type, ())
        args = list(inputs)
        for i, x in enumerate(inputs):
            value = values.value_of(x)
            if value is None:
                computed = x is not None and not isinstance(x, tvm.ir.GenericConst)
                if computed and i in operands and self.op_type in _NEEDS_SHAPE:
                    given = isinstance(x, relax.Var) and not isinstance(x, relax.DataflowVar)
                    sources = [x.name] if given else graph_inputs_feeding(bb, x)
                    fix = f" (fix it with {' '.join(f'--const {n}=VALUES' for n in sources)})" if sources else ""
                    raise UserError(f"node '{node}': {self.op_type} input {i} ({_NEEDS_SHAPE[self.op_type]}) "
                                    "depends on tensor data, not only on shapes; edgecc needs it constant "
                                    f"or computed from the symbolic dims{fix}")
                continue
            if i in operands:
                args[i] = values.operand(value)
            elif isinstance(x, relax.ShapeExpr) or tvm.ir.is_prim_expr(x):
                args[i] = values.tensor(bb, value)
        if self.op_type == "Reshape" and isinstance(args[1], relax.ShapeExpr):
            return _reshape_tensor(values, args[0], values.value_of(args[1]), attr)
        convert = functools.partial(fallback, bb, attr=attr, params=params)
        out = convert(tvm.relax.frontend.onnx.onnx_frontend.onnx_input(args))
        if self.op_type in _BROADCASTS and values.dims_of(bb.normalize(out)) is None:
            aligned = values.align(bb, args)
            if aligned is not None:
                return convert(tvm.relax.frontend.onnx.onnx_frontend.onnx_input(aligned))
        return out


_BROADCASTS = {*_ELEMENTWISE, "Pow", "Where"}

# The operands whose value must be known at import time, and what to call them in an error: fed
# a run-time tensor, TVM's converters fail (Reshape, ConstantOfShape) or compute wrong values
# (Expand: onnx's test_expand_dim_changed). Range and Tile handle one: their outputs get a dim of
# their own.
_NEEDS_SHAPE = {"Reshape": "target shape", "Expand": "target shape", "ConstantOfShape": "shape"}


def _evaluate(values: ShapeValues, op: str, inputs, attr) -> Value | None:
    """`op` on shape values, or None when an input is not one (or the op needs a tensor)."""
    if op in ("Shape", "Size"):
        dims = values.dims_of(inputs[0])
        if dims is None:
            return None
        if op == "Size":
            return Value(_elements([math.prod(dims) if dims else 1], "int64", ()), "int64")
        start, end = attr.get("start", 0), attr.get("end", len(dims))
        return Value(_elements(dims[slice(start, end)], "int64"), "int64")
    args = [values.value_of(x) for x in inputs]
    present = [a for a in args if a is not None]
    if len(present) != sum(x is not None for x in inputs) or not present:
        return None
    first = args[0]
    if op in _ELEMENTWISE:
        fn, out_dtype = _ELEMENTWISE[op]
        result = functools.reduce(lambda a, b: _map(fn, a, b), [a.elements for a in present])
        return Value(result, out_dtype or first.dtype)
    if op == "Neg":
        return Value(_map(lambda e: -e, first.elements), first.dtype)
    if op == "Not":
        return Value(_map(tirx.Not, first.elements), "bool")
    if op == "Identity":
        return first
    if op == "Cast":
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(attr["to"]))
        if dtype == "bool":
            return Value(_map(lambda e: e != tirx.const(0, _dtype(e)), first.elements), dtype)
        if not np.issubdtype(np.dtype(dtype), np.integer):
            return None  # a float computed from shapes: a run-time tensor
        return Value(_map(lambda e: tirx.Cast(dtype, e), first.elements), dtype)
    if op == "Where":
        return Value(_map(tirx.Select, *(a.elements for a in args)), args[1].dtype)
    if op == "Gather":
        indices = args[1].constant
        if indices is None:
            return None
        axis = attr.get("axis", 0)
        size = first.elements.shape[axis]
        taken = np.take(first.elements, np.where(indices < 0, indices + size, indices), axis=axis)
        return Value(_array(taken), first.dtype)
    if op == "Concat":
        return Value(np.concatenate([a.elements for a in args], axis=attr["axis"]), first.dtype)
    if op in ("Unsqueeze", "Squeeze"):
        given = args[1].constant if len(args) > 1 and args[1] is not None else np.array(attr.get("axes", []))
        if given is None:
            return None
        axes = given.tolist()
        if op == "Unsqueeze":
            rank = first.elements.ndim + len(axes)
            return Value(np.expand_dims(first.elements, tuple(sorted(a % rank for a in axes))), first.dtype)
        squeezed = tuple(a % first.elements.ndim for a in axes) if axes else None
        return Value(np.squeeze(first.elements, squeezed), first.dtype)
    if op == "Reshape":
        shape = args[1].constant
        if shape is None:
            return None
        if not attr.get("allowzero", 0):
            shape = [first.elements.shape[i] if d == 0 else d for i, d in enumerate(shape.tolist())]
        return Value(first.elements.reshape(shape), first.dtype)
    if op == "Slice":
        return _slice(args)
    return None


def _slice(args: list[Value | None]) -> Value | None:
    data = args[0].elements
    given = (args[1:] + [None, None])[:4]
    params = [a.constant if a is not None else None for a in given]
    if any(p is None for a, p in zip(given, params) if a is not None):
        return None
    starts, ends = params[0], params[1]
    axes = params[2].tolist() if params[2] is not None else list(range(len(starts)))
    steps = params[3].tolist() if params[3] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        index[axis % data.ndim] = slice(start, end, step)
    return Value(data[tuple(index)], args[0].dtype)


def _reshape_tensor(values: ShapeValues, data, shape: Value, attr):
    """Reshape of a tensor to a symbolic shape: ONNX's 0 (copy a dim) and -1 (the rest) resolved
    here, since Relax's reshape takes neither inside a ShapeExpr."""
    dims = values.dims_of(data)
    target = list(shape.elements.flat)
    if dims is None:
        raise UserError(f"node '{attr['tvm_custom']['name']}': Reshape to a computed shape of a "
                        "tensor whose shape is unknown")
    if not attr.get("allowzero", 0):
        target = [dims[i] if isinstance(d, tirx.IntImm) and int(d) == 0 else d for i, d in enumerate(target)]
    rest = [i for i, d in enumerate(target) if isinstance(d, tirx.IntImm) and int(d) == -1]
    if rest:
        target[rest[0]] = values.quotient(dims, [d for i, d in enumerate(target) if i != rest[0]])
    target = values.simplify(np.array([_int64(d) for d in target], dtype=object))
    return relax.op.reshape(data, relax.ShapeExpr(list(target)))


def lm_input_shapes(model: onnx.ModelProto) -> dict[str, list] | None:
    """The input shapes of a causal LM in one set of dims: batch, seq, past, and the mask past + seq.

    Exporters name every input's dims independently (the dynamo exporter: `s59` for one layer's
    past, `s5` for the next one's, `s53` for the mask), so nothing tells Relax that a layer's
    scores [.., seq, s5 + seq] and the mask [.., seq, s53] broadcast, and every shape after them
    is lost. An LM's full-attention caches all grow by the same steps, and the mask covers their
    past and the new tokens: these dims are one. A sliding-window layer's cache (its present is a
    Slice of the grown cache: the last window - 1 tokens) is shorter once the prompt outgrows the
    window; those caches share a dim of their own. Each dim keeps the name the token ids' or the
    first cache's input gives it. None for a model that is not an LM (lm_signature decides).
    """
    sig = lm_signature.find(model)
    if sig is None:
        return None
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    sliding = {e.past: producer.get(e.present) == "Slice" for e in sig.cache}
    inputs = {vi.name: vi.type.tensor_type.shape.dim for vi in model.graph.input}

    def dim(name: str, axis: int, default: str):
        """The input's dim there, static or a variable named as the model names it (what --shape
        binds), the default name where it has none."""
        d = inputs[name][axis]
        return d.dim_value if d.HasField("dim_value") else tirx.Var(d.dim_param or default, "int64")

    batch, seq = dim(sig.ids.name, 0, "batch"), dim(sig.ids.name, 1, "seq")
    full = [e for e in sig.cache if not sliding[e.past]]
    windowed = [e for e in sig.cache if sliding[e.past]]
    past = dim(full[0].past, full[0].seq_axis, "past") if full else None
    window_past = dim(windowed[0].past, windowed[0].seq_axis, "window_past") if windowed else None
    if full and windowed and str(window_past) == str(past):  # TorchScript's export names both lengths alike
        window_past = tirx.Var(f"{past}_window", "int64")
    roles: dict[str, dict] = {sig.ids.name: {0: batch, 1: seq}}
    if sig.positions:
        roles[sig.positions.name] = {0: batch, 1: seq}
    for entry in sig.cache:
        roles[entry.past] = {entry.seq_axis: window_past if sliding[entry.past] else past,
                             **({entry.batch_axis: batch} if entry.batch_axis is not None else {})}
    if sig.mask:  # with sliding-window layers only, the mask's length is its own
        roles[sig.mask.name] = {0: batch, **({1: past + seq} if full else {})}
    others: dict[str, tirx.Var] = {}  # any other symbolic dim: one variable per name
    shapes = {}
    for name, role in roles.items():
        shapes[name] = [d.dim_value if d.HasField("dim_value") else role[axis] if axis in role
                        else others.setdefault(d.dim_param, tirx.Var(d.dim_param, "int64"))
                        for axis, d in enumerate(inputs[name])]
    return shapes

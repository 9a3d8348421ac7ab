"""Element types TVM 0.27 cannot compile: float8 (E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ, E8M0),
float4 (E2M1) and the 4- and 2-bit integers.

TVM holds no int4 tensor and compiles no cast to float4, and its float8 casts neither saturate nor
know the FNUZ ranges. So the lowered module carries a tensor of such a type as its raw bits, one
uint8 per element (ml_dtypes' arrays of these types have itemsize 1: `a.view(np.uint8)` is free),
and edgecc computes the conversions itself, as ONNX's reference does them (ml_dtypes): decoding
looks each code up in a table made by the reference's own cast; encoding rounds to nearest even
with integer arithmetic on the float's bits.

`to_storage` retypes a model before it is imported: inputs, outputs, initializers and constants of
these types become uint8, and the Cast, CastLike, QuantizeLinear and DequantizeLinear nodes that
read such a tensor record their inputs' true element types (TYPES_ATTR) for their converters.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, te, tirx

from edgecc.errors import UserError

# The attribute in which to_storage records the ONNX element type of each input of a node (0: unknown).
TYPES_ATTR = "edgecc_input_types"


@dataclasses.dataclass(frozen=True)
class _Float:
    """A small float format, by the codes ml_dtypes gives it."""

    mantissa: int  # mantissa bits
    min_exp: int  # exponent of the smallest normal value
    max_code: int  # code of the largest finite magnitude
    sign: int  # the sign bit
    inf: int | None  # code of +inf, where there is one
    nan: int | None  # code of +NaN, where there is one
    unsigned_zero: bool  # FNUZ: no -0 (its code is NaN), NaN has no sign


_FLOATS = {
    TensorProto.FLOAT8E4M3FN: _Float(3, -6, 0x7E, 0x80, None, 0x7F, False),
    TensorProto.FLOAT8E4M3FNUZ: _Float(3, -7, 0x7F, 0x80, None, 0x80, True),
    TensorProto.FLOAT8E5M2: _Float(2, -14, 0x7B, 0x80, 0x7C, 0x7E, False),
    TensorProto.FLOAT8E5M2FNUZ: _Float(2, -15, 0x7F, 0x80, None, 0x80, True),
    TensorProto.FLOAT4E2M1: _Float(1, 0, 0x7, 0x8, None, None, False),
}
_INTS = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15), TensorProto.INT2: (-2, 1),
         TensorProto.UINT2: (0, 3)}
NARROW = frozenset({*_FLOATS, *_INTS, TensorProto.FLOAT8E8M0})
FLOATS = frozenset(_FLOATS)  # the float8 and float4 types that quantize (E8M0 is a scale's)
# The integers QuantizeLinear saturates to: ranges by type.
INTEGER_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
                  TensorProto.INT16: (-32768, 32767), **_INTS}
_CODE_BITS = {TensorProto.FLOAT4E2M1: 4, TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT2: 2,
              TensorProto.UINT2: 2}  # the others: 8

# The inputs of each op whose element type can be one of NARROW.
_TYPED_INPUTS = {"Cast": (0,), "CastLike": (0, 1), "QuantizeLinear": (2,), "DequantizeLinear": (0, 2)}


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def type_name(elem_type: int) -> str:
    return helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.")


def input_type(x, attr, i: int) -> int:
    """The ONNX element type of input `i`: as to_storage recorded it, else its Relax dtype's."""
    recorded = attr.get(TYPES_ATTR)
    if recorded and recorded[i]:
        return recorded[i]
    return helper.np_dtype_to_tensor_dtype(np.dtype(str(x.ty.dtype)))


# --- decoding: a table of every code -------------------------------------------------------------

def decode(x, source: int, to: int, saturate: bool = True, round_mode: str = "up"):
    """Codes of `source` (uint8) cast to `to` (its codes, where `to` is narrow too), by a table of
    every code made with ONNX's reference cast."""
    from onnx.reference.ops.op_cast import cast_to

    codes = np.arange(1 << _CODE_BITS.get(source, 8), dtype=np.uint8).view(np_dtype(source))
    with np.errstate(invalid="ignore"):  # NaN to an integer: what the reference gives, it gives
        table = cast_to(codes, to, saturate, round_mode)
    table = table.view(np.uint8) if to in NARROW else table
    return relax.op.take(relax.const(table), relax.op.astype(x, "int32"), axis=0)


# --- encoding: arithmetic on the bits ------------------------------------------------------------

# The bits of float32 and float64: (unsigned type, mantissa bits, exponent bias).
_BITS = {"float32": ("uint32", 23, 127), "float64": ("uint64", 52, 1023)}


def _encode_float(x, fmt: _Float, saturate: bool, largest: float):
    """The code of `fmt` nearest to x (float32 or float64; ties to even), as ml_dtypes rounds it."""
    dtype = str(x.ty)
    unsigned, mantissa, bias = _BITS[dtype]
    bits = tirx.reinterpret(unsigned, x)
    negative = (bits >> (int(unsigned[4:]) - 1)) != tirx.const(0, unsigned)
    # Saturation clips to the largest value (float4, with neither inf nor NaN, always saturates);
    # otherwise twice it still overflows, and stays finite.
    saturates = saturate or (fmt.inf is None and fmt.nan is None)
    limit = tirx.const(largest if saturates else 2 * largest, dtype)
    a = tirx.Select(tirx.isnan(x), tirx.const(0, dtype), tirx.min(tirx.abs(x), limit))
    exp = tirx.max(tirx.Cast("int32", tirx.reinterpret(unsigned, a) >> mantissa) - bias, fmt.min_exp)
    # a / 2^(exp - fmt.mantissa) is exact; its nearest integer is the code above exp's first.
    scale = tirx.reinterpret(dtype, tirx.Cast(unsigned, fmt.mantissa - exp + bias) << mantissa)
    steps = tirx.Cast("int32", tirx.nearbyint(a * scale))
    magnitude = ((exp - fmt.min_exp) << fmt.mantissa) + steps
    overflow = fmt.inf if fmt.inf is not None else fmt.nan
    if overflow is not None:
        magnitude = tirx.Select(magnitude > fmt.max_code, overflow, magnitude)
    signed = negative if not fmt.unsigned_zero else tirx.all(negative, magnitude != 0)
    code = tirx.Select(signed, magnitude | fmt.sign, magnitude)
    if fmt.nan is None:  # ml_dtypes gives a NaN the zero of the other sign
        nan = tirx.Select(negative, 0, fmt.sign)
    else:
        nan = fmt.nan if fmt.unsigned_zero else tirx.Select(negative, fmt.nan | fmt.sign, fmt.nan)
    return tirx.Cast("uint8", tirx.Select(tirx.isnan(x), nan, code))


def _encode_e8m0(x, saturate: bool, round_mode: str):
    """onnx.numpy_helper.to_float8e8m0 of float32 x: the exponent, rounded by `round_mode`."""
    bits = tirx.reinterpret("uint32", x)
    exp = tirx.Cast("int32", (bits >> 23) & tirx.const(0xFF, "uint32"))

    def bit(mask: int):
        return (bits & tirx.const(mask, "uint32")) != tirx.const(0, "uint32")

    if round_mode == "nearest":
        up = tirx.all(bit(0x400000), tirx.any(bit(0x200000), bit(0x1FFFFF), exp > 0))
    elif round_mode == "up":
        up = bit(0x7FFFFF)
    elif round_mode == "down":
        up = tirx.const(False)
    else:
        raise ValueError(f"round_mode '{round_mode}'")
    if saturate:
        up = tirx.all(up, exp != 0xFE)
    rounded = tirx.Select(up, exp + 1, exp)
    return tirx.Cast("uint8", tirx.Select(exp == 0xFF, 0xFF, rounded))


def _encode_int(x, low: int, high: int):
    """ml_dtypes' cast to a narrow integer: a float truncated, 0 out of range (NaN too); an integer
    wrapped to the type's bits."""
    mask = high - low
    dtype = str(x.ty)
    if dtype.startswith(("float", "bfloat")):
        t = tirx.trunc(x)
        in_range = tirx.all(t >= tirx.const(low, dtype), t <= tirx.const(high, dtype))
        x = tirx.Select(in_range, t, tirx.const(0, dtype))
    return tirx.Cast("uint8", tirx.Cast("int64", x) & mask)


def encode(bb, x, to: int, saturate: bool = True, round_mode: str = "up"):
    """Relax tensor `x` (any float, integer or bool type) cast to narrow type `to`: its codes, uint8."""
    x = x if isinstance(x, relax.Var) else bb.emit(x)
    dtype = str(x.ty.dtype)
    if to == TensorProto.FLOAT8E8M0:  # the reference casts to float32 first
        def scalar(v):
            return _encode_e8m0(tirx.Cast("float32", v), saturate, round_mode)
    elif to in _FLOATS:
        # float16 and bfloat16 widen exactly; integers go through float64, as ml_dtypes' casts do.
        wide = dtype if dtype in _BITS else "float32" if "float" in dtype else "float64"
        largest = float(ml_dtypes.finfo(np_dtype(to)).max)

        def scalar(v):
            return _encode_float(tirx.Cast(wide, v), _FLOATS[to], saturate, largest)
    else:
        def scalar(v):
            return _encode_int(v if dtype != "bool" else tirx.Cast("int8", v), *_INTS[to])
    name = f"encode_{type_name(to).lower()}"
    return bb.emit_te(lambda t: te.compute(t.shape, lambda *i: scalar(t(*i)), name=name), x,
                      primfunc_name_hint=name)


# --- the model's narrow tensors become uint8 -----------------------------------------------------

def to_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its tensors of NARROW types held as uint8 codes, and its nodes that read one
    annotated with their inputs' element types (TYPES_ATTR); the model itself where it has none."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    types: dict[str, int] = {}
    _element_types(model.graph, opset, types)
    if not NARROW & set(types.values()):
        return model
    model = copy.deepcopy(model)
    _retype(model.graph, types)
    return model


def _element_types(graph: onnx.GraphProto, opset: int, types: dict[str, int]) -> None:
    """types[name]: the element type of every value of `graph` and its subgraphs that the model
    declares or that ONNX's type constraints carry from a node's inputs to its outputs."""
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        subgraphs = [g for a in node.attribute for g in ([a.g] if a.HasField("g") else a.graphs)]
        for g in subgraphs:
            _element_types(g, opset, types)
        for i, name in enumerate(node.output):
            if name and name not in types:
                found = _output_type(node, i, types, opset, subgraphs)
                if found:
                    types[name] = found


def _output_type(node: onnx.NodeProto, i: int, types: dict[str, int], opset: int, subgraphs) -> int:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if isinstance(attrs.get("value"), TensorProto):  # Constant, ConstantOfShape
        return attrs["value"].data_type
    if node.op_type == "Cast":
        return attrs["to"]
    if node.op_type == "CastLike":
        return types.get(node.input[1], 0)
    if node.op_type == "QuantizeLinear":
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return attrs.get("output_dtype") or (types.get(zero_point, 0) if zero_point else TensorProto.UINT8)
    if subgraphs:  # If: its branches' outputs
        outputs = subgraphs[0].output
        return outputs[i].type.tensor_type.elem_type if i < len(outputs) else 0
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return 0
    if i >= len(schema.outputs):
        return 0
    constraint = schema.outputs[i].type_str
    for j, formal in enumerate(schema.inputs):
        if formal.type_str == constraint and j < len(node.input) and node.input[j] in types:
            return types[node.input[j]]
    return 0


def _stored(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).view(np.uint8), tensor.name)


def _retype(graph: onnx.GraphProto, types: dict[str, int]) -> None:
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in NARROW:
            vi.type.tensor_type.elem_type = TensorProto.UINT8
    for k, init in enumerate(graph.initializer):
        if init.data_type in NARROW:
            graph.initializer[k].CopyFrom(_stored(init))
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in NARROW:
                a.t.CopyFrom(_stored(a.t))
            for g in [a.g] if a.HasField("g") else a.graphs:
                _retype(g, types)
        typed = [node.input[i] for i in _TYPED_INPUTS.get(node.op_type, ()) if i < len(node.input) and node.input[i]]
        if not typed:
            continue
        unknown = [name for name in typed if name not in types]
        if unknown:
            raise UserError(f"node '{node.name or '<unnamed>'}': {node.op_type} reads '{unknown[0]}', whose "
                            "element type edgecc cannot tell, in a model with float8/float4/int4/int2 "
                            "tensors (record it in the model's value_info)")
        if any(types[name] in NARROW for name in typed):
            node.attribute.append(helper.make_attribute(TYPES_ATTR, [types.get(n, 0) for n in node.input]))

"""Lowering the optimized ONNX model to a TVM Relax IRModule.

TVM's ONNX frontend does the bulk of the work. edgecc adds converters for ops it lacks
(edgecc.frontend.converters, registered in edgecc.frontend.registry), computes the shape
arithmetic of symbolic dims while importing and gives an LM's inputs one set of dims
(edgecc.frontend.shape_values), and checks every node before any long work starts, so an op
nobody can lower fails at once with its op type, node name and a hint.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
import warnings

import numpy as np
import onnx

from edgecc.core.ir import ALIGN
from edgecc.core.kernel_mark import KernelMark
from edgecc.errors import EdgeccError, UserError
from edgecc.frontend import converters  # noqa: F401  (registers edgecc's converters)
from edgecc.frontend.converters import contrib
from edgecc.frontend.converters.narrow_types import to_storage
from edgecc.frontend.registry import CONVERTERS
from edgecc.frontend.shape_values import WRAPPED_OPS, ShapeValues, lm_input_shapes

# What to suggest when an op has no converter.
_HINTS = {
    "MatMulNBits": "int4 weights are lowered by edgecc's quantize-int4 pass and kernels",
}


def _tvm_convert_map() -> dict:
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend._get_convert_map()


def check_supported(model: onnx.ModelProto) -> None:
    """Fail before any long work when a node has no converter."""
    import_ops = set(_tvm_convert_map()) | {"If", "Constant"}
    consumed = {o.name for o in model.graph.output}
    for _, node in _all_nodes(model.graph):
        consumed.update(node.input)
    for graph, node in _all_nodes(model.graph):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        cls = CONVERTERS.get((domain, node.op_type))
        if cls is not None:
            # Outputs an edgecc converter does not compute must not be read by anyone.
            for i, name in enumerate(node.output):
                if name and name in consumed and i not in cls.computed_outputs:
                    raise UserError(f"node '{node.name}': output {i} ('{name}') of {node.op_type} "
                                    "is used, but edgecc's converter computes only outputs "
                                    f"{list(cls.computed_outputs)}")
            continue
        if node.op_type in import_ops:
            continue
        qualified = f"{domain}.{node.op_type}" if domain else node.op_type
        hint = _HINTS.get(node.op_type, "register a converter with "
                                         f"@edgecc.frontend.registry.converter('{node.op_type}', domain='{domain}')")
        where = f" in subgraph '{graph.name}'" if graph is not model.graph else ""
        raise UserError(f"node '{node.name or '<unnamed>'}'{where}: op {qualified} cannot be lowered "
                        f"to TVM (no converter); hint: {hint}")


def _pin_dims(model: onnx.ModelProto, pinned: dict[str, int]) -> None:
    for spec in model.graph.input:
        for d in spec.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in pinned:
                d.dim_value = pinned[d.dim_param]  # clears dim_param: the two are a oneof


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield graph, node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


@contextlib.contextmanager
def _patched_frontend(weights: dict[str, np.ndarray]):
    """edgecc's converters in the importer's map, shape arithmetic computed on symbolic dims
    (edgecc.frontend.shape_values), Gather lowered with in-bounds indexing, no second run of
    ONNX's checker, and the data-less initializers read from `weights`.

    The importer normalizes negative Gather indices itself; its default `take(mode="fast")`
    is undefined behaviour out of bounds and logs a warning per Gather, so clip instead.
    The importer runs the checker only to warn, on a serialized copy of every weight (its C++
    side parses that copy again); the model was checked when it was loaded.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    importer = onnx_frontend.ONNXGraphImporter
    orig_map, orig_take, orig_check = onnx_frontend._get_convert_map, relax.op.take, onnx.checker.check_model
    orig_parse = importer._parse_array

    def parse_array(self, tensor: onnx.TensorProto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.name not in weights:
            return orig_parse(self, tensor)
        return _runtime_tensor(weights[tensor.name])

    convert_map = {**orig_map(), **{op: cls for (_, op), cls in CONVERTERS.items()}}
    values = ShapeValues()  # shape arithmetic first, then the op's own converter
    convert_map.update({op: values.wrap(op, convert_map.get(op)) for op in WRAPPED_OPS})
    convert_map = {op: _named_failures(op, cls) if isinstance(cls, type) else cls
                   for op, cls in convert_map.items()}
    onnx_frontend._get_convert_map = lambda: convert_map
    relax.op.take = functools.partial(orig_take, mode="clip")
    onnx.checker.check_model = lambda *_args, **_kwargs: None
    importer._parse_array = parse_array
    try:
        yield
    finally:
        onnx_frontend._get_convert_map, relax.op.take = orig_map, orig_take
        onnx.checker.check_model, importer._parse_array = orig_check, orig_parse
        contrib.PACKED.clear()


def _runtime_tensor(array: np.ndarray):
    """`array` as a TVM tensor: its own memory where TVM can take it (writable, aligned), else a copy."""
    import tvm

    if array.flags.writeable and array.flags.c_contiguous and array.ctypes.data % ALIGN == 0:
        return tvm.runtime.from_dlpack(array)
    return tvm.runtime.tensor(np.ascontiguousarray(array))


def _named_failures(op: str, cls: type) -> type:
    """`cls` with any failure of its conversion turned into a one-line refusal naming the node and
    the op: a form of the op TVM's converter cannot take (an attribute, a dtype, a run-time operand)
    is the model's limit here, not a crash."""
    class Named(cls):
        @classmethod
        def get_converter(cls_, opset):
            convert = cls.get_converter(opset)

            def named(bb, inputs, attr, params):
                try:
                    return convert(bb, inputs, attr, params)
                except EdgeccError:
                    raise
                except Exception as e:  # TVM's converters raise every kind of error
                    text = str(e).strip().splitlines()
                    node = attr.get("tvm_custom", {}).get("name") or "<unnamed>"
                    raise UserError(f"node '{node}': op {op} cannot be lowered to TVM: {type(e).__name__}: "
                                    f"{text[-1][:300] if text else ''}") from e

            return named

    Named.__name__ = Named.__qualname__ = op
    return Named


def _route_to_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes a pass marked for an edgecc kernel become that kernel's op, for the importer only.

    The optimized ONNX keeps standard ops (ORT runs it as the reference); here a MatMul, or a
    Gemm's product, with a `bsr` KernelMark becomes edgecc's BlockSparseMatMul, a MatMulInteger
    marked `int8` (by pack-weights) edgecc's MatMulInt8, one marked `int8_dot` with the rescale
    quantize-int8 put after it edgecc's MatMulInt8Dot, and a MatMulNBits marked `int4_dot`
    edgecc's MatMulNBitsDot (same inputs and attributes, plus the instruction set pack-weights
    chose).
    """
    marks = [KernelMark.read(n) for n in model.graph.node]
    if not any(marks):
        return model
    model = copy.deepcopy(model)
    graph = model.graph
    readers: dict[str, list[int | None]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    for out in graph.output:
        readers.setdefault(out.name, []).append(None)  # the caller reads it: it cannot be folded
    constants = {t.name for t in graph.initializer}
    # int8_dot: the MatMulInteger and its rescale become one node, where the rescale ends.
    fused = {}  # index of the rescale's last node -> the fused node
    folded = set()  # indices of the nodes it replaces
    for i, mark in enumerate(marks):
        chain = mark is not None and mark.kernel == "int8_dot" and _int8_rescale(graph, i, readers, constants)
        if chain:
            indices, operands = chain
            node = graph.node[i]
            fused[indices[-1]] = onnx.helper.make_node(
                "MatMulInt8Dot", [*node.input[:2], *operands], graph.node[indices[-1]].output, name=node.name,
                domain="edgecc", tile=mark.tile, isa=mark.isa)
            folded.update([i, *indices])
    dot_weights = {graph.node[i].input[1] for i in folded if graph.node[i].op_type == "MatMulInteger"}
    nodes = []
    for i, (node, mark) in enumerate(zip(graph.node, marks)):
        if i in fused:
            nodes.append(fused[i])
            continue
        if i in folded:
            continue
        if mark is None:
            nodes.append(node)
            continue
        if mark.kernel in ("int8", "int8_dot"):  # int8_dot without quantize-int8's rescale after it
            nodes.append(onnx.helper.make_node("MatMulInt8", node.input, node.output, name=node.name,
                                               domain="edgecc", tile=mark.tile))
            continue
        if mark.kernel == "int8_columns":
            nodes.append(onnx.helper.make_node("GatherInt8Columns", node.input, node.output, name=node.name,
                                               domain="edgecc", tile=mark.tile, dot=int(node.input[0] in dot_weights)))
            continue
        if mark.kernel == "int4_dot":
            routed = copy.deepcopy(node)
            routed.op_type, routed.domain = "MatMulNBitsDot", "edgecc"
            routed.attribute.append(onnx.helper.make_attribute("isa", mark.isa))
            nodes.append(routed)
            continue
        rows, cols = mark.block
        product = node.output[0] if node.op_type == "MatMul" else node.output[0] + "_bsr"
        nodes.append(onnx.helper.make_node("BlockSparseMatMul", node.input[:2], [product], name=node.name,
                                           domain="edgecc", block_rows=rows, block_cols=cols))
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                               name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.opset_import.append(onnx.helper.make_opsetid("edgecc", 1))
    return model


def _int8_rescale(graph: onnx.GraphProto, matmul: int, readers: dict[str, list[int | None]], constants: set[str]):
    """quantize-int8's rescale after the MatMulInteger graph.node[matmul]: Cast to float, Mul by the
    rows' scale, Mul by the constant column scales, and a Gemm's Add of a constant bias if there is
    one, each the only reader of the one before. Returns (their indices, [x_scale, w_scale(, bias)]),
    or None. `readers`: value name -> the indices of the nodes reading it, a graph output read by
    None too; `constants`: the initializers' names."""

    def only_reader(i, op_type):
        found = readers.get(graph.node[i].output[0], [])
        if len(found) != 1 or found[0] is None:
            return None
        node = graph.node[found[0]]
        return found[0] if node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def other(i, prev):  # the input of binary node i that node prev does not give
        a, b = graph.node[i].input[:2]
        return b if a == graph.node[prev].output[0] else a

    cast = only_reader(matmul, "Cast")
    if cast is None or next((a.i for a in graph.node[cast].attribute if a.name == "to"), None) != onnx.TensorProto.FLOAT:
        return None
    by_rows = only_reader(cast, "Mul")
    by_columns = only_reader(by_rows, "Mul") if by_rows is not None else None
    if by_columns is None or other(by_columns, by_rows) not in constants:
        return None
    chain, operands = [cast, by_rows, by_columns], [other(by_rows, cast), other(by_columns, by_rows)]
    bias = only_reader(by_columns, "Add")
    if bias is not None and other(bias, by_columns) in constants:
        chain.append(bias)
        operands.append(other(bias, by_columns))
    return chain, operands


def to_relax(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None,
             pinned: dict[str, int] | None = None):
    """The Relax IRModule of a checked ONNX model; weights become constants of the module.
    `weights` fill its data-less initializers (edgecc.core.ir.light_proto). `pinned` fixes the
    graph inputs' symbolic dims of those names (`--shape`) before import, so that every kernel
    the importer makes is static: bound afterwards, the Relax types become static while the
    kernels the converters emitted keep the variable, and FuseTIR refuses the mix."""
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(model)
    _pin_dims(model, pinned or {})
    model = to_storage(_route_to_kernels(model))  # float8, int4, ... as the uint8 codes TVM can hold
    shapes = lm_input_shapes(model) or {}
    for spec in model.graph.input:  # the importer reads a dim of 0 as unknown: an empty input stays empty
        dims = spec.type.tensor_type.shape.dim
        if spec.name not in shapes and dims and all(d.HasField("dim_value") for d in dims) \
                and 0 in [d.dim_value for d in dims]:
            shapes[spec.name] = [d.dim_value for d in dims]
    with _patched_frontend(weights or {}), warnings.catch_warnings():
        # Inputs are passed by position; the importer's renaming of "past.0.key" is not news.
        warnings.filterwarnings("ignore", message="Renaming name")
        printed = io.StringIO()  # the importer prints the op and inputs of a node it failed on
        try:
            with contextlib.redirect_stdout(printed):
                return from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
        except UserError:
            raise
        except Exception as e:
            text = str(e).strip().splitlines()
            detail = f"{type(e).__name__}: {text[-1][:300] if text else ''}"
            failed = re.search(r"Error converting operator (\S+),", printed.getvalue())
            if failed:  # the node's operands contradict what the op takes (a dtype, a shape)
                raise UserError(f"op {failed.group(1)} cannot be lowered to TVM: {detail}") from e
            raise EdgeccError(f"TVM's ONNX importer failed: {detail}") from e

"""Numeric checks against ONNX Runtime: seeded inputs, the reference run, per-dtype tolerances."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from edgecc.core import lm_signature
from edgecc.core.dtypes import CODED_DTYPES
from edgecc.core.ir import graph_proto, large_initializers, light_proto
from edgecc.core.kernel_mark import KernelMark
from edgecc.errors import UserError

# Tolerances by output dtype: (absolute, relative). Integers must match exactly.
TOLERANCES = {
    np.dtype("float64"): (1e-7, 1e-7),
    np.dtype("float32"): (1e-4, 1e-4),
    np.dtype("float16"): (1e-2, 1e-2),
    np.dtype(ml_dtypes.bfloat16): (2e-2, 2e-2),  # an 8-bit mantissa: one rounding is up to 0.4%
    # float8 and float4: one step of the type (engines whose inputs differ in the last bit round apart)
    **{np.dtype(t): (float(ml_dtypes.finfo(t).smallest_subnormal), float(ml_dtypes.finfo(t).eps)) for t in (
        ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz,
        ml_dtypes.float8_e8m0fnu, ml_dtypes.float4_e2m1fn)},
}

# A compiled module against ONNX Runtime: two engines that sum in different orders (TVM's default
# schedules accumulate a K-long dot product sequentially, MLAS in blocks), and in a deep model the
# difference grows with depth. Measured on SmolLM2-135M (30 layers, fp32, random inputs): TVM vs
# ORT max error 1.8x the 1e-4 bound by layer 30 (relative RMS 2.5e-5), ORT optimized vs
# unoptimized 1/7 of that. So across engines the bound is 10x wider and its absolute part scales
# with the output's RMS (logits of RMS 9 carry 9x the rounding of unit-scale values). A wrong
# kernel, layout or rewrite is off by orders of magnitude more.
ACROSS_ENGINES = 10.0

# The largest input random_inputs draws (1 GiB of float32): a larger --dim is a mistake, not a test.
MAX_RANDOM_ELEMENTS = 1 << 28

# Size given to a symbolic dim that the user did not pin, per dim name heuristics.
DEFAULT_DIM = 8


# A dim named by an expression of other dims, "past + seq" (TVM's importer parses the same form).
_DIM_EXPR = re.compile(r"[A-Za-z_]\w*(?:[-+*]\d+|[-+*][A-Za-z_]\w*)+")


def dim_expr(expr: str, dim_values: dict[str, int]) -> int:
    """The value of a dim expression such as "past + seq" (left to right, + - * only)."""
    tokens = re.findall(r"[A-Za-z_]\w*|\d+|[-+*]", expr)

    def value(tok: str) -> int:
        return int(tok) if tok.isdigit() else dim_values.get(tok, dim_values.get("*", DEFAULT_DIM))

    total = value(tokens[0])
    for op, tok in zip(tokens[1::2], tokens[2::2]):
        total = {"+": total + value(tok), "-": total - value(tok), "*": total * value(tok)}[op]
    return total


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints and str (symbolic) / None (unknown)

    def concrete(self, dim_values: dict[str, int]) -> tuple[int, ...]:
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(d)
            elif isinstance(d, str) and d in dim_values:
                out.append(dim_values[d])
            elif i == 0 and isinstance(d, str) and "batch" in d.lower():
                out.append(1)
            elif isinstance(d, str) and _DIM_EXPR.fullmatch(d.replace(" ", "")):
                out.append(dim_expr(d, dim_values))
            else:
                out.append(dim_values.get("*", DEFAULT_DIM))
        return tuple(out)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], np.dtype(data["dtype"]), tuple(data["shape"]))


# Element types edgecc compiles no tensor of: strings, float6. (float8, float4, int4 and int2, which
# TVM 0.27 cannot hold either, are carried as their codes: edgecc.frontend.converters.narrow_types.)
UNCOMPILABLE_TYPES = {getattr(onnx.TensorProto, t) for t in ("STRING", "FLOAT6E2M3", "FLOAT6E3M2")
                      if hasattr(onnx.TensorProto, t)}


def _spec(vi: onnx.ValueInfoProto, model: onnx.ModelProto) -> TensorSpec:
    """The signature of a graph input or output; one edgecc cannot compile is a UserError naming
    the value and the nodes that use it."""
    users = ", ".join(f"{n.op_type} node '{n.name}'" if n.name else f"{n.op_type} node"
                      for n in model.graph.node if vi.name in n.input or vi.name in n.output)
    if not vi.type.HasField("tensor_type"):
        kind = vi.type.WhichOneof("value").removesuffix("_type")
        raise UserError(f"'{vi.name}' ({users or 'unused'}) is {'an' if kind[0] in 'aeiou' else 'a'} "
                        f"{kind}, not a tensor: edgecc compiles tensor graphs")
    tt = vi.type.tensor_type
    if tt.elem_type in UNCOMPILABLE_TYPES and users:  # an unused one is never made
        raise UserError(f"'{vi.name}' ({users}) is a tensor of "
                        f"{helper.tensor_dtype_to_string(tt.elem_type).removeprefix('TensorProto.')}, "
                        "which TVM 0.27 cannot compile")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    dims: list = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorSpec(vi.name, dtype, tuple(dims))


def graph_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    inits = {i.name for i in model.graph.initializer}
    return [_spec(vi, model) for vi in model.graph.input if vi.name not in inits]


def graph_outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(vi, model) for vi in model.graph.output]


# Operands that a model's user gives and random data cannot stand in for (axes, shapes, sizes): a
# graph input there must be given (--const, an initializer), or verification is off.
_GIVEN_OPERANDS: dict[str, dict[int, str]] = {
    **{op: {1: "axes"} for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                  "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "Squeeze",
                                  "Unsqueeze")},
    "Reshape": {1: "shape"}, "Expand": {1: "shape"}, "ConstantOfShape": {0: "shape"}, "Tile": {1: "repeats"},
    "Slice": {3: "axes"}, "TopK": {1: "k"}, "CumSum": {1: "axis"}, "Split": {1: "split"},
    "Pad": {1: "pads", 3: "axes"}, "OneHot": {1: "depth"}, "Resize": {3: "sizes"},
}
# Integer operands that must be nonzero: divisors, steps.
_NONZERO_OPERANDS = {"Div": 1, "Mod": 1, "Slice": 4, "Range": 2}
_DEFAULT_HIGH = 8  # integers are drawn from [0, 8) where nothing narrower is known


def integer_ranges(model: onnx.ModelProto, dim_values: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """[low, high) for the integer graph inputs whose consumers take only some values: indices
    within the axis they index (Gather, GatherElements, GatherND), nonzero divisors and steps.
    A graph input that an op reads as axes, a shape or a size raises a UserError naming it."""
    inputs = {s.name: s for s in graph_inputs(model)}
    shapes: dict[str, list] = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                                         for d in vi.type.tensor_type.shape.dim] for vi in model.graph.value_info}
    shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    shapes.update({name: list(s.concrete(dim_values or {})) for name, s in inputs.items()})
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.dims:
            shapes[node.output[0]] = list(node.attribute[0].t.dims)
    ranges: dict[str, tuple[int, int]] = {}

    def within(name: str, low: int, high: int) -> None:
        if name in inputs and high > low:
            lo, hi = ranges.get(name, (low, high))
            ranges[name] = (max(lo, low), min(hi, high))

    for node in model.graph.node:
        args = list(node.input) + [""] * 5
        for i, what in _GIVEN_OPERANDS.get(node.op_type, {}).items():
            if args[i] in inputs:
                raise UserError(f"input '{args[i]}' is the {what} of {node.op_type} node '{node.name}': "
                                f"random data cannot stand in for it; fix it with --const {args[i]}=VALUES, "
                                "make it an initializer, or compile without verification")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        data = shapes.get(args[0]) or []
        if node.op_type in ("Gather", "GatherElements"):
            axis = attrs.get("axis", 0)
            if -len(data) <= axis < len(data) and isinstance(data[axis], int):
                within(args[1], 0, data[axis])
        elif node.op_type == "GatherND":
            dims = data[attrs.get("batch_dims", 0):]
            if dims and all(isinstance(d, int) for d in dims):
                within(args[1], 0, min(dims))
        elif node.op_type in _NONZERO_OPERANDS:
            within(args[_NONZERO_OPERANDS[node.op_type]], 1, _DEFAULT_HIGH)
    return ranges


def _kind(dtype: np.dtype) -> str:
    """'f', 'i' or 'b' of numpy's dtypes and of ml_dtypes' (bfloat16, float8, int4: numpy's kind 'V')."""
    if dtype.kind != "V":
        return "i" if dtype.kind == "u" else dtype.kind
    for kind, info in (("f", ml_dtypes.finfo), ("i", ml_dtypes.iinfo)):
        try:
            info(dtype)
            return kind
        except (ValueError, TypeError):
            pass
    return dtype.kind


def _unsigned_float(dtype: np.dtype) -> bool:
    """float8 E8M0, a power of two: it holds no negative value."""
    return dtype == np.dtype(ml_dtypes.float8_e8m0fnu)


# Graph inputs and outputs a pass narrowed along one axis (prune-heads shrinks a KV cache's head
# axis): name -> {"axis": a, "keep": the source's positions it keeps}. Verification gives the
# optimized model the source's inputs, and compares its outputs with the source's, at those positions.
NARROWED_KEY = "edgecc.narrowed_io"


def narrowed_io(model: ir.Model) -> dict[str, dict]:
    return json.loads(model.metadata_props.get(NARROWED_KEY, "{}"))


def record_narrowed(model: ir.Model, name: str, axis: int, keep: list[int]) -> None:
    """Record that graph input or output `name` now holds positions `keep` of its `axis`, composed
    with what an earlier pass narrowed."""
    narrowed = narrowed_io(model)
    if name in narrowed:
        keep = [narrowed[name]["keep"][i] for i in keep]
    narrowed[name] = {"axis": axis, "keep": [int(i) for i in keep]}
    model.metadata_props[NARROWED_KEY] = json.dumps(narrowed)


def narrow(arrays: dict[str, np.ndarray], narrowed: dict[str, dict]) -> dict[str, np.ndarray]:
    """The source model's inputs or outputs as the narrowed model takes or returns them."""
    return {k: np.take(v, narrowed[k]["keep"], axis=narrowed[k]["axis"]) if k in narrowed else v
            for k, v in arrays.items()}


def random_inputs(
    model: onnx.ModelProto | ir.Model, seed: int = 0, dim_values: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded inputs: N(0,1) floats; integer ids within the range of the tables they index;
    attention masks as a tokenizer makes them (see _padding_mask); `position_ids` [batch, seq] the
    positions after a KV cache of the mask's length minus seq. Of a causal LM (lm_signature),
    whatever its inputs and dims are called: batch 1, seq 5, past 3 where not pinned, the mask
    over past + seq tokens, positions past .. past + seq - 1, and the cache the model makes of
    `past` random tokens."""
    graph = graph_proto(model) if isinstance(model, ir.Model) else model
    specs, lm = graph_inputs(graph), lm_signature.find(graph)
    ranges = integer_ranges(graph, _input_dims(specs, lm, dim_values))
    return draw_inputs(specs, seed, dim_values, ranges, lm, lambda feeds: run_ort(model, feeds))


def draw_inputs(
    specs: list[TensorSpec], seed: int = 0, dim_values: dict[str, int] | None = None,
    ranges: dict[str, tuple[int, int]] | None = None, lm: lm_signature.LMSignature | None = None,
    run: Callable[[dict], dict] | None = None,
) -> dict[str, np.ndarray]:
    """random_inputs without the graph, for a compiled artifact: its input `specs`, the integer
    `ranges` the graph allows (integer_ranges), its LM signature and, with one, `run`, the model
    as a function of feeds (it makes the LM's cache)."""
    rng = np.random.default_rng(seed)
    dim_values = _input_dims(specs, lm, dim_values)
    ranges = ranges or {}
    feeds = {}
    for spec in specs:
        shape = spec.concrete(dim_values)
        if math.prod(shape) > MAX_RANDOM_ELEMENTS:
            raise UserError(f"input '{spec.name}': shape {list(shape)} is too large to draw verification "
                            f"data for (over 2^28 elements); give smaller sizes with --dim")
        if "mask" in spec.name.lower() and len(shape) == 2:
            feeds[spec.name] = _padding_mask(rng, shape).astype(spec.dtype)
        elif _kind(spec.dtype) == "f":
            drawn = rng.standard_normal(shape)
            feeds[spec.name] = (np.abs(drawn) if _unsigned_float(spec.dtype) else drawn).astype(spec.dtype)
        elif _kind(spec.dtype) == "i":
            feeds[spec.name] = rng.integers(*_integer_range(spec, ranges), shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise UserError(f"input '{spec.name}': cannot make random data of dtype {spec.dtype}")
    if lm is not None:
        seq, first = feeds[lm.ids.name].shape[1], lm.cache[0]
        past = feeds[first.past].shape[first.seq_axis]
        if lm.mask:
            mask = feeds[lm.mask.name]
            feeds[lm.mask.name] = _padding_mask(rng, mask.shape).astype(mask.dtype)
        if lm.positions:
            positions = feeds[lm.positions.name]
            feeds[lm.positions.name] = np.broadcast_to(np.arange(past, past + seq),
                                                       positions.shape).astype(positions.dtype)
        if past:
            ids = next(spec for spec in specs if spec.name == lm.ids.name)
            feeds.update(_prefilled_cache(run, lm, past, feeds[lm.ids.name].shape[0],
                                          _integer_range(ids, ranges), rng))
        return feeds
    positions = feeds.get("position_ids")
    if positions is not None and positions.ndim == 2:
        mask = feeds.get("attention_mask")
        past = mask.shape[1] - positions.shape[1] if mask is not None and mask.ndim == 2 else 0
        feeds["position_ids"] = np.broadcast_to(np.arange(past, past + positions.shape[1]),
                                                positions.shape).astype(positions.dtype)
    return feeds


def _input_dims(specs: list[TensorSpec], lm, dim_values: dict[str, int] | None) -> dict[str, int]:
    """The given dims, and of a causal LM the sizes that make its inputs agree (verify_dims)."""
    if lm is None:
        return dim_values or {}
    return lm.verify_dims({s.name: s.shape for s in specs}, dim_values or {})


def _prefilled_cache(run: Callable[[dict], dict], lm, past: int, batch: int, id_range: tuple[int, int],
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The KV cache the model itself makes of `past` random tokens (`run`: the model, in ONNX
    Runtime or compiled): what a decoding step really reads. N(0,1) keys and values are nothing a
    model produces; through a quantized SmolLM2 they gave logits a relative RMS error of 1.3 from
    fp32 where real text decodes the same tokens."""
    prefill = {lm.ids.name: rng.integers(*id_range, (batch, past)).astype(lm.ids.dtype),
               **{e.past: e.empty(batch) for e in lm.cache}}
    if lm.mask:
        prefill[lm.mask.name] = np.ones((batch, past), lm.mask.dtype)
    if lm.positions:
        prefill[lm.positions.name] = np.broadcast_to(np.arange(past), (batch, past)).astype(lm.positions.dtype)
    outputs = run(prefill)
    return {e.past: outputs[e.present] for e in lm.cache}


def _integer_range(spec: TensorSpec, ranges: dict[str, tuple[int, int]]) -> tuple[int, int]:
    low, high = ranges.get(spec.name, (0, _DEFAULT_HIGH))
    return low, min(high, int(ml_dtypes.iinfo(spec.dtype).max) + 1)  # uint2 and int4 hold less


def input_rules(model: onnx.ModelProto, dim_values: dict[str, int] | None = None) -> dict[str, str]:
    """How random_inputs draws each input: what a manifest records beside the verification."""
    ranges = integer_ranges(model, dim_values)
    rules = {}
    for spec in graph_inputs(model):
        if "mask" in spec.name.lower() and len(spec.shape) == 2:
            rules[spec.name] = "padding mask: per row 1s, then 0s"
        elif _kind(spec.dtype) == "f":
            rules[spec.name] = "|normal(0, 1)|" if _unsigned_float(spec.dtype) else "normal(0, 1)"
        elif _kind(spec.dtype) == "i":
            rules[spec.name] = "integers in [{}, {})".format(*_integer_range(spec, ranges))
        else:
            rules[spec.name] = "booleans"
    lm = lm_signature.find(model)
    if lm is not None and lm.mask:
        rules[lm.mask.name] = "padding mask over past + seq tokens: per row 1s, then 0s"
    positions = lm.positions.name if lm is not None and lm.positions else "position_ids"
    if positions in rules:
        rules[positions] = "positions past .. past + seq - 1"
    return rules


def _padding_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """[batch, seq] of 1s followed by 0s (right padding): row 0 unpadded, the others padded
    after a random length >= 1. Random 0..7 ids here would be inputs no model ever sees."""
    batch, seq = shape
    lengths = np.concatenate([[seq], rng.integers(1, seq + 1, max(batch - 1, 0))])[:batch]
    return (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)


def ort_session(model: onnx.ModelProto | ir.Model, optimize: bool = False, threads: int = 0,
                weights: dict[str, np.ndarray] | None = None, outputs: Sequence[str] = ()):
    """An ONNX Runtime session; with optimize=False ORT's own fusions cannot hide a bug.

    `weights` fill `model`'s data-less initializers (edgecc.core.ir.light_proto); an IR model's
    large weights reach ORT that way, as the arrays the IR holds. `outputs`: intermediate
    values the session outputs too (calibration reads activations)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not optimize:  # a reference reads its weights where they are; prepacking would copy every one
        so.add_session_config_entry("session.disable_prepacking", "1")
    if isinstance(model, ir.Model):
        model, weights, folder = _for_ort(model)
        if folder:  # ORT maps the file itself, as when it loads the model from its path
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    elif weights is None:
        model, weights = _weights_apart(model)
    known = {o.name for o in model.graph.output}
    if any(name not in known for name in outputs):
        model = _copy(model)  # the caller's proto stays as it was; its large weights are out of it by now
        model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in outputs if n not in known)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
    if weights:
        so.add_external_initializers(list(weights), values)
    try:
        if model.ByteSize() < 1_800_000_000:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        else:
            with tempfile.TemporaryDirectory() as d:  # over protobuf's 2 GB limit: go through a file
                path = os.path.join(d, "model.onnx")
                onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
                session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.NotImplemented,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
        # The reference cannot run the model (an op version ORT dropped, an invalid graph): the model's
        # problem, and nothing edgecc builds could be checked against it.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX Runtime, the reference edgecc verifies against, cannot load the model: "
                        f"{detail[-300:]}") from None
    session.edgecc_weights = values  # ORT reads these arrays in place for as long as the session lives
    session.edgecc_proto = model
    return session


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _for_ort(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray], str | None]:
    """An IR model as ONNX Runtime takes it without a copy of its weights where it can: the graph,
    with the weights of an external-data file as references ORT maps from that file's folder,
    the other large weights as arrays (which ORT copies), and the folder (None: no such file)."""
    external = {name: t for name, t in large_initializers(model).items() if isinstance(t, ir.ExternalTensor)}
    folders = {os.path.abspath(t.base_dir or ".") for t in external.values()}
    if len(folders) != 1:
        external, folders = {}, {None}
    proto, weights = light_proto(model, keep=external)
    return proto, weights, folders.pop()


# Initializers this large reach ONNX Runtime as arrays it uses in place: serialized with the graph,
# each weight would be held three times while the session loads (the proto, its bytes, ORT's copy).
IN_PLACE_BYTES = 1 << 16
_IN_PLACE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                   onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                   onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def _weights_apart(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model with its large initializers' data left out (each is a stub ORT fills from the
    arrays by name), and those arrays; the model itself when it has none."""
    def in_place(t: onnx.TensorProto) -> bool:
        return (t.data_type in _IN_PLACE_TYPES and t.data_location == onnx.TensorProto.DEFAULT
                and t.HasField("raw_data")
                and math.prod(t.dims) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                >= IN_PLACE_BYTES)

    if not any(in_place(t) for t in model.graph.initializer):
        return model, {}
    light = _copy_except(model, onnx.ModelProto(), "graph")
    _copy_except(model.graph, light.graph, "initializer")
    weights = {}
    for t in model.graph.initializer:
        if not in_place(t):
            light.graph.initializer.add().CopyFrom(t)
            continue
        weights[t.name] = onnx.numpy_helper.to_array(t)
        stub = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                           data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="in-memory")
    return light, weights


def _copy_except(src, dst, skipped: str):
    """`dst` with every field of the message `src` but `skipped` copied into it."""
    for field, value in src.ListFields():
        if field.name == skipped:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)
    return dst


def run_ort(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray], optimize: bool = False,
            weights: dict[str, np.ndarray] | None = None) -> dict:
    """The model's outputs in ONNX Runtime (`weights`: as ort_session's); inputs it rejects
    (sizes its shapes cannot take) are a one-line UserError naming their shapes."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    sess = ort_session(model, optimize, weights=weights)
    if isinstance(model, ir.Model):
        model = sess.edgecc_proto
    names = [o.name for o in sess.get_outputs()]
    # ORT's Python API takes and gives float8, int4, ... only as their codes (uint8)
    coded = {k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint8),
                                                                helper.np_dtype_to_tensor_dtype(v.dtype))
             for k, v in feeds.items() if np.asarray(v).dtype in CODED_DTYPES}
    coded_types = {helper.np_dtype_to_tensor_dtype(d) for d in CODED_DTYPES}
    coded_outputs = {o.name: helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
                     for o in model.graph.output if o.type.tensor_type.elem_type in coded_types}
    try:
        outputs = sess.run(names, {**feeds, **coded})
    except (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.RuntimeException) as e:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ONNX Runtime cannot run the model on inputs {shapes} (give the sizes of its "
                        f"symbolic dims with --dim): {detail[-300:]}") from None
    except RuntimeError as e:  # its Python API returns no float8 but E4M3FN, no int4, no float4
        raise UserError(f"ONNX Runtime, the reference edgecc verifies against, cannot return the model's "
                        f"outputs: {str(e).strip()[:300]}; compile without verification") from None
    return {n: o.view(coded_outputs[n]) if n in coded_outputs else o for n, o in zip(names, outputs)}


def with_int8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """The reference for a module whose MatMulNBits run on int8 activations (pack-weights marked
    them `int4_dot`): a copy where each such node's input is rounded per block to int8 levels in
    plain ONNX ops (x -> round(x / s) * s, s = max|x over the block| / 127), as the kernel does.

    MatMulNBits' accuracy_level 4 allows that rounding, and ONNX Runtime applies it only for some
    zero-point forms (none with float zero points), so without this the reference and the
    module would differ by the rounding itself, not by a bug."""
    def marked(node) -> bool:
        mark = KernelMark.read(node) if node.op_type == "MatMulNBits" else None
        return mark is not None and mark.kernel == "int4_dot"

    if not any(marked(n) for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes = []
    for i, node in enumerate(model.graph.node):
        if marked(node):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            x, p = node.input[0], f"edgecc_a8_{i}"
            blocks, block = attrs["K"] // attrs["block_size"], attrs["block_size"]
            consts = {f"{p}_blocked": np.array([-1, blocks, block], np.int64),
                      f"{p}_levels": np.array(127, np.float32), f"{p}_tiny": np.array(1e-30, np.float32)}
            model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
            reduce = (helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1)
                      if opset < 18 else
                      helper.make_node("ReduceMax", [f"{p}_abs", f"{p}_axis"], [f"{p}_max"], keepdims=1))
            if opset >= 18:
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axis"))
            nodes += [helper.make_node("Shape", [x], [f"{p}_shape"]),
                      helper.make_node("Reshape", [x, f"{p}_blocked"], [f"{p}_x"]),
                      helper.make_node("Abs", [f"{p}_x"], [f"{p}_abs"]), reduce,
                      helper.make_node("Max", [f"{p}_max", f"{p}_tiny"], [f"{p}_safe"]),
                      helper.make_node("Div", [f"{p}_safe", f"{p}_levels"], [f"{p}_scale"]),
                      helper.make_node("Div", [f"{p}_x", f"{p}_scale"], [f"{p}_ratio"]),
                      helper.make_node("Round", [f"{p}_ratio"], [f"{p}_round"]),
                      helper.make_node("Mul", [f"{p}_round", f"{p}_scale"], [f"{p}_q"]),
                      helper.make_node("Reshape", [f"{p}_q", f"{p}_shape"], [f"{p}_in"])]
            node.input[0] = f"{p}_in"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@dataclasses.dataclass
class Comparison:
    ok: bool
    max_abs: float
    max_rel: float
    worst: str  # output name with the largest violation, or ""
    detail: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compare(
    ref: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    tolerance: tuple[float, float] | None = None,
    across_engines: bool = False,
) -> Comparison:
    """Elementwise |got - ref| <= atol + rtol*|ref| on every output, per-dtype tolerances;
    `across_engines`: ACROSS_ENGINES x wider, atol times max(1, RMS of ref)."""
    max_abs = max_rel = 0.0
    problems = []
    for name, r in ref.items():
        if name not in got:
            problems.append((name, "missing"))
            continue
        g = np.asarray(got[name])
        r = np.asarray(r)
        if g.shape != r.shape:
            problems.append((name, f"shape {g.shape}, expected {r.shape}"))
            continue
        if r.dtype.kind not in "fc" and _kind(r.dtype) != "f":
            bad = int(np.count_nonzero(g != r))
            if bad:
                problems.append((name, f"{bad} of {r.size} values differ"))
            continue
        atol, rtol = tolerance or TOLERANCES.get(r.dtype, (1e-4, 1e-4))
        rf, gf = r.astype(np.float64), g.astype(np.float64)
        if across_engines:
            finite_ref = rf[np.isfinite(rf)]
            rms = float(np.sqrt(np.mean(finite_ref ** 2))) if finite_ref.size else 1.0
            atol, rtol = atol * ACROSS_ENGINES * max(1.0, rms), rtol * ACROSS_ENGINES
        if not np.array_equal(np.isnan(rf), np.isnan(gf)):
            problems.append((name, "NaN positions differ"))
            continue
        finite = np.isfinite(rf) & np.isfinite(gf)
        if not np.array_equal(rf[~finite], gf[~finite], equal_nan=True):
            problems.append((name, "infinities differ"))
        diff = np.abs(gf - rf)[finite]
        if diff.size:
            a = float(diff.max())
            rel = float((diff / np.maximum(np.abs(rf[finite]), 1e-12)).max())
            max_abs, max_rel = max(max_abs, a), max(max_rel, rel)
            viol = diff - (atol + rtol * np.abs(rf[finite]))
            if (viol > 0).any():
                problems.append((name, f"max abs error {a:.3g} exceeds atol={atol:.3g}, rtol={rtol:g}"))
    detail = "; ".join(f"output '{n}': {m}" for n, m in problems)
    return Comparison(not problems, max_abs, max_rel, problems[0][0] if problems else "", detail)


def relative_error(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """The largest |got - ref| over all float outputs, as a fraction of that output's max |ref|."""
    worst = 0.0
    for name, r in ref.items():
        if np.asarray(r).dtype.kind != "f" or not np.size(r):
            continue
        r, g = np.asarray(r, np.float64), np.asarray(got[name], np.float64)
        worst = max(worst, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def relative_rmse(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """The largest ||got - ref|| / ||ref|| over the float outputs (relative RMS error).

    Unlike the largest elementwise error it is not decided by one element: a quantized model
    whose rounding flips one activation by a step is close; one whose weights are wrong is not.
    """
    worst = 0.0
    for name, r in ref.items():
        if np.asarray(r).dtype.kind != "f" or not np.size(r):
            continue
        r, g = np.asarray(r, np.float64), np.asarray(got[name], np.float64)
        worst = max(worst, float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300)))
    return worst


def cosine(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """The smallest cosine similarity, per output, of the flattened outputs."""
    worst = 1.0
    for name, r in ref.items():
        a, b = np.asarray(r, np.float64).ravel(), np.asarray(got[name], np.float64).ravel()
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        worst = min(worst, float(a @ b / norm) if norm else float(np.array_equal(a, b)))
    return worst

"""Nodes of an ONNX graph (static shapes, legalized) -> a fully int8 TFLite flatbuffer, written from
the schema: one per Edge TPU segment (segment.py), and one of the whole graph in probe mode, to see
which nodes can be written at all and how each op would map.

The flatbuffer is built with the object API classes that ship in ai-edge-litert
(`schema_py_generated`: ModelT, SubGraphT, TensorT, OperatorT ...), so no TensorFlow is needed.
Quantization follows what the TFLite converter does for full-integer models:

- activations: int8, per tensor, asymmetric, from ranges calibrated in ONNX Runtime (`calibrate`),
  planned once for the whole graph (`plan_quants`); the segment's inputs and outputs are int8 too
  (no QUANTIZE/DEQUANTIZE at the edges), with the plan's scale and zero point;
- CONV_2D / DEPTHWISE_CONV_2D weights: int8, symmetric, per output channel; FULLY_CONNECTED weights:
  int8, symmetric, per tensor; biases int32 with scale = input scale x weight scale, zero point 0;
- ops whose int8 kernels do not rescale (RESHAPE, TRANSPOSE, pools, CONCATENATION, SPLIT) share one
  scale between inputs and outputs; LOGISTIC and SOFTMAX outputs are fixed at 1/256, -128 and
  TANH at 1/128, 0 (tensorflow/lite/tools/optimize/operator_property.cc);
- op versions as op_version.cc sets them for those tensors.

Layout: ONNX is NCHW, TFLite NHWC. Every ONNX value maps to a TFLite tensor plus a permutation
(tflite = onnx.transpose(perm)); convolutions and pools produce NHWC, element-wise ops keep
whatever layout their inputs share, an ONNX Transpose only changes the permutation, and a TRANSPOSE
is written only where an op needs another layout. Afterwards each chain of RESHAPE/TRANSPOSE ops
that only re-labels the data order is folded into one RESHAPE (what linear-to-conv relies on).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict

import flatbuffers
import numpy as np
import onnx
from onnx import numpy_helper

from edgecc.core.verify import ort_session
from edgecc.errors import UserError
from edgecc.runtime.litert import INT8_MAX, INT8_MIN, Quant, quantize

WEIGHT_MAX = 127  # symmetric weights use [-127, 127], as the converter does
TINY = 1e-8  # the scale of an all-zero range: any positive number keeps dequantization finite
NHWC = (0, 2, 3, 1)
FIXED_OUTPUT_QUANT = {"Sigmoid": (1 / 256, -128), "Softmax": (1 / 256, -128), "Tanh": (1 / 128, 0)}
# Ops whose int8 kernels copy or pick values without rescaling: input(s) and output share a scale.
SAME_SCALE_OPS = {
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Identity",
    "Dropout",
    "MaxPool",
    "AveragePool",
    "Concat",
    "Split",
}


def _attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _schema():
    from ai_edge_litert import schema_py_generated as fb

    return fb


def activation_quant(lo: float, hi: float) -> Quant:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # zero must be exact
    scale = (hi - lo) / (INT8_MAX - INT8_MIN) or TINY
    zp = int(np.clip(round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
    return Quant((scale,), (zp,))


def calibrate(model: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """(min, max) of every float tensor of `model` over the samples, from ONNX Runtime."""
    floats = {
        vi.name
        for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    names = [o for n in model.graph.node for o in n.output if o in floats]
    session = ort_session(model, outputs=names)
    ranges: dict[str, tuple[float, float]] = {}
    for feeds in samples:
        values = dict(zip(names, session.run(names, feeds)))
        values.update({k: v for k, v in feeds.items() if k in floats})
        for name, v in values.items():
            # a mask's -inf (or a NaN it makes) has no int8 level: the range is the finite values'
            v = v[np.isfinite(v)] if not np.isfinite(v).all() else v
            if v.size == 0:
                continue
            lo, hi = float(np.min(v)), float(np.max(v))
            old = ranges.get(name)
            ranges[name] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return ranges


def _weight_quant(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, Quant]:
    """Symmetric int8, per channel along `axis` (None: per tensor)."""
    if axis is None:
        scale = np.array([np.abs(w).max() / WEIGHT_MAX])
    else:
        scale = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1) / WEIGHT_MAX
    scale = np.where(scale > 0, scale, TINY)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8)
    return q, Quant(tuple(float(s) for s in scale), (0,) * len(scale), axis or 0)


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def plan_quants(
    nodes: list[onnx.NodeProto], ranges: dict[str, tuple[float, float]], consts: set[str]
) -> dict[str, Quant]:
    """Per ONNX value: one Quant, shared across the groups that int8 kernels require. Planned once
    for the whole graph, so a tensor crossing from one segment to another has one scale and zero
    point on both sides."""
    uf = _UnionFind()
    fixed: dict[str, Quant] = {}
    for n in nodes:
        acts = [x for x in n.input if x and x not in consts]
        if n.op_type in SAME_SCALE_OPS:
            shared = acts if n.op_type == "Concat" else acts[:1]
            for name in (*shared, *n.output):
                if name:
                    uf.union(name, n.output[0])
        if n.op_type in FIXED_OUTPUT_QUANT:
            scale, zp = FIXED_OUTPUT_QUANT[n.op_type]
            fixed[n.output[0]] = Quant((scale,), (zp,))
    groups: dict[str, list[str]] = defaultdict(list)
    for name in ranges:
        groups[uf.find(name)].append(name)
    quants: dict[str, Quant] = {}
    for members in groups.values():
        pinned = [fixed[m] for m in members if m in fixed]
        if pinned:
            q = pinned[0]
        else:
            q = activation_quant(min(ranges[m][0] for m in members), max(ranges[m][1] for m in members))
        quants.update(dict.fromkeys(members, q))
    return quants


@dataclasses.dataclass
class Exported:
    flatbuffer: bytes
    origins: list[list[str]]  # per op of the flatbuffer: the ONNX nodes it was written for
    failed: dict[str, str]  # probe mode: node name -> why it has no int8 TFLite form


@dataclasses.dataclass
class Graph:
    """What every export of one ONNX graph reads: static shapes and constant values."""

    shapes: dict[str, tuple[int, ...]]
    consts: dict[str, np.ndarray]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "Graph":
        g = model.graph
        shapes = {}
        for vi in (*g.input, *g.value_info, *g.output):
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
        consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                consts[n.output[0]] = numpy_helper.to_array(onnx.helper.get_attribute_value(n.attribute[0]))
        return cls(shapes, consts)


class Exporter:
    """Some nodes of one ONNX graph, fed by `inputs`, producing `outputs` -> one TFLite subgraph.

    In probe mode a node with no int8 TFLite form does not stop the walk: it is recorded in
    `failed` and its outputs become inputs of the subgraph, as they will be when it runs on the host.
    """

    def __init__(
        self,
        g: Graph,
        quants: dict[str, Quant],
        nodes: list[onnx.NodeProto],
        inputs: list[str],
        outputs: list[str],
        probe: bool = False,
    ):
        self.fb = _schema()
        self.nodes = [n for n in nodes if n.op_type != "Constant"]
        self.shapes = g.shapes
        self.consts = g.consts
        self.quants = quants
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self.probe = probe
        self.failed: dict[str, str] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)
        self.tensors: list = []
        self.buffers = [self.fb.BufferT()]  # buffer 0: the empty sentinel every non-constant tensor uses
        self.ops: list = []
        self.opcodes: dict[tuple[int, int], int] = {}
        self.vals: dict[str, tuple[int, tuple[int, ...]]] = {}  # onnx name -> (tensor, perm)
        self.layouts: dict[tuple[str, tuple[int, ...]], int] = {}
        self.skip: set[int] = set()  # ids of nodes folded into an earlier op
        self.renamed: dict[str, str] = {}  # an op's output -> the name of the activation/bias folded into it
        self.current = ""  # the node being written: each op records it as its origin

    def quant(self, name: str) -> Quant:
        name = self.renamed.get(name, name)
        if name not in self.quants:
            raise UserError(f"tensor '{name}' has no calibrated range (is it a float tensor of the model?)")
        return self.quants[name]

    # --- flatbuffer pieces ---------------------------------------------------------------------

    def tensor(
        self, name: str, shape, dtype: int, quant: Quant | None = None, data: np.ndarray | None = None
    ) -> int:
        t = self.fb.TensorT()
        t.name = name
        t.shape = [int(d) for d in shape]
        t.type = dtype
        if quant is not None:
            q = self.fb.QuantizationParametersT()
            q.scale = list(quant.scale)
            q.zeroPoint = list(quant.zero_point)
            q.quantizedDimension = quant.axis
            t.quantization = q
        t.buffer = 0
        if data is not None:
            b = self.fb.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            self.buffers.append(b)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const_int32(self, name: str, values) -> int:
        a = np.asarray(values, np.int32)
        return self.tensor(name, a.shape, self.fb.TensorType.INT32, data=a)

    def const_int8(self, name: str, value: np.ndarray, quant: Quant | None = None) -> int:
        value = np.asarray(value, np.float32)
        quant = quant or activation_quant(value.min(), value.max())
        return self.tensor(name, value.shape, self.fb.TensorType.INT8, quant, quantize(value, quant))

    def op(
        self, code: int, inputs: list[int], outputs: list[int], options=None, options_type: int = 0
    ) -> None:
        o = self.fb.OperatorT()
        o.opcodeIndex = code  # the builtin code for now; indices are assigned in finish()
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        o.origin = [self.current]
        self.ops.append(o)

    def act_tensor(self, name: str, shape, quant: Quant | None = None) -> int:
        return self.tensor(name, shape, self.fb.TensorType.INT8, quant or self.quant(name))

    # --- values and layouts --------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.consts:
            return tuple(self.consts[name].shape)
        if name not in self.shapes:
            raise UserError(
                f"tensor '{name}' has no static shape after the pipeline (static-shapes fixes the "
                "inputs; a size that depends on data cannot run on the Edge TPU)"
            )
        return self.shapes[name]

    def layout(self, name: str, want: tuple[int, ...]) -> int:
        """The tensor holding ONNX value `name` in layout `want` (a TRANSPOSE written on demand)."""
        idx, perm = self.val(name)
        if perm == want:
            return idx
        key = (name, want)
        if key not in self.layouts:
            q = [perm.index(j) for j in want]
            shape = [self.shape(name)[j] for j in want]
            out = self.act_tensor(f"{name}/perm{''.join(map(str, want))}", shape, self.quant(name))
            self.op(
                self.fb.BuiltinOperator.TRANSPOSE,
                [idx, self.const_int32(f"{name}/perm", q)],
                [out],
                self.fb.TransposeOptionsT(),
                self.fb.BuiltinOptions.TransposeOptions,
            )
            self.layouts[key] = out
        return self.layouts[key]

    def val(self, name: str) -> tuple[int, tuple[int, ...]]:
        if name not in self.vals:
            raise UserError(f"tensor '{name}' is not an int8 tensor of the device part")
        return self.vals[name]

    def plain(self, name: str) -> int:
        return self.layout(name, tuple(range(len(self.shape(name)))))

    def define(self, name: str, perm: tuple[int, ...] | None = None, quant: Quant | None = None) -> int:
        """A new tensor for the ONNX output `name` (after any folded activation) in layout `perm`."""
        final = self.renamed.get(name, name)
        shape = self.shape(final)
        perm = perm or tuple(range(len(shape)))
        idx = self.act_tensor(final, [shape[j] for j in perm], quant or self.quant(final))
        self.vals[final] = (idx, perm)
        return idx

    # --- folding -------------------------------------------------------------------------------

    def _only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.output_names:
            return None
        return users[0]

    def fused_activation(self, node: onnx.NodeProto) -> int:
        """Fold a Relu / Clip(0,6) / Clip(-1,1) that alone reads `node`'s output into it."""
        act = self.fb.ActivationFunctionType
        user = self._only_consumer(node.output[0])
        kind = self._activation_kind(user) if user is not None else None
        if kind is None:
            return act.NONE
        self.skip.add(id(user))
        self.renamed[node.output[0]] = user.output[0]
        return kind

    def _activation_kind(self, node: onnx.NodeProto) -> int | None:
        act = self.fb.ActivationFunctionType
        if node.op_type == "Relu":
            return act.RELU
        if node.op_type != "Clip":
            return None
        lo, hi = self._clip_bounds(node)
        return {(0.0, 6.0): act.RELU6, (-1.0, 1.0): act.RELU_N1_TO_1, (0.0, math.inf): act.RELU}.get((lo, hi))

    def _clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float]:
        attrs = _attrs(node)
        lo, hi = attrs.get("min", -math.inf), attrs.get("max", math.inf)
        if len(node.input) > 1 and node.input[1]:
            lo = float(self.consts[node.input[1]])
        if len(node.input) > 2 and node.input[2]:
            hi = float(self.consts[node.input[2]])
        return float(lo), float(hi)

    def folded_bias(self, node: onnx.NodeProto, n: int) -> np.ndarray | None:
        """A constant Add of n values that alone reads `node`'s output, folded into it."""
        user = self._only_consumer(node.output[0])
        if user is None or user.op_type != "Add":
            return None
        other = [x for x in user.input if x != node.output[0]]
        if len(other) != 1 or other[0] not in self.consts or self.consts[other[0]].size != n:
            return None
        self.skip.add(id(user))
        self.renamed[node.output[0]] = user.output[0]
        return self.consts[other[0]].reshape(n).astype(np.float32)

    # --- the walk ------------------------------------------------------------------------------

    def run(self) -> Exported:
        for name in self.input_names:
            self._input(name)
        for node in self.nodes:
            if id(node) in self.skip:
                continue
            self.current = node.name
            handler = getattr(self, f"_op_{node.op_type}", None)
            if handler is None or node.domain not in ("", "ai.onnx"):
                self._fail(node, UserError(
                    f"node '{node.name}' ({node.domain + '.' if node.domain else ''}{node.op_type}): "
                    "no int8 TFLite form in edgecc's Edge TPU exporter (supported: "
                    f"{', '.join(sorted(k[4:] for k in dir(self) if k.startswith('_op_')))})"
                ))
                continue
            if not self.probe:
                handler(node)
                continue
            saved = len(self.ops), dict(self.layouts), set(self.skip), dict(self.renamed), dict(self.vals)
            try:
                handler(node)
            except UserError as e:  # undo what the node half wrote
                self.ops = self.ops[: saved[0]]
                self.layouts, self.skip, self.renamed, self.vals = saved[1:]
                self._fail(node, e)
        if self.probe:  # an output a failed node would have made is the host's
            self.output_names = [name for name in self.output_names if name in self.vals]
        return self._finish([self.plain(name) for name in self.output_names])

    def _input(self, name: str) -> None:
        self.vals[name] = (self.act_tensor(name, self.shape(name)), tuple(range(len(self.shape(name)))))

    def _fail(self, node: onnx.NodeProto, error: UserError) -> None:
        """Outside probe mode, the error; in it, the node's outputs become the subgraph's inputs."""
        if not self.probe:
            raise error
        self.failed[node.name] = str(error)
        for name in node.output:
            if name and name in self.quants and name in self.shapes:
                self._input(name)
                self.input_names.append(name)

    # element-wise -------------------------------------------------------------------------------

    def _binary(self, node: onnx.NodeProto, code: int, options, options_type: int, b_value=None) -> None:
        a_name, b_name = node.input[0], node.input[1]
        operands = [
            (a_name, self.consts.get(a_name)),
            (b_name, b_value if b_value is not None else self.consts.get(b_name)),
        ]
        acts = [name for name, c in operands if c is None]
        if not acts:
            raise UserError(
                f"node '{node.name}' ({node.op_type}) has only constant inputs; run simplify first"
            )
        perms = {self.val(n)[1] for n in acts}
        ranks = {len(self.shape(n)) for n in acts}
        perm = perms.pop() if len(perms) == 1 and len(ranks) == 1 else None
        out_rank = len(self.shape(node.output[0]))
        if perm is not None and len(perm) != out_rank:
            perm = None
        inputs = []
        for i, (name, c) in enumerate(operands):
            if c is None:
                inputs.append(self.layout(name, perm) if perm else self.plain(name))
                continue
            if perm:
                c = np.asarray(c).reshape((1,) * (out_rank - np.ndim(c)) + np.shape(c)).transpose(perm)
            inputs.append(self.const_int8(f"{node.output[0]}/const{i}", c))
        if hasattr(options, "fusedActivationFunction"):
            options.fusedActivationFunction = self.fused_activation(node)
        out = self.define(node.output[0], perm)
        self.op(code, inputs, [out], options, options_type)

    def _op_Add(self, node):
        self._binary(
            node, self.fb.BuiltinOperator.ADD, self.fb.AddOptionsT(), self.fb.BuiltinOptions.AddOptions
        )

    def _op_Sub(self, node):
        self._binary(
            node, self.fb.BuiltinOperator.SUB, self.fb.SubOptionsT(), self.fb.BuiltinOptions.SubOptions
        )

    def _op_Mul(self, node):
        self._binary(
            node, self.fb.BuiltinOperator.MUL, self.fb.MulOptionsT(), self.fb.BuiltinOptions.MulOptions
        )

    def _op_Div(self, node):
        divisor = self.consts.get(node.input[1])
        if divisor is None:
            raise UserError(
                f"node '{node.name}' (Div): division by a tensor has no int8 TFLite op; "
                "only division by a constant (a MUL by its reciprocal)"
            )
        self._binary(
            node,
            self.fb.BuiltinOperator.MUL,
            self.fb.MulOptionsT(),
            self.fb.BuiltinOptions.MulOptions,
            b_value=(1.0 / divisor).astype(np.float32),
        )

    def _op_Pow(self, node):
        exponent = self.consts.get(node.input[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) != 2.0:
            raise UserError(f"node '{node.name}' (Pow): only x^2 (a MUL) has an int8 TFLite form")
        idx, perm = self.val(node.input[0])
        self.op(
            self.fb.BuiltinOperator.MUL,
            [idx, idx],
            [self.define(node.output[0], perm)],
            self.fb.MulOptionsT(),
            self.fb.BuiltinOptions.MulOptions,
        )

    def _unary(
        self,
        node,
        code: int,
        options=None,
        options_type: int = 0,
        source: str | None = None,
        plain: bool = False,
    ) -> None:
        source = source or node.input[0]
        idx, perm = (self.plain(source), None) if plain else self.val(source)
        quant = None
        if node.op_type in FIXED_OUTPUT_QUANT:
            scale, zp = FIXED_OUTPUT_QUANT[node.op_type]
            quant = Quant((scale,), (zp,))
        self.op(code, [idx], [self.define(node.output[0], perm, quant)], options, options_type)

    def _op_Relu(self, node):
        self._unary(node, self.fb.BuiltinOperator.RELU)

    def _op_Clip(self, node):
        kind = self._activation_kind(node)
        codes = {
            self.fb.ActivationFunctionType.RELU: self.fb.BuiltinOperator.RELU,
            self.fb.ActivationFunctionType.RELU6: self.fb.BuiltinOperator.RELU6,
            self.fb.ActivationFunctionType.RELU_N1_TO_1: self.fb.BuiltinOperator.RELU_N1_TO_1,
        }
        if kind is None:
            raise UserError(
                f"node '{node.name}' (Clip {self._clip_bounds(node)}): only [0, inf), [0, 6] and "
                "[-1, 1] have int8 TFLite ops (RELU, RELU6, RELU_N1_TO_1)"
            )
        self._unary(node, codes[kind])

    def _op_Sigmoid(self, node):
        self._unary(node, self.fb.BuiltinOperator.LOGISTIC)

    def _op_Tanh(self, node):
        self._unary(node, self.fb.BuiltinOperator.TANH)

    def _op_Sqrt(self, node):
        user = self._only_consumer(node.output[0])
        if user is None or user.op_type != "Reciprocal":
            raise UserError(
                f"node '{node.name}' (Sqrt): int8 TFLite has RSQRT, not SQRT; only "
                "Reciprocal(Sqrt(x)) is exported (as RSQRT)"
            )
        self.skip.add(id(user))
        self._unary(user, self.fb.BuiltinOperator.RSQRT, source=node.input[0])

    def _op_Identity(self, node):
        self.vals[node.output[0]] = self.val(node.input[0])

    _op_Dropout = _op_Identity

    # data movement -----------------------------------------------------------------------------

    def _reshape(self, node: onnx.NodeProto) -> None:
        out_shape = self.shape(node.output[0])
        options = self.fb.ReshapeOptionsT()
        options.newShape = list(out_shape)
        src = self.plain(node.input[0])
        self.op(
            self.fb.BuiltinOperator.RESHAPE,
            [src, self.const_int32(f"{node.output[0]}/shape", out_shape)],
            [self.define(node.output[0])],
            options,
            self.fb.BuiltinOptions.ReshapeOptions,
        )

    _op_Reshape = _op_Flatten = _op_Squeeze = _op_Unsqueeze = _reshape

    def _op_Transpose(self, node):
        idx, perm = self.val(node.input[0])
        attrs = _attrs(node)
        s = list(attrs.get("perm", reversed(range(len(perm)))))
        self.vals[node.output[0]] = (idx, tuple(s.index(p) for p in perm))  # no op: a new view

    def _op_Concat(self, node):
        axis = onnx.helper.get_attribute_value(node.attribute[0]) if node.attribute else 0
        rank = len(self.shape(node.output[0]))
        axis %= rank
        q = self.quant(node.output[0])
        acts = [x for x in node.input if x not in self.consts]
        perms = {self.val(x)[1] for x in acts}
        perm = perms.pop() if len(perms) == 1 else tuple(range(rank))
        inputs = []
        for i, x in enumerate(node.input):
            if x in self.consts:
                inputs.append(
                    self.const_int8(f"{node.output[0]}/const{i}", self.consts[x].transpose(perm), q)
                )
            else:
                inputs.append(self.layout(x, perm))
        options = self.fb.ConcatenationOptionsT()
        options.axis = perm.index(axis)
        self.op(
            self.fb.BuiltinOperator.CONCATENATION,
            inputs,
            [self.define(node.output[0], perm)],
            options,
            self.fb.BuiltinOptions.ConcatenationOptions,
        )

    def _op_Split(self, node):
        attrs = _attrs(node)
        rank = len(self.shape(node.input[0]))
        axis = attrs.get("axis", 0) % rank
        sizes = [self.shape(o)[axis] for o in node.output]
        src = self.plain(node.input[0])
        outs = [self.define(o) for o in node.output]
        if len(set(sizes)) == 1:
            options = self.fb.SplitOptionsT()
            options.numSplits = len(sizes)
            self.op(
                self.fb.BuiltinOperator.SPLIT,
                [self.const_int32(f"{node.output[0]}/axis", axis), src],
                outs,
                options,
                self.fb.BuiltinOptions.SplitOptions,
            )
        else:
            options = self.fb.SplitVOptionsT()
            options.numSplits = len(sizes)
            self.op(
                self.fb.BuiltinOperator.SPLIT_V,
                [
                    src,
                    self.const_int32(f"{node.output[0]}/sizes", sizes),
                    self.const_int32(f"{node.output[0]}/axis", axis),
                ],
                outs,
                options,
                self.fb.BuiltinOptions.SplitVOptions,
            )

    # reductions and normalization -------------------------------------------------------------

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        attrs = _attrs(node)
        if len(node.input) > 1 and node.input[1]:
            return [int(a) for a in self.consts[node.input[1]].reshape(-1)]
        return list(attrs["axes"]) if "axes" in attrs else None

    def _op_ReduceMean(self, node):
        attrs = _attrs(node)
        rank = len(self.shape(node.input[0]))
        axes = self._axes(node)
        axes = sorted(a % rank for a in (axes if axes is not None else range(rank)))
        keep = bool(attrs.get("keepdims", 1))
        idx, perm = self.val(node.input[0])
        if not keep:
            idx, perm = self.plain(node.input[0]), tuple(range(rank))
        options = self.fb.ReducerOptionsT()
        options.keepDims = keep
        out = self.define(node.output[0], perm if keep else None)
        self.op(
            self.fb.BuiltinOperator.MEAN,
            [idx, self.const_int32(f"{node.output[0]}/axes", [perm.index(a) for a in axes])],
            [out],
            options,
            self.fb.BuiltinOptions.ReducerOptions,
        )

    def _op_GlobalAveragePool(self, node):
        options = self.fb.ReducerOptionsT()
        options.keepDims = True
        self.op(
            self.fb.BuiltinOperator.MEAN,
            [self.layout(node.input[0], NHWC), self.const_int32(f"{node.output[0]}/axes", [1, 2])],
            [self.define(node.output[0], NHWC)],
            options,
            self.fb.BuiltinOptions.ReducerOptions,
        )

    def _op_Softmax(self, node):
        attrs = _attrs(node)
        rank = len(self.shape(node.input[0]))
        if attrs.get("axis", -1) % rank != rank - 1:
            raise UserError(
                f"node '{node.name}' (Softmax over axis {attrs['axis']}): TFLite's SOFTMAX "
                "normalizes the last axis only"
            )
        options = self.fb.SoftmaxOptionsT()
        options.beta = 1.0
        self._unary(
            node, self.fb.BuiltinOperator.SOFTMAX, options, self.fb.BuiltinOptions.SoftmaxOptions, plain=True
        )

    # convolution, pooling, matmul --------------------------------------------------------------

    def _padding(self, node: onnx.NodeProto, kernel: list[int], strides: list[int], dilations: list[int]):
        """(TFLite padding, explicit [[top, bottom], [left, right]] or None) for an ONNX window op."""
        attrs = _attrs(node)
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto == "VALID":
            return self.fb.Padding.VALID, None
        if auto == "SAME_UPPER":
            return self.fb.Padding.SAME, None
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        if not any(pads):
            return self.fb.Padding.VALID, None
        in_hw = self.shape(node.input[0])[2:]
        same = []
        for size, k, s, d in zip(in_hw, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            same += [total // 2, total - total // 2]
        if [pads[0], pads[2], pads[1], pads[3]] == same:
            return self.fb.Padding.SAME, None
        return self.fb.Padding.VALID, [[pads[0], pads[2]], [pads[1], pads[3]]]

    def _window(self, node: onnx.NodeProto, kernel: list[int]):
        attrs = _attrs(node)
        if len(kernel) != 2:
            raise UserError(f"node '{node.name}' ({node.op_type}): only 2-D windows have TFLite ops")
        strides = list(attrs.get("strides", [1, 1]))
        dilations = list(attrs.get("dilations", [1, 1]))
        padding, explicit = self._padding(node, kernel, strides, dilations)
        return strides, dilations, padding, explicit

    def _padded(self, node: onnx.NodeProto, explicit) -> int:
        src = self.layout(node.input[0], NHWC)
        if explicit is None:
            return src
        shape = list(self.tensors[src].shape)
        shape[1] += sum(explicit[0])
        shape[2] += sum(explicit[1])
        out = self.act_tensor(f"{node.input[0]}/padded", shape, self.quant(node.input[0]))
        pads = self.const_int32(f"{node.input[0]}/pads", [[0, 0], *explicit, [0, 0]])
        self.op(
            self.fb.BuiltinOperator.PAD,
            [src, pads],
            [out],
            self.fb.PadOptionsT(),
            self.fb.BuiltinOptions.PadOptions,
        )
        return out

    def _op_Conv(self, node):
        attrs = _attrs(node)
        w = self.consts.get(node.input[1])
        if w is None or w.ndim != 4:
            raise UserError(f"node '{node.name}' (Conv): only 2-D convolutions with constant weights")
        out_c, in_per_group, kh, kw = w.shape
        group = attrs.get("group", 1)
        in_c = self.shape(node.input[0])[1]
        strides, dilations, padding, explicit = self._window(node, [kh, kw])
        src = self._padded(node, explicit)
        in_scale = self.quant(node.input[0]).scale[0]
        bias = (
            self.consts[node.input[2]]
            if len(node.input) > 2 and node.input[2]
            else np.zeros(out_c, np.float32)
        )
        if group == 1:
            code, axis = self.fb.BuiltinOperator.CONV_2D, 0
            wt = w.transpose(0, 2, 3, 1)  # OIHW -> OHWI
            options, otype = self.fb.Conv2DOptionsT(), self.fb.BuiltinOptions.Conv2DOptions
        elif group == in_c and in_per_group == 1:
            code, axis = self.fb.BuiltinOperator.DEPTHWISE_CONV_2D, 3
            wt = w.transpose(1, 2, 3, 0)  # [C*m, 1, H, W] -> [1, H, W, C*m]
            options, otype = self.fb.DepthwiseConv2DOptionsT(), self.fb.BuiltinOptions.DepthwiseConv2DOptions
            options.depthMultiplier = out_c // in_c
        else:
            raise UserError(
                f"node '{node.name}' (Conv, group={group}): grouped convolutions other than "
                "depthwise have no Edge TPU form"
            )
        wq, wquant = _weight_quant(wt, axis)
        options.padding = padding
        options.strideH, options.strideW = strides
        options.dilationHFactor, options.dilationWFactor = dilations
        options.fusedActivationFunction = self.fused_activation(node)
        weights = self.tensor(f"{node.input[1]}/int8", wt.shape, self.fb.TensorType.INT8, wquant, wq)
        bias_idx = self._bias(f"{node.output[0]}/bias", bias, in_scale, wquant)
        self.op(code, [src, weights, bias_idx], [self.define(node.output[0], NHWC)], options, otype)

    def _bias(self, name: str, bias: np.ndarray, in_scale: float, wquant: Quant) -> int:
        scale = in_scale * np.asarray(wquant.scale)
        q = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        quant = Quant(tuple(float(s) for s in scale), (0,) * len(scale), 0)
        return self.tensor(name, q.shape, self.fb.TensorType.INT32, quant, q)

    def _pool(self, node, code: int) -> None:
        attrs = _attrs(node)
        kernel = list(attrs["kernel_shape"])
        strides, dilations, padding, explicit = self._window(node, kernel)
        if explicit is not None or any(d != 1 for d in dilations) or attrs.get("ceil_mode", 0):
            raise UserError(
                f"node '{node.name}' ({node.op_type}): only SAME or VALID padding, no dilation, "
                "no ceil_mode (TFLite pools)"
            )
        if (
            node.op_type == "AveragePool"
            and attrs.get("count_include_pad", 0)
            and padding == self.fb.Padding.SAME
        ):
            raise UserError(
                f"node '{node.name}' (AveragePool): count_include_pad=1 with padding; "
                "TFLite averages over the valid pixels only"
            )
        options = self.fb.Pool2DOptionsT()
        options.padding = padding
        options.strideH, options.strideW = strides
        options.filterHeight, options.filterWidth = kernel
        self.op(
            code,
            [self.layout(node.input[0], NHWC)],
            [self.define(node.output[0], NHWC)],
            options,
            self.fb.BuiltinOptions.Pool2DOptions,
        )

    def _op_MaxPool(self, node):
        if len(node.output) > 1 and node.output[1]:
            raise UserError(f"node '{node.name}' (MaxPool): the indices output has no TFLite form")
        self._pool(node, self.fb.BuiltinOperator.MAX_POOL_2D)

    def _op_AveragePool(self, node):
        self._pool(node, self.fb.BuiltinOperator.AVERAGE_POOL_2D)

    def _fully_connected(
        self, node: onnx.NodeProto, x: str, w_nk: np.ndarray, bias: np.ndarray | None
    ) -> None:
        n = w_nk.shape[0]
        if bias is None:
            bias = self.folded_bias(node, n)
        wq, wquant = _weight_quant(w_nk, None)
        options = self.fb.FullyConnectedOptionsT()
        options.keepNumDims = len(self.shape(x)) > 2
        options.fusedActivationFunction = self.fused_activation(node)
        weights = self.tensor(f"{node.output[0]}/weights", w_nk.shape, self.fb.TensorType.INT8, wquant, wq)
        inputs = [self.plain(x), weights]
        inputs.append(
            self._bias(
                f"{node.output[0]}/bias",
                bias if bias is not None else np.zeros(n, np.float32),
                self.quant(x).scale[0],
                wquant,
            )
        )
        self.op(
            self.fb.BuiltinOperator.FULLY_CONNECTED,
            inputs,
            [self.define(node.output[0])],
            options,
            self.fb.BuiltinOptions.FullyConnectedOptions,
        )

    def _op_MatMul(self, node):
        a, b = node.input
        if b in self.consts and self.consts[b].ndim == 2:
            self._fully_connected(node, a, self.consts[b].T.astype(np.float32), None)
            return
        if a in self.consts or b in self.consts:
            raise UserError(f"node '{node.name}' (MatMul): a constant operand must be the 2-D right-hand one")
        options = self.fb.BatchMatMulOptionsT()
        self.op(
            self.fb.BuiltinOperator.BATCH_MATMUL,
            [self.plain(a), self.plain(b)],
            [self.define(node.output[0])],
            options,
            self.fb.BuiltinOptions.BatchMatMulOptions,
        )

    def _op_Gemm(self, node):
        attrs = _attrs(node)
        w = self.consts.get(node.input[1])
        if attrs.get("transA", 0) or w is None:
            raise UserError(f"node '{node.name}' (Gemm): only transA=0 with a constant B")
        w = w if attrs.get("transB", 0) else w.T
        w = (w * attrs.get("alpha", 1.0)).astype(np.float32)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = (self.consts[node.input[2]].reshape(-1) * attrs.get("beta", 1.0)).astype(np.float32)
            bias = np.broadcast_to(bias, (w.shape[0],)).copy()
        self._fully_connected(node, node.input[0], w, bias)

    # --- finishing -----------------------------------------------------------------------------

    def _fold_movement_chains(self, outputs: list[int]) -> None:
        """Replace each chain of RESHAPE/TRANSPOSE ops that keeps the data order by one RESHAPE."""
        movement = {self.fb.BuiltinOperator.RESHAPE, self.fb.BuiltinOperator.TRANSPOSE}
        producer = {o: op for op in self.ops for o in op.outputs}
        consumers: dict[int, list] = defaultdict(list)
        for op in self.ops:
            for i in op.inputs:
                consumers[i].append(op)
        uses = Counter({i: len(c) for i, c in consumers.items()})
        for o in outputs:
            uses[o] += 1

        def chain_end(op) -> bool:  # not read by exactly one more movement op
            users = consumers[op.outputs[0]]
            return not (uses[op.outputs[0]] == 1 and users and users[0].opcodeIndex in movement)

        kept = []
        for op in self.ops:
            if op.opcodeIndex in movement and chain_end(op):
                chain = [op]
                while True:
                    src = producer.get(chain[0].inputs[0])
                    if src is None or src.opcodeIndex not in movement or uses[src.outputs[0]] != 1:
                        break
                    chain.insert(0, src)
                # The longest tail of the chain that only re-labels the data order becomes one RESHAPE.
                tail = next((chain[i:] for i in range(len(chain) - 1) if self._keeps_order(chain[i:])), None)
                if tail is not None:
                    first, last = tail[0], tail[-1]
                    shape = self.tensors[last.outputs[0]].shape
                    options = self.fb.ReshapeOptionsT()
                    options.newShape = list(shape)
                    merged = self.fb.OperatorT()
                    merged.opcodeIndex = self.fb.BuiltinOperator.RESHAPE
                    merged.inputs = [
                        first.inputs[0],
                        self.const_int32(f"{self.tensors[last.outputs[0]].name}/shape", shape),
                    ]
                    merged.outputs = list(last.outputs)
                    merged.builtinOptionsType = self.fb.BuiltinOptions.ReshapeOptions
                    merged.builtinOptions = options
                    merged.origin = sorted({o for c in tail for o in c.origin})
                    kept = [k for k in kept if not any(k is c for c in tail)]
                    kept.append(merged)
                    continue
            kept.append(op)
        self.ops = kept

    def _keeps_order(self, chain: list) -> bool:
        shape = self.tensors[chain[0].inputs[0]].shape
        order = np.arange(math.prod(shape)).reshape(shape)
        for op in chain:
            if op.opcodeIndex == self.fb.BuiltinOperator.TRANSPOSE:
                perm = np.frombuffer(self.buffers[self.tensors[op.inputs[1]].buffer].data.tobytes(), np.int32)
                order = order.transpose(perm)
            else:
                order = order.reshape(self.tensors[op.outputs[0]].shape)
        return bool((order.reshape(-1) == np.arange(order.size)).all())

    def _version(self, op) -> int:
        """The version op_version.cc gives these int8 tensors."""
        B = self.fb.BuiltinOperator
        code = op.opcodeIndex
        ins = [self.tensors[i] for i in op.inputs]
        if code == B.MUL:
            s = [t.quantization.scale[0] for t in (ins[0], ins[1], self.tensors[op.outputs[0]])]
            return 3 if s[0] * s[1] / s[2] >= 1.0 else 2
        if code == B.FULLY_CONNECTED:
            return 5 if op.builtinOptions.keepNumDims else 4
        if code in (B.TRANSPOSE, B.PAD):
            return 4 if len(ins[0].shape) > 4 else 2
        if code == B.SPLIT_V:
            return 2
        return {B.CONV_2D: 3, B.DEPTHWISE_CONV_2D: 3, B.RESHAPE: 1, B.RELU_N1_TO_1: 1}.get(code, 2)

    def _finish(self, outputs: list[int]) -> Exported:
        self._fold_movement_chains(outputs)
        used = sorted(
            {i for op in self.ops for i in (*op.inputs, *op.outputs)}
            | set(outputs)
            | {self.vals[n][0] for n in self.input_names}
        )
        remap = {old: new for new, old in enumerate(used)}
        tensors, buffers = [], [self.fb.BufferT()]
        for old in used:
            t = self.tensors[old]
            if t.buffer:
                buffers.append(self.buffers[t.buffer])
                t.buffer = len(buffers) - 1
            tensors.append(t)
        codes: list = []
        for op in self.ops:
            key = (op.opcodeIndex, self._version(op))
            if key not in self.opcodes:
                oc = self.fb.OperatorCodeT()
                oc.builtinCode = key[0]
                oc.deprecatedBuiltinCode = min(key[0], 127)
                oc.version = key[1]
                self.opcodes[key] = len(codes)
                codes.append(oc)
            op.opcodeIndex = self.opcodes[key]
            op.inputs = [remap[i] for i in op.inputs]
            op.outputs = [remap[i] for i in op.outputs]
        sub = self.fb.SubGraphT()
        sub.tensors = tensors
        sub.inputs = [remap[self.vals[n][0]] for n in self.input_names]
        sub.outputs = [remap[i] for i in outputs]
        sub.operators = self.ops
        sub.name = "main"
        for name, idx in zip(self.output_names, sub.outputs):
            for t in tensors:  # the output keeps the ONNX name; a same-named NHWC original steps aside
                if t.name == name and t is not tensors[idx]:
                    t.name = f"{name}/internal"
            tensors[idx].name = name
        model = self.fb.ModelT()
        model.version = 3
        model.description = "edgecc: fully int8 for the Edge TPU"
        model.operatorCodes = codes
        model.subgraphs = [sub]
        model.buffers = buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return Exported(bytes(builder.Output()), [op.origin for op in self.ops], self.failed)


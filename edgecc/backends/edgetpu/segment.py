"""The legalized graph cut into Edge TPU segments and host segments.

edgetpu_compiler maps one contiguous run of supported ops per model and leaves the rest to the
CPU, so a transformer's first activation x activation matmul (attention's Q.K^T) would end the only
TPU segment. edgecc makes the cut itself, so that every linear layer lands on the TPU:

1. placement: a node goes to the host when it reads an integer tensor (lookups, index arithmetic),
   when it has no int8 TFLite form, or when one of its TFLite ops is predicted not to map (the
   target's table: activation x activation BATCH_MATMUL, a SOFTMAX over more than one dim ...);
   the whole graph is exported once in probe mode and every op's status read;
2. grouping: a topological order that stays on one side as long as it can; each run is a segment;
3. a TPU segment without multiply-accumulates goes to the host: it would only add transfers;
4. each TPU segment is exported alone and predicted again; a node whose ops no longer map there
   (a layout its neighbours impose) goes to the host and the cut is made again.

A value crossing a cut is int8 when an Edge TPU segment writes or reads it, with the scale and zero
point of one quantization plan for the whole graph, so producer and consumer agree and nothing is
requantized at the seam; host segments dequantize what they read and quantize what the TPU reads.
Between host segments values stay float.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgecc.backends.edgetpu import predict, tflite
from edgecc.passes.equalize_channels import PLACEMENT_KEY
from edgecc.runtime.litert import Quant

EDGETPU, HOST = "edgetpu", "host"
INTEGER = "reads an integer tensor: lookups and index arithmetic run on the host"
PLACED = "placed on the host by equalize-channels: a per-channel scale in float"
NO_MACS = "in a run of ops without multiply-accumulates: on the Edge TPU it would only add transfers"


@dataclasses.dataclass
class Segment:
    kind: str
    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    exported: tflite.Exported | None = None  # Edge TPU segments
    ops: list[dict] | None = None  # their per-op prediction


@dataclasses.dataclass
class Plan:
    segments: list[Segment]
    host: dict[str, str]  # node on the host -> why
    macs: dict[str, int]  # node -> multiply-accumulates
    int8: dict[str, Quant]  # values crossing a cut as int8 -> their quantization
    shapes: dict[str, tuple[int, ...]]


def plan(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], table: dict) -> Plan:
    """Place, group and export: the segments of `model` (nodes named uniquely first)."""
    _name_nodes(model.graph)
    g = tflite.Graph.of(model)
    nodes = [n for n in model.graph.node if n.op_type != "Constant"]
    quants = tflite.plan_quants(nodes, ranges, set(g.consts))
    macs = {n.name: node_macs(n, g) for n in nodes}
    host = dict.fromkeys(_integer_nodes(model), INTEGER)
    host.update((n.name, PLACED) for n in nodes if _placed_on_host(n))
    host.update(_probe(model, g, quants, nodes, host, table))
    while True:
        segments = _group(model, nodes, host)
        for s in segments:  # a TPU op reads shapes from its static ones: integer shape operands stay behind
            if s.kind == EDGETPU:
                s.inputs = [x for x in s.inputs if x in quants]
        idle = [s for s in segments if s.kind == EDGETPU and not any(macs[n.name] for n in s.nodes)]
        if idle and any(macs.values()):
            host.update({n.name: NO_MACS for s in idle for n in s.nodes})
            continue
        unmapped = {}
        for s in segments:
            if s.kind == EDGETPU:
                s.exported = tflite.Exporter(g, quants, s.nodes, s.inputs, s.outputs).run()
                s.ops = predict.op_statuses(s.exported.flatbuffer, table)
                unmapped.update(_unmapped(s.ops, s.exported.origins))
        if not unmapped:
            break
        host.update(unmapped)
    producer = {o: s for s in segments for n in s.nodes for o in n.output}
    readers = defaultdict(set)
    for s in segments:
        for name in s.inputs:
            readers[name].add(s.kind)
    crossing = {name for s in segments for name in (*s.inputs, *s.outputs)}
    int8 = {
        name: quants[name]
        for name in crossing
        if name in quants
        and (EDGETPU in readers[name] or (name in producer and producer[name].kind == EDGETPU))
    }
    return Plan(segments, host, macs, int8, g.shapes)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every node a unique name: placement and the prediction refer to nodes by name."""
    seen: set[str] = set()
    for i, n in enumerate(graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def _placed_on_host(node: onnx.NodeProto) -> bool:
    return any(p.key == PLACEMENT_KEY and p.value == "host" for p in node.metadata_props)


def _integer_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes reading an integer tensor that derives from an integer graph input."""
    dtypes = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output)
    }
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    tainted = {i.name for i in model.graph.input if dtypes[i.name] not in floats}
    out = []
    for n in model.graph.node:
        if any(x in tainted for x in n.input):
            out.append(n.name)
            tainted.update(o for o in n.output if o in dtypes and dtypes[o] not in floats)
    return out


def _unmapped(ops: list[dict], origins: list[list[str]]) -> dict[str, str]:
    out = {}
    for op, origin in zip(ops, origins):
        if op["status"] != predict.MAPPED:
            why = f"{op['op']}: {op['status']}" + (f" ({op['why']})" if op["why"] else "")
            out.update((name, why) for name in origin)
    return out


def _probe(model, g, quants, nodes, host, table) -> dict[str, str]:
    """Every node that cannot run on the Edge TPU, and why: one export of all other nodes."""
    device = [n for n in nodes if n.name not in host]
    made = {o for n in device for o in n.output}
    inputs = list(dict.fromkeys(
        x for n in device for x in n.input if x and x not in made and x not in g.consts and x in quants
    ))
    outputs = [o.name for o in model.graph.output if o.name in made]
    probe = tflite.Exporter(g, quants, device, inputs, outputs, probe=True).run()
    return {**probe.failed, **_unmapped(predict.op_statuses(probe.flatbuffer, table), probe.origins)}


def _group(model: onnx.ModelProto, nodes: list[onnx.NodeProto], host: dict[str, str]) -> list[Segment]:
    """Segments from a topological order that switches sides only when nothing on its side is ready."""
    order = {id(n): i for i, n in enumerate(nodes)}
    producer = {o: n for n in nodes for o in n.output}
    users: dict[int, list] = defaultdict(list)
    waiting = {}
    for n in nodes:
        deps = {id(producer[x]) for x in n.input if x in producer}
        waiting[id(n)] = len(deps)
        for d in deps:
            users[d].append(n)
    ready: dict[str, list] = {EDGETPU: [], HOST: []}

    def kind(n) -> str:
        return HOST if n.name in host else EDGETPU

    def push(n) -> None:
        heapq.heappush(ready[kind(n)], (order[id(n)], id(n), n))

    for n in nodes:
        if not waiting[id(n)]:
            push(n)
    runs: list[tuple[str, list]] = []
    while ready[EDGETPU] or ready[HOST]:
        if not runs or not ready[runs[-1][0]]:
            side = min((k for k in ready if ready[k]), key=lambda k: ready[k][0][0])
            runs.append((side, []))
        n = heapq.heappop(ready[runs[-1][0]])[2]
        runs[-1][1].append(n)
        for u in users[id(n)]:
            waiting[id(u)] -= 1
            if not waiting[id(u)]:
                push(u)
    model_outputs = {o.name for o in model.graph.output}
    consts = {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"
    }
    readers: dict[str, set[int]] = defaultdict(set)
    for n in nodes:
        for x in n.input:
            readers[x].add(id(n))
    segments = []
    for side, members in runs:
        made = {o for n in members for o in n.output if o}
        ids = {id(n) for n in members}
        inputs = list(dict.fromkeys(
            x for n in members for x in n.input if x and x not in made and x not in consts
        ))
        outputs = [o for n in members for o in n.output if o and (o in model_outputs or readers[o] - ids)]
        segments.append(Segment(side, members, inputs, outputs))
    return segments


def node_macs(node: onnx.NodeProto, g: tflite.Graph) -> int:
    """Multiply-accumulates of a MatMul, Gemm or Conv node (0 for every other op)."""
    def shape(name):
        return g.consts[name].shape if name in g.consts else g.shapes.get(name)

    out = shape(node.output[0]) if node.output else None
    if out is None or node.op_type not in ("MatMul", "Gemm", "Conv"):
        return 0
    if node.op_type == "Conv":
        w = shape(node.input[1])
        return math.prod(out) * math.prod(w[1:]) if w is not None else 0
    a = shape(node.input[0])
    if a is None:
        return 0
    trans_a = any(x.name == "transA" and x.i for x in node.attribute)
    return math.prod(out) * int(a[0] if node.op_type == "Gemm" and trans_a else a[-1])


def host_model(model: onnx.ModelProto, seg: Segment, int8: dict[str, Quant]) -> onnx.ModelProto:
    """A host segment as its own ONNX model: int8 inputs dequantized, int8 outputs quantized."""
    g = model.graph
    infos = {vi.name: vi for vi in (*g.input, *g.value_info, *g.output)}
    inits = {t.name: t for t in g.initializer}
    constants = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    rename = {name: f"{name}/float" for name in (*seg.inputs, *seg.outputs) if name in int8}
    pre, post, params = [], [], []
    for name in seg.inputs + seg.outputs:
        if name not in int8:
            continue
        q = int8[name]
        scale, zero = f"{name}/scale", f"{name}/zero_point"
        params += [
            numpy_helper.from_array(np.array(q.scale[0], np.float32), scale),
            numpy_helper.from_array(np.array(q.zero_point[0], np.int8), zero),
        ]
        if name in seg.inputs:
            pre.append(helper.make_node("DequantizeLinear", [name, scale, zero], [rename[name]]))
        else:
            post.append(helper.make_node("QuantizeLinear", [rename[name], scale, zero], [name]))
    body = []
    for n in seg.nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [rename.get(x, x) for x in n.input]
        c.output[:] = [rename.get(x, x) for x in n.output]
        body.append(c)
    read = {x for n in seg.nodes for x in n.input}
    body = [constants[x] for x in sorted(read) if x in constants] + body

    def info(name: str) -> onnx.ValueInfoProto:
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(infos[name])
        if name in int8:
            vi.type.tensor_type.elem_type = TensorProto.INT8
        return vi

    graph = helper.make_graph(
        pre + body + post,
        f"{g.name}_host",
        [info(x) for x in seg.inputs],
        [info(x) for x in seg.outputs],
        [inits[x] for x in sorted(read) if x in inits] + params,
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out

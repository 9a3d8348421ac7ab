"""equalize-channels: per-channel scales where int8 linear layers meet float host code.

On the Edge TPU a tensor is int8 with one scale, so a channel that runs 20x larger than the others
(BERT's residual stream and FFN outputs do) sets the step for all of them. Where a linear layer
reads from, or writes to, code that runs on the host in float, its channels can be rescaled for
free, exactly in float:

- input: X @ W = (X / t) @ (t * W): the host divides X by t, the rows of W take t (SmoothQuant's
  t = max|X_c|^alpha / max|W_c|^(1 - alpha)); linear layers reading the same X share one t;
- output: X @ W + b = (X @ (W / s) + b / s) * s, s = each output channel's peak over the median
  channel's: the TPU writes channels of equal range and the host multiplies s back.

The two Muls are marked for the host (node metadata `edgecc.placement`), so the Edge TPU backend
cuts there. Only tensors that one int8 scale would damage are rescaled (rounding error above
`max_error` of the median channel's RMS on the calibration inputs): a model whose tensors quantize
well stays whole.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecc.core.calibration import activation_batches
from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_array, constant_matrix

PLACEMENT_KEY = "edgecc.placement"
LEVELS = 255  # int8 steps between a tensor's calibrated min and max
FLOOR = 1e-5  # no channel scale below this fraction of the largest: all-zero channels stay finite


class _Stats:
    """Per-channel peak |x| and RMS over the samples, and what per-tensor int8 would do to them."""

    def __init__(self):
        self.peak, self.sq, self.lo, self.hi, self.rows = None, None, 0.0, 0.0, 0

    def add(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        peak, sq = np.abs(rows).max(axis=0), (rows**2).sum(axis=0)
        self.peak = peak if self.peak is None else np.maximum(self.peak, peak)
        self.sq = sq if self.sq is None else self.sq + sq
        self.lo, self.hi = min(self.lo, rows.min()), max(self.hi, rows.max())
        self.rows += len(rows)

    def int8_error(self) -> float:
        """The rounding error of one int8 scale over the whole tensor, relative to the RMS of its
        median channel: a loud channel that leaves the others a few levels shows here, where the
        tensor's own relative error, dominated by that channel, would look fine."""
        typical = np.median(np.sqrt(self.sq / max(self.rows, 1)))
        return float((self.hi - self.lo) / LEVELS / np.sqrt(12) / typical) if typical > 0 else 0.0


def _linears(graph: ir.Graph) -> list[tuple[ir.Node, np.ndarray, ir.Node | None, np.ndarray | None]]:
    """(MatMul, W, bias Add or None, bias or None) for every X @ W with a constant 2-D float W."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = constant_matrix(node.inputs[1], dtype=None)
        x, y = node.inputs[0], node.outputs[0]
        if w is None or x.shape is None or x.shape[-1] != w.shape[0]:
            continue
        users = [u for u, _ in y.uses()]
        add, bias = None, None
        if len(users) == 1 and users[0].op_type == "Add" and not y.is_graph_output():
            other = [v for v in users[0].inputs if v is not y]
            b = constant_array(other[0]) if len(other) == 1 else None
            if b is not None and b.ndim >= 1 and b.shape[-1] == b.size == w.shape[1]:
                add, bias = users[0], b
        found.append((node, w, add, bias))
    return found


def _calibrate(model: ir.Model, ctx: PassContext, names: list[str]) -> dict[str, _Stats]:
    stats = {name: _Stats() for name in names}
    for batch in activation_batches(model, ctx, names):
        for name, rows in batch.items():
            stats[name].add(rows)
    return stats


def _host_mul(graph: ir.Graph, x: ir.Value, scale: np.ndarray, name: str) -> ir.Node:
    const = ir.Value(name=f"{name}_scale", const_value=ir.tensor(scale.astype(np.float32)))
    graph.register_initializer(const)
    node = ir.Node("", "Mul", [x, const], name=f"{name}_mul", num_outputs=1)
    node.outputs[0].name = f"{name}_equalized"
    node.outputs[0].dtype, node.outputs[0].shape = x.dtype, x.shape
    node.metadata_props[PLACEMENT_KEY] = "host"
    return node


@register_pass
class EqualizeChannels(Pass):
    name = "equalize-channels"
    description = (
        "per-channel scales, exact in float, where int8 linear layers read from or write to host code: "
        "SmoothQuant on inputs, equal channel ranges on outputs"
    )
    options = (
        Option("alpha", float, 0.75, "SmoothQuant migration strength for inputs", low=0.0, high=1.0),
        Option("max_error", float, 0.02,
               "rescale a tensor whose int8 rounding error, relative to its median channel's RMS, exceeds this",
               low=0.0),
    )
    requires = ("static-shapes",)
    needs_shapes = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        linears = _linears(graph)
        outputs = {(add or mm).outputs[0] for mm, _, add, _ in linears}
        inputs = {mm.inputs[0] for mm, *_ in linears}
        stats = _calibrate(model, ctx, sorted({v.name for v in inputs | outputs}))
        weights = {id(mm): (w, bias) for mm, w, _, bias in linears}
        smoothed, equalized = 0, 0
        for x in sorted(inputs, key=lambda v: v.name):
            s = stats[x.name]
            if s.int8_error() <= self.opts["max_error"]:
                continue
            readers = [mm for mm, *_ in linears if mm.inputs[0] is x]
            w_peak = np.max([np.abs(weights[id(mm)][0]).max(axis=1) for mm in readers], axis=0)
            alpha = self.opts["alpha"]
            t = s.peak**alpha / np.maximum(w_peak, 1e-12) ** (1 - alpha)
            t = np.clip(t, FLOOR * t.max(), None) if t.max() > 0 else np.ones_like(t)
            mul = _host_mul(graph, x, 1.0 / t, f"{x.name}_smooth")
            graph.insert_before(readers[0], mul)
            for mm in readers:
                w, bias = weights[id(mm)]
                weights[id(mm)] = (w * t[:, None], bias)
                mm.replace_input_with(0, mul.outputs[0])
            smoothed += 1
        for mm, _, add, _ in linears:
            y = (add or mm).outputs[0]
            w, bias = weights[id(mm)]
            if stats[y.name].int8_error() > self.opts["max_error"]:
                peak = stats[y.name].peak
                s = peak / np.median(peak) if np.median(peak) > 0 else np.ones_like(peak)
                s = np.clip(s, FLOOR * s.max(), None)
                w, bias = w / s[None, :], (bias / s.reshape(bias.shape) if bias is not None else None)
                mul = _host_mul(graph, y, s, f"{y.name}_restore")
                was_output, name = y.is_graph_output(), y.name
                ir.convenience.replace_all_uses_with(y, mul.outputs[0], replace_graph_outputs=True)
                mul.replace_input_with(0, y)
                graph.insert_after(add or mm, mul)
                if was_output:  # the graph's output keeps its name
                    y.name, mul.outputs[0].name = f"{name}_equalized", name
                equalized += 1
            _set_constant(graph, mm, 1, w, "equalized")
            if add is not None:
                other = 1 if add.inputs[0] is mm.outputs[0] else 0
                _set_constant(graph, add, other, bias.astype(np.float32), "equalized")
        stats_out = {"inputs_smoothed": smoothed, "outputs_equalized": equalized, "linears": len(linears)}
        return PassResult(model, bool(smoothed or equalized), stats_out)


def _set_constant(graph: ir.Graph, node: ir.Node, index: int, value: np.ndarray, tag: str) -> None:
    """Give `node` a new initializer at input `index` (the old one may be shared)."""
    old = node.inputs[index]
    if np.array_equal(constant_array(old), value):
        return
    const = ir.Value(name=f"{old.name}_{tag}_{node.name}", const_value=ir.tensor(value.astype(np.float32)))
    graph.register_initializer(const)
    node.replace_input_with(index, const)

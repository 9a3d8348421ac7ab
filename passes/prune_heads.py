"""prune-heads: remove whole attention heads, so the model is genuinely smaller and faster.

Find. Every Softmax is a candidate. Back from it, through the ops that scale and mask the scores
(Mul, Div, Add, Sub, Where), must lie a MatMul of two computed tensors (Q @ K^T); forward, the
probabilities must go to one MatMul (P @ V), past the Where(IsNaN(P), 0, P) that
scaled_dot_product_attention exports. Those are the attention blocks, numbered in graph order
("layers" in the `heads` option and in the stats).

Check. Q, K and V are each followed back, through the ops that move heads around (Reshape,
Transpose, Unsqueeze, Squeeze, Expand, Tile, scalar Mul/Div), to the columns of a projection with
constant weights: MatMul (+ Add), Gemm, or the Reshape -> Gemm -> Reshape that `fuse` makes; one
per Q/K/V, or a fused QKV or KV projection whose columns a Split or Slices cut, or which is viewed
as [.., 3, heads, d] with Q, K, V taken off the 3-axis (Gather, or Split/Slice and Squeeze). Along
the way the pass tracks the head axis: which tensor axis holds the heads, and which head sits at
each position of it. At the two attention MatMuls this tells which query heads meet which K/V
head: one each (multi-head), or a group each (grouped-query: K/V repeated with
Unsqueeze+Expand+Reshape as torch's repeat_interleave exports, or with Tile as `repeat` does,
or Q viewed as [b, kv, group, t, d] against K/V unsqueezed to [b, kv, 1, t, d] as edgecc's Llama
export does; such a view must hold whole groups in each row). Two more kinds of step keep heads
apart. Ops that work on each head alone: from a tensor x, elementwise ops whose other operands
are the same for every head (size 1 or absent on the head axes: RoPE's cos/sin tables, a norm's
weight), and Slice, Split, Concat and reductions on other axes with constant parameters; that
covers rotary embeddings (x * cos + rotate_half(x) * sin, rotate_half a Concat of -x[.., d/2:]
and x[.., :d/2] on head_dim, both branches from the same x) and RMSNorm per head over head_dim
(Qwen3's q/k norms). And the KV cache: K (after RoPE) or V concatenated with a past graph input
on another axis, the Concat's result being both the present output and the attention operand;
the past holds the same heads at the same positions, so it loses the same ones. From P @ V the head axis is followed to the output projection. Every shape element that holds a
head count or the attention width (the Reshape to [b, t, h, d/h], fuse's Reshape to [.., 3*d], the
Expand of grouped K/V, the Reshape back to [b, t, h*d/h] or [-1, h*d/h], Split sizes, Slice
bounds) must be a constant or computed from constants and static dims alone, so that it can be
rewritten; elements computed at run time from batch and sequence sizes are kept, and stay right
because pruning changes head axes only. scaled_dot_product_attention's exports need three
allowances: a scale computed at run time from the head size (a scalar, the same for every head),
the dynamo exporter's transpose of K through [-1, t, d] (its Reshape back reads the head count
from the very tensor it reshapes, so that read follows the pruning), and TorchScript's second
transpose of K, read only for its length (a use outside the block is fine when it only reaches
Shapes of other axes). What the pass cannot prove it rewrites correctly it leaves alone, saying
why in stats["skipped"]: the size of a head axis read at run time (Shape of a head axis), a mask,
scale or rotary table with a per-head axis, a value of the block used outside it (other than the
present output of a KV cache), ops the head axis cannot be followed through (a head axis merged
with the batch axis, a Concat or reduction across heads).
When a requested pruning removes no head, the pass warns with the reasons (strict=true: an error).

Rewrite. The pruned heads' columns leave the Q/K/V weights and biases, their rows leave the
output projection, and each shape element above gets its new value (shared shape constants are
copied, never edited in place). The result computes exactly what the unpruned model computes with
those heads' attention outputs set to zero. A K/V head goes when none of its query heads stays;
it then also leaves the KV cache: the past inputs' and present outputs' head axes shrink (the
graph's input and output shapes say so), and the pruned model given the unpruned cache without
those heads' entries returns the unpruned present outputs without them. When a group loses only
some of its query heads (unit=query), the groups no longer have one size: Q and the attention
output are then viewed one head per row (Llama's [b, kv, group, t, d] becomes [b, heads, 1, t, d],
the group element of each such Reshape set to 1) and K and V reach the two attention MatMuls
through a Gather that gives each remaining query head its K/V head. The cache keeps its layout.

Choose. `heads` names what goes; otherwise `ratio` of the units: in grouped-query attention a
K/V head with its group of query heads (unit=group), or single query heads (unit=query); a head
in multi-head attention. Units go per block (scope=layer) or across all blocks at once
(scope=model), never every unit of a block, one at a time: each is the unit whose removal adds
least to what its block has lost so far. Importance is the L2 norm of a unit's weights, or
(importance=calibration) the error its removal leaves in the block's output on calibration data,
after the refit when recover is on, against the geometric mean of the energies of that output and
of the residual stream it joins (class _Damage). With SmolLM2's 3 K/V heads per layer a
per-block ratio below 1/3 removes nothing; scope=model removes the least important units wherever
they are. On SmolLM2 (fp32 perplexity 54.7) a quarter of the heads so removed, with recover,
cost perplexity 67.1 as K/V groups and 59.3 as query heads (benchmarks/prune_smollm2.py); ranking
groups each alone by their error relative to the block's output cost 90.3, by mean |attention
output|, blind to the output projection, 100.

Recover (recover=true). Zeroing heads loses what they added; part of it is predictable from the
heads that stay. Each pruned block's output projection is refit by least squares on its input X
in the unpruned model over calibration data: W' = argmin ||X[:, kept] W' - X W||^2, ridge-damped
normal equations in float64, bias unchanged. The stats give the projection's relative output
error on that data before and after the refit; the model no longer equals the masked one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgecc.core.calibration import activation_samples
from edgecc.core.ir import infer_shapes
from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import Rejected, constant_array, constant_matrix, node_name, ridge_refit
from edgecc.core.static_values import (
    broadcast_dim,
    dims_read,
    node_axes,
    shape_elements,
    shape_pieces,
    static_dims,
    static_value,
)
from edgecc.core.verify import record_narrowed
from edgecc.errors import UserError

# Ops that take one of Q, K, V off the parts axis of a projection viewed as [.., 3, heads, d].
PICK_OPS = ("Gather", "Split", "Slice")
# Ops that carry Q, K, V (or the attention output) between a projection and a MatMul.
CHAIN_OPS = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Tile", "Mul", "Div", "Cast",
             "Identity") + PICK_OPS
# Ops between the score MatMul and the Softmax: scaling, masking, additive biases.
SCORE_OPS = ("Mul", "Div", "Add", "Sub", "Where", "Cast", "Identity")
MAX_SCORE_OPS = 8
MAX_REASONS = 3  # reasons named in the warning when no head is removed; stats hold them all
SPLIT_INPUT_OPSET = 13  # Split takes its sizes as an input from opset 13 on
_PAIR = re.compile(r"^(\d+):(\d+)$")


def parse_heads(text: str) -> dict[int, set[int]]:
    """"0:1,1:3" (or joined by ';') -> {0: {1}, 1: {3}}; ValueError if malformed."""
    heads: dict[int, set[int]] = {}
    if not text.strip():
        return heads
    for item in re.split(r"[;,]", text):
        m = _PAIR.match(item.strip())
        if not m:
            raise ValueError(item)
        heads.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return heads


# ----------------------------------------------------------------------------------------------
# Shape elements that hold a head count


def _check_editable(value: ir.Value, index: int) -> None:
    """Element `index` of shape `value` must be fixed, so that a new value can replace it."""
    if shape_elements(value)[index] is None:
        raise Rejected(f"element {index} of shape '{value.name}' holds a head count or width but is "
                       f"computed at run time")


# ----------------------------------------------------------------------------------------------
# The head axis and how ops move it


@dataclasses.dataclass(frozen=True)
class HeadAxis:
    """Where a tensor keeps its heads: axis `u`, whose positions hold labels[0] `inner` times,
    then labels[1] `inner` times... (labels are head numbers). `labels` is None on a projection's
    output before its columns are split into heads; `cols` is the number of projection columns
    per head, known from that split on. `dims` are the tensor's static dims (None: dynamic).
    A fused projection viewed as [.., parts, heads, d] also has a parts axis `part` until one of
    Q, K, V is taken off it (`picked`, its index). Query heads viewed as [.., kv, group, ..] for
    grouped-query attention (Llama's 5-d MatMul) continue on axis u + 1: with `split` > 1, axis u
    has rows of `split` heads, position (i, j) holding head labels[i * split + j] (inner is 1)."""

    dims: tuple
    u: int
    labels: tuple | None = None
    inner: int = 1
    cols: int | None = None
    part: int | None = None
    parts: int = 1
    picked: int | None = None
    split: int = 1

    @property
    def size(self) -> int:
        return self.dims[self.u] if self.labels is None else len(self.labels) * self.inner // self.split

    @property
    def axes(self) -> tuple[int, ...]:
        """The axes that hold heads."""
        return (self.u, self.u + 1) if self.split > 1 else (self.u,)

    def label(self, i: int, j: int = 0) -> int:
        """The head at position i of axis u (and j of axis u + 1 when split)."""
        return self.labels[(i * self.split + j) // self.inner]

    def kept(self, keep: Callable[[int], bool]) -> int:
        """The size of axis u once the heads `keep` rejects are gone (whole rows, when split)."""
        return sum(1 for label in self.labels if keep(label)) * self.inner // self.split


def _with(ax: HeadAxis, dims, u: int, **changes) -> HeadAxis:
    dims = list(dims)
    ax = dataclasses.replace(ax, dims=tuple(dims), u=u, **changes)
    dims[u] = ax.size
    if ax.split > 1:
        dims[u + 1] = ax.split
    return dataclasses.replace(ax, dims=tuple(dims))


def _check_broadcast(value: ir.Value, ax: HeadAxis, what: str) -> None:
    """`value`, combined elementwise with a tensor whose heads are where `ax` says, must be the
    same for every head (size 1 or absent at the head axes)."""
    shape = value.shape
    if shape is None:
        raise Rejected(f"{what}: the shape of '{value.name}' is unknown, so it may differ per head")
    for axis in ax.axes:
        pos = len(ax.dims) - axis  # the head axis, counted from the right
        if len(shape) >= pos and shape[len(shape) - pos] != 1:
            raise Rejected(f"{what}: '{value.name}' (shape {list(shape)}) differs per head")


def _data_input(node: ir.Node) -> ir.Value:
    """The input that carries the heads (for Mul: the one that is not a constant; for a KV-cache
    Concat: the new keys or values, not the past)."""
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if node.op_type == "Mul" and constant_array(b) is None and constant_array(a) is not None:
        return b
    if node.op_type == "Concat":
        return next(v for v in node.inputs if not v.is_graph_input())
    return node.inputs[0]


def _cache_past(node: ir.Node) -> ir.Value | None:
    """The past input of Concat(past, new) that extends a KV cache (a graph input), else None."""
    if node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    pasts = [v for v in node.inputs if v is not None and v.is_graph_input()]
    return pasts[0] if len(pasts) == 1 else None


def _step(node: ir.Node, ax: HeadAxis, x: ir.Value, y: ir.Value) -> tuple[HeadAxis, int | None]:
    """The head axis on `node`'s output `y` (its head-carrying input is `x`), and the index of the
    element of its shape input (input 1) that holds the head axis' size and must be rewritten."""
    op, n, u, where = node.op_type, len(ax.dims), ax.u, f"{node.op_type} '{node_name(node)}'"
    if op in ("Identity", "Cast"):
        return ax, None
    if op in ("Mul", "Div"):
        if op == "Div" and node.inputs[0] is not x:
            raise Rejected(f"{where} divides by the heads")
        other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
        _check_broadcast(other, ax, where)
        return ax, None
    if ax.split > 1 and op != "Reshape":
        raise Rejected(f"{where} comes while the heads span two axes ({u} and {u + 1})")
    if op == "Concat":
        return _cache_concat(node, ax, x, y, where), None
    if op == "Transpose":
        perm = list(node.attributes.get_ints("perm", None) or range(n)[::-1])
        part = None if ax.part is None else perm.index(ax.part)
        return _with(ax, [ax.dims[p] for p in perm], perm.index(u), part=part), None
    if op == "Unsqueeze":
        axes = node_axes(node)
        if axes is None:
            raise Rejected(f"{where}: axes computed at run time")
        dims, out, part = list(ax.dims), n + len(axes), ax.part
        for a in sorted(a % out for a in axes):
            dims.insert(a, 1)
            u += a <= u
            part = None if part is None else part + (a <= part)
        return _with(ax, dims, u, part=part), None
    if op == "Squeeze":
        axes = node_axes(node)
        if axes is None:
            axes = [i for i, d in enumerate(ax.dims) if d == 1]
            if any(d is None for d in ax.dims):
                raise Rejected(f"{where} squeezes every size-1 axis of a tensor with dynamic dims")
        axes = {a % n for a in axes}
        if u in axes:
            raise Rejected(f"{where} squeezes the head axis")
        dims = [d for i, d in enumerate(ax.dims) if i not in axes]
        part = None if ax.part is None or ax.part in axes else ax.part - sum(a < ax.part for a in axes)
        return _with(ax, dims, u - sum(a < u for a in axes), part=part), None
    if op in PICK_OPS:
        return _pick(node, ax, y, where), None
    if ax.part is not None:
        raise Rejected(f"{where} comes before Q, K and V are taken apart")
    if ax.labels is None and op != "Reshape":
        raise Rejected(f"{where} comes before the projection's columns are split into heads")
    if op == "Tile":
        reps = static_value(node.inputs[1])
        if reps is None:
            raise Rejected(f"{where}: repeats computed at run time")
        reps = reps.tolist()
        dims = [d * r if d is not None else None for d, r in zip(ax.dims, reps)]
        return _with(ax, dims, u, labels=ax.labels * reps[u]), None
    if op == "Expand":
        return _expand(node, ax, where)
    if op == "Reshape":
        return _reshape(node, ax, where)
    raise Rejected(f"{where} is not an op the head axis can be followed through")


def _cache_concat(node: ir.Node, ax: HeadAxis, x: ir.Value, y: ir.Value, where: str) -> HeadAxis:
    """After Concat(past, x) on a sequence axis: the past cache holds the same heads as `x`, at the
    same positions (it is this output from the step before), so it loses the same heads."""
    past = _cache_past(node)
    if past is None:
        raise Rejected(f"{where} is not an op the head axis can be followed through")
    axis = node.attributes.get_int("axis", 0) % len(ax.dims)
    if axis in ax.axes:
        raise Rejected(f"{where} concatenates along the head axis")
    dims = static_dims(past)
    if len(dims) != len(ax.dims) or dims[ax.u] != ax.size:
        raise Rejected(f"{where}: the cache '{past.name}' (shape {dims}) does not hold the heads of "
                       f"'{x.name}' on axis {ax.u}")
    return _with(ax, static_dims(y), ax.u)


def _pick(node: ir.Node, ax: HeadAxis, y: ir.Value, where: str) -> HeadAxis:
    """After a Gather, Split or Slice that takes one of Q, K, V off the parts axis."""
    if ax.part is None or ax.picked is not None:
        raise Rejected(f"{where} is not an op the head axis can be followed through")
    p, op = ax.part, node.op_type
    if op == "Slice":
        axis, start, stop = _slice_span(node, len(ax.dims), ax.parts)
        picked = start if stop - start == 1 else None
    else:
        axis = node.attributes.get_int("axis", 0) % len(ax.dims)
        if op == "Split":
            picked = y.index() if set(_split_sizes(node, ax.parts)) == {1} else None
        else:
            index = static_value(node.inputs[1])
            picked = int(index) % ax.parts if index is not None and index.ndim == 0 else None
    if axis != p or picked is None:
        raise Rejected(f"{where} does not take one of Q, K, V off the parts axis (axis {p})")
    dims = list(ax.dims)
    if op == "Gather":  # drops the parts axis
        del dims[p]
        return _with(ax, dims, ax.u - (p < ax.u), part=None, picked=picked)
    dims[p] = 1  # a Squeeze drops it later
    return _with(ax, dims, ax.u, picked=picked)


def _slice_span(node: ir.Node, rank: int, size: int) -> tuple[int, int, int]:
    """(axis, start, stop) of a Slice of one axis of `size` elements with step 1."""
    where = f"Slice '{node_name(node)}'"
    inputs = list(node.inputs[1:]) + [None] * (5 - len(node.inputs))
    defaults = (None, None, np.zeros(1, np.int64), np.ones(1, np.int64))  # axes [0], steps [1]
    starts, ends, axes, steps = (default if v is None else static_value(v)
                                 for v, default in zip(inputs, defaults))
    if any(a is None for a in (starts, ends, axes, steps)):
        raise Rejected(f"{where}: bounds computed at run time")
    if starts.size != 1 or steps.reshape(-1).tolist() != [1]:
        raise Rejected(f"{where} does not take one contiguous range of one axis")
    axis = int(axes.reshape(-1)[0]) % rank
    start, stop, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(size)
    return axis, start, stop


def _target(node: ir.Node, where: str) -> list[int | None]:
    """The elements of a Reshape's or Expand's shape input, with the node named if unreadable."""
    try:
        return shape_elements(node.inputs[1])
    except Rejected as e:
        raise Rejected(f"{where}: {e}") from None


def _expand(node: ir.Node, ax: HeadAxis, where: str) -> tuple[HeadAxis, int | None]:
    target = _target(node, where)
    n, size = len(ax.dims), ax.size
    out = max(n, len(target))
    lead_in, lead_e = out - n, out - len(target)
    dims = []
    for i in range(out):
        d = ax.dims[i - lead_in] if i >= lead_in else 1
        e = target[i - lead_e] if i >= lead_e else 1
        dims.append(None if d is None or e is None else max(d, e))
    u = ax.u + lead_in
    k = u - lead_e  # the target element for the head axis
    if k < 0 or target[k] == 1:
        return _with(ax, dims, u), None
    if target[k] is None:
        raise Rejected(f"{where} computes the size of the head axis at run time")
    if target[k] == size:
        return _with(ax, dims, u), k
    if size == 1:  # one K/V head broadcast to all query heads: a repeat, nothing to rewrite
        return _with(ax, dims, u, labels=ax.labels * target[k]), None
    raise Rejected(f"{where} expands the head axis from {size} to {target[k]}")


def _reshape(node: ir.Node, ax: HeadAxis, where: str) -> tuple[HeadAxis, int | None]:
    """Four regroupings keep heads whole: keeping the last axis ([b, t, W] <-> [-1, W]), splitting
    the head axis ([.., W] -> [.., h, W/h]), merging it with the next ([.., h, d] -> [.., h*d]) and
    splitting a fused projection's columns into parts of heads ([.., W] -> [.., 3, h, W/(3h)]),
    leading and trailing axes unchanged. Anything else mixes heads with other axes."""
    raw = _target(node, where)
    allowzero = node.attributes.get_int("allowzero", 0)
    n, out, u, size = len(ax.dims), len(raw), ax.u, ax.size
    shape = [ax.dims[i] if e == 0 and not allowzero and i < n else e for i, e in enumerate(raw)]
    dims = [e if e is not None and e > 0 else None for e in shape]

    def fixed(e):
        return e is not None and e > 0

    found = None
    if u == n - 1 and shape[-1] == size and ax.labels is not None:
        found = _with(ax, dims, out - 1), out - 1
    elif out == n + 1:
        a, b = shape[u], shape[u + 1]
        if a == -1 and fixed(b) and size % b == 0:
            a = size // b
        if b == -1 and fixed(a) and size % a == 0:
            b = size // a
        if fixed(a) and fixed(b) and a * b == size and ax.split == 1:
            dims[u + 1] = b
            if ax.labels is None:  # the projection's columns become heads of b columns each
                found = _with(ax, dims, u, labels=tuple(range(a)), inner=1, cols=b), u
            elif ax.inner % b == 0:
                found = _with(ax, dims, u, inner=ax.inner // b), u
            elif ax.inner == 1 and _same_after(shape[u + 2:], ax.dims[u + 1:]):
                # [.., h, ..] -> [.., h/g, g, ..]: rows of g heads
                found = _with(ax, dims, u, split=b), u
    elif out == n + 2 and ax.labels is None and all(fixed(e) for e in shape[u:u + 3]):
        parts, heads, cols = shape[u:u + 3]
        if parts * heads * cols == size:
            found = _with(ax, dims, u + 1, labels=tuple(range(heads)), cols=cols, part=u, parts=parts), u + 1
    elif (out == n - 1 and ax.labels is not None and u + 1 < n and fixed(ax.dims[u + 1])
          and shape[u] in (size * ax.dims[u + 1], -1)):
        merged = {"split": 1} if ax.split > 1 else {"inner": ax.inner * ax.dims[u + 1]}
        found = _with(ax, dims, u, **merged), u
    elif (u == n - 2 and ax.labels is not None and ax.split == 1 and fixed(ax.dims[-1])
          and shape[-1] == size * ax.dims[-1]):
        # [.., h, d] -> [-1, h*d] before a Gemm: the leading axes regroup among themselves
        found = _with(ax, dims, out - 1, inner=ax.inner * ax.dims[-1]), out - 1
    if found is None:
        raise Rejected(f"{where} to {raw} regroups the head axis (axis {u} of {list(ax.dims)}) in a way "
                       f"the pass does not handle")
    new, index = found
    if raw[index] == -1:  # inferred from the element count: follows the pruning by itself
        return new, None
    if raw[index] == 0 and not allowzero:  # copies the input's dim
        if index == u and shape[index] == size:
            return new, None
        raise Rejected(f"{where} copies a dim (0) into the head axis")
    _check_editable(node.inputs[1], index)
    return new, index


def _same_after(shape: list, dims: tuple) -> bool:
    """Whether a Reshape's trailing target elements keep the input's trailing dims (where known),
    the last one fixed: the regrouping stays in front of them."""
    return (len(shape) == len(dims) and bool(shape) and shape[-1] == dims[-1]
            and all(s == d for s, d in zip(shape, dims) if s is not None and s > 0 and d is not None))


# ----------------------------------------------------------------------------------------------
# Ops that act on each head alone: rotary embeddings, per-head norms


LOCAL_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal", "Cast", "Identity",
             "Slice", "Split", "Concat", "ReduceMean", "ReduceSum")
MAX_LOCAL_OPS = 24
AXIS_OPS = ("Slice", "Split", "Concat", "ReduceMean", "ReduceSum")  # what they do stays on some axes


@dataclasses.dataclass
class Local:
    """y computed from x alone by LOCAL_OPS, with other operands (cos/sin tables, norm weights)
    that must not differ per head: RoPE's x * cos + rotate_half(x) * sin, where rotate_half is
    Concat(-x[.., d/2:], x[.., :d/2]), or an RMSNorm over head_dim. Heads stay apart when the
    ops that move values (Slice, Split, Concat, reductions) work on axes other than the heads."""

    op_type = "Local"  # read by the walker like a node's
    nodes: list[ir.Node]  # in graph order
    x: ir.Value
    y: ir.Value


def _local(y: ir.Value) -> Local | None:
    """The Local region ending at `y`, if `y` is computed by LOCAL_OPS from one tensor x of its
    shape (where known) and from operands that broadcast to it; None otherwise."""
    order: list[ir.Node] = []  # the cone of LOCAL_OPS nodes behind y, producers first

    def visit(node):
        if node in order or len(order) > MAX_LOCAL_OPS:
            return
        for v in node.inputs:
            p = v.producer() if v is not None and static_value(v) is None else None
            if p is not None and p.op_type in LOCAL_OPS:
                visit(p)
        order.append(node)

    visit(y.producer())
    if len(order) > MAX_LOCAL_OPS or y.shape is None:
        return None
    made = {v for node in order for v in node.outputs}
    leaves = {v for node in order for v in node.inputs
              if v is not None and v not in made and static_value(v) is None}
    target = static_dims(y)
    xs = [v for v in leaves if v.shape is not None and len(v.shape) == len(target)
          and all(a == b for a, b in zip(static_dims(v), target) if a is not None and b is not None)]

    def computed_from(x):  # the nodes that compute from x; the rest make side operands
        inside, nodes = {x}, []
        for node in order:
            if any(v in inside for v in node.inputs):
                nodes.append(node)
                inside.update(node.outputs)
        return nodes

    regions = sorted(((computed_from(x), x) for x in xs), key=lambda r: -len(r[0]))
    # x: the one tensor most of the region computes from (RoPE's x feeds both branches, cos one)
    if not regions or len(regions) > 1 and len(regions[1][0]) == len(regions[0][0]):
        return None
    nodes, x = regions[0]
    return Local(nodes, x, y) if y.producer() in nodes else None


def _local_step(local: Local, ax: HeadAxis) -> HeadAxis:
    """The head axis on local.y: that of x, once every op is checked to keep heads apart."""
    n, inside = len(ax.dims), {local.x} | {v for node in local.nodes for v in node.outputs}
    for node in local.nodes:
        where = f"{node.op_type} '{node_name(node)}'"
        if any(len(static_dims(v)) != n for v in node.outputs):
            raise Rejected(f"{where} changes the rank of a tensor with heads")
        if node.op_type not in AXIS_OPS:  # elementwise: the other operands are the same for every head
            for v in node.inputs:
                if v is not None and v not in inside:
                    _check_broadcast(v, ax, where)
            continue
        axes = _local_axes(node, n)
        if axes is None:
            raise Rejected(f"{where}: axes, bounds or sizes computed at run time")
        if set(axes) & set(ax.axes):
            raise Rejected(f"{where} works across heads (axis {min(set(axes) & set(ax.axes))})")
        data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
        if any(v not in inside for v in data):
            raise Rejected(f"{where} joins the heads with '{next(v for v in data if v not in inside).name}'")
    return _with(ax, static_dims(local.y), ax.u)


def _local_axes(node: ir.Node, rank: int) -> list[int] | None:
    """The axes a Slice, Split, Concat or reduction works on, when its parameters are constants."""
    op = node.op_type
    if op == "Slice":
        params = [static_value(v) if v is not None else None for v in node.inputs[1:]]
        if any(p is None for p in params[:2]) or any(
                v is not None and p is None for v, p in zip(node.inputs[3:], params[2:])):
            return None
        axes = params[2] if len(params) > 2 and params[2] is not None else np.arange(params[0].size)
        return [int(a) % rank for a in axes.reshape(-1)]
    if op in ("Split", "Concat"):
        if op == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None and static_value(
                node.inputs[1]) is None:
            return None
        return [node.attributes.get_int("axis", 0) % rank]
    axes = node_axes(node)
    return None if not axes else [a % rank for a in axes]


# ----------------------------------------------------------------------------------------------
# Projections and the Q/K/V chains


@dataclasses.dataclass
class Linear:
    """y = x @ W (+ b) with a constant W: MatMul (+ Add), Gemm, or fuse's Reshape -> Gemm -> Reshape."""

    output: ir.Value
    matmul: ir.Node  # MatMul or Gemm; W is its input 1
    out_axis: int  # W's output axis: 1 for [K, N], 0 for Gemm with transB ([N, K])
    bias_node: ir.Node | None  # the Add, or the Gemm, whose input `bias_input` is b
    bias_input: int
    reshape: ir.Node | None  # fuse's Reshape of the Gemm's rows back to [.., N]
    nodes: list[ir.Node]  # the nodes whose outputs have N columns

    @property
    def width(self) -> int:
        return constant_matrix(self.matmul.inputs[1], dtype=None).shape[self.out_axis]


def _linear(value: ir.Value) -> Linear | None:
    node = value.producer()
    if node is None:
        return None
    reshape = None
    if node.op_type == "Reshape":
        gemm = node.inputs[0].producer()
        if gemm is None or gemm.op_type != "Gemm" or not _keeps_columns(node, gemm):
            return None
        reshape, node = node, gemm
    if node.op_type == "Gemm":
        if constant_matrix(node.inputs[1], dtype=None) is None or node.attributes.get_int("transA", 0):
            return None
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if has_bias and constant_array(node.inputs[2]) is None:
            return None
        out_axis = 0 if node.attributes.get_int("transB", 0) else 1
        return Linear(value, node, out_axis, node if has_bias else None, 2, reshape,
                      [node] + ([reshape] if reshape else []))
    if node.op_type == "Add":
        for i in (0, 1):
            mm = node.inputs[i].producer()
            if (mm is not None and mm.op_type == "MatMul"
                    and constant_matrix(mm.inputs[1], dtype=None) is not None
                    and constant_array(node.inputs[1 - i]) is not None):
                return Linear(value, mm, 1, node, 1 - i, None, [mm, node])
        return None
    if node.op_type == "MatMul" and constant_matrix(node.inputs[1], dtype=None) is not None:
        return Linear(value, node, 1, None, 0, None, [node])
    return None


def _keeps_columns(reshape: ir.Node, gemm: ir.Node) -> bool:
    """Whether `reshape` only regroups the rows of `gemm`'s [M, N] output, as fuse's does."""
    w = constant_matrix(gemm.inputs[1], dtype=None)
    try:
        last = shape_elements(reshape.inputs[1])[-1]
    except Rejected:
        return False
    return w is not None and last == w.shape[0 if gemm.attributes.get_int("transB", 0) else 1]


@dataclasses.dataclass
class Part:
    """The columns [offset, offset + width) of a projection: all of it, one output of a Split or a
    Slice of its columns (`cut`), or one of Q, K, V taken off its [.., 3, heads, d] view."""

    linear: Linear
    offset: int
    width: int
    cut: ir.Node | None = None


def _split_sizes(node: ir.Node, width: int) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = static_value(node.inputs[1])
        if sizes is None:
            raise Rejected(f"Split '{node_name(node)}': sizes computed at run time")
        return sizes.tolist()
    if "split" in node.attributes:
        return list(node.attributes.get_ints("split"))
    count = len(node.outputs)
    if width % count:
        raise Rejected(f"Split '{node_name(node)}' cuts {width} columns into {count} uneven parts")
    return [width // count] * count


def _part(value: ir.Value) -> Part | None:
    linear = _linear(value)
    if linear is not None:
        return Part(linear, 0, linear.width)
    node = value.producer()
    if node is None or node.op_type not in ("Split", "Slice") or (linear := _linear(node.inputs[0])) is None:
        return None  # a Split or Slice of anything else may take Q, K or V off a parts axis
    rank = len(static_dims(node.inputs[0]))
    if node.op_type == "Slice":
        axis, start, stop = _slice_span(node, rank, linear.width)
    else:
        axis = node.attributes.get_int("axis", 0) % rank
        sizes = _split_sizes(node, linear.width)
        start = sum(sizes[:value.index()])
        stop = start + sizes[value.index()]
    if axis != rank - 1:
        raise Rejected(f"{node.op_type} '{node_name(node)}' does not cut the projection's columns")
    return Part(linear, start, stop - start, node)


@dataclasses.dataclass
class Chain:
    """Q, K or V (or the attention output): the nodes that carry it, the head axis where it
    ends, and the shape elements that hold a head axis' size."""

    nodes: list[ir.Node]
    axis: HeadAxis
    edits: list[tuple[ir.Node, int, HeadAxis]]  # (Reshape/Expand, shape element, head axis it sizes)
    values: dict[ir.Value, HeadAxis]  # every value computed, with its head axis
    part: Part | None = None
    # The shape elements that hold the size of a row of heads (a Reshape to [.., kv, group, ..]),
    # which ungrouping sets to 1; None when one of them is computed at run time.
    groups: list[tuple[ir.Node, int]] | None = dataclasses.field(default_factory=list)


def _walk(steps: list[tuple[ir.Node, ir.Value, ir.Value]], ax: HeadAxis, chain: Chain) -> HeadAxis:
    """The head axis along `steps` (node, head-carrying input, output), recorded in `chain`."""
    i = 0
    while i < len(steps):
        node, x, y = steps[i]
        if isinstance(node, Local):
            ax = _local_step(node, ax)
            chain.nodes += node.nodes
            chain.values.update({v: _with(ax, static_dims(v), ax.u) for n in node.nodes for v in n.outputs})
            i += 1
            continue
        swap = _swap_last_axes(steps[i:i + 3], ax)
        if swap is None:
            before = ax
            ax, index = _step(node, ax, x, y)
            if ax.split > 1 and before.split == 1 and chain.groups is not None:
                chain.groups = _group_element(node, ax.u + 1, chain.groups)
            done = [(node, y, ax)]
            if node.op_type == "Concat":  # the past cache loses the same heads
                past = _cache_past(node)
                chain.values[past] = _with(ax, static_dims(past), ax.u)
        else:
            ax, index, reads = swap
            chain.nodes += reads
            # heads merged with the batch on axis 0: any reader of that axis would see it shrink
            done = [(node, y, HeadAxis(tuple(static_dims(y)), 0)) for node, _, y in steps[i:i + 2]]
            done.append((steps[i + 2][0], steps[i + 2][2], ax))
        i += len(done)
        for node, y, axis in done:
            chain.nodes.append(node)
            chain.values[y] = axis
        if index is not None:
            chain.edits.append((done[-1][0], index, ax))
    return ax


def _group_element(reshape: ir.Node, element: int, found: list) -> list | None:
    """`found` with the element of `reshape`'s shape that holds its rows' group size, or None if
    that element is computed at run time."""
    try:
        _check_editable(reshape.inputs[1], element)
    except Rejected:
        return None
    return found + [(reshape, element)]


def _swap_last_axes(steps: list[tuple[ir.Node, ir.Value, ir.Value]],
                    ax: HeadAxis) -> tuple[HeadAxis, int | None, list[ir.Node]] | None:
    """Reshape [.., h, t, d] -> [-1, t, d], Transpose [0, 2, 1], Reshape to [.., h, d, t] with the
    leading dims read from the first Reshape's input: how the dynamo exporter transposes K in
    scaled_dot_product_attention. It is one transpose of the last two axes; the head count it
    reads at run time is that of the tensor it reshapes, so it follows the pruning. Returns the
    head axis after it, the element of the last Reshape's shape to rewrite, and the Shape nodes
    it reads; None if `steps` do not start with it."""
    ops = [node.op_type for node, _, _ in steps]
    n = len(ax.dims)
    if (ops != ["Reshape", "Transpose", "Reshape"] or ax.labels is None or ax.part is not None
            or ax.u >= n - 2 or list(steps[1][0].attributes.get_ints("perm", [])) != [0, 2, 1]):
        return None
    (first, x, _), (last, _, _) = steps[0], steps[2]
    try:
        merged, back = _shape_reads(first.inputs[1], x), _shape_reads(last.inputs[1], x)
    except Rejected:
        return None

    def is_dim(element, i):
        return element == ("x", i) or ax.dims[i] is not None and element == ax.dims[i]

    order = list(range(n - 2)) + [n - 1, n - 2]
    if (len(merged) != 3 or merged[0] != -1 or not all(map(is_dim, merged[1:], (n - 2, n - 1)))
            or len(back) != n or not all(map(is_dim, back, order))):
        return None
    where = f"Reshape '{node_name(last)}'"
    if back[ax.u] != ("x", ax.u):  # a fixed head count: rewritten, not read
        _check_editable(last.inputs[1], ax.u)
    shapes = [node for node in dict.fromkeys(x.consumers()) if node.op_type == "Shape"]
    sized = {first.inputs[1].producer(), last.inputs[1].producer()}
    for shape in shapes:
        for user in shape.outputs[0].consumers():
            picked = _dims_picked(user.outputs[0], x) if user not in sized else []
            if picked is None:
                raise Rejected(f"{where}: Shape '{node_name(shape)}' of '{x.name}' is read by "
                               f"{user.op_type} '{node_name(user)}'")
            if ax.u in picked and not set(user.outputs[0].consumers()) <= sized:
                raise Rejected(f"Shape '{node_name(shape)}' reads the head axis of '{x.name}' at run time")
    dims = [ax.dims[i] for i in order]
    return _with(ax, dims, ax.u), None if back[ax.u] == ("x", ax.u) else ax.u, shapes


def _shape_reads(shape: ir.Value, x: ir.Value) -> list:
    """The elements of a shape tensor: an int where fixed, ("x", i) where read at run time from
    dim i of `x`, None otherwise."""
    elements: list = []
    for piece in shape_pieces(shape):
        if piece.ints is not None:
            elements += piece.ints.tolist()
        else:
            picked = _dims_picked(piece.value, x)
            elements += [("x", i) for i in picked] if picked is not None else [None] * piece.length
    return elements


def _dims_picked(value: ir.Value, x: ir.Value) -> list[int] | None:
    """The dims of `x` that `value` holds when it is Shape(x), or a constant Slice or Gather of it;
    None when it is something else."""
    node = value.producer()
    shape = node.inputs[0].producer() if node is not None and node.op_type in ("Slice", "Gather") else node
    if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not x:
        return None
    n = len(static_dims(x))
    dims = list(range(n))[slice(shape.attributes.get_int("start", 0), shape.attributes.get_int("end", n))]
    if node is shape:
        return dims
    args = [static_value(v) for v in node.inputs[1:] if v is not None]
    if any(a is None for a in args):
        return None
    if node.op_type == "Gather":
        return [dims[i] for i in args[0].reshape(-1).tolist()]
    if len(args) > 2 and args[2].reshape(-1).tolist() not in ([0], [-1]):
        return None
    step = int(args[3].reshape(-1)[0]) if len(args) > 3 else 1
    return dims[slice(int(args[0].reshape(-1)[0]), int(args[1].reshape(-1)[0]), step)]


def _joins_computed(node: ir.Node) -> bool:
    """Mul or Div of two computed tensors of the output's rank: either may hold the heads (x times
    its RMS norm), which a Local region tells apart; a scale of lower rank is a chain step."""
    if node.op_type not in ("Mul", "Div") or node.outputs[0].shape is None:
        return False
    rank = len(node.outputs[0].shape)
    return all(static_value(v) is None and v.shape is not None and len(v.shape) == rank for v in node.inputs)


def _input_chain(operand: ir.Value, what: str) -> Chain:
    """Follow `operand` of an attention MatMul back to the projection columns it comes from."""
    value, steps = operand, []
    while (part := _part(value)) is None:
        node = value.producer()
        if node is not None and (_cache_past(node) is not None or node.op_type in CHAIN_OPS
                                 and not _joins_computed(node)):
            steps.append((node, _data_input(node), value))
        elif node is not None and node.op_type in LOCAL_OPS and (local := _local(value)) is not None:
            steps.append((local, local.x, value))
        else:
            by = f"{node.op_type} '{node_name(node)}'" if node is not None else "a graph input"
            raise Rejected(f"{what} '{value.name}' comes from {by}, not from a projection with "
                           f"constant weights through ops that keep heads apart")
        value = steps[-1][1]
    dims = static_dims(value)
    dims[-1] = part.width
    start = HeadAxis(tuple(dims), len(dims) - 1)
    chain = Chain([], start, [], {value: start}, part)
    ax = chain.axis = _walk(steps[::-1], start, chain)
    if ax.labels is None:
        raise Rejected(f"{what}: the projection's columns are never split into heads")
    if ax.part is not None:
        raise Rejected(f"{what} keeps the parts axis of its projection's [.., {ax.parts}, heads, d] view")
    if ax.picked is not None:
        width = part.width // ax.parts
        chain.part = dataclasses.replace(part, offset=part.offset + ax.picked * width, width=width)
    return chain


def _output_chain(pv: ir.Node, ax: HeadAxis) -> tuple[Chain, ir.Node, int]:
    """Follow the attention output forward to the output projection: (chain, projection, the
    axis of its weight that meets the heads)."""
    value = pv.outputs[0]
    chain = Chain([], ax, [], {value: ax})
    while True:
        users = [n for n in value.consumers() if n.op_type != "Shape"]  # Shape reads: checked later
        if len(users) != 1:
            raise Rejected(f"the attention output '{value.name}' has {len(users)} users")
        node = users[0]
        if (node.op_type in ("MatMul", "Gemm") and node.inputs[0] is value
                and constant_matrix(node.inputs[1], dtype=None) is not None
                and not node.attributes.get_int("transA", 0)):
            break
        if node.op_type not in CHAIN_OPS or _data_input(node) is not value:
            raise Rejected(f"the attention output '{value.name}' goes to {node.op_type} '{node_name(node)}', "
                           f"not to an output projection with constant weights")
        ax = _walk([(node, value, node.outputs[0])], ax, chain)
        value = node.outputs[0]
    chain.axis = ax
    if ax.u != len(ax.dims) - 1:
        raise Rejected(f"the output projection '{node_name(node)}' does not take the heads on its last axis")
    in_axis = 1 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 0
    if constant_matrix(node.inputs[1], dtype=None).shape[in_axis] != ax.size:
        raise Rejected(f"the output projection '{node_name(node)}' does not match the attention width "
                       f"{ax.size}")
    return chain, node, in_axis


# ----------------------------------------------------------------------------------------------
# Attention blocks: find, then check


@dataclasses.dataclass
class Block:
    """An attention block that passed every check, with all the pass needs to prune it."""

    softmax: ir.Node
    q: Chain
    k: Chain
    v: Chain
    out: Chain  # from P @ V to the output projection's input
    proj: ir.Node
    proj_axis: int  # the axis of the output projection's weight that meets the heads
    group: dict[int, int]  # query head -> its K/V head
    linears: list[Linear]
    cuts: list[ir.Node]  # the Splits and Slices that cut fused projections' columns
    values: dict[ir.Value, HeadAxis]  # every value whose head axis shrinks
    score: ir.Node  # Q @ K^T
    pv: ir.Node  # P @ V

    @property
    def heads(self) -> list[int]:
        return sorted(self.group)

    @property
    def kv_heads(self) -> list[int]:
        return sorted(set(self.group.values()))

    @property
    def grouped(self) -> bool:
        return len(self.kv_heads) != len(self.heads)

    @property
    def splits_groups(self) -> bool:
        """Whether single query heads of a group can go: Q and the attention output can be
        viewed one head per row (see _prune)."""
        return self.q.groups is not None and self.out.groups is not None

    def queries(self, kv: int) -> list[int]:
        return [q for q in self.heads if self.group[q] == kv]

    def units(self, unit: str) -> dict[int, list[int]]:
        """What ratio counts and removes, with the query heads each takes: a K/V head with its
        group (unit=group), or one query head (unit=query, where the groups can be split)."""
        if unit == "query" and (not self.grouped or self.splits_groups):
            return {q: [q] for q in self.heads}
        return {kv: self.queries(kv) for kv in self.kv_heads}

    def removed_kv(self, removed: set[int]) -> set[int]:
        """The K/V heads none of whose query heads stay once the query heads `removed` go."""
        return {kv for kv in self.kv_heads if set(self.queries(kv)) <= removed}


def _score_path(value: ir.Value, depth: int = 0) -> list[ir.Node] | None:
    """The nodes from a MatMul of two computed tensors to `value` through score ops, or None."""
    node = value.producer()
    if node is None or depth > MAX_SCORE_OPS:
        return None
    if node.op_type == "MatMul":
        return [node] if all(constant_array(v) is None for v in node.inputs) else None
    if node.op_type not in SCORE_OPS:
        return None
    found = [p for v in node.inputs if v is not None and (p := _score_path(v, depth + 1)) is not None]
    return found[0] + [node] if len(found) == 1 else None


def _find(softmax: ir.Node) -> tuple[list[ir.Node], list[ir.Node], ir.Node]:
    """(score MatMul and the score ops up to the Softmax, the NaN guard after it if any, the P @ V
    MatMul); Rejected if this Softmax is not attention."""
    path = _score_path(softmax.inputs[0])
    if path is None:
        raise Rejected("its input is not a MatMul of two computed tensors (through scale/mask ops)")
    guard = _nan_guard(softmax.outputs[0])
    probs = guard[-1].outputs[0] if guard else softmax.outputs[0]
    users = probs.consumers()
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not probs:
        raise Rejected("its output does not go to exactly one MatMul with V")
    return path, guard, users[0]


def _nan_guard(probs: ir.Value) -> list[ir.Node]:
    """[IsNaN, Where] of Where(IsNaN(P), c, P), which scaled_dot_product_attention exports to zero
    fully masked rows; [] if `probs` has none."""
    users = probs.consumers()
    isnan = next((u for u in users if u.op_type == "IsNaN"), None)
    if isnan is None or len(users) != 2:
        return []
    where = next(u for u in users if u is not isnan)
    if (where.op_type != "Where" or where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs
            or len(isnan.outputs[0].consumers()) != 1):
        return []
    return [isnan, where]


def _align(a: HeadAxis, b: HeadAxis, node: ir.Node, what: str) -> tuple[HeadAxis, dict[int, int]]:
    """The head axis of MatMul(a, b)'s output, and which head of b each head of a meets."""
    na, nb = len(a.dims), len(b.dims)
    if max(a.axes) >= na - 2 or max(b.axes) >= nb - 2:
        raise Rejected(f"{what}: the heads are on a matrix axis, not a batch axis")
    if na - a.u != nb - b.u:
        raise Rejected(f"{what}: the operands keep their heads on different axes")
    if a.size != b.size and b.size != 1:
        raise Rejected(f"{what}: {a.size} heads meet {b.size}")
    if b.split != a.split and (b.split > 1 or b.dims[b.u + 1] != 1):
        raise Rejected(f"{what}: the operands' heads span different axes")
    meets: dict[int, int] = {}
    for e in range(a.size):
        for j in range(a.split):  # a row of a's heads meets one head of b broadcast over it
            la, lb = a.label(e, j), b.label(e if b.size > 1 else 0, j if b.split > 1 else 0)
            if meets.setdefault(la, lb) != lb:
                raise Rejected(f"{what}: head {la} meets two heads")
    n = max(na, nb)
    batch = [broadcast_dim(a.dims[i - n + na] if i >= n - na else 1, b.dims[i - n + nb] if i >= n - nb else 1)
             for i in range(n - 2)]
    inferred = static_dims(node.outputs[0])
    dims = [mine if mine is not None else seen for mine, seen in
            zip(batch + [a.dims[-2], b.dims[-1]], inferred)]
    return _with(a, dims, n - (na - a.u)), meets


def _analyze(score_path: list[ir.Node], softmax: ir.Node, guard: list[ir.Node], pv: ir.Node) -> Block:
    """Check one attention block end to end; Rejected says why it must be left alone."""
    score = score_path[0]
    q = _input_chain(score.inputs[0], "Q")
    k = _input_chain(score.inputs[1], "K")
    v = _input_chain(pv.inputs[1], "V")
    values: dict[ir.Value, HeadAxis] = {**q.values, **k.values, **v.values}

    ax, q_to_k = _align(q.axis, k.axis, score, "Q @ K")
    values[score.outputs[0]] = ax
    for node in score_path[1:]:
        on_path = values.keys()
        for other in node.inputs:
            if other is not None and other not in on_path:
                _check_broadcast(other, ax, f"{node.op_type} '{node_name(node)}'")
        ax = _with(ax, static_dims(node.outputs[0]), ax.u)
        values[node.outputs[0]] = ax
    axis = softmax.attributes.get_int("axis", -1) % len(ax.dims)
    if axis <= max(ax.axes):
        raise Rejected(f"Softmax '{node_name(softmax)}' normalizes across heads (axis {axis})")
    for node in [softmax] + guard:
        values[node.outputs[0]] = ax
    if guard:
        _check_broadcast(guard[1].inputs[1], ax, f"Where '{node_name(guard[1])}'")
    ax, q_to_v = _align(ax, v.axis, pv, "P @ V")
    if q_to_v != q_to_k:
        raise Rejected("keys and values are grouped differently over the query heads")
    out, proj, proj_axis = _output_chain(pv, ax)
    values.update(out.values)

    heads = set(q.axis.labels)
    if len(heads) != len(q.axis.labels) or set(q_to_k) != heads or set(out.axis.labels) != heads:
        raise Rejected("query heads repeat or go missing between the projection and the output")
    if set(k.axis.labels) != set(q_to_k.values()) or set(v.axis.labels) != set(q_to_k.values()):
        raise Rejected("some K/V heads meet no query head")

    shared = {(n, e) for n, e, _ in q.edits} & {(n, e) for c in (k, v) for n, e, _ in c.edits}
    if shared and any(h != kv for h, kv in q_to_k.items()):
        raise Rejected("Q and K/V share a head count but are grouped differently")
    for chain, unit in ((q, q_to_k.get), (out, q_to_k.get), (k, int), (v, int)):
        for node, _, ax in chain.edits:  # a row of heads shrinks only as a whole
            if any(len({unit(ax.label(i, j)) for j in range(ax.split)}) > 1 for i in range(ax.size)):
                raise Rejected(f"{node.op_type} '{node_name(node)}' groups heads of different K/V heads")
    linears, cuts = _check_projections([q.part, k.part, v.part], values)
    region = {n for c in (q, k, v, out) for n in c.nodes} | {n for lin in linears for n in lin.nodes}
    region |= set(cuts) | set(score_path) | set(guard) | {softmax, pv, proj}
    presents = {n.outputs[0] for n in region if _cache_past(n) is not None}
    _check_uses(values, region, presents)
    return Block(softmax, q, k, v, out, proj, proj_axis, q_to_k, linears, cuts, values, score, pv)


def _check_projections(parts: list[Part], values: dict) -> tuple[list[Linear], list[ir.Node]]:
    """Q, K and V must come from distinct columns that together use each projection whole."""
    by_linear: dict[int, list[Part]] = {}
    for part in parts:
        by_linear.setdefault(id(part.linear.matmul), []).append(part)
    linears, all_cuts = [], []
    for group in by_linear.values():
        linear, cuts = group[0].linear, list(dict.fromkeys(p.cut for p in group if p.cut is not None))
        at = 0
        for offset, width in sorted((p.offset, p.width) for p in group):
            if offset != at:
                raise Rejected(f"Q, K and V do not use each of the {linear.width} columns of their "
                               f"projection once")
            at += width
        if at != linear.width:
            raise Rejected(f"Q, K and V do not use all {linear.width} columns of their projection")
        for cut in cuts:
            if sum(p.cut is cut for p in group) != len(cut.outputs):
                raise Rejected(f"Split '{node_name(cut)}' has outputs that are not Q, K or V")
        if linear.bias_node is not None:
            bias = constant_array(linear.bias_node.inputs[linear.bias_input])
            if bias.ndim and bias.shape[-1] not in (1, linear.width):
                raise Rejected(f"the bias of '{node_name(linear.matmul)}' has shape {list(bias.shape)}")
        if linear.reshape is not None:
            _check_editable(linear.reshape.inputs[1], len(shape_elements(linear.reshape.inputs[1])) - 1)
        for node in linear.nodes:
            dims = static_dims(node.outputs[0])
            values[node.outputs[0]] = HeadAxis(tuple(dims), len(dims) - 1)
        for out in (out for cut in cuts for out in cut.outputs):
            dims = static_dims(out)
            values[out] = HeadAxis(tuple(dims), len(dims) - 1)
        all_cuts += cuts
        linears.append(linear)
    return linears, all_cuts


def _check_uses(values: dict[ir.Value, HeadAxis], region: set[ir.Node], presents: set[ir.Value]) -> None:
    """Every value whose head axis shrinks must be used only inside the block, and its head axis
    never read at run time: whatever reads it would see the new size. The KV cache's present
    outputs shrink with their past inputs."""
    for value, ax in values.items():
        if value.is_graph_output() and value not in presents:
            raise Rejected(f"'{value.name}' is a graph output, not a KV cache that its past input extends")
        for user in value.consumers():
            if user not in region:
                _check_use_outside(user, value, ax)


def _check_use_outside(user: ir.Node, value: ir.Value, ax: HeadAxis) -> None:
    """Outside the block, a pruned value may only reach Shapes that read other axes, directly or
    through ops that move its heads (TorchScript's scaled_dot_product_attention transposes K a
    second time only to read its length)."""
    if user.op_type == "Shape":
        if ax.u in dims_read(user, len(ax.dims)):
            raise Rejected(f"Shape '{node_name(user)}' reads the head axis of '{value.name}' at run time")
        return
    out, moved, index = user.outputs[0], None, None
    if (user.op_type in CHAIN_OPS and len(user.outputs) == 1 and _data_input(user) is value
            and not out.is_graph_output()):
        with contextlib.suppress(Rejected):
            moved, index = _step(user, ax, value, out)
    if moved is None or index is not None:  # not a head-moving op, or one that sizes the heads
        raise Rejected(f"'{value.name}' is also used by {user.op_type} '{node_name(user)}' outside the "
                       f"attention block")
    for next_user in out.consumers():
        _check_use_outside(next_user, out, moved)


# ----------------------------------------------------------------------------------------------
# Importance and the choice of heads


def _columns(chain: Chain, keep: Callable[[int], bool]) -> list[int]:
    """The projection columns of the heads `keep` accepts."""
    cols, part = chain.axis.cols, chain.part
    return [part.offset + h * cols + i for h in range(part.width // cols) if keep(h) for i in range(cols)]


def _rows(out: Chain, keep: Callable[[int], bool]) -> list[int]:
    """The positions of the output projection's input held by the query heads `keep` accepts."""
    ax = out.axis
    return [i * ax.inner + j for i, h in enumerate(ax.labels) if keep(h) for j in range(ax.inner)]


def _weight_norms(block: Block, units: dict[int, list[int]]) -> dict[int, float]:
    """Per unit: the L2 norm of its query heads' Q columns and output rows, and of the K and V
    columns of the K/V heads it leaves without a query head."""
    scores = {}
    for unit, queries in units.items():
        gone_q, gone_kv = set(queries), block.removed_kv(set(queries))
        total = 0.0
        for chain, keep in ((block.q, gone_q.__contains__), (block.k, gone_kv.__contains__),
                            (block.v, gone_kv.__contains__)):
            linear = chain.part.linear
            w = constant_matrix(linear.matmul.inputs[1], dtype=None)
            total += float((np.take(w, _columns(chain, keep), axis=linear.out_axis) ** 2).sum())
        w = constant_matrix(block.proj.inputs[1], dtype=None)
        total += float((np.take(w, _rows(block.out, gone_q.__contains__), axis=block.proj_axis) ** 2).sum())
        scores[unit] = math.sqrt(total)
    return scores


class _Damage:
    """The error that removing query heads leaves in a block's output on calibration samples X,
    ||X' W' - X W||^2, with the output projection refit (ridge_refit) when `refit`, as recover
    will do. It is measured against the geometric mean of the block output's energy ||X W||^2 and
    that of the residual stream it is added to (where the block has one), so that blocks rank
    fairly whatever their scale: removing 25% of SmolLM2's query heads so cost perplexity 59.3,
    against 63.9 relative to the block's output alone and 61.9 relative to the stream alone."""

    def __init__(self, block: Block, rows: np.ndarray, stream: np.ndarray | None, refit: bool):
        weight = constant_matrix(block.proj.inputs[1], dtype=None)
        self.w = (weight if block.proj_axis == 0 else weight.T).astype(np.float64)  # [inputs, outputs]
        x = rows.astype(np.float64)
        self.gram = x.T @ x
        self.target = self.gram @ self.w
        energy = float(np.sum(self.w * self.target))
        if stream is not None:
            energy = math.sqrt(energy * float(np.sum(stream.astype(np.float64) ** 2)))
        self.scale = max(energy, np.finfo(np.float64).tiny)
        self.block, self.refit = block, refit

    def __call__(self, removed: set[int]) -> float:
        if not removed:
            return 0.0
        kept = np.array(_rows(self.block.out, lambda h: h not in removed))
        approx = np.zeros_like(self.w)
        approx[kept] = ridge_refit(self.gram, kept, self.target) if self.refit else self.w[kept]
        diff = approx - self.w
        return float(np.sum(diff * (self.gram @ diff))) / self.scale


def _stream(block: Block) -> ir.Value | None:
    """The residual stream after the block's output joins it: the Add, past a bias and the
    Reshapes `fuse` puts around a Gemm, that adds the projection's output to a computed tensor."""
    value = block.proj.outputs[0]
    while len(value.consumers()) == 1:
        node = value.consumers()[0]
        if node.op_type == "Add":
            other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            if constant_array(other) is None:
                return node.outputs[0]
        elif node.op_type not in ("Reshape", "Identity"):
            return None
        value = node.outputs[0]
    return None


def _greedy(units: dict[int, dict[int, list[int]]], cost: Callable[[int, list[int]], float],
            counts: dict[int, int] | int) -> dict[int, list[int]]:
    """Units to remove, one at a time, each the one that adds the least cost to what its block
    has lost so far (removals in one block compound: their costs are not added up alone); per
    block as `counts` says, or (an int) that many across all blocks. A block keeps one unit."""
    removal: dict[int, list[int]] = {i: [] for i in units}

    def best(i):
        left = [u for u in units[i] if u not in removal[i]]
        if len(left) <= 1:
            return None
        base = cost(i, removal[i])
        extra, unit = min((cost(i, removal[i] + [u]) - base, u) for u in left)
        return extra, i, unit

    if isinstance(counts, dict):
        for i, count in counts.items():
            for _ in range(count):
                if (found := best(i)) is not None:
                    removal[i].append(found[2])
        return removal
    heap = [found for i in units if (found := best(i)) is not None]
    heapq.heapify(heap)
    for _ in range(counts):
        if not heap:
            break
        _, i, unit = heapq.heappop(heap)
        removal[i].append(unit)
        if (found := best(i)) is not None:
            heapq.heappush(heap, found)
    return removal


# ----------------------------------------------------------------------------------------------
# Rewrite


class _Rewriter:
    """Makes new initializers and shape tensors; never edits a value in place (it may be shared)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.names = {v.name for v in graph.inputs} | set(graph.initializers)
        self.names |= {v.name for n in graph for v in n.outputs}
        self.shapes: dict[tuple, ir.Value] = {}

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def constant(self, array: np.ndarray, base: str) -> ir.Value:
        name = self.unique(base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
        self.graph.register_initializer(value)
        return value

    def slice_input(self, node: ir.Node, index: int, keep: list[int], axis: int) -> None:
        value = node.inputs[index]
        array = np.ascontiguousarray(np.take(constant_array(value), keep, axis=axis))
        node.replace_input_with(index, self.constant(array, f"{value.name}.pruned"))

    def set_bounds(self, node: ir.Node, start: int, stop: int) -> None:
        """Slice `node` from `start` to `stop` (its starts and ends keep their dtype)."""
        for index, bound in ((1, start), (2, stop)):
            dtype = static_value(node.inputs[index]).dtype
            bounds = self.constant(np.array([bound], dtype), f"{node_name(node)}.bounds")
            node.replace_input_with(index, bounds)

    def set_element(self, node: ir.Node, index: int, element: int, new: int) -> None:
        """Input `index` of `node` (a shape) with element `element` set to `new`."""
        value = node.inputs[index]
        key = (id(value), element, new)
        if key not in self.shapes:
            self.shapes[key] = self._shape_with(value, element, new)
        node.replace_input_with(index, self.shapes[key])

    def _shape_with(self, value: ir.Value, element: int, new: int) -> ir.Value:
        pieces = shape_pieces(value)
        if all(p.ints is not None for p in pieces):
            array = np.concatenate([p.ints for p in pieces])
            array[element] = new
            return self.constant(array, f"{value.name}.pruned")
        inputs, at = [], 0
        for p in pieces:
            if at <= element < at + p.length:
                array = p.ints.copy()  # _check_editable made sure this piece is fixed
                array[element - at] = new
                inputs.append(self.constant(array, f"{p.value.name}.pruned"))
            else:
                inputs.append(p.value)
            at += p.length
        concat = value.producer()
        name = self.unique(f"{value.name}.pruned")
        node = ir.node("Concat", inputs, {"axis": 0}, name=name, outputs=[ir.Value(name=name)])
        self.graph.insert_after(concat, node)  # every user of the old shape comes after it
        return node.outputs[0]


def _prune(model: ir.Model, block: Block, removed: set[int], rw: _Rewriter, opset: int,
           proj_weight: np.ndarray | None) -> None:
    """Remove the query heads `removed`, and the K/V heads none of whose query heads stay;
    `proj_weight`, if given, replaces what is left of the output projection's weight.

    Where a group loses only some of its query heads (unit=query), the groups no longer have one
    size, so Q and the attention output are viewed one head per row ([.., kv, group, ..] becomes
    [.., heads, 1, ..]) and K and V reach the attention MatMuls through a Gather that gives each
    remaining query head its K/V head: the KV cache keeps its layout, one copy per step."""
    gone_kv = block.removed_kv(removed)

    def keep_q(h):
        return h not in removed

    def keep_kv(h):
        return h not in gone_kv

    ungroup = any(block.group[h] not in gone_kv for h in removed)
    keeps = {id(block.q): keep_q, id(block.k): keep_kv, id(block.v): keep_kv, id(block.out): keep_q}
    # Q, K and V reshaped by one node (a [.., 3, heads, d] view) edit it once
    sizes = {(node, element): _kept_size(ax, keeps[id(chain)], ungroup)
             for chain in (block.q, block.k, block.v, block.out) for node, element, ax in chain.edits}
    if ungroup:
        sizes.update({(node, element): 1 for chain in (block.q, block.out) for node, element in chain.groups})
    for (node, element), size in sizes.items():
        rw.set_element(node, 1, element, size)
    if ungroup:
        _gather_kv(block, keep_q, keep_kv, rw)
    for chain in (block.q, block.k, block.v, block.out):  # a KV cache's past inputs and present outputs
        for value, ax in chain.values.items():
            if value.is_graph_input() or value.is_graph_output():
                dims = list(value.shape.dims)
                dims[ax.u] = ax.kept(keeps[id(chain)])
                value.shape = ir.Shape(dims)
                record_narrowed(model, value.name, ax.u,
                                [i for i in range(ax.dims[ax.u]) if keeps[id(chain)](ax.label(i))])
    for linear in block.linears:
        chains = sorted((c for c in (block.q, block.k, block.v) if c.part.linear.matmul is linear.matmul),
                        key=lambda c: c.part.offset)
        cols = [i for c in chains for i in _columns(c, keeps[id(c)])]
        width = linear.width
        rw.slice_input(linear.matmul, 1, cols, linear.out_axis)
        if linear.bias_node is not None:
            bias = constant_array(linear.bias_node.inputs[linear.bias_input])
            if bias.ndim and bias.shape[-1] == width:
                rw.slice_input(linear.bias_node, linear.bias_input, cols, bias.ndim - 1)
        if linear.reshape is not None:
            rw.set_element(linear.reshape, 1, len(shape_elements(linear.reshape.inputs[1])) - 1, len(cols))
        widths = [len(_columns(c, keeps[id(c)])) for c in chains]
        cut = chains[0].part.cut
        if cut is not None and cut.op_type == "Split":
            _set_split_sizes(cut, widths, rw, opset)
        elif cut is not None:  # one Slice per chain
            for chain, start, width in zip(chains, np.cumsum([0] + widths), widths):
                rw.set_bounds(chain.part.cut, int(start), int(start + width))
    if proj_weight is None:
        rw.slice_input(block.proj, 1, _rows(block.out, keep_q), block.proj_axis)
    else:
        block.proj.replace_input_with(1, rw.constant(proj_weight, f"{block.proj.inputs[1].name}.refit"))


def _kept_size(ax: HeadAxis, keep: Callable[[int], bool], ungroup: bool) -> int:
    """The size of head axis `ax` once the heads `keep` rejects are gone: whole rows of a group,
    or, ungrouped, one head per row."""
    if ungroup and ax.split > 1:
        return sum(1 for label in ax.labels if keep(label))
    return ax.kept(keep)


def _gather_kv(block: Block, keep_q: Callable[[int], bool], keep_kv: Callable[[int], bool],
               rw: _Rewriter) -> None:
    """Feed each attention MatMul, in place of its K or V operand, the K/V head of every query
    head that stays, in the order of the ungrouped query heads."""
    q = block.q.axis
    kept = [i for i in range(q.size) for j in range(q.split) if keep_q(q.label(i, j))]
    for matmul, chain in ((block.score, block.k), (block.pv, block.v)):
        ax = chain.axis
        if ax.size == 1:  # one K/V head, broadcast over every query head
            continue
        positions = [e for e in range(ax.size) if keep_kv(ax.label(e))]
        indices = np.array([positions.index(i) for i in kept], np.int64)
        operand = matmul.inputs[1]
        name = rw.unique(f"{operand.name}.per_query")
        gather = ir.node("Gather", [operand, rw.constant(indices, f"{name}.indices")], {"axis": ax.u},
                         name=name, outputs=[ir.Value(name=name)])
        rw.graph.insert_before(matmul, gather)
        matmul.replace_input_with(1, gather.outputs[0])


def _refit(block: Block, removed: set[int], x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The output projection's weight refit on the rows `x` of its unpruned input X: W' = argmin
    ||X[:, kept] W' - X W||^2 (pass_helpers.ridge_refit), in W's layout; and
    the relative error of the projection's output on `x` without and with the refit."""
    kept = _rows(block.out, lambda h: h not in removed)
    weight = constant_matrix(block.proj.inputs[1], dtype=None)
    w = (weight if block.proj_axis == 0 else weight.T).astype(np.float64)  # [inputs, outputs]
    x = x.astype(np.float64)
    gram = x.T @ x
    fitted = ridge_refit(gram, kept, gram @ w)
    y = x @ w
    scale = max(float(np.linalg.norm(y)), np.finfo(np.float64).tiny)
    before = float(np.linalg.norm(x[:, kept] @ w[kept] - y)) / scale
    after = float(np.linalg.norm(x[:, kept] @ fitted - y)) / scale
    return (fitted if block.proj_axis == 0 else fitted.T).astype(weight.dtype), before, after


def _set_split_sizes(split: ir.Node, sizes: list[int], rw: _Rewriter, opset: int) -> None:
    if "split" in split.attributes or opset < SPLIT_INPUT_OPSET:
        split.attributes["split"] = ir.AttrInt64s("split", sizes)
        return
    split.attributes.pop("num_outputs", None)
    if len(split.inputs) < 2:
        split.resize_inputs(2)
    split.replace_input_with(1, rw.constant(np.array(sizes, np.int64), f"{node_name(split)}.sizes"))


def _float_weights(model: ir.Model) -> tuple[int, int]:
    tensors = [v.const_value for v in model.graph.initializers.values()
               if v.const_value is not None and v.const_value.dtype.is_floating_point()]
    return sum(t.size for t in tensors), sum(t.nbytes for t in tensors)


# ----------------------------------------------------------------------------------------------
# The pass


@register_pass
class PruneHeads(Pass):
    name = "prune-heads"
    description = ("remove whole attention heads (multi-head and grouped-query): slice the Q/K/V and "
                   "output-projection weights and rewrite the shapes that hold the head count")
    options = (
        Option("ratio", float, 0.25, "fraction of the heads to remove (rounded down; never all of a "
               "block), of each block's or of the model's as scope says", low=0.0, high=0.9),
        Option("scope", str, "layer", "where ratio ranks heads: within each block, or across all blocks "
               "at once (so that blocks with few K/V heads can lose one, and the least important go "
               "wherever they are)", choices=("layer", "model")),
        Option("heads", str, "", "remove exactly these heads instead, as layer:head pairs joined by ',' "
               "(quoted in a pipeline: heads=\"0:1,1:3\"; ';' also joins); layers count attention "
               "blocks in graph order; in grouped-query attention a head takes its whole group along",
               kind="layer:head list"),
        Option("importance", str, "weight-norm", "how ratio ranks heads: the L2 norm of their Q/K/V and "
               "output weights, or the relative error their removal leaves in the block's output on calibration "
               "data (after the refit, with recover)",
               choices=("weight-norm", "calibration")),
        Option("strict", bool, False, "fail, naming the reason, where a requested pruning removes no head "
               "(instead of a warning)"),
        Option("unit", str, "group", "what ratio counts and removes in grouped-query attention: a K/V head "
               "with its group of query heads (the KV cache shrinks), or single query heads (far less "
               "accuracy lost; a K/V head goes only with its last query head)", choices=("group", "query")),
        Option("recover", bool, False, "refit each pruned block's output projection by least squares so "
               "that its output on calibration data stays as close to the unpruned one as the remaining "
               "heads allow"),
    )
    provides = ("pruned",)
    # Removing heads changes what the model computes, by an amount only the model's task can tell
    # (measure accuracy; fine-tune after pruning). The bound only stops a rewrite that wrecks the
    # outputs (a quarter of SmolLM2's K/V groups moves its logits on random inputs by a relative
    # RMS of 1.16; the pruned model's perplexity on text is what says how much that costs);
    # verification then holds the rest of the pipeline to the pruned model's numbers.
    drift = 2.0
    needs_shapes = True  # the checks read ranks and static dims

    def __init__(self, **opts):
        super().__init__(**opts)
        try:
            self.requested = parse_heads(self.opts["heads"])
        except ValueError as e:
            raise UserError(f"pass 'prune-heads': option 'heads' expects layer:head pairs joined by ',' "
                            f"(e.g. \"0:1,1:3\"), got '{self.opts['heads']}' (bad item '{e}')") from None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        weights_before = _float_weights(model)
        layers: list[Block | str] = []  # a Block, or why that attention block is left alone
        not_attention = []
        for node in model.graph:
            if node.op_type != "Softmax":
                continue
            try:
                path, guard, pv = _find(node)
            except Rejected as e:
                not_attention.append(f"Softmax '{node_name(node)}': {e}")
                continue
            try:
                layers.append(_analyze(path, node, guard, pv))
            except Rejected as e:
                layers.append(f"Softmax '{node_name(node)}': {e}")
        blocks = {i: b for i, b in enumerate(layers) if isinstance(b, Block)}
        by_calibration = self.opts["importance"] == "calibration" and not self.opts["heads"].strip()
        samples, streams = {}, {}  # each block's output-projection input, and the residual stream after it
        if blocks and (by_calibration or self.opts["recover"]):
            after = {i: v.name for i, b in blocks.items() if by_calibration and (v := _stream(b)) is not None}
            names = sorted({b.proj.inputs[0].name for b in blocks.values()} | set(after.values()))
            rows = activation_samples(model, ctx, names)
            samples = {i: rows[b.proj.inputs[0].name] for i, b in blocks.items()}
            streams = {i: rows[name] for i, name in after.items()}
        removal, scores = self._choose(layers, blocks, samples, streams)
        pruned = [i for i, heads in removal.items() if heads]
        warnings = []
        if not pruned and (self.opts["heads"].strip() or self.opts["ratio"] > 0):
            why = f"removed no head: {_nothing_removed(layers, not_attention, self.opts)}"
            if self.opts["strict"]:
                raise UserError(f"pass 'prune-heads': {why}")
            warnings.append(why)

        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        rewriter = _Rewriter(model.graph)
        errors = {}  # block -> the projection's relative output error without and with the refit
        for i in pruned:
            refit = None
            if self.opts["recover"]:
                refit, *errors[i] = _refit(blocks[i], removal[i], samples[i])
            _prune(model, blocks[i], removal[i], rewriter, opset, refit)
        for value in (v for i in pruned for v in blocks[i].values):
            if not (value.is_graph_input() or value.is_graph_output()):
                value.shape = None  # stale; shape inference fills in the new sizes
        if pruned:
            RemoveUnusedNodesPass()(model)  # the old weights and shape tensors
            model = infer_shapes(model)
        weights_after = _float_weights(model)
        stats = {
            "blocks_found": len(layers),
            "blocks_pruned": len(pruned),
            "blocks_skipped": len(layers) - len(blocks),
            "heads_before": sum(len(b.heads) for b in blocks.values()),
            "heads_after": sum(len(b.heads) - len(removal[i]) for i, b in blocks.items()),
            "weights_removed": weights_before[0] - weights_after[0],
            "bytes_removed": weights_before[1] - weights_after[1],
            "blocks": {str(i): _block_stats(b, removal[i], scores.get(i), errors.get(i))
                       for i, b in blocks.items()},
            "skipped": [f"layer {i} ({why})" for i, why in enumerate(layers) if isinstance(why, str)],
            "not_attention": not_attention,
        }
        if errors:
            stats["recover"] = {"error_before": float(np.mean([e[0] for e in errors.values()])),
                                "error_after": float(np.mean([e[1] for e in errors.values()]))}
        return PassResult(model, bool(pruned), stats, warnings)

    def _choose(self, layers, blocks, samples, streams) -> tuple[dict[int, set[int]], dict]:
        """The query heads to remove per block, and the importance of each unit."""
        units = {i: b.units(self.opts["unit"]) for i, b in blocks.items()}
        if self.opts["heads"].strip():
            return {i: set() for i in blocks} | self._requested(layers, units), {}
        if self.opts["importance"] == "calibration":
            damage = {i: _Damage(b, samples[i], streams.get(i), self.opts["recover"]) for i, b in blocks.items()}

            def cost(i, chosen):
                return damage[i](set().union(*(units[i][u] for u in chosen)))

            scores = {i: {u: cost(i, [u]) for u in units[i]} for i in blocks}
        else:
            scores = {i: _weight_norms(b, units[i]) for i, b in blocks.items()}

            def cost(i, chosen):
                return sum(scores[i][u] for u in chosen)

        ratio = self.opts["ratio"]
        if self.opts["scope"] == "model":
            counts = math.floor(ratio * sum(len(u) for u in units.values()) + 1e-9)
        else:
            counts = {i: math.floor(ratio * len(u) + 1e-9) for i, u in units.items()}
        removal = _greedy(units, cost, counts)
        return {i: set().union(*(units[i][u] for u in chosen)) for i, chosen in removal.items()}, scores

    def _requested(self, layers: list, units: dict[int, dict[int, list[int]]]) -> dict[int, set[int]]:
        where = "pass 'prune-heads': option 'heads'"
        removal = {}
        for layer, heads in sorted(self.requested.items()):
            if layer >= len(layers):
                raise UserError(f"{where}: layer {layer} does not exist; the model has {len(layers)} "
                                f"attention block(s)")
            block = layers[layer]
            if isinstance(block, str):
                raise UserError(f"{where}: layer {layer} cannot be pruned: {block}")
            bad = sorted(h for h in heads if h not in block.group)
            if bad:
                raise UserError(f"{where}: head {bad[0]} is out of range; layer {layer} has "
                                f"{len(block.heads)} heads (0..{len(block.heads) - 1})")
            removed = {q for queries in units[layer].values() if heads & set(queries) for q in queries}
            if len(removed) == len(block.heads):
                raise UserError(f"{where}: would remove every head of layer {layer}")
            removal[layer] = removed
        return removal


def _layout(block: Block) -> str:
    if len(block.linears) == 3:
        return "separate Q/K/V"
    fused = "fused QKV" if len(block.linears) == 1 else "fused KV"
    cut = block.k.part.cut
    return f"{fused} ({cut.op_type if cut is not None else '[.., 3, heads, d] view'})"


def _nothing_removed(layers: list, not_attention: list[str], opts: dict) -> str:
    """Why no head went: the reasons each block was left alone, or what the Softmaxes were."""
    if not layers:
        return "no attention block found" + (f": {'; '.join(not_attention)}" if not_attention else
                                             " (the model has no Softmax)")
    ratio, unit = opts["ratio"], opts["unit"]
    blocks = [b for b in layers if not isinstance(b, str)]

    def what(b):  # what ratio counts in block b
        return "heads" if len(b.units(unit)) == len(b.heads) else "K/V groups"

    if opts["scope"] == "model" and blocks:
        kinds = " or ".join(sorted({what(b) for b in blocks}))
        return (f"ratio {ratio:g} of the {sum(len(b.units(unit)) for b in blocks)} {kinds} of {len(blocks)} "
                f"blocks rounds down to none")
    reasons = [f"layer {i} ({b})" if isinstance(b, str) else
               f"layer {i} (ratio {ratio:g} of its {len(b.units(unit))} {what(b)} rounds down to none)"
               for i, b in enumerate(layers)]
    more = len(reasons) - MAX_REASONS
    return "; ".join(reasons[:MAX_REASONS]) + (f"; and {more} more (stats 'skipped')" if more > 0 else "")


def _block_stats(block: Block, removed: set[int], scores: dict | None, errors: list | None) -> dict:
    stats = {
        "softmax": node_name(block.softmax),
        "attention": "grouped-query" if block.grouped else "multi-head",
        "projections": _layout(block),
        "heads_before": len(block.heads),
        "heads_after": len(block.heads) - len(removed),
        "removed_heads": sorted(removed),
    }
    if block.grouped:
        gone_kv = block.removed_kv(removed)
        stats.update(kv_heads_before=len(block.kv_heads), kv_heads_after=len(block.kv_heads) - len(gone_kv),
                     removed_kv_heads=sorted(gone_kv))
    if scores is not None:
        stats["importance"] = {str(u): round(s, 6) for u, s in scores.items()}
    if errors is not None:
        stats["output_error"] = {"before_refit": round(errors[0], 6), "after_refit": round(errors[1], 6)}
    return stats

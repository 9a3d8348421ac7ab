"""simplify: structural before/after, numeric equivalence vs ORT, fires / must not fire."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
from edgecc.passes import simplify
from edgecc.passes.simplify import Simplify, _weights_kept_apart
from onnx import helper, numpy_helper

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import compare, random_inputs, run_ort
from tests.conftest import parse_model

# Shape arithmetic that folds to a constant, a dead branch, an Identity chain.
FOLDABLE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 8] x) => (float[B, 8] y) {
    w = Constant <value = float[8, 8] {1,0,0,0,0,0,0,0, 0,1,0,0,0,0,0,0, 0,0,1,0,0,0,0,0,
        0,0,0,1,0,0,0,0, 0,0,0,0,1,0,0,0, 0,0,0,0,0,1,0,0, 0,0,0,0,0,0,1,0, 0,0,0,0,0,0,0,1}> ()
    two = Constant <value = float {2.0}> ()
    three = Constant <value = float {3.0}> ()
    k = Add(two, three)
    wk = Mul(w, k)
    h = MatMul(x, wk)
    dead = Relu(h)
    i1 = Identity(h)
    y = Tanh(i1)
}
"""

# Already minimal: nothing to fold or remove.
MINIMAL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 8] x, float[8, 8] w) => (float[B, 8] y) {
    h = MatMul(x, w)
    y = Tanh(h)
}
"""


def _run(text: str, **opts):
    before = parse_model(text)
    result = run_pass(Simplify(**opts), ir.from_proto(before), PassContext())
    return before, result, ir.to_proto(result.model)


@pytest.mark.parametrize("use_onnxsim", [True, False])
def test_structure_constants_folded_dead_and_identity_removed(use_onnxsim):
    _, result, after = _run(FOLDABLE, onnxsim=use_onnxsim)
    ops = Counter(n.op_type for n in after.graph.node)
    assert ops == Counter({"MatMul": 1, "Tanh": 1})
    assert result.changed and result.stats["nodes_removed"] > 0
    # The folded weight is w * (2 + 3): an initializer, no longer arithmetic.
    (weight,) = [i for i in after.graph.initializer]
    assert onnx_to_np(weight)[0, 0] == 5.0


@pytest.mark.parametrize("use_onnxsim", [True, False])
def test_numerics_match_ort_without_its_optimizations(use_onnxsim):
    before, _, after = _run(FOLDABLE, onnxsim=use_onnxsim)
    feeds = random_inputs(before, seed=1, dim_values={"B": 3})
    result = compare(run_ort(before, feeds), run_ort(after, feeds))
    assert result.ok, result.detail


def test_does_not_fire_on_a_minimal_graph():
    before, result, after = _run(MINIMAL)
    assert not result.changed
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    assert result.stats["nodes_removed"] == 0


def test_keeps_symbolic_dims_and_graph_outputs():
    _, _, after = _run(FOLDABLE)
    dims = after.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "B"
    assert [o.name for o in after.graph.output] == ["y"]


def test_on_the_example_lm_from_both_exporters(example_path):
    import onnx

    for exporter in ("dynamo", "torchscript"):
        before = onnx.load(str(example_path("tiny-lm", exporter)))
        result = run_pass(Simplify(), ir.from_proto(before), PassContext())
        after = ir.to_proto(result.model)
        assert len(after.graph.node) <= len(before.graph.node), exporter
        feeds = random_inputs(before, seed=0, dim_values={"batch": 2, "seq": 9})
        cmp = compare(run_ort(before, feeds), run_ort(after, feeds))
        assert cmp.ok, (exporter, cmp.detail)


def onnx_to_np(tensor):
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _weighted(const_rows: bool):
    """x @ w (or, with const_rows, a folded constant @ w) over a large weight, a large embedding
    table gathered, and shape arithmetic onnxsim folds: weights onnxsim gets only as inputs."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    table = rng.standard_normal((300, 64)).astype(np.float32)
    one = numpy_helper.from_array(np.ones((1, 64), np.float32), "one")
    f = 1  # float
    rows = [helper.make_node("Add", ["one", "one"], ["two"]), helper.make_node("MatMul", ["two", "w"], ["c"]),
            helper.make_node("Add", ["xw", "c"], ["y"])] if const_rows else \
        [helper.make_node("Identity", ["xw"], ["y"])]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Add", ["e", "x"], ["h"]),
         helper.make_node("MatMul", ["h", "w"], ["xw"]), *rows], "g",
        [helper.make_tensor_value_info("x", f, ["B", 64]), helper.make_tensor_value_info("ids", 7, ["B"])],
        [helper.make_tensor_value_info("y", f, ["B", 512])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(table, "table"), one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("const_rows", [False, True])
def test_weights_kept_out_of_onnxsim_give_the_graph_onnxsim_gives_with_them(monkeypatch, const_rows):
    """Large MatMul and Gather weights reach onnxsim as inputs; the result is the graph of the
    whole model's simplification, weights in place and in order. Where a node reads such a weight
    and constants only (const_rows), onnxsim folds it: it gets the weights."""
    before = _weighted(const_rows)
    kept_apart = run_pass(Simplify(), ir.from_proto(before), PassContext())
    monkeypatch.setattr(simplify, "APART_BYTES", 1 << 62)
    whole = run_pass(Simplify(), ir.from_proto(before), PassContext())
    assert ir.to_proto(kept_apart.model) == ir.to_proto(whole.model)
    assert [n.op_type for n in kept_apart.model.graph].count("MatMul") == 1
    feeds = random_inputs(before, seed=0, dim_values={"B": 3})
    cmp = compare(run_ort(before, feeds), run_ort(ir.to_proto(kept_apart.model), feeds))
    assert cmp.ok, cmp.detail


def test_weights_kept_apart_are_large_and_read_only_by_matmul_gemm_or_gather():
    big, small = np.ones((128, 128), np.float32), np.ones((8, 128), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "u"], ["b"]),
         helper.make_node("Transpose", ["u"], ["ut"]), helper.make_node("Gemm", ["a", "s"], ["c"], transB=1),
         helper.make_node("MatMul", ["x", "v"], ["d"])], "g",
        [helper.make_tensor_value_info("x", 1, [2, 128]), helper.make_tensor_value_info("v", 1, [128, 128])],
        [helper.make_tensor_value_info(n, 1, None) for n in ("b", "ut", "c", "d")],
        [numpy_helper.from_array(big, "w"), numpy_helper.from_array(big, "u"),  # u: also transposed
         numpy_helper.from_array(small, "s"), numpy_helper.from_array(big, "v")])  # v: an input too
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert list(_weights_kept_apart(ir.from_proto(model))) == ["w"]

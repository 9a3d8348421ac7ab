"""simplify: structural before/after, numeric equivalence vs ORT, fires / must not fire."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import pytest

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.passes.simplify import Simplify
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

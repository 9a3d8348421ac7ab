"""fuse-siblings: structure, exact numerics against ORT, where it fires and where it must not."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

import edgecc
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import random_inputs, run_ort
from edgecc.passes.fuse_siblings import FuseSiblings


def _model(widths=(8, 4, 4), same_input=True, weight_as_input=False) -> onnx.ModelProto:
    """x [B, 3, 16] projected by one MatMul per width (q, k, v); the second feeds a Relu, the others
    are graph outputs."""
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, n)).astype(np.float32) for n in widths]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 3, 16])]
    if not same_input:
        inputs.append(helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, ["B", 3, 16]))
    if weight_as_input:
        inputs.append(helper.make_tensor_value_info("w0", onnx.TensorProto.FLOAT, list(weights[0].shape)))
    nodes, outputs = [], []
    for i, n in enumerate(widths):
        x = "x2" if not same_input and i == 1 else "x"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"proj{i}"))
    nodes.append(helper.make_node("Relu", ["y1"], ["r"]))
    for name, n in (("y0", widths[0]), ("r", widths[1]), *((f"y{i}", widths[i]) for i in range(2, len(widths)))):
        outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["B", 3, n]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, **opts):
    result = run_pass(FuseSiblings(**opts), ir.from_proto(model), PassContext())
    return result, ir.to_proto(result.model)


def test_structure_one_matmul_over_concatenated_weights_then_split():
    result, after = _run(_model())
    assert Counter(n.op_type for n in after.graph.node) == Counter({"MatMul": 1, "Split": 1, "Relu": 1})
    weight = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}[after.graph.node[0].input[1]]
    assert weight.shape == (16, 16)
    assert [o.name for o in after.graph.output] == ["y0", "r", "y2"]
    assert result.changed and result.stats == {"groups": 1, "matmuls_merged": 3}
    onnx.checker.check_model(after, full_check=True)


def test_numerics_are_exact_against_ort():
    before = _model()
    _, after = _run(before)
    feeds = random_inputs(before, seed=1, dim_values={"B": 2})
    want, got = run_ort(before, feeds), run_ort(after, feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_does_not_fire_across_inputs_or_on_an_overridable_weight():
    for model in (_model(widths=(8, 4), same_input=False), _model(widths=(8, 4), weight_as_input=True)):
        result, after = _run(model)
        assert not result.changed and Counter(n.op_type for n in after.graph.node)["MatMul"] == len(
            [n for n in model.graph.node if n.op_type == "MatMul"])


def test_min_weights_leaves_small_groups_alone():
    result, _ = _run(_model(), min_weights=16 * 16 + 1)
    assert not result.changed


def test_compiled_lm_projections_merge_and_match_ort(example_path, tmp_path):
    art = edgecc.compile(example_path("tiny-llama"), "host", tmp_path / "a", "simplify,fuse,fuse-siblings")
    stats = next(p["stats"] for p in art.manifest["passes"] if p["name"] == "fuse-siblings")
    assert stats == {"groups": 4, "matmuls_merged": 10}  # per layer: q, k, v and gate, up
    assert art.manifest["verification"]["ok"]

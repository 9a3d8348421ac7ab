"""decompose-layernorm: structure, numerics vs ORT, fires / must not fire."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from edgecc.passes.decompose_layernorm import DecomposeLayerNorm

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import random_inputs, run_ort
from tests.conftest import parse_model


def _model(opset: int = 17, axis: int = -1, outputs: str = "y") -> str:
    return f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[1, 5, 8] x) => (float[1, 5, 8] y) <float[8] s = {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}},
                                            float[8] b = {{0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7}}> {{
    {outputs} = LayerNormalization <axis = {axis}, epsilon = 0.001> (x, s, b)
}}
"""


def _run(text: str, explain: bool = False):
    model = parse_model(text)
    result = run_pass(DecomposeLayerNorm(), ir.from_proto(model), PassContext(explain=explain))
    return model, result, ir.to_proto(result.model)


def test_structure_only_ops_the_exporter_maps():
    _, result, out = _run(_model())
    ops = Counter(n.op_type for n in out.graph.node)
    assert result.changed and result.stats["layernorms"] == 1 and ops["LayerNormalization"] == 0
    assert ops["ReduceMean"] == 2 and ops["Sqrt"] == 1 and ops["Reciprocal"] == 1 and ops["Div"] == 0


def test_numerics_match_ort_layernorm():
    for opset in (17, 18):  # ReduceMean's axes: an attribute, then an input
        model, _, out = _run(_model(opset))
        feeds = random_inputs(model, seed=3)
        np.testing.assert_allclose(run_ort(out, feeds)["y"], run_ort(model, feeds)["y"], rtol=1e-4, atol=1e-5)


def test_does_not_fire_over_other_axes_or_when_statistics_are_used():
    _, result, out = _run(_model(axis=1))
    assert not result.changed and out.graph.node[0].op_type == "LayerNormalization"
    used = _model(outputs="y, mean").replace(
        "=> (float[1, 5, 8] y)", "=> (float[1, 5, 8] y, float[1, 5, 1] mean)"
    )
    _, result, _ = _run(used)
    assert not result.changed


def test_explain_names_why_a_layernorm_was_left():
    _, result, _ = _run(_model(axis=1), explain=True)
    assert result.stats["near_misses"] == [
        "decompose-layernorm: LayerNormalization 'y': normalizes from axis 1 of rank 3; only the last axis "
        "is decomposed"]
    _, result, _ = _run(_model())
    assert "near_misses" not in result.stats  # only with explain

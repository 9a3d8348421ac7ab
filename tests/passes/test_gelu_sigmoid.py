"""gelu-sigmoid: structure, numerics vs ORT's GELU (within the approximation), fires / must not fire."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from edgecc.passes.gelu_sigmoid import SIGMOID_SCALE, GeluSigmoid

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import relative_rmse, run_ort
from tests.conftest import parse_model

ONNX_GELU = """
<ir_version: 9, opset_import: ["" : 20]>
g (float[1, 4, 64] x) => (float[1, 4, 64] y) {
    y = Gelu <approximate = "none"> (x)
}
"""
ORT_GELU = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[1, 4, 64] x) => (float[1, 4, 64] y) {
    y = com.microsoft.Gelu (x)
}
"""
FAST_GELU_WITH_BIAS = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[1, 4, 64] x, float[64] b) => (float[1, 4, 64] y) {
    y = com.microsoft.FastGelu (x, b)
}
"""


def _run(text: str, check: bool = True):
    import onnx

    model = parse_model(text) if check else onnx.parser.parse_model(text)
    result = run_pass(GeluSigmoid(), ir.from_proto(model), PassContext())
    return model, result, ir.to_proto(result.model)


def test_structure_x_times_sigmoid():
    for text in (ONNX_GELU, ORT_GELU):
        _, result, out = _run(text, check=text is ONNX_GELU)
        ops = Counter(n.op_type for n in out.graph.node)
        assert result.changed and ops == {"Sigmoid": 1, "Mul": 2, "Constant": 1}, ops


def test_numerics_within_the_approximation_of_gelu():
    model, _, out = _run(ONNX_GELU)
    x = np.linspace(-6, 6, 256, dtype=np.float32).reshape(1, 4, 64)
    ref, got = run_ort(model, {"x": x})["y"], run_ort(out, {"x": x})["y"]
    np.testing.assert_allclose(got, x / (1 + np.exp(-SIGMOID_SCALE * x)), rtol=1e-5, atol=1e-6)
    assert np.abs(got - ref).max() < 0.021  # the sigmoid approximation's known worst case
    normal = {"x": np.random.default_rng(0).standard_normal((1, 4, 64)).astype(np.float32)}
    assert relative_rmse(run_ort(model, normal), run_ort(out, normal)) < GeluSigmoid.drift


def test_does_not_fire_on_fast_gelu_with_a_bias():
    _, result, out = _run(FAST_GELU_WITH_BIAS, check=False)
    assert not result.changed and out.graph.node[0].op_type == "FastGelu"

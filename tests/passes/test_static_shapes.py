"""static-shapes: structure, numerics vs ORT, fires / must not fire, and its errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from edgecc.passes.static_shapes import StaticShapes

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import random_inputs, run_ort
from edgecc.errors import UserError
from tests.conftest import parse_model

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, T, 4] x) => (float[B, T, 4] y) {
    h = Relu(x)
    s = Shape(h)
    y = Reshape(h, s)
}
"""


def _run(text: str, ctx: PassContext):
    result = run_pass(StaticShapes(), ir.from_proto(parse_model(text)), ctx)
    return result, ir.to_proto(result.model)


def test_structure_inputs_and_every_value_become_static():
    result, out = _run(MODEL, PassContext(dim_values={"T": 5}))
    assert result.changed and result.stats["inputs_fixed"] == 1
    dims = [
        [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in (*out.graph.input, *out.graph.output)
    ]
    assert dims == [[1, 5, 4], [1, 5, 4]]
    assert all(d.HasField("dim_value") for vi in out.graph.value_info for d in vi.type.tensor_type.shape.dim)


def test_numerics_unchanged_in_ort():
    _, out = _run(MODEL, PassContext(dim_values={"T": 5}))
    feeds = random_inputs(out, seed=1)
    np.testing.assert_array_equal(run_ort(parse_model(MODEL), feeds)["y"], run_ort(out, feeds)["y"])


def test_sizes_come_from_calibration_data():
    _, out = _run(MODEL, PassContext(calibration={"x": np.zeros((6, 7, 4), np.float32)}))
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [1, 7, 4]


def test_does_not_fire_on_a_static_model():
    result, _ = _run(MODEL.replace("float[B, T, 4] x", "float[1, 3, 4] x"), PassContext())
    assert not result.changed


@pytest.mark.parametrize(
    "text,ctx,fragment",
    [
        (MODEL, PassContext(), "input 'x': dim 1 ('T') is symbolic"),
        (MODEL, PassContext(dim_values={"T": 5, "B": 2}), "input 'x' has batch 2 (dim 0)"),
        (
            MODEL.replace("float[B, T, 4] x", "float[4, T, 4] x"),
            PassContext(dim_values={"T": 5}),
            "has batch 4",
        ),
    ],
)
def test_errors_name_the_input_and_dim(text, ctx, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        _run(text, ctx)

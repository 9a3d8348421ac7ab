"""layernorm-row-scale: structure, numerics vs ORT, fires on outlier rows only."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from edgecc.passes.layernorm_row_scale import LayerNormRowScale

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import run_ort
from tests.conftest import parse_model

OUTLIER_ROW = 2


def _floats(values) -> str:
    return ", ".join(f"{v:.4f}" for v in np.ravel(values))


def _model(extra_output: bool = False) -> str:
    """x + (h @ w + b) -> LayerNorm over 4 rows of 8 channels; optionally the sum as a second output."""
    rng = np.random.default_rng(0)
    outputs = "float[1, 4, 8] y, float[1, 4, 8] z" if extra_output else "float[1, 4, 8] y"
    return f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4, 8] x, float[1, 4, 16] h) => ({outputs})
  <float[16, 8] w = {{{_floats(rng.standard_normal((16, 8)))}}},
   float[8] b = {{{_floats(rng.standard_normal(8))}}},
   float[8] s = {{{_floats(rng.uniform(0.5, 2, 8))}}}, float[8] t = {{{_floats(rng.standard_normal(8))}}}> {{
    m = MatMul (h, w)
    p = Add (m, b)
    z = Add (x, p)
    y = LayerNormalization <axis = -1, epsilon = 1e-5> (z, s, t)
}}
"""


def _calibration(outlier: float, samples: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((samples, 4, 16)).astype(np.float32)
    h[:, OUTLIER_ROW] *= outlier  # one token whose projection output dwarfs the others'
    return {"x": rng.standard_normal((samples, 4, 8)).astype(np.float32), "h": h}


def _run(text: str, calibration: dict[str, np.ndarray]):
    model = parse_model(text)
    result = run_pass(LayerNormRowScale(), ir.from_proto(model), PassContext(calibration=calibration))
    return model, result, ir.to_proto(result.model)


def test_structure_scales_the_residual_and_the_projection_input_by_one_column():
    _, result, out = _run(_model(), _calibration(outlier=50.0))
    ops = Counter(n.op_type for n in out.graph.node)
    assert result.changed and result.stats == {"layernorms": 1, "rows_scaled": 2}
    assert ops["Mul"] == 2 and ops["LayerNormalization"] == 1 and ops["MatMul"] == 1
    inits = {i.name: i for i in out.graph.initializer}
    column = next(v for k, v in inits.items() if k.endswith("_row_scale"))
    p = np.frombuffer(column.raw_data, np.float32) if column.raw_data else np.array(column.float_data)
    assert list(column.dims) == [4, 1] and p[OUTLIER_ROW] < 0.1  # the outlier row shrinks most
    assert np.count_nonzero(p == 1.0) == 2  # rows at or below the median keep their scale


def test_numerics_match_ort_on_the_calibration_and_fresh_inputs():
    model, _, out = _run(_model(), _calibration(outlier=50.0))
    for seed in (1, 7):
        feeds = {k: v[:1] for k, v in _calibration(outlier=50.0, seed=seed).items()}
        np.testing.assert_allclose(run_ort(out, feeds)["y"], run_ort(model, feeds)["y"], rtol=1e-4, atol=1e-4)


def test_fires_only_on_outlier_rows_and_only_where_the_sum_has_no_other_use():
    _, result, _ = _run(_model(), _calibration(outlier=1.0))
    assert not result.changed and result.stats["rows_scaled"] == 0
    _, result, out = _run(_model(extra_output=True), _calibration(outlier=50.0))
    assert not result.changed and not any(i.name.endswith("_row_scale") for i in out.graph.initializer)

"""equalize-channels: exact in float, host-placed scales, int8 error down, quiet on well-behaved tensors."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from edgecc.passes.equalize_channels import PLACEMENT_KEY, EqualizeChannels

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import run_ort
from tests.conftest import parse_model

OUTLIER_IN, OUTLIER_OUT = 3, 5  # x's loud channel; the output channel q's weights make loud


def _floats(values) -> str:
    return ", ".join(f"{v:.5f}" for v in np.ravel(values))


def _model(loud_weights: float) -> str:
    """q = x @ wq + bq (a graph output) and k = Relu(x @ wk): two linear layers reading one x."""
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((8, 8))
    wq[:, OUTLIER_OUT] *= loud_weights
    return f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 6, 8] x) => (float[1, 6, 8] q, float[1, 6, 8] k)
  <float[8, 8] wq = {{{_floats(wq)}}}, float[8] bq = {{{_floats(rng.standard_normal(8))}}},
   float[8, 8] wk = {{{_floats(rng.standard_normal((8, 8)))}}}> {{
    m = MatMul (x, wq)
    q = Add (m, bq)
    n = MatMul (x, wk)
    k = Relu (n)
}}
"""


def _inputs(loud: float, samples: int = 6, seed: int = 1) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((samples, 1, 6, 8)).astype(np.float32)
    x[..., OUTLIER_IN] *= loud
    return {"x": x}


def _run(loud: float):
    model = parse_model(_model(loud_weights=loud))
    calibration = {"x": _inputs(loud)["x"][:, 0]}
    result = run_pass(EqualizeChannels(), ir.from_proto(model), PassContext(calibration=calibration))
    return model, result, ir.to_proto(result.model)


def _int8_error(x: np.ndarray) -> float:
    """One int8 scale for the tensor: the median channel's relative rounding error."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    step = (hi - lo) / 255
    rows = x.reshape(-1, x.shape[-1])
    err = np.linalg.norm(np.round(rows / step) * step - rows, axis=0) / np.linalg.norm(rows, axis=0)
    return float(np.median(err))


def test_float_outputs_are_unchanged_on_calibration_and_fresh_inputs():
    model, result, out = _run(loud=30.0)
    assert result.changed
    assert [o.name for o in out.graph.output] == ["q", "k"]  # a rescaled graph output keeps its name
    for seed in (1, 9):
        feeds = {"x": _inputs(30.0, seed=seed)["x"][0]}
        got, want = run_ort(out, feeds), run_ort(model, feeds)
        for name in ("q", "k"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_one_shared_input_scale_and_output_scales_all_marked_for_the_host():
    _, result, out = _run(loud=30.0)
    muls = [n for n in out.graph.node if n.op_type == "Mul"]
    assert all({p.key: p.value for p in n.metadata_props}.get(PLACEMENT_KEY) == "host" for n in muls)
    smooth = [n for n in muls if n.input[0] == "x"]
    assert len(smooth) == 1  # q's and k's MatMul read x through the same division
    readers = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert {n.input[0] for n in readers} == {smooth[0].output[0]}
    assert result.stats == {"inputs_smoothed": 1, "outputs_equalized": len(muls) - 1, "linears": 2}
    assert any(n.output[0] == "q" for n in muls)  # q's channels are restored on the host, by name


def test_what_the_tpu_sees_quantizes_better():
    model, _, out = _run(loud=30.0)
    inner = {n.output[0]: n for n in out.graph.node}
    x_tpu = inner["q"].input[0]  # q = Mul(q', s): q' is what the TPU writes
    names = [x_tpu, next(n.output[0] for n in out.graph.node if n.input and n.input[0] == "x")]
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    feeds = {"x": _inputs(30.0, seed=4)["x"][0]}
    before, after = run_ort(model, feeds), run_ort(probe, feeds)
    assert _int8_error(after[names[0]]) < 0.5 * _int8_error(before["q"])
    assert _int8_error(after[names[1]]) < 0.5 * _int8_error(feeds["x"])


def test_tensors_that_quantize_well_are_left_alone():
    _, result, out = _run(loud=1.0)
    assert not result.changed and result.stats["inputs_smoothed"] == result.stats["outputs_equalized"] == 0
    assert not any(n.op_type == "Mul" for n in out.graph.node)

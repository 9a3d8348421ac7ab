"""quantize-int8: structure, numerics vs ORT, fires / must not fire, calibration, compiled size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import edgecc
from edgecc.core.calibration import load_calibration
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import PassManager, VerifyEachPass, run_pass
from edgecc.core.verify import compare, random_inputs, relative_error, run_ort
from edgecc.errors import UserError, VerificationError
from edgecc.passes.quantize_int8 import QMAX, QuantizeInt8
from tests.conftest import run_cli
from tests.passes.linear_models import linear_model

K, N = 64, 48


def _quantize(model: onnx.ModelProto, ctx: PassContext | None = None, **opts):
    result = run_pass(QuantizeInt8(min_weights=0, **opts), ir.from_proto(model), ctx or PassContext())
    return result, ir.to_proto(result.model)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- structure --------------------------------------------------------------------------------

def test_dynamic_structure_int8_weights_and_per_token_scales():
    result, out = _quantize(linear_model())
    ops = _ops(out)
    assert ops["MatMulInteger"] == 1 and ops["MatMul"] == 0
    assert ops["ReduceMax"] == 1  # the per-token scale is computed at run time
    inits = _initializers(out)
    assert "w" not in inits  # the float weight is gone, not kept beside the int8 one
    (wq,) = [v for v in inits.values() if v.dtype == np.int8]
    assert wq.shape == (K, N) and np.abs(wq.astype(int)).max() == QMAX  # each column uses its range
    (w_scale,) = [v for k, v in inits.items() if k.endswith("wscale")]
    assert w_scale.shape == (N,)
    assert result.changed and result.stats["matmuls"] == 1 and result.stats["int8_weight_bytes"] == K * N


def test_static_structure_has_a_constant_activation_scale():
    _, out = _quantize(linear_model(), mode="static")
    assert _ops(out)["ReduceMax"] == 0
    (x_scale,) = [v for k, v in _initializers(out).items() if k.endswith("xscale")]
    assert x_scale.shape == () and x_scale > 0


def test_per_tensor_weights_have_one_scale():
    _, out = _quantize(linear_model(), per_channel=False)
    (w_scale,) = [v for k, v in _initializers(out).items() if k.endswith("wscale")]
    assert w_scale.size == 1


def test_smoothquant_inserts_a_channel_scale_and_moves_it_into_the_weights():
    _, out = _quantize(linear_model(), smoothquant=0.5)
    (smooth,) = [v for k, v in _initializers(out).items() if k.endswith("smooth")]
    assert smooth.shape == (K,) and not np.allclose(smooth, 1.0)


def test_gemm_with_transposed_weight_keeps_its_bias():
    model = linear_model(gemm_attrs={"transB": 1})
    _, out = _quantize(model)
    ops = _ops(out)
    assert ops["MatMulInteger"] == 1 and ops["Gemm"] == 0 and ops["Add"] == 1
    feeds = random_inputs(model, seed=2, dim_values={"B": 5})
    assert relative_error(run_ort(model, feeds), run_ort(out, feeds)) < 0.02


# --- numerics against ONNX Runtime --------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"mode": "static"}, {"smoothquant": 0.5}, {"per_channel": False},
                                  {"mode": "static", "smoothquant": 0.8}])
def test_close_to_fp32_in_ort_without_its_optimizations(opts):
    model = linear_model()
    _, out = _quantize(model, **opts)
    feeds = random_inputs(model, seed=1, dim_values={"B": 2, "T": 5})
    err = relative_error(run_ort(model, feeds), run_ort(out, feeds))
    assert err < 0.02, err  # int8 on both sides: about 1/127 of the range per operand


def test_dynamic_arithmetic_is_exactly_int8_per_token():
    """ORT on the rewritten graph equals a numpy model of symmetric per-token int8 quantization."""
    model = linear_model()
    _, out = _quantize(model)
    x = random_inputs(model, seed=3, dim_values={"B": 2, "T": 4})["x"]
    w = numpy_helper.to_array(model.graph.initializer[0])
    w_scale = np.abs(w).max(axis=0) / QMAX
    wq = np.clip(np.rint(w / w_scale), -QMAX, QMAX)
    x_scale = np.abs(x).max(axis=-1, keepdims=True) / QMAX
    xq = np.clip(np.rint(x / x_scale), -QMAX, QMAX)
    expected = np.maximum((xq @ wq) * x_scale * w_scale, 0)
    got = run_ort(out, {"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- fires where it should, not where it must not ------------------------------------------------

def test_does_not_touch_a_weight_the_caller_can_override():
    result, out = _quantize(linear_model(weight_as_input=True))
    assert not result.changed and _ops(out)["MatMulInteger"] == 0 and result.stats["matmuls"] == 0


def test_leaves_small_matmuls_in_float():
    result = run_pass(QuantizeInt8(min_weights=K * N + 1), ir.from_proto(linear_model()), PassContext())
    assert not result.changed and result.stats["matmuls"] == 0


def test_does_not_fire_on_gemm_with_alpha():
    result, out = _quantize(linear_model(gemm_attrs={"alpha": 2.0}))
    assert not result.changed and _ops(out)["Gemm"] == 1


def test_explain_says_why_a_matmul_stayed_float():
    result = run_pass(QuantizeInt8(min_weights=K * N + 1), ir.from_proto(linear_model()), PassContext(explain=True))
    assert any(f"{K * N} weights < min_weights={K * N + 1}" in m for m in result.stats["near_misses"])
    result, _ = _quantize(linear_model(gemm_attrs={"alpha": 2.0}), PassContext(explain=True))
    assert any("Gemm with alpha or beta != 1" in m for m in result.stats["near_misses"])


def test_intermediate_used_elsewhere_is_still_correct():
    model = linear_model(shared_matmul_output=True)
    _, out = _quantize(model)
    feeds = random_inputs(model, seed=4, dim_values={"B": 1, "T": 3})
    ref, got = run_ort(model, feeds), run_ort(out, feeds)
    assert set(got) == {"y", "h"} and relative_error(ref, got) < 0.02


# --- calibration -------------------------------------------------------------------------------

def test_static_scale_comes_from_the_given_calibration_data():
    model = linear_model()
    x = np.zeros((1, 2, K), np.float32)
    x[0, 0, 0] = 5.0  # the calibrated range is exactly 5
    _, out = _quantize(model, PassContext(calibration={"x": x}), mode="static")
    (x_scale,) = [v for k, v in _initializers(out).items() if k.endswith("xscale")]
    assert x_scale == pytest.approx(5.0 / QMAX)


@pytest.mark.parametrize("data,fragment", [
    ({"y": np.zeros((1, 2, K), np.float32)}, "missing ['x'], unexpected ['y']"),
    ({"x": np.zeros((1, 2, K), np.float64)}, "'x' has dtype float64"),
    ({"x": np.zeros((1, K + 1), np.float32)}, "'x' has shape [1, 65]"),
])
def test_calibration_that_does_not_match_thelinear_model(tmp_path, data, fragment):
    path = tmp_path / "calib.npz"
    np.savez(path, **data)
    with pytest.raises(UserError) as e:
        load_calibration(path, linear_model())
    assert str(e.value).startswith(str(path)) and fragment in str(e.value)


def test_cli_bad_calibration_is_a_one_line_user_error(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(linear_model(), str(model_path))
    np.savez(tmp_path / "c.npz", z=np.zeros(3, np.float32))
    res = run_cli("compile", model_path, "-p", "quantize-int8{mode=static}", "--calibration",
                  tmp_path / "c.npz", "-o", tmp_path / "out")
    assert res.returncode == 2 and "calibration inputs do not match the model" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,fragment", [
    ("quantize-int8{mode=weird}", "must be one of dynamic, static"),
    ("quantize-int8{smoothquant=1.5}", "must be in [0.0, 1.0]"),
])
def test_options_out_of_range(text, fragment):
    with pytest.raises(UserError) as e:
        edgecc.parse_pipeline(text)
    assert fragment in str(e.value)


# --- verification contract and the compiled artifact -----------------------------------------

def test_verify_accepts_the_declared_drift_and_rebases():
    pm = PassManager("quantize-int8{min_weights=0},simplify", instruments=(VerifyEachPass(),))
    _, reports = pm.run(ir.from_proto(linear_model()), PassContext(dim_values={"B": 2, "T": 3}))
    assert reports[0].verify["ok"] and 0 < reports[0].verify["relative_rmse"] <= QuantizeInt8.drift
    assert reports[1].verify["ok"] and reports[1].verify["max_abs"] < 1e-5  # vs the int8 outputs


def test_verify_names_a_lossy_pass_that_exceeds_its_drift(monkeypatch):
    monkeypatch.setattr(QuantizeInt8, "drift", 1e-6)
    pm = PassManager("quantize-int8{min_weights=0}", instruments=(VerifyEachPass(),))
    with pytest.raises(VerificationError, match="pass 'quantize-int8.*moved the outputs by .* more than"):
        pm.run(ir.from_proto(linear_model()), PassContext())


def test_compiled_example_lm_is_smaller_and_matches_ort_on_the_int8_graph(example_path, tmp_path):
    fp32 = edgecc.compile(example_path("tiny-lm"), "host", tmp_path / "fp32", "simplify,fuse")
    int8 = edgecc.compile(example_path("tiny-lm"), "host", tmp_path / "int8", "simplify,fuse,quantize-int8",
                          keep_reference=True)
    v = int8.manifest["verification"]
    assert v["ok"] and v["reference"] == "onnxruntime (optimized model)"
    assert v["relative_error_vs_fp32"] < 0.05 and v["cosine_vs_fp32"] > 0.999
    lib32 = fp32.model_bytes
    lib8 = int8.model_bytes
    assert lib8 < 0.6 * lib32, (lib8, lib32)  # the int8 weights are what the module stores
    opt = onnx.load(str(int8.path / "model.opt.onnx"))
    feeds = random_inputs(opt, seed=9, dim_values={"batch": 2, "seq": 11})
    ref = run_ort(opt, feeds)
    atol = max(np.abs(r).max() for r in ref.values()) / QMAX
    assert compare(ref, int8.run(feeds), tolerance=(atol, 0.0)).ok

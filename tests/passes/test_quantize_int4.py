"""quantize-int4: structure, numerics vs ORT's MatMulNBits, AWQ, GPTQ, fires / must not fire, compiled."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import edgecc
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import compare, random_inputs, relative_error, run_ort
from edgecc.errors import UserError
from edgecc.kernels.int4 import dequantize_blockwise, quantize_blockwise, unpack_int4
from edgecc.passes.quantize_int4 import QuantizeInt4
from tests.passes.linear_models import K, N, linear_model


def _quantize(model: onnx.ModelProto, ctx: PassContext | None = None, **opts):
    result = run_pass(QuantizeInt4(min_weights=0, **opts), ir.from_proto(model), ctx or PassContext())
    return result, ir.to_proto(result.model)


def _nbits(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- structure --------------------------------------------------------------------------------

@pytest.mark.parametrize("block,symmetric,bits_per_weight", [(32, True, 5.0), (64, True, 4.5),
                                                               (32, False, 5.125)])
def test_structure_matmulnbits_with_packed_nibbles(block, symmetric, bits_per_weight):
    result, out = _quantize(linear_model(), block=block, symmetric=symmetric)
    (node,) = _nbits(out)
    assert node.domain == "com.microsoft"
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs == {"K": K, "N": N, "bits": 4, "block_size": block, "accuracy_level": 0}
    inits = _inits(out)
    packed = inits[node.input[1]]
    assert packed.dtype == np.uint8 and packed.shape == (N, K // block, block // 2)
    assert inits[node.input[2]].shape == (N * K // block,)
    assert (len(node.input) > 3) == (not symmetric)  # zero points only for asymmetric blocks
    assert "w" not in inits and not Counter(n.op_type for n in out.graph.node)["MatMul"]
    assert {o.domain: o.version for o in out.opset_import}.get("com.microsoft") == 1
    assert result.stats["matmuls"] == 1 and result.stats["bits_per_weight"] == bits_per_weight


def test_awq_divides_the_activation_by_its_channel_scales():
    _, out = _quantize(linear_model(), method="awq")
    mul = [n for n in out.graph.node if n.op_type == "Mul"]
    assert len(mul) == 1 and mul[0].output[0] == _nbits(out)[0].input[0]
    assert _inits(out)[mul[0].input[1]].shape == (K,)


# --- numerics against ONNX Runtime (its MatMulNBits kernel, optimizations off) ------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_computes_exactly_the_blockwise_dequantized_weights(symmetric):
    model = linear_model()
    _, out = _quantize(model, block=32, symmetric=symmetric)
    w = numpy_helper.to_array(model.graph.initializer[0])
    q, scales, zeros = quantize_blockwise(w, 32, symmetric)
    x = random_inputs(model, seed=1, dim_values={"B": 2, "T": 3})["x"]
    expected = np.maximum(x @ dequantize_blockwise(q, scales, zeros, 32), 0)
    np.testing.assert_allclose(run_ort(out, {"x": x})["y"], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [{}, {"block": 64}, {"symmetric": False}, {"method": "awq"}])
def test_close_to_fp32(opts):
    model = linear_model()
    _, out = _quantize(model, **opts)
    feeds = random_inputs(model, seed=2, dim_values={"B": 2, "T": 5})
    # int4 steps are 1/7 of a block's range; outputs stay within ~15% of their own range
    assert relative_error(run_ort(model, feeds), run_ort(out, feeds)) < 0.15


def test_awq_beats_rtn_when_a_few_channels_carry_large_activations():
    model = linear_model(k=128, n=64)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 32, 128)).astype(np.float32)
    x[..., :4] *= 30  # outlier channels, as LMs have
    ctx = PassContext(calibration={"x": x})
    errors = {}
    for method in ("rtn", "awq"):
        _, out = _quantize(model, ctx, method=method)
        test_x = rng.standard_normal((2, 16, 128)).astype(np.float32)
        test_x[..., :4] *= 30
        errors[method] = relative_error(run_ort(model, {"x": test_x}), run_ort(out, {"x": test_x}))
    assert errors["awq"] < 0.8 * errors["rtn"], errors


def _on_q4_1_grid(w: np.ndarray, block: int) -> np.ndarray:
    """w rounded the way GGUF's Q4_1 does: per block of K, m + q * d with the min m and the step
    d = (max - min) / 15 stored as float16."""
    blocks = w.reshape(-1, block, w.shape[1])
    lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
    m, d = (v.astype(np.float16).astype(np.float32) for v in (lo, (hi - lo) / 15))
    return (m + np.clip(np.round((blocks - m) / d), 0, 15) * d).reshape(w.shape).astype(np.float32)


def test_float_zero_points_reproduce_a_q4_1_grid_exactly():
    """Asymmetric blocks with float zero points put each block's min and max on levels 0 and 15:
    weights already on that grid (GGUF Q4_1, as SmolLM2 ships) come back unchanged, where uint8
    zero points cannot (the min is not a whole number of steps from 0)."""
    model = linear_model()
    w = _on_q4_1_grid(numpy_helper.to_array(model.graph.initializer[0]), 32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    feeds = random_inputs(model, seed=6, dim_values={"B": 2, "T": 3})
    reference = run_ort(model, feeds)
    result, floats = _quantize(model, symmetric=False, zero_points="float")
    (node,) = _nbits(floats)
    assert _inits(floats)[node.input[3]].dtype == np.float32
    assert result.stats["bits_per_weight"] == 6.0  # 4 + a float32 scale and zero per 32
    assert relative_error(reference, run_ort(floats, feeds)) < 1e-5
    _, levels = _quantize(model, symmetric=False)
    assert relative_error(reference, run_ort(levels, feeds)) > 1e-3


def test_skip_outputs_leaves_an_lm_head_for_a_later_pass():
    """The matmul whose result is a graph output stays float; the one inside is quantized."""
    model = linear_model(shared_matmul_output=True)  # h = x @ w is an output too
    result, out = _quantize(model, skip_outputs=True)
    assert not result.changed and not _nbits(out)
    result, out = _quantize(linear_model(), skip_outputs=True)
    assert result.changed and len(_nbits(out)) == 1


# --- GPTQ ----------------------------------------------------------------------------------------

ZERO_POINTS = [{}, {"symmetric": False}, {"symmetric": False, "zero_points": "float"}]


def _correlated_rows(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    """Activations as LMs have them: channels correlated (a few directions carry most of the
    signal) and of very different scales. The directions and scales are fixed, rows are drawn."""
    fixed = np.random.default_rng(7)
    basis, scale = fixed.standard_normal((16, k)), np.exp(fixed.normal(0, 1, k))
    z = rng.standard_normal((rows, 16))
    return ((z @ basis + 0.3 * rng.standard_normal((rows, k))) * scale).astype(np.float32)


def _stored_weights(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(levels, scales, zeros) [K, N], [K/block, N], [K/block, N] read back from the MatMulNBits blob."""
    (node,) = _nbits(model)
    attrs = {a.name: a.i for a in node.attribute}
    k, n, blocks = attrs["K"], attrs["N"], attrs["K"] // attrs["block_size"]
    inits = _inits(model)
    zeros = inits[node.input[3]] if len(node.input) > 3 else None
    levels = unpack_int4(inits[node.input[1]].reshape(n, k // 2), k, n, signed=zeros is None)
    scales = inits[node.input[2]].reshape(n, blocks).T
    if zeros is not None and zeros.dtype == np.uint8:  # two nibbles a byte, N-major
        nibbles = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(n, -1)
        zeros = nibbles[:, :blocks].T
    elif zeros is not None:
        zeros = zeros.reshape(n, blocks).T
    return levels, scales, zeros


def _gptq_case(seed: int = 0, k: int = 128, n: int = 64):
    """The model, calibration from the correlated distribution, and held-out rows from it."""
    rng = np.random.default_rng(seed)
    calibration = _correlated_rows(rng, 512, k).reshape(8, 64, k)
    held_out = _correlated_rows(rng, 256, k).reshape(4, 64, k)
    return linear_model(k=k, n=n), PassContext(calibration={"x": calibration}), held_out


@pytest.mark.parametrize("opts", ZERO_POINTS)
def test_gptq_beats_rtn_on_held_out_rows_and_ort_computes_the_stored_weights(opts):
    model, ctx, x = _gptq_case()
    reference = run_ort(model, {"x": x})["y"]
    outputs = {m: run_ort(_quantize(model, ctx, method=m, **opts)[1], {"x": x})["y"] for m in ("rtn", "gptq")}
    errors = {m: float(np.sum((y - reference) ** 2) / np.sum(reference ** 2)) for m, y in outputs.items()}
    assert errors["gptq"] < 0.2 * errors["rtn"], errors
    _, out = _quantize(model, ctx, method="gptq", **opts)
    expected = np.maximum(x @ dequantize_blockwise(*_stored_weights(out), 32), 0)
    np.testing.assert_allclose(outputs["gptq"], expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("opts", [*ZERO_POINTS, {"block": 16}, {"block": 128, "act_order": False}])
def test_gptq_with_act_order_keeps_rtns_grid_for_every_block(opts):
    """Static groups: each block's scale and zero point are rtn's, from the original weights, so
    GPTQ only moves weights between levels of the grid rtn would store; act-order changes the
    order the rows are rounded in, not the layout."""
    model, ctx, _ = _gptq_case()
    gptq = _stored_weights(_quantize(model, ctx, method="gptq", **opts)[1])
    rtn = _stored_weights(_quantize(model, **opts)[1])
    np.testing.assert_array_equal(gptq[1], rtn[1])
    if rtn[2] is not None:
        np.testing.assert_array_equal(gptq[2], rtn[2])
    assert gptq[0].dtype == rtn[0].dtype and 0.05 < np.mean(gptq[0] != rtn[0]) < 0.9


def test_gptq_on_a_gemm_with_transposed_weight():
    k, n = 128, 64
    model = linear_model(gemm_attrs={"transB": 1}, k=k, n=n)
    rng = np.random.default_rng(1)
    ctx = PassContext(calibration={"x": _correlated_rows(rng, 512, k)})
    x = _correlated_rows(rng, 128, k)
    reference = run_ort(model, {"x": x})["y"]
    errors = {m: relative_error({"y": reference}, run_ort(_quantize(model, ctx, method=m)[1], {"x": x}))
              for m in ("rtn", "gptq")}
    assert errors["gptq"] < 0.5 * errors["rtn"], errors


def test_gptq_zeroes_the_weights_of_an_input_calibration_never_saw():
    """A channel that is 0 on every calibration row has no Hessian row: GPTQ's reference sets its
    weights to 0 (their rounding cannot be judged) and the factorization stays finite."""
    model, ctx, x = _gptq_case()
    ctx.calibration["x"][..., 5] = 0
    levels, scales, zeros = _stored_weights(_quantize(model, ctx, method="gptq")[1])
    stored = dequantize_blockwise(levels, scales, zeros, 32)
    assert np.all(stored[5] == 0) and np.all(np.isfinite(stored)) and np.any(stored[4] != 0)


def test_gptq_stats_are_the_output_errors_on_the_calibration_rows():
    model, ctx, _ = _gptq_case()
    result, out = _quantize(model, ctx, method="gptq")
    stats = result.stats
    assert stats["calibration"] == "given" and set(stats["gptq_vs_rtn"]) == {"w"}
    x = ctx.calibration["x"].reshape(-1, 128)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    stored = {"gptq": dequantize_blockwise(*_stored_weights(out), 32),
              "rtn": dequantize_blockwise(*_stored_weights(_quantize(model)[1]), 32)}
    for method, approx in stored.items():
        measured = np.sum((x @ (approx - w)) ** 2) / np.sum((x @ w) ** 2)
        assert stats["gptq_vs_rtn"]["w"][method] == pytest.approx(measured, rel=1e-2)
        assert stats[f"{method}_error"] == stats["gptq_vs_rtn"]["w"][method]
    assert stats["gptq_error"] < 0.2 * stats["rtn_error"]


def test_gptq_warns_when_calibration_has_fewer_rows_than_inputs():
    model, _, _ = _gptq_case()
    few = PassContext(calibration={"x": _correlated_rows(np.random.default_rng(2), 40, 128).reshape(1, 40, 128)})
    (warning,) = _quantize(model, few, method="gptq")[0].warnings
    assert "40 calibration rows, fewer than the 128 inputs" in warning
    assert not _quantize(model, _gptq_case()[1], method="gptq")[0].warnings


# --- fires where it should, not where it must not ------------------------------------------------

def test_block_that_does_not_divide_k_leaves_the_matmul_in_float():
    result, out = _quantize(linear_model(k=48), block=32)
    assert not result.changed and not _nbits(out) and result.stats["matmuls"] == 0


def test_does_not_touch_an_overridable_weight_or_a_small_one():
    result, _ = _quantize(linear_model(weight_as_input=True))
    assert not result.changed
    small = run_pass(QuantizeInt4(min_weights=K * N + 1), ir.from_proto(linear_model()), PassContext())
    assert not small.changed


def test_gemm_keeps_its_bias_and_transposed_weight():
    model = linear_model(gemm_attrs={"transB": 1})
    _, out = _quantize(model)
    assert len(_nbits(out)) == 1 and Counter(n.op_type for n in out.graph.node)["Add"] == 1
    feeds = random_inputs(model, seed=3, dim_values={"B": 4})
    assert relative_error(run_ort(model, feeds), run_ort(out, feeds)) < 0.15


def test_gemm_with_alpha_is_left_alone():
    result, _ = _quantize(linear_model(gemm_attrs={"alpha": 0.5}))
    assert not result.changed


def test_accuracy_level_is_written_for_onnx_runtime_too():
    model = run_pass(QuantizeInt4(min_weights=0, accuracy_level=4), ir.from_proto(linear_model()), PassContext()).model
    (node,) = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert node.attributes.get_int("accuracy_level") == 4


@pytest.mark.parametrize("text,fragment", [
    ("quantize-int4{block=48}", "must be one of 16, 32, 64, 128, 256"),
    ("quantize-int4{method=squeezellm}", "must be one of rtn, awq, gptq"),
    ("quantize-int4{method=gptq,damp=0}", "option 'damp' must be in"),
    ("quantize-int4{accuracy_level=2}", "must be one of 0, 4"),
])
def test_bad_options(text, fragment):
    with pytest.raises(UserError, match=fragment):
        edgecc.parse_pipeline(text)


# --- the compiled artifact computes on the nibbles -------------------------------------------

def test_compiled_example_lm_matches_ort_and_stores_nibbles(example_path, tmp_path):
    fp32 = edgecc.compile(example_path("tiny-lm"), "host", tmp_path / "fp32", "simplify,fuse")
    int4 = edgecc.compile(example_path("tiny-lm"), "host", tmp_path / "int4", "simplify,fuse,quantize-int4",
                          keep_reference=True)
    v = int4.manifest["verification"]
    assert v["ok"] and v["reference"] == "onnxruntime (optimized model)" and v["max_abs"] < 1e-4
    assert v["cosine_vs_fp32"] > 0.99
    lib32 = fp32.model_bytes
    lib4 = int4.model_bytes
    assert lib4 < 0.5 * lib32, (lib4, lib32)
    opt = onnx.load(str(int4.path / "model.opt.onnx"))
    for dims in ({"batch": 1, "seq": 1}, {"batch": 2, "seq": 13}):  # decode and prefill shapes
        feeds = random_inputs(opt, seed=4, dim_values=dims)
        assert compare(run_ort(opt, feeds), int4.run(feeds), tolerance=(1e-4, 1e-4)).ok, dims


def test_compiled_float_zero_points_match_ort(example_path, tmp_path):
    art = edgecc.compile(example_path("tiny-lm"), "host", tmp_path / "f",
                         "simplify,fuse,quantize-int4{symmetric=false,zero_points=float}")
    assert art.manifest["verification"]["ok"] and art.manifest["verification"]["max_abs"] < 1e-4


def test_int4_pipeline_builds_for_jetson_with_device_code(example_path, tmp_path):
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the Jetson backend needs it to build device code")
    art = edgecc.compile(example_path("tiny-lm"), "jetson-orin-nano", tmp_path / "j",
                         "simplify,fuse,quantize-int4")
    assert art.manifest["build"]["device_code"] == "cubin" and art.manifest["build"]["kernels"] > 0

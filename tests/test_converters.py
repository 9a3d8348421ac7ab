"""edgecc's converters on forms the ONNX node cases do not exercise, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgecc
from edgecc.core.verify import compare, run_ort


def _model(graph, opset=22):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _compiled(tmp_path, model):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return edgecc.compile(path, "host", tmp_path / "art", verify=False)


@pytest.mark.parametrize("op, attrs", [
    ("LSTM", {"direction": "bidirectional"}),
    ("LSTM", {"direction": "reverse", "clip": 0.5, "input_forget": 1}),
    ("GRU", {"direction": "bidirectional", "linear_before_reset": 1}),
    ("GRU", {"activations": ["HardSigmoid", "Softsign"], "activation_alpha": [0.3],
             "activation_beta": [0.4]}),
    ("RNN", {"direction": "reverse", "activations": ["Relu"], "clip": 1.5}),
])
@pytest.mark.parametrize("layout", [0, 1])
def test_recurrence_over_a_long_sequence_with_lengths_and_states(tmp_path, op, attrs, layout):
    """Every input and output of a recurrent op at once: a sequence longer than the node cases',
    per-entry sequence_lens (a reverse direction starts at each entry's own last element),
    initial states, peepholes, and batch-first layout (which ONNX Runtime refuses: its reference
    is the same node in layout 0 on the inputs transposed, its outputs transposed back)."""
    rng = np.random.default_rng(0)
    steps, batch, size, hidden = 9, 3, 4, 5
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    lstm = op == "LSTM"
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h"] + (["initial_c", "P"] if lstm else [])
    outputs = ["Y", "Y_h"] + (["Y_c"] if lstm else [])
    shapes = {"X": [steps, batch, size], "W": [dirs, gates * hidden, size], "R": [dirs, gates * hidden, hidden],
              "B": [dirs, 2 * gates * hidden], "sequence_lens": [batch], "initial_h": [dirs, batch, hidden],
              "initial_c": [dirs, batch, hidden], "P": [dirs, 3 * hidden],
              "Y": [steps, dirs, batch, hidden], "Y_h": [dirs, batch, hidden], "Y_c": [dirs, batch, hidden]}
    feeds = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in names}
    feeds["sequence_lens"] = np.array([steps, 4, 1], np.int32)
    # layout 1 swaps the sequence and batch axes of X and the states, the first two axes of Y
    batch_first = {"X": [1, 0, 2], "initial_h": [1, 0, 2], "initial_c": [1, 0, 2],
                   "Y": [2, 0, 1, 3], "Y_h": [1, 0, 2], "Y_c": [1, 0, 2]}

    def model(layout):
        def value(n):
            shape = np.empty(shapes[n]).transpose(batch_first[n]).shape if layout and n in batch_first else shapes[n]
            return helper.make_tensor_value_info(n, TensorProto.INT32 if n == "sequence_lens" else TensorProto.FLOAT,
                                                 shape)

        node = helper.make_node(op, names, outputs, hidden_size=hidden, layout=layout, **attrs)
        return _model(helper.make_graph([node], "recurrence", [value(n) for n in names], [value(n) for n in outputs]))

    expected = run_ort(model(0), feeds)
    if layout:
        feeds = {n: v.transpose(batch_first[n]) if n in batch_first else v for n, v in feeds.items()}
        expected = {n: v.transpose(batch_first[n]) for n, v in expected.items()}
    result = compare(expected, _compiled(tmp_path, model(layout)).run(feeds))
    assert result.ok, result.detail


def test_qlinear_matmul_rounds_half_to_even(tmp_path):
    """Requantization rounds halves to even before adding the zero point (the spec's order; ONNX's
    reference adds it first): products of 0.5 * odd numbers, an odd zero point."""
    feeds = {"a": np.array([[1, 3, 5, -1, -3, -5, 7]], np.int8).T, "a_scale": np.array([0.5], np.float32),
             "a_zero": np.array([0], np.int8), "b": np.array([[1, -1]], np.int8),
             "b_scale": np.array([1.0], np.float32), "b_zero": np.array([0], np.int8),
             "y_scale": np.array([1.0], np.float32), "y_zero": np.array([1], np.int8)}
    graph = helper.make_graph(
        [helper.make_node("QLinearMatMul", list(feeds), ["y"])], "qmatmul",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [7, 2])])
    model = _model(graph, opset=21)
    got = _compiled(tmp_path, model).run(feeds)["y"]
    np.testing.assert_array_equal(got, run_ort(model, feeds)["y"])


def test_qlinear_conv_per_channel_with_bias_groups_strides_and_same_padding(tmp_path):
    """QLinearConv with a per-output-channel weight scale, an int32 bias, two groups, strides and
    SAME_UPPER padding (padded with x's zero point, i.e. zero once it is subtracted)."""
    rng = np.random.default_rng(1)
    feeds = {"x": rng.integers(0, 256, (1, 4, 9, 8), dtype=np.uint8), "x_scale": np.float32(0.02),
             "x_zero": np.uint8(120), "w": rng.integers(-128, 128, (6, 2, 3, 3), dtype=np.int8),
             "w_scale": rng.uniform(0.01, 0.05, 6).astype(np.float32), "w_zero": np.zeros(6, np.int8),
             "y_scale": np.float32(0.5), "y_zero": np.uint8(100),
             "bias": rng.integers(-2000, 2000, 6).astype(np.int32)}
    names = list(feeds)
    graph = helper.make_graph(
        [helper.make_node("QLinearConv", names, ["y"], group=2, strides=[2, 2], auto_pad="SAME_UPPER")], "qconv",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v))
         for n, v in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 6, 5, 4])])
    model = _model(graph, opset=10)
    feeds = {n: np.asarray(v) for n, v in feeds.items()}
    got = _compiled(tmp_path, model).run(feeds)["y"]
    np.testing.assert_array_equal(got, run_ort(model, feeds)["y"])


def test_det_pivots_rows_and_gives_zero_for_singular_matrices(tmp_path):
    """Det of 5x5 matrices (the node cases have 2x2 only): random ones, one whose first column
    starts with 0 (a row swap, which negates), one with two equal rows (singular: a zero pivot)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    x[0, 1, 0, 0] = 0.0
    x[1, 2, 3] = x[1, 2, 1]
    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "det",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape[:2])])
    model = _model(graph)
    result = compare(run_ort(model, {"x": x}), _compiled(tmp_path, model).run({"x": x}))
    assert result.ok, result.detail


def test_l1_normalization_of_negative_values_and_a_zero_row(tmp_path):
    """LpNormalization with p=1 sums magnitudes (the node cases hold no negative value); a row of
    zeros normalizes to zeros."""
    x = np.random.default_rng(3).standard_normal((3, 4, 5)).astype(np.float32)
    x[1, :, 2] = 0.0
    graph = helper.make_graph([helper.make_node("LpNormalization", ["x"], ["y"], axis=1, p=1)], "lp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)])
    model = _model(graph)
    result = compare(run_ort(model, {"x": x}), _compiled(tmp_path, model).run({"x": x}))
    assert result.ok, result.detail


def test_cumprod_with_a_constant_axis_reversed_and_exclusive(tmp_path):
    """CumProd with its axis an initializer (the node cases feed it as a graph input), reversed
    and exclusive along a middle axis of a 3-D tensor."""
    x = np.random.default_rng(4).uniform(0.5, 1.5, (2, 4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("CumProd", ["x", "axis"], ["y"], exclusive=1, reverse=1)], "cumprod",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
                              [onnx.numpy_helper.from_array(np.array(-2, np.int64), "axis")])
    model = _model(graph, opset=26)
    result = compare(run_ort(model, {"x": x}), _compiled(tmp_path, model).run({"x": x}))
    assert result.ok, result.detail


@pytest.mark.parametrize("op, state, attrs", [
    ("Adagrad", ["H"], {"decay_factor": 0.1, "norm_coefficient": 0.01, "epsilon": 1e-5}),
    ("Adam", ["V", "H"], {"alpha": 0.8, "beta": 0.9, "norm_coefficient": 0.01, "norm_coefficient_post": 0.02}),
    ("Momentum", ["V"], {"alpha": 0.9, "beta": 0.5, "norm_coefficient": 0.01, "mode": "standard"}),
    ("Momentum", ["V"], {"alpha": 0.9, "beta": 0.5, "norm_coefficient": 0.01, "mode": "nesterov"}),
])
def test_optimizers_after_the_first_update(tmp_path, op, state, attrs):
    """Two tensors updated at T=3, where Adagrad's decay, Adam's bias correction and Momentum's
    beta apply (the node cases have T=0 only). ONNX Runtime has no kernels for these ops, so the
    reference is ONNX's own evaluator."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(5)
    shapes = {"1": [3, 4], "2": [5]}
    names = [f"{k}{i}" for k in ["X", "G", *state] for i in shapes]
    feeds = {"R": np.array(0.1, np.float32), "T": np.array(3, np.int64)}
    feeds.update({n: rng.uniform(0.1, 1.0, shapes[n[-1]]).astype(np.float32) for n in names})
    outputs = [f"{n}_new" for n in names if not n.startswith("G")]
    node = helper.make_node(op, list(feeds), outputs, domain="ai.onnx.preview.training", **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                     for n, v in feeds.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n[-5]]) for n in outputs])
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 22), helper.make_opsetid("ai.onnx.preview.training", 1)])
    onnx.checker.check_model(model, full_check=True)
    expected = dict(zip(outputs, ReferenceEvaluator(model).run(None, feeds)))
    result = compare(expected, _compiled(tmp_path, model).run(feeds))
    assert result.ok, result.detail


def test_deform_conv_groups_strides_dilations_and_offsets_past_the_border(tmp_path):
    """DeformConv with two groups, two offset groups, strides, dilations, pads, mask and bias, its
    offsets large enough that samples fall partly or wholly outside the image (zero there)."""
    rng = np.random.default_rng(2)
    feeds = {"X": rng.standard_normal((2, 4, 7, 6)), "W": rng.standard_normal((6, 2, 3, 2)),
             "offset": 3 * rng.standard_normal((2, 2 * 2 * 6, 3, 3)), "B": rng.standard_normal(6),
             "mask": rng.uniform(size=(2, 2 * 6, 3, 3))}
    feeds = {n: v.astype(np.float32) for n, v in feeds.items()}
    node = helper.make_node("DeformConv", list(feeds), ["Y"], group=2, offset_group=2, strides=[2, 2],
                            dilations=[2, 1], pads=[1, 0, 1, 1])
    graph = helper.make_graph(
        [node], "deform",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape) for n, v in feeds.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 6, 3, 3])])
    model = _model(graph, opset=19)
    result = compare(run_ort(model, feeds), _compiled(tmp_path, model).run(feeds))
    assert result.ok, result.detail


def test_float8_and_int4_inputs_and_outputs_take_and_give_ml_dtypes_arrays(tmp_path):
    """Graph inputs and outputs of float8, float4 and int4: the artifact takes and returns numpy
    arrays of those dtypes, bit for bit as ONNX's reference casts them (saturating and not)."""
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    T = TensorProto
    nodes = [helper.make_node("Cast", ["x"], ["to_e4m3"], to=T.FLOAT8E4M3FN),
             helper.make_node("Cast", ["x"], ["to_e5m2"], to=T.FLOAT8E5M2, saturate=0),
             helper.make_node("Cast", ["x"], ["to_e2m1"], to=T.FLOAT4E2M1),
             helper.make_node("Cast", ["x"], ["to_int4"], to=T.INT4),
             helper.make_node("Cast", ["e4m3"], ["from_e4m3"], to=T.FLOAT16),
             helper.make_node("Cast", ["int4"], ["from_int4"], to=T.FLOAT)]
    ins = {"x": T.FLOAT, "e4m3": T.FLOAT8E4M3FN, "int4": T.INT4}
    outs = {"to_e4m3": T.FLOAT8E4M3FN, "to_e5m2": T.FLOAT8E5M2, "to_e2m1": T.FLOAT4E2M1, "to_int4": T.INT4,
            "from_e4m3": T.FLOAT16, "from_int4": T.FLOAT}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, t, [4, 64]) for k, t in ins.items()],
                              [helper.make_tensor_value_info(k, t, [4, 64]) for k, t in outs.items()])
    model = _model(graph, opset=23)
    art = _compiled(tmp_path, model)
    assert [o["dtype"] for o in art.outputs] == ["float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "int4",
                                                  "float16", "float32"]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 64)) * np.float32(2.0) ** rng.integers(-12, 18, (4, 64))).astype(np.float32)
    x[0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    feeds = {"x": x, "e4m3": rng.integers(0, 256, (4, 64), np.uint8).view(ml_dtypes.float8_e4m3fn),
             "int4": rng.integers(-8, 8, (4, 64)).astype(ml_dtypes.int4)}
    got = art.run(feeds)
    for name, ref in zip(outs, ReferenceEvaluator(model).run(None, feeds)):
        assert got[name].dtype == ref.dtype, name
        if ref.itemsize == 1:  # the codes, NaNs and signs of zero included
            assert np.array_equal(got[name].view(np.uint8), ref.view(np.uint8)), name
        else:
            assert np.array_equal(got[name], ref, equal_nan=True), name


def test_blocked_int4_weights_dequantized_as_onnx_runtime_does(tmp_path):
    """ONNX Runtime's int4 QDQ weight format: int4 initializers and zero points, blocked along K
    with a last block cut short, into a MatMul; compiled with verification against ORT."""
    import ml_dtypes

    rng = np.random.default_rng(1)
    k, n, block = 20, 8, 8  # blocks of 8, 8 and 4 rows
    weights = rng.integers(-8, 8, (k, n)).astype(ml_dtypes.int4)
    zero_points = rng.integers(-2, 3, (3, n)).astype(ml_dtypes.int4)
    scales = rng.uniform(0.01, 0.1, (3, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "scale", "zp"], ["w_float"], axis=0, block_size=block),
         helper.make_node("MatMul", ["x", "w_float"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [onnx.numpy_helper.from_array(weights, "w"), onnx.numpy_helper.from_array(scales, "scale"),
         onnx.numpy_helper.from_array(zero_points, "zp")])
    model = _model(graph, opset=21)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    art = edgecc.compile(path, "host", tmp_path / "art")
    assert art.manifest["verification"]["ok"], art.manifest["verification"]
    x = rng.standard_normal((3, k)).astype(np.float32)
    result = compare(run_ort(model, {"x": x}), art.run({"x": x}))
    assert result.ok, result.detail


def test_float8_graph_input_is_verified_against_onnx_runtime(tmp_path):
    """Verification draws float8 inputs and runs ONNX Runtime on them (as codes, which is all its
    Python API takes and, of float8, gives only E4M3FN), and compares the outputs within one step."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "scale"], ["x"]),
         helper.make_node("QuantizeLinear", ["x", "scale2", "zp"], ["y"])], "g",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [2, 16])],
        [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
         onnx.numpy_helper.from_array(np.array(0.25, np.float32), "scale2"),
         helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])])
    path = tmp_path / "model.onnx"
    onnx.save(_model(graph, opset=21), path)
    art = edgecc.compile(path, "host", tmp_path / "art")
    assert art.manifest["verification"]["ok"], art.manifest["verification"]
    assert art.inputs[0]["dtype"] == art.outputs[0]["dtype"] == "float8_e4m3fn"


@pytest.mark.parametrize("channels, length, onesided, inverse", [
    (1, 8, 0, 0), (1, 14, 1, 0), (1, 7, 1, 0), (2, 14, 0, 1), (2, 7, 0, 0),
])
def test_dft_cuts_or_pads_the_signal_to_dft_length(tmp_path, channels, length, onesided, inverse):
    """A dft_length shorter or longer than the signal (which the node cases never give): the
    signal is cut or zero-padded to it, real or complex, one-sided or inverse, along axis 1."""
    x = np.random.default_rng(1).standard_normal((2, 10, 3, channels)).astype(np.float32)
    bins = length // 2 + 1 if onesided else length
    graph = helper.make_graph(
        [helper.make_node("DFT", ["x", "n", "axis"], ["y"], onesided=onesided, inverse=inverse)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, bins, 3, 2])],
        [onnx.numpy_helper.from_array(np.array(length, np.int64), "n"),
         onnx.numpy_helper.from_array(np.array(1, np.int64), "axis")])
    model = _model(graph, opset=20)
    result = compare(run_ort(model, {"x": x}), _compiled(tmp_path, model).run({"x": x}))
    assert result.ok, result.detail


def test_attention_external_cache_with_a_window_on_both_sides(tmp_path):
    """nonpad_kv_seqlen without causal masking: each batch row's queries sit at its own valid
    length less the queries', a window reaches one key back and one ahead of them, and keys past
    the valid length are padding; grouped KV heads."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ([3, 4, 2, 8], [3, 2, 6, 8], [3, 2, 6, 8]))
    feeds = {"q": q, "k": k, "v": v, "nonpad": np.array([6, 3, 4], np.int64)}
    graph = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v", "", "", "", "nonpad"], ["y"],
                          left_window_size=1, right_window_size=1)], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in feeds.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 2, 8])])
    model = _model(graph, opset=25)
    result = compare(run_ort(model, feeds), _compiled(tmp_path, model).run(feeds))
    assert result.ok, result.detail


def test_tensor_scatter_on_the_second_axis_wraps_around_in_circular_mode(tmp_path):
    """TensorScatter along axis 1 of a 4D cache (the node cases write along -2), each batch row
    from its own index, the circular one past the cache's end back to its start."""
    rng = np.random.default_rng(3)
    feeds = {"past": rng.standard_normal((2, 5, 3, 4)).astype(np.float32),
             "update": rng.standard_normal((2, 3, 3, 4)).astype(np.float32),
             "at": np.array([4, 1], np.int64)}
    graph = helper.make_graph(
        [helper.make_node("TensorScatter", ["past", "update", "at"], ["present"], axis=1,
                          mode="circular")], "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64 if n == "at" else TensorProto.FLOAT, a.shape)
         for n, a in feeds.items()],
        [helper.make_tensor_value_info("present", TensorProto.FLOAT, [2, 5, 3, 4])])
    model = _model(graph, opset=24)
    result = compare(run_ort(model, feeds), _compiled(tmp_path, model).run(feeds))
    assert result.ok, result.detail


def test_range_of_integer_bounds_fed_at_run_time_counting_down(tmp_path):
    """Range whose bounds are graph inputs, its length known only at run time: integer bounds
    counting down by a constant step, down to an empty range (the node cases' such Ranges, in the
    window functions' expanded forms, are float), then used with a value computed beside it."""
    graph = helper.make_graph(
        [helper.make_node("Sub", ["start", "limit"], ["span"]),
         helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
         helper.make_node("Mul", ["r", "span"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.INT64, []) for n in ("start", "limit")],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])],
        [onnx.numpy_helper.from_array(np.array(-3, np.int64), "delta")])
    model = _model(graph, opset=11)
    art = _compiled(tmp_path, model)
    for start, limit in ((10, -1), (4, 4), (7, 0)):
        feeds = {"start": np.array(start, np.int64), "limit": np.array(limit, np.int64)}
        result = compare(run_ort(model, feeds), art.run(feeds))
        assert result.ok, (start, limit, result.detail)


def test_split_by_sizes_on_the_last_axis_with_an_empty_part(tmp_path):
    """Split by constant sizes along axis -1 (as fuse-siblings emits it) with a part of size 0."""
    x = np.random.default_rng(4).standard_normal((2, 3, 7)).astype(np.float32)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [3], [4, 0, 3])
    graph = helper.make_graph([helper.make_node("Split", ["x", "sizes"], ["a", "b", "c"], axis=-1)], "split",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, k])
                               for n, k in (("a", 4), ("b", 0), ("c", 3))], [sizes])
    model = _model(graph)
    got = _compiled(tmp_path, model).run({"x": x})
    assert [got[n].shape for n in "abc"] == [(2, 3, 4), (2, 3, 0), (2, 3, 3)]
    result = compare(run_ort(model, {"x": x}), got)
    assert result.ok, result.detail

"""edgecc's converters on forms the ONNX node cases do not exercise, against ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgecc
from edgecc.verify import compare, run_ort


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

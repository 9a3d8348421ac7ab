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

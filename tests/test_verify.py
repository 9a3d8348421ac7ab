"""Verification helpers: seeded inputs that look like real ones, and the error measures."""

import numpy as np
import onnx
from onnx import helper

from edgecc.verify import random_inputs, relative_error, relative_rmse


def _model_with_inputs(*inputs) -> onnx.ModelProto:
    values = [helper.make_tensor_value_info(name, dtype, shape) for name, dtype, shape in inputs]
    nodes = [helper.make_node("Identity", [v.name], [v.name + "_out"]) for v in values]
    outs = [helper.make_tensor_value_info(v.name + "_out", v.type.tensor_type.elem_type, None) for v in values]
    return helper.make_model(helper.make_graph(nodes, "g", values, outs))


def test_attention_masks_are_right_padded_ones_and_zeros():
    model = _model_with_inputs(("attention_mask", onnx.TensorProto.INT64, ["batch", "seq"]),
                               ("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]))
    feeds = random_inputs(model, seed=1, dim_values={"batch": 6, "seq": 10})
    mask = feeds["attention_mask"]
    assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
    assert mask[0].all() and mask[:, 0].all()  # row 0 unpadded; every row has a token
    assert (np.diff(mask, axis=1) <= 0).all()  # ones, then zeros
    assert not mask.all()  # some row is padded
    assert feeds["input_ids"].max() > 1  # ids are not masks


def test_float_masks_too():
    model = _model_with_inputs(("mask", onnx.TensorProto.FLOAT, [2, 5]))
    mask = random_inputs(model, seed=0)["mask"]
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}


def test_relative_rmse_is_not_decided_by_one_element():
    ref = {"y": np.ones(10_000, np.float32)}
    one_outlier = {"y": ref["y"].copy()}
    one_outlier["y"][0] = 2.0
    assert relative_error(ref, one_outlier) == 1.0
    assert relative_rmse(ref, one_outlier) == 0.01
    assert relative_rmse(ref, {"y": -ref["y"]}) == 2.0
    assert relative_rmse({"i": np.arange(3)}, {"i": np.zeros(3)}) == 0.0  # integer outputs are not measured

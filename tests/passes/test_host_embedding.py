"""host-embedding: the integer part is marked for the host; the graph itself is untouched."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from edgecc.passes.host_embedding import HOST_OUTPUTS_KEY, HostEmbedding
from onnx import TensorProto, helper, numpy_helper

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import random_inputs, run_ort
from edgecc.errors import UserError


def _model(shifted_is_output: bool = False):
    """ids -> Add 1 -> Gather(table) -> MatMul(w): an embedding lookup and a linear layer."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 8)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Add", ["ids", "one"], ["shifted"]),
        helper.make_node("Gather", ["table", "shifted"], ["e"]),
        helper.make_node("MatMul", ["e", "w"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])]
    if shifted_is_output:
        outputs.append(helper.make_tensor_value_info("shifted", TensorProto.INT64, [1, 6]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_structure_marks_the_gather_output_as_the_boundary():
    model = _model()
    result = run_pass(HostEmbedding(), ir.from_proto(model), PassContext())
    assert result.changed
    assert json.loads(result.model.metadata_props[HOST_OUTPUTS_KEY]) == ["e"]
    assert result.stats["host_nodes"] == 2 and result.stats["host_ops"] == "Add x1, Gather x1"
    assert [n.op_type for n in result.model.graph] == ["Add", "Gather", "MatMul"]  # nothing removed


def test_numerics_unchanged_in_ort():
    model = _model()
    out = ir.to_proto(run_pass(HostEmbedding(), ir.from_proto(model), PassContext()).model)
    feeds = random_inputs(model, seed=0)
    np.testing.assert_array_equal(run_ort(model, feeds)["y"], run_ort(out, feeds)["y"])


def test_does_not_fire_on_a_float_model():
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", 1, [1, 4])],
            [helper.make_tensor_value_info("y", 1, [1, 4])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    result = run_pass(HostEmbedding(), ir.from_proto(model), PassContext())
    assert not result.changed and HOST_OUTPUTS_KEY not in result.model.metadata_props


def test_an_integer_tensor_read_by_the_device_part_is_an_error():
    with pytest.raises(UserError, match="integer tensor 'shifted' .* is read by the device part"):
        run_pass(HostEmbedding(), ir.from_proto(_model(shifted_is_output=True)), PassContext())

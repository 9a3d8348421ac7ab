"""linear-to-conv: structure, numerics vs ORT, fires / must not fire."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from edgecc.passes.linear_to_conv import LinearToConv
from onnx import TensorProto, helper, numpy_helper

from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import random_inputs, run_ort

K, N = 16, 24


def _model(rows: tuple[int, ...] = (1, 6), bias: bool = True, gemm: bool = False, weight_input: bool = False):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K) if gemm else (K, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    elif bias:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["b", "h"], ["y"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, K])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, N])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model):
    result = run_pass(LinearToConv(), ir.from_proto(model), PassContext())
    return result, ir.to_proto(result.model)


def test_structure_a_1x1_conv_with_the_bias():
    result, out = _run(_model())
    ops = Counter(n.op_type for n in out.graph.node)
    assert result.changed and result.stats["linears"] == 1
    assert ops["Conv"] == 1 and ops["MatMul"] == 0 and ops["Add"] == 0
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    weights = {t.name: t for t in out.graph.initializer}
    assert list(weights[conv.input[1]].dims) == [N, K, 1, 1] and len(conv.input) == 3


def test_numerics_match_ort():
    for model in (_model(), _model(rows=(2, 3), bias=False), _model(rows=(5,), gemm=True)):
        _, out = _run(model)
        feeds = random_inputs(model, seed=2)
        np.testing.assert_allclose(run_ort(out, feeds)["y"], run_ort(model, feeds)["y"], rtol=1e-5, atol=1e-5)


def test_fires_on_many_rows_only_and_on_constant_weights_only():
    assert not _run(_model(rows=(1, 1)))[0].changed  # one row: FULLY_CONNECTED maps as it is
    result, out = _run(_model(weight_input=True))
    assert not result.changed and Counter(n.op_type for n in out.graph.node)["MatMul"] == 1

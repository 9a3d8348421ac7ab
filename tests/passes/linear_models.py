"""Small linear models for the quantization pass tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

K, N = 64, 48


def linear_model(weight_as_input: bool = False, gemm_attrs: dict | None = None, k: int = K, n: int = N,
                 shared_matmul_output: bool = False) -> onnx.ModelProto:
    """x[B, T, K] @ W[K, N] (+ relu), or Gemm(x[B, K], W, b) when gemm_attrs is given."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if gemm_attrs is not None:
        if gemm_attrs.get("transB"):
            w = w.T.copy()
        b = rng.standard_normal(n).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], **gemm_attrs)]
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", k])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", n])
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "T", k])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "T", n])
        inits = [numpy_helper.from_array(w, "w")]
    outputs = [y]
    if shared_matmul_output:
        outputs.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["B", "T", n]))
    inputs = [x] + ([helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(w.shape))]
                    if weight_as_input else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model

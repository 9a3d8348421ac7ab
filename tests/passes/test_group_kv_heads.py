"""group-kv-heads: grouped-query attention as torch exports it (repeat_kv, SDPA's layout steps)
reads each KV head once; same numbers as ORT on the original; left alone where the repeat has
another reader."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import random_inputs, run_ort
from edgecc.passes.group_kv_heads import GroupKVHeads

B, KV, REP, Q, S, D = 2, 2, 3, 4, 6, 8
H = KV * REP


def _model(extra_reader: bool = False, expand_shape_known: bool = True) -> onnx.ModelProto:
    """softmax(q * c @ (repeat(k) * c)^T) @ repeat(v), the repeats as transformers' repeat_kv and the
    K transpose as torch's SDPA decomposition exports them (Reshape, Transpose, Reshape)."""
    consts = {
        "two": np.array([2], np.int64), "scale": np.array(D ** -0.25, np.float32),
        "expanded": np.array([B, KV, REP, S, D], np.int64), "heads": np.array([B, H, S, D], np.int64),
        "merged": np.array([-1, S, D], np.int64), "k_t": np.array([B, H, D, S], np.int64),
    }
    nodes = []
    for x in ("k", "v"):
        nodes += [helper.make_node("Unsqueeze", [x, "two"], [f"{x}_u"]),
                  helper.make_node("Expand", [f"{x}_u", "expanded"], [f"{x}_e"]),
                  helper.make_node("Reshape", [f"{x}_e", "heads"], [f"{x}_r"], allowzero=1)]
    nodes += [
        helper.make_node("Reshape", ["k_r", "merged"], ["k_m"]),
        helper.make_node("Transpose", ["k_m"], ["k_mt"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["k_mt", "k_t"], ["k_tt"]),
        helper.make_node("Mul", ["k_tt", "scale"], ["k_s"]),
        helper.make_node("Mul", ["q", "scale"], ["q_s"]),
        helper.make_node("MatMul", ["q_s", "k_s"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_r"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [B, H, Q, D])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("v_r", onnx.TensorProto.FLOAT, [B, H, S, D]))
    # TorchScript's queries have a head dim shape inference cannot follow
    inputs = [helper.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [B, H if expand_shape_known else "h", Q, D])]
    inputs += [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [B, KV, S, D]) for x in ("k", "v")]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                                              data_prop=True)
    if not expand_shape_known:  # as TorchScript exports it: the Expand's target computed at run time too
        for v in model.graph.value_info:
            if v.name in ("k_e", "v_e"):
                for i, d in enumerate(v.type.tensor_type.shape.dim):
                    if i != 1:
                        d.dim_param = f"unk_{v.name}_{i}"
    return model


def _run(model: onnx.ModelProto):
    result = run_pass(GroupKVHeads(), ir.from_proto(model), PassContext())
    return result, ir.to_proto(result.model)


@pytest.mark.parametrize("expand_shape_known", [True, False])
def test_both_attention_matmuls_read_the_kv_heads_once(expand_shape_known):
    result, after = _run(_model(expand_shape_known=expand_shape_known))
    ops = Counter(n.op_type for n in after.graph.node)
    assert ops["Expand"] == 0 and ops["MatMul"] == 2, ops
    assert result.changed and result.stats == {"matmuls": 2}
    assert [o.name for o in after.graph.output] == ["y"]
    onnx.checker.check_model(after, full_check=True)


@pytest.mark.parametrize("expand_shape_known", [True, False])
def test_numbers_match_ort_on_the_original(expand_shape_known):
    before = _model(expand_shape_known=expand_shape_known)
    _, after = _run(before)
    feeds = random_inputs(before, seed=3, dim_values={"h": H})
    np.testing.assert_allclose(run_ort(after, feeds)["y"], run_ort(before, feeds)["y"], rtol=1e-5, atol=1e-6)


def test_a_repeat_read_elsewhere_keeps_its_matmul():
    result, after = _run(_model(extra_reader=True))
    assert result.stats == {"matmuls": 1}  # the K side still rewritten; V's repeat is an output
    assert Counter(n.op_type for n in after.graph.node)["Expand"] == 1


def test_compiled_with_the_default_pipeline_verifies(tmp_path):
    path = tmp_path / "gqa.onnx"
    onnx.save(_model(), path)
    art = edgecc.compile(path, "host", tmp_path / "out")
    assert "group-kv-heads" in art.manifest["pipeline"]
    assert next(p for p in art.manifest["passes"] if p["name"] == "group-kv-heads")["stats"] == {"matmuls": 2}
    assert art.manifest["verification"]["max_abs"] < 1e-4

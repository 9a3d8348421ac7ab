"""Verification: seeded inputs that look like real ones and respect each op's domain, the error
measures, and a compiled module run where its crash cannot end edgecc."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import edgecc
from edgecc.core.verify import (
    IN_PLACE_BYTES,
    graph_inputs,
    narrow,
    narrowed_io,
    random_inputs,
    record_narrowed,
    relative_error,
    relative_rmse,
    run_ort,
)
from edgecc.errors import UserError
from edgecc.runtime.isolate import ModuleCrash, run_isolated


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


def _one_node(op: str, inputs, outputs, **attrs) -> onnx.ModelProto:
    """A one-node model; inputs and outputs as (name, elem_type, shape)."""
    values = [helper.make_tensor_value_info(*i) for i in inputs]
    node = helper.make_node(op, [i[0] for i in inputs], [o[0] for o in outputs], name=f"{op}_0", **attrs)
    graph = helper.make_graph([node], "g", values, [helper.make_tensor_value_info(*o) for o in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_inputs_respect_the_domain_of_the_ops_that_read_them():
    ints = onnx.TensorProto.INT64
    div = _one_node("Div", [("a", ints, [64]), ("b", ints, [64])], [("c", ints, [64])])
    assert random_inputs(div)["b"].min() >= 1  # no integer division by zero
    gather = _one_node("GatherND", [("data", onnx.TensorProto.FLOAT, [3, 5]), ("i", ints, [64, 2])],
                       [("y", onnx.TensorProto.FLOAT, [64])])
    assert random_inputs(gather)["i"].max() < 3  # within every axis it indexes
    take = _one_node("Gather", [("data", onnx.TensorProto.FLOAT, ["n", 4]), ("i", ints, [64])],
                     [("y", onnx.TensorProto.FLOAT, [64, 4])])
    assert random_inputs(take, dim_values={"n": 2})["i"].max() < 2  # the size the data input is given
    bf16 = _one_node("Relu", [("x", onnx.TensorProto.BFLOAT16, [4])], [("y", onnx.TensorProto.BFLOAT16, [4])])
    assert random_inputs(bf16)["x"].dtype.name == "bfloat16"


def test_an_input_that_is_an_axis_or_a_shape_must_be_given():
    model = _one_node("ReduceSum", [("x", onnx.TensorProto.FLOAT, [2, 3]), ("axes", onnx.TensorProto.INT64, [1])],
                      [("y", onnx.TensorProto.FLOAT, None)])
    with pytest.raises(UserError, match=r"^input 'axes' is the axes of ReduceSum node 'ReduceSum_0'"):
        random_inputs(model)


def test_a_sequence_input_is_refused_by_name():
    seq = helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None)
    node = helper.make_node("SequenceLength", ["s"], ["n"], name="len")
    model = helper.make_model(helper.make_graph(
        [node], "g", [seq], [helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [])]))
    with pytest.raises(UserError, match=r"^'s' \(SequenceLength node 'len'\) is a sequence, not a tensor"):
        graph_inputs(model)


@pytest.fixture(scope="module")
def int_div(tmp_path_factory):
    """An integer Div compiled for this host, unverified."""
    ints = onnx.TensorProto.INT32
    path = tmp_path_factory.mktemp("div") / "div.onnx"
    onnx.save(_one_node("Div", [("a", ints, [4]), ("b", ints, [4])], [("c", ints, [4])]), path)
    return edgecc.compile(path, "host", path.with_suffix(""), verify=False)


def test_a_crash_in_the_module_is_an_error_not_a_dead_process(int_div):
    a = np.arange(4, dtype=np.int32)
    assert (run_isolated(int_div, {"a": a, "b": np.full(4, 2, np.int32)})["c"] == a // 2).all()
    with pytest.raises(ModuleCrash, match="compiled module crashed \\(signal SIGFPE\\)"):
        run_isolated(int_div, {"a": a, "b": np.zeros(4, np.int32)})
    with pytest.raises(UserError, match="missing \\['b'\\]"):  # the module's own errors pass through
        run_isolated(int_div, {"a": a})


def test_scalar_inputs_and_layernorm_statistics_verify(tmp_path):
    f = onnx.TensorProto.FLOAT
    scalar = tmp_path / "scalar.onnx"
    onnx.save(_one_node("Add", [("a", f, []), ("b", f, [])], [("c", f, [])]), scalar)
    art = edgecc.compile(scalar, "host", tmp_path / "scalar", verify=True)
    assert art.manifest["verification"]["input_shapes"] == {"a": [], "b": []}
    assert art.run({"a": np.array(1, np.float32), "b": np.array(2, np.float32)})["c"].shape == ()
    ln = tmp_path / "ln.onnx"  # Mean and InvStdDev are graph outputs: verification compares them
    onnx.save(_one_node("LayerNormalization", [("x", f, [3, 8]), ("s", f, [8])],
                        [("y", f, [3, 8]), ("mean", f, [3, 1]), ("inv_std", f, [3, 1])]), ln)
    art = edgecc.compile(ln, "host", tmp_path / "ln", verify=True)
    assert art.manifest["verification"]["ok"]
    assert art.manifest["verification"]["inputs_drawn"] == {"x": "normal(0, 1)", "s": "normal(0, 1)"}


def test_the_isolated_run_follows_parallel_kernels_run_in_the_parent(tmp_path):
    """A forked child inherits the parent's TVM thread pool without its worker threads; run on
    that pool, the parallel dense kernel of a matmul with symbolic rows would spin forever."""
    weight = onnx.numpy_helper.from_array(np.ones((256, 256), np.float32), "w")
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", f, ["n", 256])],
                              [helper.make_tensor_value_info("y", f, ["n", 256])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "mm.onnx")
    art = edgecc.compile(tmp_path / "mm.onnx", "host", tmp_path / "mm", verify=False)
    x = np.ones((64, 256), np.float32)
    expected = art.run({"x": x})["y"]
    assert (run_isolated(art, {"x": x}, timeout=120)["y"] == expected).all()


def test_ort_reads_large_weights_in_place_and_small_ones_from_the_graph():
    """Large float and integer initializers reach ONNX Runtime as arrays beside the graph; the
    outputs are those of the whole model, and the model given is left as it was."""
    rng = np.random.default_rng(0)
    rows = IN_PLACE_BYTES // (4 * 16) + 1
    w = rng.standard_normal((16, rows)).astype(np.float32)  # over the bound
    b = rng.standard_normal(rows).astype(np.float32)  # under it
    table = rng.integers(-5, 5, (rows, 16)).astype(np.int64)
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("Gather", ["table", "ids"], ["rows"])], "g",
        [helper.make_tensor_value_info("x", f, [2, 16]),
         helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", f, [2, rows]),
         helper.make_tensor_value_info("rows", onnx.TensorProto.INT64, [3, 16])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b"),
         onnx.numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    before = model.SerializeToString()
    x, ids = rng.standard_normal((2, 16)).astype(np.float32), np.array([0, 7, rows - 1])
    got = run_ort(model, {"x": x, "ids": ids})
    np.testing.assert_allclose(got["y"], x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["rows"], table[ids])
    assert model.SerializeToString() == before


def test_narrowed_inputs_compose_and_select_the_kept_positions():
    graph = helper.make_graph([helper.make_node("Identity", ["past"], ["y"])], "g",
                              [helper.make_tensor_value_info("past", onnx.TensorProto.FLOAT, [2, 4, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, 3])])
    model = ir.from_proto(helper.make_model(graph))
    record_narrowed(model, "past", 1, [0, 2, 3])
    record_narrowed(model, "past", 1, [1, 2])  # a second pass keeps positions 1, 2 of what is left
    assert narrowed_io(model) == {"past": {"axis": 1, "keep": [2, 3]}}
    a = np.arange(24).reshape(2, 4, 3)
    np.testing.assert_array_equal(narrow({"past": a, "x": a}, narrowed_io(model))["past"], a[:, [2, 3]])
    assert narrow({"x": a}, narrowed_io(model))["x"] is a

"""pack-weights: layout marks, contract with the compression passes, and compiled numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.core.kernel_mark import KernelMark
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import PassManager, run_pass
from edgecc.core.pipeline import parse_pipeline
from edgecc.core.target import load_target
from edgecc.core.verify import random_inputs, run_ort
from edgecc.errors import UserError
from edgecc.passes.pack_weights import PackWeights
from tests.passes.linear_models import linear_model


def _quantized(pipeline: str = "quantize-int8{min_weights=0}") -> ir.Model:
    return PassManager(pipeline).run(ir.from_proto(linear_model()), PassContext())[0]


def _marks(model: ir.Model) -> dict[str, KernelMark]:
    """edgecc's kernel marks per op type."""
    return {n.op_type: KernelMark.read(n) for n in model.graph if KernelMark.read(n) is not None}


def test_marks_int8_matmuls_with_the_target_panel_width():
    result = run_pass(PackWeights(), _quantized(), PassContext(target=load_target("rpi4")))
    assert _marks(result.model) == {"MatMulInteger": KernelMark("int8", tile=16)}
    assert result.changed and result.stats["int8_packed"] == 1 and result.stats["tile"] == 16
    assert result.stats["tile_from"] == "target rpi4"


def test_tile_option_overrides_the_target():
    result = run_pass(PackWeights(tile=1), _quantized(), PassContext(target=load_target("rpi4")))
    assert _marks(result.model)["MatMulInteger"].tile == 1


def test_values_are_untouched_so_ort_still_runs_it_exactly():
    before = ir.to_proto(_quantized())
    after = ir.to_proto(run_pass(PackWeights(), _quantized(), PassContext()).model)
    feeds = random_inputs(before, seed=3, dim_values={"B": 2, "T": 5})
    ref, got = run_ort(before, feeds), run_ort(after, feeds)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name])


def test_int4_is_already_packed_and_counted_not_changed():
    result = run_pass(PackWeights(), _quantized("quantize-int4{block=32}"), PassContext())
    assert not result.changed and result.stats["int4_nibble_packed"] == 1 and result.stats["int8_packed"] == 0
    assert _marks(result.model) == {}


def _matmul_integer(zero_point: bool, weight_as_input: bool) -> ir.Model:
    w = np.ones((8, 4), np.int8)
    inputs = ["x", "w"] + (["xz"] if zero_point else [])
    inits = [numpy_helper.from_array(np.int8(1), "xz")] if zero_point else []
    graph_inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.INT8, [2, 8])]
    if weight_as_input:
        graph_inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.INT8, [8, 4]))
    inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["y"])], "g", graph_inputs,
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, [2, 4])], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("zero_point, weight_as_input", [(True, False), (False, True)])
def test_does_not_fire_on_zero_points_or_an_overridable_weight(zero_point, weight_as_input):
    result = run_pass(PackWeights(), _matmul_integer(zero_point, weight_as_input), PassContext())
    assert not result.changed and _marks(result.model) == {}


def test_fires_on_a_plain_constant_int8_weight():
    assert run_pass(PackWeights(), _matmul_integer(False, False), PassContext()).stats["int8_packed"] == 1


@pytest.mark.parametrize("text", ["pack-weights", "simplify,pack-weights", "fuse,pack-weights,quantize-int8"])
def test_pipeline_without_compression_before_it_is_refused(text):
    with pytest.raises(UserError, match="'pack-weights' requires 'compressed-weights'.*quantize-int8"):
        parse_pipeline(text).check_contract()


@pytest.mark.parametrize("before", ["quantize-int8", "quantize-int4", "block-sparsity"])
def test_each_compression_pass_allows_it(before):
    parse_pipeline(f"{before},pack-weights").check_contract()


def test_tile_out_of_range():
    with pytest.raises(UserError, match="tile"):
        parse_pipeline("quantize-int8,pack-weights{tile=300}")


def test_compiled_packed_lm_equals_the_unpacked_one(example_path, tmp_path):
    """Integer sums are exact in any layout, so packing changes no output bit."""
    src = example_path("tiny-lm")
    plain = edgecc.compile(src, "host", tmp_path / "plain", "simplify,fuse,quantize-int8")
    packed = edgecc.compile(src, "host", tmp_path / "packed", "simplify,fuse,quantize-int8,pack-weights",
                            keep_reference=True)
    reports = {p["name"]: p for p in packed.manifest["passes"]}
    assert reports["pack-weights"]["stats"]["int8_packed"] > 0
    feeds = random_inputs(onnx.load(str(packed.path / "model.opt.onnx")), seed=5,
                          dim_values={"batch": 1, "seq": 9})
    a, b = plain.run(feeds), packed.run(feeds)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert packed.manifest["verification"]["ok"]


def test_a_wrong_packed_layout_fails_the_compile(example_path, tmp_path, monkeypatch):
    """The end-of-compile check must catch a kernel that reads the wrong weights."""
    from edgecc.errors import VerificationError
    from edgecc.frontend.converters import contrib  # where the int8 converter packs the weights
    from edgecc.kernels import int8_dot  # the layout on targets with int8 dot products

    for module, name in ((contrib, "pack_int8"), (int8_dot, "pack")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda w, tile, real=real: np.roll(real(w, tile), 1, axis=-1))
    with pytest.raises(VerificationError, match="disagrees with the optimized model in ONNX Runtime"):
        edgecc.compile(example_path("tiny-lm"), "host", tmp_path / "bad", "simplify,fuse,quantize-int8,pack-weights")
    assert not (tmp_path / "bad").exists()

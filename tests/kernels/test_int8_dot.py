"""int8 x int8 dot-product kernel: layout, numerics against numpy (VNNI here, Arm dotprod under
qemu), where pack-weights chooses it, and how the lowering folds quantize-int8's rescale into it."""


import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax, tirx

import edgecc
from edgecc.core.kernel_mark import KernelMark
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import PassManager
from edgecc.core.target import load_target
from edgecc.frontend.lower import _route_to_kernels
from edgecc.kernels import int4_dot, int8_dot
from tests.kernels.targets import require_emulator
from tests.passes.linear_models import linear_model

HOST_TARGET = load_target("host").tvm_target()
needs_vnni = pytest.mark.skipif(int4_dot.isa(HOST_TARGET) != "avx512vnni", reason="this CPU has no AVX-512 VNNI")
INT8 = "quantize-int8{min_weights=0},pack-weights"


def test_pack_puts_four_k_of_each_column_together():
    K, N, tile = 12, 40, 16
    w = np.random.default_rng(0).integers(-127, 128, (K, N)).astype(np.int8)
    packed = int8_dot.pack(w, tile)
    assert packed.shape == (3, K // 4, tile, 4) and packed.dtype == np.int8
    p, g, j, i = 1, 2, 5, 3
    assert packed[p, g, j, i] == w[4 * g + i, tile * p + j]
    assert not packed[2, :, N - 2 * tile:].any()  # padding columns are zero
    np.testing.assert_array_equal(int8_dot.unpack(packed, N), w)
    with pytest.raises(ValueError, match="K % 4"):
        int8_dot.pack(w[:10], tile)


def test_column_offsets_undo_the_unsigned_activations():
    """vpdpbusd reads x + 128; starting from the offsets leaves x @ w."""
    rng = np.random.default_rng(1)
    w = rng.integers(-127, 128, (8, 20)).astype(np.int8)
    x = rng.integers(-127, 128, (3, 8)).astype(np.int8)
    offsets = int8_dot.column_offsets(w, 16).reshape(-1)[:20]
    unsigned = (x.astype(np.int64) + 128) @ w.astype(np.int64)
    np.testing.assert_array_equal(unsigned + offsets, x.astype(np.int64) @ w)


def _module(w, sw, bias, tile, isa):
    bb = relax.BlockBuilder()
    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, w.shape[0]), "int8"))
    sx = relax.Var("sx", relax.TensorType((m, 1), "float32"))
    with bb.function("main", [x, sx]):
        with bb.dataflow():
            out = bb.emit_output(int8_dot.emit(bb, x, sx, w, sw, bias, tile, isa))
        bb.emit_func_output(out)
    return bb.get()


@needs_vnni
@pytest.mark.parametrize("per_column, with_bias", [(True, True), (False, False)])
def test_matches_numpy_for_any_row_count(per_column, with_bias):
    """Blocks of rows, the rows left over and single rows; N not a multiple of the panel width.
    The integer sums are exact (K * 127 * 255 is far from overflow); the rescale is float32."""
    K, N, tile = 96, 100, 64
    rng = np.random.default_rng(2)
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    w[:, 0] = 127  # the largest sums
    sw = rng.random(N).astype(np.float32) if per_column else np.float32(0.01)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    vm = relax.VirtualMachine(tvm.compile(_module(w, sw, bias, tile, "avx512vnni"), target=HOST_TARGET), tvm.cpu())
    assert int8_dot.block_rows(tile) == 3
    for rows in (1, 2, 3, 4, 7):
        x = rng.integers(-127, 128, (rows, K)).astype(np.int8)
        x[:, ::2] = 127
        sx = rng.random((rows, 1)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(sx)).numpy()
        want = int8_dot.reference(x, w, sx[:, 0], sw, bias)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _marks(model: ir.Model) -> list:
    return [KernelMark.read(n) for n in model.graph if KernelMark.read(n) is not None]


def test_chosen_only_where_the_target_has_int8_dot_products():
    def marks(target):
        return _marks(PassManager(INT8).run(ir.from_proto(linear_model()), PassContext(target=load_target(target)))[0])

    assert marks("rpi4") == [KernelMark("int8", tile=16)]  # Cortex-A72: no dotprod
    assert marks("rpi5") == [KernelMark("int8_dot", tile=16, isa="dotprod")]
    assert marks("jetson-orin-nano") == [KernelMark("int8", tile=1)]
    assert not int8_dot.fits(66, 16, "dotprod") and not int8_dot.fits(64, 8, "avx512vnni")


def _routed_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in _route_to_kernels(model).graph.node]


@pytest.mark.parametrize("gemm", [False, True])
def test_the_rescale_is_folded_into_the_kernel(gemm):
    source = linear_model(gemm_attrs={} if gemm else None)
    opt, _ = PassManager(INT8).run(ir.from_proto(source), PassContext(target=load_target("rpi5")))
    ops = _routed_ops(ir.to_proto(opt))
    assert "MatMulInt8Dot" in ops and "MatMulInteger" not in ops
    assert ops[ops.index("MatMulInt8Dot"):] == (["MatMulInt8Dot"] if gemm else ["MatMulInt8Dot", "Relu"])
    dot = next(n for n in _route_to_kernels(ir.to_proto(opt)).graph.node if n.op_type == "MatMulInt8Dot")
    assert len(dot.input) == (5 if gemm else 4)  # xq, W, x_scale, w_scale (, bias)


def _int32_matmul_integer() -> onnx.ModelProto:
    """A MatMulInteger whose int32 sums are the graph's output: nothing to fold."""
    w = np.random.default_rng(3).integers(-127, 128, (32, 16)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.INT8, ["B", 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT32, ["B", 16])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_without_a_rescale_the_widening_kernel_takes_it():
    model = ir.from_proto(_int32_matmul_integer())
    KernelMark("int8_dot", tile=16, isa="dotprod").write(next(iter(model.graph)))
    assert _routed_ops(ir.to_proto(model)) == ["MatMulInt8"]


@needs_vnni
@pytest.mark.parametrize("options, gemm", [("", False), (",mode=static", False), (",per_channel=false", False),
                                           ("", True)])
def test_compiles_and_matches_onnx_runtime(tmp_path, options, gemm):
    """Row scales per token or one static scale, column scales per channel or one, a Gemm's bias."""
    model = tmp_path / "m.onnx"
    onnx.save(linear_model(k=256, n=96, gemm_attrs={} if gemm else None), model)
    pipeline = f"quantize-int8{{min_weights=0{options}}},pack-weights"
    art = edgecc.compile(model, "host", tmp_path / "a", pipeline, keep_reference=True)
    assert art.manifest["passes"][-1]["stats"]["int8_dot"] == 1
    v = art.manifest["verification"]
    assert v["ok"] and v["relative_rmse_vs_reference"] < 1e-6


@needs_vnni
def test_an_int32_output_compiles_through_the_widening_kernel(tmp_path):
    marked = ir.from_proto(_int32_matmul_integer())
    KernelMark("int8_dot", tile=64, isa="avx512vnni").write(next(iter(marked.graph)))
    model = tmp_path / "m.onnx"
    onnx.save(ir.to_proto(marked), model)
    art = edgecc.compile(model, "host", tmp_path / "a", "fuse", keep_reference=True)
    opt = onnx.load(str(art.path / "model.opt.onnx"))
    assert _routed_ops(opt) == ["MatMulInt8"]
    x = np.random.default_rng(4).integers(-127, 128, (3, 32)).astype(np.int8)
    w = numpy_helper.to_array(_int32_matmul_integer().graph.initializer[0])
    np.testing.assert_array_equal(art.run({"x": x})["y"], x.astype(np.int32) @ w.astype(np.int32))


@pytest.mark.emulation
def test_rpi5_sdot_kernel_matches_onnx_runtime_under_qemu(tmp_path):
    require_emulator()
    model = tmp_path / "m.onnx"
    onnx.save(linear_model(k=256, n=96), model)
    art = edgecc.compile(model, "rpi5", tmp_path / "pi5", INT8, keep_reference=True)
    assert art.manifest["passes"][-1]["stats"]["int8_dot"] == 1
    v = art.manifest["verification"]
    assert v["runner"] == "qemu-user emulation" and v["relative_rmse_vs_reference"] < 1e-6

"""int4 x int8 dot-product kernel: layout, numerics against numpy (VNNI here, Arm dotprod under
qemu), and where it is (not) chosen."""


import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tvm
from tvm import relax, tirx

import edgecc
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import PassManager
from edgecc.core.target import load_target
from edgecc.core.verify import random_inputs, run_ort, with_int8_activations
from edgecc.kernels import int4_dot
from edgecc.kernels.int4 import quantize_blockwise
from tests.kernels.targets import RPI4, require_emulator
from tests.passes.linear_models import linear_model

HOST_TARGET = load_target("host").tvm_target()
needs_vnni = pytest.mark.skipif(int4_dot.isa(HOST_TARGET) != "avx512vnni", reason="this CPU has no AVX-512 VNNI")


def test_pack_puts_four_k_of_sixteen_outputs_in_each_nibble_half():
    K, N = 16, 32
    levels = np.random.default_rng(0).integers(0, 16, (K, N)).astype(np.uint8)
    packed = int4_dot.pack(levels)
    assert packed.shape == (N // 16, K // 8, 16, 4) and packed.dtype == np.uint8
    t, c, i, j = 1, 1, 5, 2
    assert packed[t, c, i, j] & 15 == levels[8 * c + j, 16 * t + i]
    assert packed[t, c, i, j] >> 4 == levels[8 * c + 4 + j, 16 * t + i]


def test_metadata_is_stored_as_float16_where_its_values_are_float16():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    _, scales, zeros = quantize_blockwise(w, 32, symmetric=False, float_zeros=True)
    assert int4_dot.pack_meta(scales, zeros).dtype == np.float16
    _, scales, _ = quantize_blockwise(w, 32, symmetric=True)
    meta = int4_dot.pack_meta(scales, np.full_like(scales, 8))
    assert meta.dtype == np.float16 and np.array_equal(meta[:, :, 1], meta[:, :, 0] * 8)
    _, scales, zeros = quantize_blockwise(w, 32, symmetric=False)  # uint8 zero points: s * z has more bits
    assert int4_dot.pack_meta(scales, zeros.astype(np.float32)).dtype == np.float32
    assert int4_dot.pack_meta(np.full_like(scales, 1e-6), zeros).dtype == np.float32  # subnormal in float16


def _module(levels, scales, zeros, block):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tirx.Var("m", "int64"), levels.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(int4_dot.emit(bb, x, levels, scales, zeros, block, "avx512vnni"))
        bb.emit_func_output(out)
    return bb.get()


@needs_vnni
@pytest.mark.parametrize("block, float_zeros", [(32, True), (64, True), (32, False)])
def test_matches_numpy_for_any_row_count(block, float_zeros):
    """float16 metadata (float zero points), and float32 (uint8 zero points)."""
    K, N = 128, 48
    w = np.random.default_rng(1).standard_normal((K, N)).astype(np.float32)
    levels, scales, zeros = quantize_blockwise(w, block, symmetric=False, float_zeros=float_zeros)
    zeros = zeros.astype(np.float32)
    ex = tvm.compile(_module(levels, scales, zeros, block), target=HOST_TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for rows in (1, 3, 5, 8):  # single rows, blocks of int4_dot.ROWS and what is left over
        x = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
        x[0, :block] = 0  # an all-zero block of activations has no scale
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        want = int4_dot.reference(x, levels, scales, zeros, block)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_chosen_only_where_the_target_has_int8_dot_products_and_the_shape_fits():
    assert int4_dot.isa(RPI4) is None  # Cortex-A72: no dotprod
    assert int4_dot.isa(load_target("rpi5").tvm_target()) == "dotprod"
    assert int4_dot.isa(load_target("jetson-orin-nano").tvm_target()) is None
    assert int4_dot.fits(576, 1536, 32) and not int4_dot.fits(576, 1000, 32) and not int4_dot.fits(64, 48, 4)


def _compile(tmp_path, name, opts, target="host"):
    model = tmp_path / "m.onnx"
    onnx.save(linear_model(k=256, n=96), model)
    return edgecc.compile(model, target, tmp_path / name,
                          f"quantize-int4{{block=32,accuracy_level=4{opts}}},pack-weights",
                          keep_reference=True)


@needs_vnni
@pytest.mark.parametrize("opts", ["", ",symmetric=false", ",symmetric=false,zero_points=float"])
def test_accuracy_level_4_compiles_to_the_kernel_and_matches_its_reference(tmp_path, opts):
    art = _compile(tmp_path, "a", opts)
    assert art.manifest["passes"][-1]["stats"]["int4_int8_dot"] == 1
    v = art.manifest["verification"]
    assert v["ok"] and v["relative_rmse_vs_reference"] < 1e-5  # ORT on the explicitly rounded graph
    assert v["relative_rmse_vs_fp32"] < 0.15


@needs_vnni
def test_reference_rounds_activations_only_where_the_kernel_does(tmp_path):
    art = _compile(tmp_path, "a", ",symmetric=false,zero_points=float")
    opt = onnx.load(str(art.path / "model.opt.onnx"))
    rounded = with_int8_activations(opt)
    assert len(rounded.graph.node) > len(opt.graph.node)
    feeds = random_inputs(opt, seed=2, dim_values={"B": 1, "T": 3})
    plain, explicit = run_ort(opt, feeds)["y"], run_ort(rounded, feeds)["y"]
    assert np.abs(plain - explicit).max() > 1e-4  # ORT itself keeps float activations here
    on_rpi4, _ = PassManager("quantize-int4{block=32,accuracy_level=4},pack-weights").run(
        ir.from_proto(linear_model(k=256, n=96)), PassContext(target=load_target("rpi4")))
    unmarked = ir.to_proto(on_rpi4)
    assert with_int8_activations(unmarked) is unmarked


@needs_vnni
def test_without_accuracy_level_4_the_float_kernel_stays(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(linear_model(k=256, n=96), model)
    art = edgecc.compile(model, "host", tmp_path / "c", "quantize-int4{block=32},pack-weights")
    assert art.manifest["passes"][-1]["stats"]["int4_int8_dot"] == 0


@pytest.mark.emulation
def test_rpi5_sdot_kernel_matches_its_reference_under_qemu(tmp_path):
    require_emulator()
    art = _compile(tmp_path, "pi5", ",symmetric=false,zero_points=float", target="rpi5")
    assert art.manifest["passes"][-1]["stats"]["int4_int8_dot"] == 1
    v = art.manifest["verification"]
    assert v["runner"] == "qemu-user emulation" and v["relative_rmse_vs_reference"] < 1e-5

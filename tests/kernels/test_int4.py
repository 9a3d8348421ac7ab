"""Int4 weight-only kernels: quantization, packing, and the compiled dequant-matmul."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from edgecc.kernels.int4 import (
    build_module,
    dequantize_blockwise,
    emit_int4_linear,
    linear_module,
    pack_int4,
    quantize_blockwise,
    schedule,
    unpack_int4,
)
from tvm import relax, tirx
from tvm.support import cc

from edgecc.errors import UserError
from tests.kernels.targets import (
    CROSS_CC,
    EM_AARCH64,
    HOST,
    JETSON,
    RPI4,
    cuda_source,
    e_machine,
    emulated_python,
    needs_cross_cc,
    needs_nvcc,
)


def _weights(K: int, N: int, seed: int = 0) -> np.ndarray:
    """Normal weights plus the corner cases: an all-zero block and an all-positive block."""
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    w[:32, 0] = 0
    w[:32, 1] = np.abs(w[:32, 1]) + 1
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_quantization_error_is_at_most_half_a_scale(block, symmetric):
    w = _weights(256, 48)
    q, scales, zeros = quantize_blockwise(w, block, symmetric)
    assert scales.shape == (256 // block, 48) and scales.dtype == np.float32
    if symmetric:
        assert q.dtype == np.int8 and zeros is None
        assert q.min() >= -8 and q.max() <= 7
    else:
        assert q.dtype == np.uint8 and zeros.dtype == np.uint8 and zeros.shape == scales.shape
        assert q.max() <= 15 and zeros.max() <= 15
    err = np.abs(dequantize_blockwise(q, scales, zeros, block) - w)
    bound = np.repeat(scales, block, axis=0) / 2
    assert np.all(err <= bound * (1 + 1e-6))
    assert np.all(dequantize_blockwise(q, scales, zeros, block)[:32, 0] == 0)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 65), (64, 32)])
def test_pack_unpack_round_trip(shape, signed):
    rng = np.random.default_rng(1)
    q = (rng.integers(-8, 8, shape).astype(np.int8) if signed
         else rng.integers(0, 16, shape).astype(np.uint8))
    packed = pack_int4(q)
    K, N = shape
    assert packed.dtype == np.uint8 and packed.shape == (N, (K + 1) // 2)
    back = unpack_int4(packed, K, N, signed=signed)
    assert back.dtype == q.dtype
    np.testing.assert_array_equal(back, q)


def test_packed_layout_matches_matmulnbits():
    """Row n holds column n; even k in the low nibble; signed values are offset by 8."""
    q = np.array([[1, -8], [2, 7], [3, 0]], np.int8)  # K = 3, N = 2
    np.testing.assert_array_equal(pack_int4(q), [[0xA9, 0x0B], [0xF0, 0x08]])


def test_block_must_divide_k():
    with pytest.raises(UserError, match=r"block 32 .*K = 100"):
        quantize_blockwise(np.zeros((100, 4), np.float32), 32, symmetric=True)


@pytest.mark.parametrize("M", [1, 7, None], ids=["gemv", "M7", "symbolic"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_kernel_matches_numpy(block, symmetric, M):
    """Tolerance: 1e-4 of the largest output. The kernel dequantizes to the same fp32 values
    as numpy; only fp32 summation order (and FMA) differ from the float64 reference, about
    sqrt(K) * 6e-8 relative here, so 1e-4 has margin while a wrong nibble, scale or zero point
    moves outputs by ~1e-2."""
    K, N = 256, 72  # N not a multiple of the 32-column tile
    w = _weights(K, N, seed=block)
    q, scales, zeros = quantize_blockwise(w, block, symmetric)
    ref_w = dequantize_blockwise(q, scales, zeros, block).astype(np.float64)
    vm = relax.VirtualMachine(build_module(K, N, block, symmetric, HOST, M=M, weight=w), tvm.cpu())
    rng = np.random.default_rng(2)
    for rows in [M] if M else [1, 7]:
        x = rng.standard_normal((rows, K)).astype(np.float32)
        y = vm["main"](tvm.runtime.tensor(x)).numpy()
        ref = x.astype(np.float64) @ ref_w
        assert y.shape == (rows, N)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_odd_width_gemv():
    K, N = 64, 33
    w = _weights(K, N)
    q, scales, zeros = quantize_blockwise(w, 32, True)
    vm = relax.VirtualMachine(build_module(K, N, 32, True, HOST, M=1, weight=w), tvm.cpu())
    x = np.random.default_rng(3).standard_normal((1, K)).astype(np.float32)
    ref = x.astype(np.float64) @ dequantize_blockwise(q, scales, zeros, 32)
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("M, kernel", [(1, "int4_gemv"), (7, "int4_matmul"), (None, "int4_matmul")])
def test_dispatch_and_cpu_schedule(M, kernel):
    with HOST:
        mod = relax.get_pipeline("zero")(linear_module(64, 64, 32, True, M=M))
    scheduled = schedule(mod, HOST)
    func = scheduled[kernel]
    assert func.attrs["tirx.is_scheduled"]
    assert schedule(scheduled, HOST)[kernel].same_as(func)
    text = func.script()
    assert "T.parallel" in text and "T.vectorized" in text


@pytest.mark.parametrize("symmetric", [True, False])
def test_compiled_constants_are_packed_int4(symmetric):
    """The executable's constants are the nibbles, scales and zero points, never fp32 weights."""
    K = N = 512
    block = 32
    ex = build_module(K, N, block, symmetric, HOST, M=1)
    blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(ex.mod).numpy().nbytes
    expected = K * N // 2 + 4 * K * N // block + (0 if symmetric else K * N // block)
    assert expected <= blob < expected + 16 * 1024
    assert blob < K * N * 4 / 5


@needs_cross_cc
@pytest.mark.parametrize("M", [1, None])
def test_rpi4_cross_compile(M, tmp_path):
    ex = build_module(256, 128, 32, True, RPI4, M=M)
    lib = tmp_path / "int4.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64


_EMULATED_RUN = """
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
d = sys.argv[1]
x = np.load(d + "/x.npy")
vms = {m: VirtualMachine(tvm.runtime.load_module(f"{d}/{m}.so"), tvm.cpu())
       for m in ("gemv", "any")}
np.savez(d + "/out.npz", gemv=vms["gemv"]["main"](tvm.runtime.tensor(x[:1])).numpy(),
         any=vms["any"]["main"](tvm.runtime.tensor(x)).numpy())
"""


@needs_cross_cc
@pytest.mark.emulation
def test_rpi4_numerics_under_qemu(tmp_path):
    """The NEON code (cortex-a72) computes what numpy does: GEMV and symbolic-M kernels."""
    run = emulated_python()
    K, N, block = 256, 72, 32
    w = _weights(K, N)
    for name, M in (("gemv", 1), ("any", None)):
        ex = build_module(K, N, block, False, RPI4, M=M, weight=w)
        ex.export_library(str(tmp_path / f"{name}.so"), fcompile=cc.cross_compiler(CROSS_CC))
    x = np.random.default_rng(4).standard_normal((3, K)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run(_EMULATED_RUN, tmp_path)
    q, scales, zeros = quantize_blockwise(w, block, symmetric=False)
    ref = x.astype(np.float64) @ dequantize_blockwise(q, scales, zeros, block)
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["gemv"], ref[:1], rtol=0, atol=1e-4 * np.abs(ref).max())
        np.testing.assert_allclose(out["any"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())


@needs_nvcc
@pytest.mark.parametrize("M, kernel", [(1, "int4_gemv_kernel"), (None, "int4_matmul_kernel")])
def test_jetson_build(M, kernel, tmp_path):
    ex = build_module(256, 128, 32, False, JETSON, M=M)
    src = cuda_source(ex)
    assert "__global__ void __launch_bounds__" in src and kernel in src
    with JETSON:
        cubin = tvm.support.nvcc.compile_cuda(src, "cubin", compiler="nvcc")
    assert bytes(cubin[:4]) == b"\x7fELF"
    lib = tmp_path / "int4.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64


def test_symbolic_rows_choose_the_gemv_for_one_row_at_run_time():
    """emit_int4_linear behind symbolic rows: one private function holding both kernels and a
    rows == 1 test; both branches equal numpy."""
    K, N, block = 64, 48, 32
    w = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32)
    q, scales, zeros = quantize_blockwise(w, block, False, float_zeros=True)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tirx.Var("m", "int64"), K), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(emit_int4_linear(bb, x, relax.const(pack_int4(q)), relax.const(scales),
                                                relax.const(zeros), block, K, N))
        bb.emit_func_output(y)
    mod = bb.get()
    names = {gv.name_hint for gv in mod.functions}
    assert {"int4_linear", "int4_gemv", "int4_matmul"} <= names
    with HOST:
        mod = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(tvm.compile(schedule(mod, HOST), target=HOST), tvm.cpu())
    expected_w = dequantize_blockwise(q, scales, zeros, block)
    for rows in (1, 5):
        xv = np.random.default_rng(rows).standard_normal((rows, K)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(xv)).numpy()
        np.testing.assert_allclose(got, xv @ expected_w, rtol=1e-4, atol=1e-4)

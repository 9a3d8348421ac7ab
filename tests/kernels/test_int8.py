"""int8 matmul kernel: packing, exactness against numpy, schedules, and the three targets."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from edgecc.kernels.int8 import build_module, pack_int8, panel_width, reference, unpack_int8
from tvm import relax
from tvm.support import cc

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


def _operands(M: int, K: int, N: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (K, N)).astype(np.int8)
    x = rng.integers(-127, 128, (M, K)).astype(np.int8)
    w[:, 0] = 127  # the largest sums: K * 127 * 127 must not overflow int32
    x[:, :] = np.where(np.arange(K) % 2 == 0, 127, x)
    return x, w


def _run(ex, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("tile", [0, 1, 16, 48])
def test_pack_round_trip_and_panel_layout(tile):
    _, w = _operands(1, 40, 100)
    packed = pack_int8(w, tile)
    np.testing.assert_array_equal(unpack_int8(packed, tile, 100), w)
    if tile:
        assert packed.shape == (-(-100 // tile), 40, tile)
        np.testing.assert_array_equal(packed[1, :, 0], w[:, tile])  # panel 1 starts at column tile


def test_pack_refuses_other_dtypes():
    with pytest.raises(TypeError, match="int8"):
        pack_int8(np.zeros((4, 4), np.float32), 16)


@pytest.mark.parametrize("tile", [0, 1, 32, 64])
@pytest.mark.parametrize("M", [1, 5, None])
def test_kernel_is_exact(tile, M):
    """Integer arithmetic: the compiled kernel equals numpy bit for bit, padding included
    (N = 100 is not a multiple of any panel width)."""
    x, w = _operands(3 if M is None else M, 96, 100)
    np.testing.assert_array_equal(_run(build_module(w, tile, HOST, M=M), x), reference(x, w))


@pytest.mark.parametrize("tile", [0, 32])
def test_rescale_is_fused_into_the_kernel(tile):
    """quantize-int8's rescale, float(x @ w) * row scale * column scale, on [batch, seq, K] rows
    with symbolic dims: FuseOps puts it into the kernel's PrimFunc, which runs it panel by panel
    (no int32 [batch, seq, N] tensor between two kernels), and each value is numpy's float32
    arithmetic in the same order."""
    from edgecc.kernels.int8 import emit_int8_matmul
    from tvm import tirx

    from edgecc.backends.tvm_common import prepare
    from edgecc.backends.tvm_cpu import schedule_kernels

    K, N = 96, 100
    x, w = _operands(7, K, N)
    col = np.linspace(0.01, 0.02, N, dtype=np.float32)
    batch, seq = tirx.Var("batch", "int64"), tirx.Var("seq", "int64")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((batch, seq, K), "int8"))
    sv = relax.Var("s", relax.TensorType((batch, seq, 1), "float32"))
    with bb.function("main", [xv, sv]):
        with bb.dataflow():
            acc = emit_int8_matmul(bb, xv, relax.const(pack_int8(w, tile)), tile, K, N)
            out = bb.emit_output(relax.op.multiply(relax.op.multiply(relax.op.astype(acc, "float32"), sv),
                                                   relax.const(col)))
        bb.emit_func_output(out)
    mod = schedule_kernels(prepare(bb.get(), HOST), HOST)
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 1 and "int8_matmul" in kernels[0] and "multiply" in kernels[0], kernels
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    scale = np.linspace(0.5, 1.0, 7, dtype=np.float32).reshape(1, 7, 1)
    got = vm["main"](tvm.runtime.tensor(x.reshape(1, 7, K)), tvm.runtime.tensor(scale)).numpy()
    want = reference(x, w).astype(np.float32).reshape(1, 7, N) * scale * col
    np.testing.assert_array_equal(got, want)


def test_compiled_constants_are_int8():
    K = N = 512
    ex = build_module(_operands(1, K, N)[1], 64, HOST, M=1)
    blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(ex.mod).numpy().nbytes
    assert K * N <= blob < K * N + 16 * 1024


def test_panel_width_follows_the_target():
    with HOST:
        assert panel_width(HOST) % 8 == 0 and panel_width(HOST) >= 16
    assert panel_width(RPI4) == 16  # NEON: 128-bit vectors, four int32 vectors
    assert panel_width(JETSON) == 1


@needs_cross_cc
def test_rpi4_cross_compile(tmp_path):
    lib = tmp_path / "int8.so"
    build_module(_operands(1, 64, 48)[1], 16, RPI4, M=None).export_library(
        str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64


_EMULATED_RUN = """
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
d = sys.argv[1]
x = np.load(d + "/x.npy")
vm = VirtualMachine(tvm.runtime.load_module(d + "/int8.so"), tvm.cpu())
np.save(d + "/out.npy", vm["main"](tvm.runtime.tensor(x)).numpy())
"""


@needs_cross_cc
@pytest.mark.emulation
def test_rpi4_numerics_under_qemu(tmp_path):
    run = emulated_python()
    x, w = _operands(3, 128, 40)
    build_module(w, 16, RPI4, M=None).export_library(str(tmp_path / "int8.so"),
                                                    fcompile=cc.cross_compiler(CROSS_CC))
    np.save(tmp_path / "x.npy", x)
    run(_EMULATED_RUN, tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), reference(x, w))


@needs_nvcc
@pytest.mark.parametrize("M", [1, None])
def test_jetson_build(M, tmp_path):
    ex = build_module(_operands(1, 256, 128)[1], 1, JETSON, M=M)
    src = cuda_source(ex)
    assert "__global__" in src and "int8_matmul" in src
    with JETSON:
        assert bytes(tvm.support.nvcc.compile_cuda(src, "cubin", compiler="nvcc")[:4]) == b"\x7fELF"
    lib = tmp_path / "int8.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64

"""fp32 dense kernel for symbolic rows: numerics against numpy, routing, and the CPU targets."""

import numpy as np
import pytest
import tvm
from edgecc.kernels.dense import KERNEL_ATTR, block_rows, dense_tile, reference, route_symbolic_matmuls
from tvm import relax, tirx
from tvm.support import cc

from edgecc.backends.tvm_common import prepare
from edgecc.backends.tvm_cpu import schedule_kernels
from edgecc.core.target import load_target
from edgecc.runtime import weights
from tests.kernels.targets import CROSS_CC, EM_AARCH64, HOST, RPI4, e_machine, emulated_python, needs_cross_cc


def _module(w: np.ndarray, rows):
    """main(x [rows..., K]) = matmul(x, w) + 1, the way TVM's importer writes an ONNX MatMul."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((*rows, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.add(y, relax.const(1.0, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod) -> list:
    return [f for f in mod.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs]


def _build(w, rows, target_name="host"):
    desc = load_target(target_name)
    tgt = desc.tvm_target()
    mod = schedule_kernels(prepare(_module(w, rows), desc.tvm_target()), tgt)
    return mod, tvm.compile(mod, target=tgt)


@pytest.mark.parametrize("N", [96, 100])  # 100: not a multiple of the panel width, sliced back
def test_matches_numpy_for_every_row_count(N):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((72, N)).astype(np.float32)
    mod, ex = _build(w, (tirx.Var("b", "int64"), tirx.Var("s", "int64")))
    assert len(_kernels(mod)) == 1
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for M in (1, 3, 4, 5, 6, 7, 16):  # 2 x M rows: on AVX-512 (7 a block) every remainder 0-6
        x = rng.standard_normal((2, M, 72)).astype(np.float32)
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, reference(x, w) + 1, rtol=1e-5, atol=1e-5, err_msg=f"{2 * M} rows")


def test_static_rows_stay_on_tvms_tunable_path():
    w = np.ones((16, 32), np.float32)
    _, routed = route_symbolic_matmuls(_module(w, (4, 8)), HOST)
    assert routed == 0
    _, routed = route_symbolic_matmuls(_module(w, (tirx.Var("s", "int64"), 8)), HOST)
    assert routed == 1


def test_only_constant_fp32_weights_are_routed():
    bb = relax.BlockBuilder()
    s = tirx.Var("s", "int64")
    x = relax.Var("x", relax.TensorType((s, 16), "float32"))
    w = relax.Var("w", relax.TensorType((16, 8), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, w))  # attention-style: both operands computed
        bb.emit_func_output(out)
    _, routed = route_symbolic_matmuls(bb.get(), HOST)
    assert routed == 0


@pytest.mark.parametrize("tied", [False, True])  # tied: the weight is also read as it is (an LM's tied embedding)
def test_lifted_weight_is_packed_when_written(tmp_path, tied):
    """After weights.lift, a routed weight's parameter holds the panels, packed only as the weight
    file is written; the module run on the file's tensors matches numpy."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 20)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tirx.Var("s", "int64"), 24), "float32"))
    weight = relax.const(w)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, weight))
            if tied:
                y = bb.emit(relax.op.add(y, relax.op.sum(weight, axis=[0])))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    lifted, arrays = weights.lift(bb.get(), min_bytes=64)
    assert len(arrays) == 1
    desc = load_target("host")
    mod = schedule_kernels(prepare(lifted, desc.tvm_target(), arrays), desc.tvm_target())
    assert len(_kernels(mod)) == 1 and len(arrays) == (2 if tied else 1)
    assert callable(arrays[-1])  # the panels: packed when written
    entries = weights.write(tmp_path / weights.FILE, arrays)
    assert arrays == []
    assert entries[-1]["shape"][1:] == [24, int(_kernels(mod)[0].attrs[KERNEL_ATTR])]
    vm = relax.VirtualMachine(tvm.compile(mod, target=desc.tvm_target()), tvm.cpu())
    xs = rng.standard_normal((3, 24)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(xs), *weights.load(tmp_path / weights.FILE, entries)).numpy()
    want = reference(xs, w) + (w.sum(0) if tied else 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@needs_cross_cc
def test_rpi4_cross_compile(tmp_path):
    w = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    mod, ex = _build(w, (tirx.Var("s", "int64"), tirx.Var("t", "int64")), "rpi4")
    assert int(_kernels(mod)[0].attrs[KERNEL_ATTR]) == 16  # NEON: four 4-lane vectors
    lib = tmp_path / "dense.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64


_EMULATED_RUN = """
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
d = sys.argv[1]
vm = VirtualMachine(tvm.runtime.load_module(d + "/dense.so"), tvm.cpu())
np.save(d + "/out.npy", vm["main"](tvm.runtime.tensor(np.load(d + "/x.npy"))).numpy())
"""


@needs_cross_cc
@pytest.mark.emulation
def test_rpi4_numerics_under_qemu(tmp_path):
    """NEON: 11 rows, two blocks of 4 and one of the 3 left."""
    run = emulated_python()
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    x = rng.standard_normal((11, 64)).astype(np.float32)
    _, ex = _build(w, (tirx.Var("s", "int64"),), "rpi4")
    ex.export_library(str(tmp_path / "dense.so"), fcompile=cc.cross_compiler(CROSS_CC))
    np.save(tmp_path / "x.npy", x)
    run(_EMULATED_RUN, tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference(x, w) + 1, rtol=1e-5, atol=1e-5)


def test_panel_and_block_per_vector_width():
    """AVX-512: two-vector panels, 7 rows of accumulators; NEON: four vectors, 4 rows."""
    avx512 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    assert (dense_tile(avx512), block_rows(avx512, dense_tile(avx512))) == (32, 7)
    assert (dense_tile(RPI4), block_rows(RPI4, dense_tile(RPI4))) == (16, 4)

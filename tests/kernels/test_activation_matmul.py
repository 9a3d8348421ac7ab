"""Schedule for activation matmuls with symbolic shapes: which kernels it takes, and that they
compute exactly what TVM's default code computes. The attention here has a softcap (tanh, as
Gemma 2 writes it), which kernels.attention does not take."""

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.support import cc

from edgecc.backends.tvm_common import prepare
from edgecc.backends.tvm_cpu import schedule_kernels
from edgecc.core.target import load_target
from edgecc.kernels import activation_matmul
from tests.kernels.targets import CROSS_CC, EM_AARCH64, e_machine, needs_cross_cc

HEADS, DIM = 3, 16
CAP = 5.0


def _attention(seq, total):
    """softmax(CAP * tanh(q @ k^T * scale / CAP) + mask) @ v."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, HEADS, seq, DIM), "float32"))
    k = relax.Var("k", relax.TensorType((1, HEADS, total, DIM), "float32"))
    v = relax.Var("v", relax.TensorType((1, HEADS, total, DIM), "float32"))
    mask = relax.Var("mask", relax.TensorType((1, 1, seq, total), "float32"))
    with bb.function("main", [q, k, v, mask]):
        with bb.dataflow():
            kt = bb.emit(relax.op.permute_dims(k, [0, 1, 3, 2]))
            scores = bb.emit(relax.op.matmul(q, kt))
            scores = bb.emit(relax.op.multiply(scores, relax.const(0.25 / CAP, "float32")))
            scores = bb.emit(relax.op.multiply(relax.op.tanh(scores), relax.const(CAP, "float32")))
            scores = bb.emit(relax.op.add(scores, mask))
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            out = bb.emit_output(relax.op.matmul(probs, v))
        bb.emit_func_output(out)
    return bb.get()


def _matmul_kernels(mod) -> dict:
    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}


def _feeds(seq: int, total: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((1, 1, seq, total)) < 0.2, -1e4, 0).astype(np.float32)
    return [rng.standard_normal((1, HEADS, n, DIM)).astype(np.float32) for n in (seq, total, total)] + [mask]


def _run(mod, feeds):
    ex = tvm.compile(mod, target=load_target("host").tvm_target())
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*map(tvm.runtime.tensor, feeds)).numpy()


def test_symbolic_attention_matmuls_are_scheduled_and_exact():
    desc = load_target("host")
    prepared = prepare(_attention(tirx.Var("seq", "int64"), tirx.Var("total", "int64")), desc.tvm_target())
    scheduled = schedule_kernels(prepared, desc.tvm_target())
    kernels = _matmul_kernels(scheduled)
    assert len(kernels) == 2 and all(f.attrs.get("tirx.is_scheduled") for f in kernels.values())
    for seq, total in ((1, 37), (5, 5)):  # a decode step after a cache; a prefill
        q, k, v, mask = feeds = _feeds(seq, total)
        got = _run(scheduled, feeds)
        assert np.array_equal(got, _run(prepared, feeds))  # same summation order: bit-identical
        scores = CAP * np.tanh(q @ k.transpose(0, 1, 3, 2) * 0.25 / CAP) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        np.testing.assert_allclose(got, probs / probs.sum(-1, keepdims=True) @ v, rtol=1e-5, atol=1e-5)


def test_static_shapes_are_left_to_tuning():
    desc = load_target("host")
    scheduled = activation_matmul.schedule(prepare(_attention(4, 4), desc.tvm_target()), desc.tvm_target())
    assert not any(f.attrs.get("tirx.is_scheduled") for f in _matmul_kernels(scheduled).values())


@needs_cross_cc
def test_rpi4_cross_compile(tmp_path):
    desc = load_target("rpi4")
    mod = schedule_kernels(prepare(_attention(tirx.Var("seq", "int64"), tirx.Var("total", "int64")), desc.tvm_target()),
                           desc.tvm_target())
    assert all(f.attrs.get("tirx.is_scheduled") for f in _matmul_kernels(mod).values())
    lib = tmp_path / "attention.so"
    tvm.compile(mod, target=desc.tvm_target()).export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64


def test_gpu_modules_are_left_to_dlight():
    desc = load_target("jetson-orin-nano")
    prepared = prepare(_attention(tirx.Var("seq", "int64"), tirx.Var("total", "int64")), desc.tvm_target())
    assert activation_matmul.schedule(prepared, desc.tvm_target()).same_as(prepared)

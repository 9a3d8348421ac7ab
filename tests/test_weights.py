"""Weights beside the library: lifting constants out of `main`, the file, and the mapped tensors."""

import gc
import weakref

import numpy as np
import tvm
from tvm import relax

from edgecc.runtime import weights


def _module(w: np.ndarray):
    """main(x) = (x @ w) @ w + 1: one large constant used twice, one scalar constant."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = relax.const(w)
            y = bb.emit(relax.op.matmul(bb.emit(relax.op.matmul(x, c)), c))
            out = bb.emit_output(relax.op.add(y, relax.const(np.float32(1))))
        bb.emit_func_output(out)
    return bb.get()


def test_large_constants_become_trailing_parameters_once_each():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    mod, arrays = weights.lift(_module(w))
    assert [p.name for p in mod["main"].params] == ["x", "weight0"]  # the scalar stays inside
    assert len(arrays) == 1 and np.array_equal(arrays[0], w)
    assert weights.lift(_module(w), min_bytes=w.nbytes + 1)[1] == []


def test_lifted_module_runs_on_the_mapped_file(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    mod, arrays = weights.lift(_module(w))
    entries = weights.write(tmp_path / weights.FILE, arrays + [np.arange(3, dtype=np.int8)])
    assert [e["offset"] % weights.ALIGN for e in entries] == [0, 0]
    tensors = weights.load(tmp_path / weights.FILE, entries)
    assert np.array_equal(tensors[1].numpy(), np.arange(3, dtype=np.int8))
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target("llvm")), tvm.cpu())
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = vm["main"](tvm.runtime.tensor(x), tensors[0]).numpy()
    np.testing.assert_allclose(got, x @ w @ w + 1, rtol=1e-4, atol=1e-4)


def test_lift_keeps_no_reference_to_the_weights_it_returns():
    """TVM keeps a mutator class alive after its use; the weights must not live as long."""
    mod, arrays = weights.lift(_module(np.ones((64, 64), np.float32)))
    lifted = weakref.ref(arrays[0])
    del mod, arrays
    gc.collect()
    assert lifted() is None


def test_types_numpy_cannot_view_are_lifted_as_copies():
    # numpy's DLPack has no bfloat16 (nor ml_dtypes' other types): those constants are copied out.
    import ml_dtypes

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64).astype(ml_dtypes.bfloat16)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64), "bfloat16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(x, relax.const(w)))
        bb.emit_func_output(out)
    _, arrays = weights.lift(bb.get())
    assert len(arrays) == 1 and arrays[0].dtype == w.dtype and np.array_equal(arrays[0], w)

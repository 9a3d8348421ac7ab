"""The CPU schedules for kernels nothing else schedules (kernels/fallback.py): every kernel of a
transformer block's glue is scheduled, fused elementwise chains keep no intermediate buffer,
and the results are what TVM's default code computes."""

import numpy as np
import tvm
from tvm import relax, tirx

from edgecc.backends.tvm_common import prepare
from edgecc.backends.tvm_cpu import schedule_kernels
from edgecc.core.target import load_target

D, HIDDEN = 64, 96


def _glue():
    """RMSNorm, SiLU(gate) * up, a softmax over the last axis and a residual add: the kernels
    around a block's matmuls, with a symbolic sequence length."""
    seq = tirx.Var("seq", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, seq, D), "float32"))
    gate = relax.Var("gate", relax.TensorType((1, seq, HIDDEN), "float32"))
    up = relax.Var("up", relax.TensorType((1, seq, HIDDEN), "float32"))
    scale = relax.const(np.linspace(0.5, 1.5, D, dtype=np.float32))
    with bb.function("main", [x, gate, up]):
        with bb.dataflow():
            norm = bb.emit(relax.op.nn.rms_norm(x, scale, axes=[-1], epsilon=1e-5))
            act = bb.emit(relax.op.multiply(relax.op.nn.silu(gate), up))
            probs = bb.emit(relax.op.nn.softmax(relax.op.multiply(act, relax.const(0.5, "float32")), axis=-1))
            mixed = bb.emit(relax.op.add(relax.op.astype(relax.op.astype(norm, "float16"), "float32"), x))
            out = bb.emit_output(relax.Tuple([mixed, probs]))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, feeds):
    ex = tvm.compile(mod, target=load_target("host").tvm_target())
    return [t.numpy() for t in relax.VirtualMachine(ex, tvm.cpu())["main"](*map(tvm.runtime.tensor, feeds))]


def test_every_kernel_is_scheduled_without_intermediate_buffers():
    tgt = load_target("host").tvm_target()
    scheduled = schedule_kernels(prepare(_glue(), tgt), tgt)
    kernels = {gv.name_hint: f for gv, f in scheduled.functions.items() if isinstance(f, tirx.PrimFunc)}
    assert kernels and all(f.attrs.get("tirx.is_scheduled") for f in kernels.values()), sorted(kernels)
    chains = [name for name in kernels if name.startswith("fused_") and "softmax" not in name
              and "rms_norm" not in name]
    assert chains  # the elementwise chains FuseOps made
    for name in chains:
        assert "alloc_buffer" not in kernels[name].script(), name  # one pass, no workspace


def test_results_match_tvms_default_code():
    tgt = load_target("host").tvm_target()
    prepared = prepare(_glue(), tgt)
    scheduled = schedule_kernels(prepared, tgt)
    rng = np.random.default_rng(0)
    for seq in (1, 7):  # a decode step, a prefill
        feeds = [rng.standard_normal((1, seq, n)).astype(np.float32) for n in (D, HIDDEN, HIDDEN)]
        for got, want in zip(_run(scheduled, feeds), _run(prepared, feeds)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        x = feeds[0]
        norm = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.linspace(0.5, 1.5, D, dtype=np.float32)
        expected = norm.astype(np.float16).astype(np.float32) + x
        np.testing.assert_allclose(_run(scheduled, feeds)[0], expected, rtol=2e-3, atol=2e-3)

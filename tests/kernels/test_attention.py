"""fp32 attention kernel: numerics against numpy for the layouts exporters write, the prompt and
decode paths, what it leaves alone, and the rpi4 build under qemu."""

import numpy as np
import pytest
import tvm
from edgecc.kernels.attention import KERNEL_ATTR, reference, route
from tvm import relax, tirx
from tvm.support import cc

from edgecc.backends.tvm_common import prepare
from edgecc.backends.tvm_cpu import schedule_kernels
from tests.kernels.targets import CROSS_CC, HOST, RPI4, emulated_python, needs_cross_cc

B, S, L = (tirx.Var(n, "int64") for n in ("b", "s", "l"))
# Q, K^T, V and mask shapes as exporters write them
SMOLLM2_GQA = ((B, 3, 3, S, 64), (B, 3, 1, 64, L), (B, 3, 1, L, 64), (B, 1, 1, S, L))  # group-kv-heads
BERT = ((B, 12, S, 64), (B, 12, 64, S), (B, 12, S, 64), (B, 1, 1, S))  # a padding mask over keys
NO_MASK = ((B, 4, S, 48), (B, 4, 48, L), (B, 4, L, 32), None)  # Dv != D
ROWS_ONLY = ((S, 16), (16, L), (L, 16), (S, L))


def _module(shapes, scale: float | None, divide: bool = False, dtype: str = "float32", guard: bool = False,
            keys: bool = False):
    """main(q, kt, v[, mask]) = softmax(q @ kt [* scale or / (1 / scale)] [+ mask]) @ v; with
    `guard`, softmax's NaNs replaced by 0 first, as torch's exporter writes it. With `keys`, main
    takes K (kt's shape with its last two dims swapped) and transposes it, as a cache's keys are."""
    qs, ks, vs, ms = shapes
    ks = (*ks[:-2], ks[-1], ks[-2]) if keys else ks
    bb = relax.BlockBuilder()
    params = [relax.Var(n, relax.TensorType(s, dtype)) for n, s in (("q", qs), ("kt", ks), ("v", vs), ("m", ms))
              if s is not None]
    with bb.function("main", params):
        with bb.dataflow():
            kt = params[1]
            if keys:
                rank = len(ks)
                kt = bb.emit(relax.op.permute_dims(kt, [*range(rank - 2), rank - 1, rank - 2]))
            s = bb.emit(relax.op.matmul(params[0], kt))
            if scale is not None:
                c = relax.const(np.array(1 / scale if divide else scale, dtype))
                s = bb.emit(relax.op.divide(s, c) if divide else relax.op.multiply(c, s))
            if ms is not None:
                s = bb.emit(relax.op.add(params[3], s))
            p = bb.emit(relax.op.nn.softmax(s, axis=-1))
            if guard:
                p = bb.emit(relax.op.where(relax.op.isnan(p), relax.const(0.0, dtype), p))
            out = bb.emit_output(relax.op.matmul(p, params[2]))
        bb.emit_func_output(out)
    return bb.get()


def _kernels(mod) -> list:
    return [f for f in mod.functions.values()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs]


def _transposes(mod) -> int:
    """How many permute_dims `main` still calls."""
    return sum(isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.permute_dims"
               for block in mod["main"].body.blocks for b in block.bindings)


def _inputs(shapes, sizes: dict, seed=0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        if shape is not None:
            dims = [sizes[str(d)] if isinstance(d, tirx.Var) else d for d in shape]
            out.append(rng.standard_normal(dims).astype(np.float32))
    if shapes[3] is not None:  # a causal-style mask: most keys open, some at -1e9
        out[3] = np.where(out[3] > -1.0, 0.0, -1e9).astype(np.float32)
    return out


@pytest.mark.parametrize("shapes, scale, divide, keys", [
    (SMOLLM2_GQA, 0.125, False, False), (BERT, 0.125, True, False), (NO_MASK, None, False, False),
    (ROWS_ONLY, 0.3, False, False), (SMOLLM2_GQA, 0.125, False, True), (BERT, 0.125, True, True)],
    ids=["gqa-5d", "bert-4d", "no-mask", "2d", "gqa-5d-keys", "bert-4d-keys"])
def test_matches_numpy(shapes, scale, divide, keys):
    """One build, called for a decode step (1 row), fewer rows than a block (rows one at a time),
    and prompts whose keys end in a partial block of the packed panels or fill whole ones. With
    `keys`, the kernel reads K itself where the graph transposes it: no transpose is left."""
    routed, count = route(_module(shapes, scale, divide, keys=keys), HOST)
    assert count == 1 and len(_kernels(routed)) == 1
    assert _transposes(routed) == 0
    vm = relax.VirtualMachine(tvm.compile(schedule_kernels(prepare(routed, HOST), HOST), target=HOST), tvm.cpu())
    for rows, keys_ in [(1, 129), (3, 20), (13, 20), (40, 64), (37, 37)]:
        args = _inputs(shapes, {"b": 2, "s": rows, "l": rows if shapes is BERT else keys_})
        if keys:  # the graph's K, and the K^T the reference takes
            ordered = [*range(args[1].ndim - 2), args[1].ndim - 1, args[1].ndim - 2]
            k = np.ascontiguousarray(args[1].transpose(ordered))
            got = vm["main"](*[tvm.runtime.tensor(a) for a in (args[0], k, *args[2:])]).numpy()
        else:
            got = vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
        want = reference(*args[:3], args[3] if len(args) > 3 else None, 1.0 if scale is None else scale)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{rows} rows, {keys_} keys")


@pytest.mark.parametrize("guard", [False, True], ids=["softmax", "isnan-guard"])
def test_rows_with_every_key_masked(guard):
    """A row masked with -inf throughout is NaN, as softmax makes it, or 0 behind torch's isnan
    guard; the other rows are unaffected. Masked with float32's minimum (as Hugging Face masks),
    a row is finite: the mean of V, as softmax makes it."""
    routed, count = route(_module(BERT, 0.125, guard=guard), HOST)
    assert count == 1
    vm = relax.VirtualMachine(tvm.compile(schedule_kernels(prepare(routed, HOST), HOST), target=HOST), tvm.cpu())
    for rows in (1, 20):  # a row one at a time; a prompt's blocks
        q, kt, v, _ = _inputs(BERT, {"b": 2, "s": rows})
        for fill in (-np.inf, np.finfo(np.float32).min):
            mask = np.zeros((2, 1, 1, rows), np.float32)
            mask[0] = fill  # every key of batch row 0
            got = vm["main"](*[tvm.runtime.tensor(a) for a in (q, kt, v, mask)]).numpy()
            if fill == -np.inf:
                assert (np.all(got[0] == 0) if guard else np.all(np.isnan(got[0])))
            else:
                np.testing.assert_allclose(got[0], np.broadcast_to(v[0].mean(-2, keepdims=True), got[0].shape),
                                           rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[1:], reference(q[1:], kt[1:], v[1:], mask[1:], 0.125), rtol=1e-5, atol=1e-5)


def test_leaves_alone_static_shapes_other_dtypes_and_other_axes():
    static = ((1, 2, 8, 16), (1, 2, 16, 8), (1, 2, 8, 16), None)
    assert route(_module(static, 0.25), HOST)[1] == 0  # TVM's tunable path
    assert route(_module(NO_MASK, None, dtype="float16"), HOST)[1] == 0
    mod = _module(SMOLLM2_GQA, 0.125)
    assert route(mod, HOST)[1] == 1
    # a softmax over the query axis is not attention's
    bb = relax.BlockBuilder()
    q, kt, v = (relax.Var(n, relax.TensorType(s, "float32")) for n, s in zip("qkv", NO_MASK[:3]))
    with bb.function("main", [q, kt, v]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.softmax(bb.emit(relax.op.matmul(q, kt)), axis=-2))
            out = bb.emit_output(relax.op.matmul(p, v))
        bb.emit_func_output(out)
    assert route(bb.get(), HOST)[1] == 0


def test_prepare_routes_before_fast_math():
    """prepare() sends attention to the kernel on CPUs: no separate softmax kernel is left."""
    mod = prepare(_module(SMOLLM2_GQA, 0.125), HOST)
    names = [gv.name_hint for gv in mod.functions]
    assert any("attention" in n for n in names) and not any("softmax" in n for n in names)


_EMULATED_RUN = """
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
d = sys.argv[1]
vm = VirtualMachine(tvm.runtime.load_module(d + "/attention.so"), tvm.cpu())
args = [tvm.runtime.tensor(np.load(d + f"/{n}.npy")) for n in ("q", "kt", "v", "m")]
np.save(d + "/out.npy", vm["main"](*args).numpy())
"""


@needs_cross_cc
@pytest.mark.emulation
def test_rpi4_numerics_under_qemu(tmp_path):
    """NEON: two-vector blocks of 8 keys, 8 rows a block; a prompt of 19 rows and 21 keys."""
    run = emulated_python()
    routed, count = route(_module(SMOLLM2_GQA, 0.125), RPI4)
    assert count == 1
    ex = tvm.compile(schedule_kernels(prepare(routed, RPI4), RPI4), target=RPI4)
    ex.export_library(str(tmp_path / "attention.so"), fcompile=cc.cross_compiler(CROSS_CC))
    args = _inputs(SMOLLM2_GQA, {"b": 1, "s": 19, "l": 21})
    for name, a in zip(("q", "kt", "v", "m"), args):
        np.save(tmp_path / f"{name}.npy", a)
    run(_EMULATED_RUN, tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference(*args[:3], args[3], 0.125),
                               rtol=1e-5, atol=1e-5)

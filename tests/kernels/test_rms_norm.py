"""RMSNorm kernel: the forms exporters write, with and without the residual add, against numpy
and ONNX Runtime; what it leaves alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from edgecc.kernels.rms_norm import KERNEL_ATTR, reference, route
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from edgecc.backends.tvm_common import prepare
from edgecc.backends.tvm_cpu import schedule_kernels
from edgecc.frontend.lower import to_relax
from tests.kernels.targets import HOST

H = 64
EPS = 1e-5


def _model(square: str = "Pow", residual: bool = True, rank: int = 3, gamma_first: bool = False) -> onnx.ModelProto:
    """y = x / sqrt(mean(x^2) + eps) * gamma, x = a + b with `residual` (else x = a); outputs y and
    x, which a later residual add would read."""
    dims = ["b", "s", H][-rank:]
    nodes = [helper.make_node("Add", ["a", "b"], ["x"]) if residual else helper.make_node("Identity", ["a"], ["x"]),
             helper.make_node("Pow", ["x", "two"], ["sq"]) if square == "Pow" else helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["m"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["m", "eps"], ["me"]),
             helper.make_node("Sqrt", ["me"], ["r"]),
             helper.make_node("Div", ["one", "r"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["n"]),
             helper.make_node("Mul", ["gamma", "n"] if gamma_first else ["n", "gamma"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("a", "b")[:1 + residual]]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("y", "x")]
    rng = np.random.default_rng(1)
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("two", 2.0), ("eps", EPS), ("one", 1.0))]
    consts.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, H).astype(np.float32), "gamma"))
    graph = helper.make_graph(nodes, "rms", inputs, outputs, consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _kernels(mod) -> int:
    return sum(isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs
               for f in mod.functions.values())


@pytest.mark.parametrize("square, residual, gamma_first", [("Pow", True, False), ("Mul", True, True),
                                                          ("Pow", False, False)],
                         ids=["pow-residual", "mul-residual-gamma-first", "pow"])
def test_matches_onnxruntime(square, residual, gamma_first):
    """One kernel is all that is left; its two outputs match ONNX Runtime and numpy, for a decode
    row and for a prompt's rows."""
    model = _model(square, residual, gamma_first=gamma_first)
    routed, count = route(to_relax(model), HOST)
    assert count == 1 and _kernels(routed) == 1
    mod = schedule_kernels(prepare(routed, HOST), HOST)
    calls = [b.value for block in mod["main"].body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    assert len([c for c in calls if c.op.name == "relax.call_tir"]) == 1  # nothing else computes
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, seq in [(1, 1), (2, 7)]:
        feeds = {n: rng.standard_normal((batch, seq, H)).astype(np.float32) for n in ("a", "b")[:1 + residual]}
        want_y, want_x = session.run(None, feeds)
        got_y, got_x = (t.numpy() for t in vm["main"](*[tvm.runtime.tensor(v) for v in feeds.values()]))
        np.testing.assert_allclose(got_x, want_x, rtol=0, atol=0)
        np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_y, reference(want_x, numpy_helper.to_array(model.graph.initializer[3]), EPS),
                                   rtol=1e-5, atol=1e-6)


def test_leaves_alone_other_forms():
    """Rank 2 (not an LM's hidden states), a cube instead of a square, a mean over another axis."""
    assert route(to_relax(_model(rank=2)), HOST)[1] == 0
    cube = _model()
    cube.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array(3.0, np.float32), "two"))
    assert route(to_relax(cube), HOST)[1] == 0
    other_axis = _model()
    other_axis.graph.node[2].attribute[0].ints[:] = [1]
    assert route(to_relax(other_axis), HOST)[1] == 0

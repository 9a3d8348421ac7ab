"""fuse: structural before/after, numerics vs ORT (its optimizations off), fires / must not fire.

Each rule group (LayerNorm, GELU, MatMul+bias) is tested on tiny hand-written models and on torch
exports (TorchScript at opsets 14 and 17, dynamo at its default opset and at 18); the rank-3
MatMul+bias rewrite is also compiled with TVM and run at two dynamic shapes.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import pytest

from edgecc.core.pass_base import PassContext, get_pass
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.passes.fuse import Fuse
from tests.conftest import parse_model

DIMS = {"B": 2, "S": 3, "batch": 2, "seq": 5}
OTHER_DIMS = {"B": 3, "S": 1, "batch": 1, "seq": 7}
NO_MATCHES = {"layernorm": 0, "layernorm_bias": 0, "gelu": 0, "matmul_bias": 0}


def _floats(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return ", ".join(f"{v:.4f}" for v in rng.uniform(-1, 1, n))


def _model(opset: int, signature: str, initializers: list[str], body: str) -> onnx.ModelProto:
    inits = f"<{', '.join(initializers)}>" if initializers else ""
    return parse_model(
        f'<ir_version: 10, opset_import: ["" : {opset}]>\ng {signature} {inits} {{\n{body}\n}}'
    )


def _fuse(before: onnx.ModelProto, explain: bool = False, **opts):
    result = run_pass(Fuse(**opts), ir.from_proto(before), PassContext(explain=explain))
    after = ir.to_proto(result.model)
    onnx.checker.check_model(after)
    return result, after


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def _node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == op_type]
    return node


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _opset(model: onnx.ModelProto, domain: str = "") -> int | None:
    return next((o.version for o in model.opset_import if o.domain == domain), None)


def _assert_matches_ort(before: onnx.ModelProto, after: onnx.ModelProto, dims=DIMS):
    feeds = random_inputs(before, seed=0, dim_values=dims)
    result = compare(run_ort(before, feeds, optimize=False), run_ort(after, feeds, optimize=False))
    assert result.ok, result.detail


# ----------------------------------------------------------------------------- LayerNorm

def layernorm_model(opset=17, square="Pow", normalize="Div", swapped=False, axis=-1, keepdims=1,
                    x_dims="B, S, 8", scale_dims="8", addend="bias", outputs="") -> onnx.ModelProto:
    """(x - mean) / sqrt(var + eps) * scale + addend, in the spellings exporters use.

    `swapped` puts the constant first in every commutative op; `keepdims` is the first
    ReduceMean's."""
    inits = [f"float[{scale_dims}] scale = {{{_floats(8, 1)}}}",
             f"float[8] bias = {{{_floats(8, 2)}}}", "float eps = {1e-5}", "float two = {2.0}",
             "float one = {1.0}"]
    if opset >= 18:  # ReduceMean's axes became an input
        inits.append(f"int64[1] axes = {{{axis}}}")
        mean = f"mean = ReduceMean <keepdims = {keepdims}> (x, axes)"
        var = "var = ReduceMean(sq, axes)"
    else:
        mean = f"mean = ReduceMean <axes = [{axis}], keepdims = {keepdims}> (x)"
        var = f"var = ReduceMean <axes = [{axis}]> (sq)"

    def comm(out, op, a, b):
        return f"{out} = {op}({b}, {a})" if swapped else f"{out} = {op}({a}, {b})"

    square_line = "sq = Pow(d, two)" if square == "Pow" else "sq = Mul(d, d)"
    normalize_lines = {
        "Div": "n = Div(d, std)",
        "Reciprocal": f"r = Reciprocal(std)\n{comm('n', 'Mul', 'd', 'r')}",
        "OneDiv": f"r = Div(one, std)\n{comm('n', 'Mul', 'd', 'r')}",
    }[normalize]
    body = "\n".join([mean, "d = Sub(x, mean)", square_line, var, comm("ve", "Add", "var", "eps"),
                      "std = Sqrt(ve)", normalize_lines, comm("s", "Mul", "n", "scale"),
                      comm("y", "Add", "s", addend)])
    return _model(opset, f"(float[{x_dims}] x) => (float[{x_dims}] y{outputs})", inits, body)


LAYERNORM_VARIANTS = {
    "opset17-attr-axes-pow-div": {},
    "opset18-input-axes-mul-reciprocal": {"opset": 18, "square": "Mul", "normalize": "Reciprocal"},
    "constants-first-one-div": {"swapped": True, "normalize": "OneDiv"},
}


@pytest.mark.parametrize("variant", LAYERNORM_VARIANTS)
def test_layernorm_structure(variant):
    result, after = _fuse(layernorm_model(**LAYERNORM_VARIANTS[variant]))
    assert result.changed
    assert result.stats == {**NO_MATCHES, "layernorm": 1, "layernorm_bias": 1}
    assert _ops(after) == Counter({"LayerNormalization": 1})
    node = _node(after, "LayerNormalization")
    assert list(node.input) == ["x", "scale", "bias"]
    attrs = _attrs(node)
    assert attrs["axis"] == -1 and attrs["stash_type"] == onnx.TensorProto.FLOAT
    assert math.isclose(attrs["epsilon"], 1e-5, rel_tol=1e-6)
    assert {i.name for i in after.graph.initializer} == {"scale", "bias"}  # eps, two, one removed


@pytest.mark.parametrize("variant", LAYERNORM_VARIANTS)
def test_layernorm_matches_ort(variant):
    before = layernorm_model(**LAYERNORM_VARIANTS[variant])
    _assert_matches_ort(before, _fuse(before)[1])


def test_layernorm_below_opset_17_converts_the_model():
    before = layernorm_model(opset=14)
    result, after = _fuse(before)
    assert result.stats["opset_converted"] == "14->17" and _opset(after) == 17
    assert _ops(after) == Counter({"LayerNormalization": 1})
    _assert_matches_ort(before, after)


def test_layernorm_below_opset_17_without_a_match_keeps_the_opset():
    result, after = _fuse(layernorm_model(opset=14, axis=1), explain=True)
    assert not result.changed and "opset_converted" not in result.stats
    assert _opset(after) == 14 and "LayerNormalization" not in _ops(after)


def test_layernorm_below_opset_17_when_conversion_fails(monkeypatch):
    def fail(model, version):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(onnx.version_converter, "convert_version", fail)
    result, after = _fuse(layernorm_model(opset=14), explain=True)
    assert not result.changed and _opset(after) == 14 and "LayerNormalization" not in _ops(after)
    misses = result.stats["near_misses"]
    assert "layernorm: converting opset 14 to 17 failed: no adapter" in misses
    assert any("LayerNormalization needs opset 17; model has 14" in m for m in misses)


def test_bias_not_folded_into_a_layernorm_that_returns_its_statistics():
    """The library bias rule would try to replace all three outputs and raise."""
    inits = [f"float[8] scale = {{{_floats(8, 1)}}}", f"float[8] bias = {{{_floats(8, 2)}}}"]
    body = "n, mean, inv_std = LayerNormalization(x, scale)\ny = Add(n, bias)"
    before = _model(17, "(float[B, S, 8] x) => (float[B, S, 8] y)", inits, body)
    result, after = _fuse(before, explain=True)
    assert not result.changed and _ops(after) == Counter({"LayerNormalization": 1, "Add": 1})
    assert any("also returns its mean" in m for m in result.stats["near_misses"])


def test_layernorm_not_fused_when_the_deviation_is_used_elsewhere():
    before = layernorm_model(outputs=", float[B, S, 8] d")
    result, after = _fuse(before, explain=True)
    assert result.stats["layernorm"] == 0 and "LayerNormalization" not in _ops(after)
    misses = result.stats["near_misses"]
    assert any(m.startswith("layernorm:") and "other uses" in m for m in misses)
    _assert_matches_ort(before, after)


@pytest.mark.parametrize("opset", [17, 18])
def test_layernorm_not_fused_over_another_axis(opset):
    result, after = _fuse(layernorm_model(opset=opset, axis=1), explain=True)
    assert not result.changed and "LayerNormalization" not in _ops(after)
    assert any("reduces axes [1], not the last only" in m for m in result.stats["near_misses"])


def test_layernorm_not_fused_when_the_mean_drops_its_axis():
    """keepdims=0 on [8, 8] still broadcasts, but subtracts row i's mean from column i."""
    before = layernorm_model(x_dims="8, 8", keepdims=0)
    result, after = _fuse(before, explain=True)
    assert result.stats["layernorm"] == 0 and "LayerNormalization" not in _ops(after)
    assert any("has keepdims=0" in m for m in result.stats["near_misses"])


def test_layernorm_not_fused_with_a_scale_of_another_shape():
    result, _ = _fuse(layernorm_model(scale_dims="1, 1, 8"), explain=True)
    assert result.stats["layernorm"] == 0
    assert any("scale shape [1,1,8] is not [8]" in m for m in result.stats["near_misses"])


def test_residual_addend_is_not_folded_as_a_bias():
    """The library bias rule alone would fold `+ x` into LayerNormalization's bias."""
    before = layernorm_model(addend="x")
    result, after = _fuse(before, explain=True)
    assert result.stats["layernorm"] == 1 and result.stats["layernorm_bias"] == 0
    assert list(_node(after, "LayerNormalization").input) == ["x", "scale"]
    assert _ops(after)["Add"] == 1
    assert any(m.startswith("layernorm_bias:") and "addend shape" in m
               for m in result.stats["near_misses"])
    _assert_matches_ort(before, after)


# ----------------------------------------------------------------------------- GELU

GELU_INITS = ["float half = {0.5}", "float one = {1.0}", "float sqrt2 = {1.4142135}",
              "float inv_sqrt2 = {0.70710677}", "float three = {3.0}", "float k = {0.044715}",
              "float c = {0.7978846}"]
# What the exporters emit: TorchScript's F.gelu, torchlib's (dynamo below opset 20), hand-written.
GELU_BODIES = {
    ("none", "torchscript"): ["e = Div(x, sqrt2)", "t = Erf(e)", "a = Add(t, one)", "m = Mul(x, a)",
                              "y = Mul(m, half)"],
    ("none", "torchlib"): ["e = Div(x, sqrt2)", "t = Erf(e)", "a = Add(t, one)", "h = Mul(half, a)",
                           "y = Mul(x, h)"],
    ("none", "hand"): ["h = Mul(x, half)", "e = Mul(x, inv_sqrt2)", "t = Erf(e)", "a = Add(one, t)",
                       "y = Mul(h, a)"],
    ("tanh", "torchscript"): ["x2 = Mul(x, x)", "x3 = Mul(x, x2)", "kx3 = Mul(k, x3)",
                              "i = Add(x, kx3)", "ci = Mul(c, i)", "t = Tanh(ci)",
                              "a = Add(one, t)", "m = Mul(x, a)", "y = Mul(half, m)"],
    ("tanh", "torchlib"): ["x3 = Pow(x, three)", "kx3 = Mul(k, x3)", "i = Add(x, kx3)",
                           "ci = Mul(c, i)", "t = Tanh(ci)", "a = Add(t, one)", "h = Mul(half, a)",
                           "y = Mul(x, h)"],
    ("tanh", "hand"): ["x3 = Pow(x, three)", "kx3 = Mul(x3, k)", "i = Add(kx3, x)",
                       "ci = Mul(i, c)", "t = Tanh(ci)", "a = Add(t, one)", "h = Mul(half, x)",
                       "y = Mul(a, h)"],
}


def gelu_model(form: tuple[str, str], opset=18, inits=GELU_INITS, outputs="") -> onnx.ModelProto:
    body = "\n".join(GELU_BODIES[form])
    return _model(opset, f"(float[B, 16] x) => (float[B, 16] y{outputs})", list(inits), body)


@pytest.mark.parametrize("form", GELU_BODIES, ids="-".join)
@pytest.mark.parametrize("opset", [18, 20])
def test_gelu_structure(form, opset):
    approximate, _ = form
    result, after = _fuse(gelu_model(form, opset))
    assert result.changed and result.stats == {**NO_MATCHES, "gelu": 1}
    if opset >= 20:
        assert _ops(after) == Counter({"Gelu": 1})
        assert _attrs(_node(after, "Gelu"))["approximate"].decode() == approximate
        assert _opset(after, "com.microsoft") is None
    else:  # only ONNX Runtime's contrib ops exist below opset 20
        fused = "com.microsoft.FastGelu" if approximate == "tanh" else "com.microsoft.Gelu"
        assert _ops(after) == Counter({fused: 1})
        assert _opset(after, "com.microsoft") == 1
    assert not after.graph.initializer  # the constants went with the decomposition


@pytest.mark.parametrize("form", GELU_BODIES, ids="-".join)
@pytest.mark.parametrize("opset", [18, 20])
def test_gelu_matches_ort(form, opset):
    before = gelu_model(form, opset)
    _assert_matches_ort(before, _fuse(before)[1])


@pytest.mark.parametrize("name, wrong, expected", [
    ("inv_sqrt2", "0.8", "inv_sqrt2 is 0.8, expected 0.7071068"),
    ("half", "0.49", "half is 0.49, expected 0.5"),
    ("k", "0.05", "cubic_coeff is 0.05, expected 0.044715"),
])
def test_gelu_not_fused_with_a_wrong_constant(name, wrong, expected):
    inits = [f"float {name} = {{{wrong}}}" if i.split()[1] == name else i for i in GELU_INITS]
    form = ("tanh", "hand") if name == "k" else ("none", "hand")
    before = gelu_model(form, inits=inits)
    result, after = _fuse(before, explain=True)
    assert not result.changed and result.stats["gelu"] == 0
    assert _ops(after) == _ops(before)
    assert any(m.startswith("gelu: Mul 'y'") and expected in m for m in result.stats["near_misses"])


def test_gelu_not_fused_when_erf_is_used_elsewhere():
    before = gelu_model(("none", "torchscript"), outputs=", float[B, 16] t")
    result, after = _fuse(before, explain=True)
    assert not result.changed and "com.microsoft.Gelu" not in _ops(after)
    assert any("other uses" in m for m in result.stats["near_misses"])


def test_gelu_constant_that_callers_can_override_is_not_a_constant():
    body = "\n".join(GELU_BODIES["none", "torchscript"])
    before = _model(18, "(float[B, 16] x, float half) => (float[B, 16] y)", GELU_INITS, body)
    result, _ = _fuse(before, explain=True)
    assert result.stats["gelu"] == 0
    assert any("half 'half' is a graph input" in m for m in result.stats["near_misses"])


# ----------------------------------------------------------------------------- MatMul + bias

W = f"float[8, 4] w = {{{_floats(32, 3)}}}"
B4 = f"float[4] b = {{{_floats(4, 4)}}}"


def matmul_model(opset=17, x="float[B, S, 8]", y="float[B, S, 4]", inits=(W, B4), inputs="",
                 outputs="", add="y = Add(mm, b)", extra="") -> onnx.ModelProto:
    body = f"mm = MatMul(x, w)\n{add}\n{extra}"
    return _model(opset, f"({x} x{inputs}) => ({y} y{outputs})", list(inits), body)


@pytest.mark.parametrize("add", ["y = Add(mm, b)", "y = Add(b, mm)"])
def test_matmul_bias_rank2_becomes_gemm(add):
    before = matmul_model(x="float[B, 8]", y="float[B, 4]", add=add)
    result, after = _fuse(before)
    assert result.stats == {**NO_MATCHES, "matmul_bias": 1}
    assert _ops(after) == Counter({"Gemm": 1})
    assert list(_node(after, "Gemm").input) == ["x", "w", "b"]
    _assert_matches_ort(before, after)


@pytest.mark.parametrize("opset", [14, 17])
def test_matmul_bias_rank3_becomes_reshaped_gemm(opset):
    result, after = _fuse(matmul_model(opset=opset))
    assert result.stats == {**NO_MATCHES, "matmul_bias": 1}
    ops = _ops(after)
    assert ops["Gemm"] == 1 and ops["Reshape"] == 2 and ops["Concat"] == 1
    assert "MatMul" not in ops and "Add" not in ops
    shape = _node(after, "Shape")
    if opset >= 15:  # Shape takes start/end from opset 15; below, a Slice cuts off the last dim
        assert _attrs(shape) == {"start": 0, "end": -1} and "Slice" not in ops
    else:
        assert _attrs(shape) == {} and ops["Slice"] == 1
    # The output keeps its symbolic dims.
    dims = after.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["B", "S", 4]


@pytest.mark.parametrize("opset", [14, 17])
@pytest.mark.parametrize("dims", [DIMS, OTHER_DIMS])
def test_matmul_bias_rank3_matches_ort(opset, dims):
    before = matmul_model(opset=opset)
    _assert_matches_ort(before, _fuse(before)[1], dims=dims)


def _tvm_run(model: onnx.ModelProto, shapes: list[tuple[int, ...]], seed=0) -> list[tuple]:
    """Compile once with TVM (dynamic dims stay symbolic); (input, TVM output) per shape."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    target = tvm.target.Target.from_device(tvm.cpu())
    with target:
        mod = relax.get_pipeline("zero")(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    runs = []
    for shape in shapes:
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        out = vm["main"](tvm.runtime.tensor(x))
        runs.append((x, (out if isinstance(out, tvm.runtime.Tensor) else out[0]).numpy()))
    return runs


@pytest.mark.parametrize("opset", [14, 17])
def test_matmul_bias_rank3_compiles_with_tvm_and_matches_ort(opset):
    before = matmul_model(opset=opset)
    _, after = _fuse(before)
    for x, got in _tvm_run(after, [(2, 3, 8), (1, 5, 8)]):
        result = compare(run_ort(before, {"x": x}), {"y": got})
        assert result.ok, result.detail


def test_matmul_bias_not_fused_when_the_product_is_used_elsewhere():
    before = matmul_model(outputs=", float[B, S, 4] z", extra="z = Relu(mm)")
    result, after = _fuse(before, explain=True)
    assert not result.changed and "Gemm" not in _ops(after)
    misses = result.stats["near_misses"]
    assert any(m.startswith("matmul_bias:") and "other uses" in m for m in misses)


@pytest.mark.parametrize("case, expected", [
    ({"inits": (B4,), "inputs": ", float[8, 4] w"}, "weight 'w' is not a constant"),
    # An initializer that is also a graph input can be overridden by the caller.
    ({"inits": (W, B4), "inputs": ", float[8, 4] w"}, "weight 'w' is not a constant"),
    ({"inits": (W,), "inputs": ", float[4] b"}, "bias 'b' is not a constant"),
    ({"inits": (W, f"float[3, 4] b = {{{_floats(12, 5)}}}"), "x": "float[3, 8]",
      "y": "float[3, 4]"}, "bias 'b' has shape [3, 4], not [4]"),
])
def test_matmul_bias_not_fused(case, expected):
    result, after = _fuse(matmul_model(**case), explain=True)
    assert not result.changed and "Gemm" not in _ops(after)
    assert any(m.startswith("matmul_bias:") and expected in m for m in result.stats["near_misses"])


# ----------------------------------------------------------------------------- the pass

def test_registered_with_its_options():
    assert get_pass("fuse") is Fuse
    assert [o.name for o in Fuse.options] == ["layernorm", "gelu", "matmul_bias"]
    assert Fuse.provides == ("fused",)


def test_zero_matches_change_nothing():
    before = _model(17, "(float[B, 8] x) => (float[B, 8] y)", [], "y = Relu(x)")
    result, after = _fuse(before)
    assert not result.changed and result.stats == NO_MATCHES  # no near_misses without explain
    assert _ops(after) == Counter({"Relu": 1})


# ----------------------------------------------------------------------------- torch exports

def _torch_block():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class HandLayerNorm(nn.Module):  # mean/var written out: ReduceMean, Pow, Sqrt, Div
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d) + 0.5)
            self.bias = nn.Parameter(torch.rand(d))

        def forward(self, x):
            mean = x.mean(-1, keepdim=True)
            var = ((x - mean) ** 2).mean(-1, keepdim=True)
            return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias

    class RsqrtLayerNorm(HandLayerNorm):  # d * d, rsqrt, weight first
        def forward(self, x):
            d = x - x.mean(-1, keepdim=True)
            inv_std = torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-6)
            return self.weight * (d * inv_std) + self.bias

    class Block(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.ln_hand, self.ln_rsqrt = HandLayerNorm(d), RsqrtLayerNorm(d)
            self.ln = nn.LayerNorm(d)
            self.fc1, self.fc2, self.fc3 = nn.Linear(d, 32), nn.Linear(32, d), nn.Linear(d, d)

        def forward(self, x):
            h = F.gelu(self.fc1(self.ln_hand(x)))
            h = F.gelu(self.fc2(h), approximate="tanh")
            h = self.ln_rsqrt(h)
            h = 0.5 * h * (1 + torch.erf(h * 0.7071067811865476))
            h = self.fc3(h)
            inner = math.sqrt(2 / math.pi) * (h + 0.044715 * torch.pow(h, 3))
            h = 0.5 * h * (1 + torch.tanh(inner))
            return self.ln(h)

    torch.manual_seed(0)
    return Block().eval(), torch.randn(2, 5, 16)


# Expected matches per export. nn.LayerNorm is decomposed only below opset 17; F.gelu is
# decomposed below opset 20 (dynamo's default opset emits Gelu itself).
EXPORTS = {
    "torchscript-14": {"layernorm": 3, "layernorm_bias": 3, "gelu": 4, "matmul_bias": 3},
    "torchscript-17": {"layernorm": 2, "layernorm_bias": 2, "gelu": 4, "matmul_bias": 3},
    "dynamo": {"layernorm": 2, "layernorm_bias": 2, "gelu": 2, "matmul_bias": 3},
    "dynamo-18": {"layernorm": 2, "layernorm_bias": 2, "gelu": 4, "matmul_bias": 3},
}


@pytest.fixture(scope="module")
def exported():
    """exported(name) -> the torch block exported that way, with dynamic batch and seq."""
    import torch

    module, x = _torch_block()
    cache: dict[str, onnx.ModelProto] = {}

    def get(name: str) -> onnx.ModelProto:
        if name not in cache:
            exporter, _, opset = name.partition("-")
            with warnings.catch_warnings():  # TorchScript's deprecation, dynamo's pytree notices
                warnings.simplefilter("ignore")
                if exporter == "torchscript":
                    f = io.BytesIO()
                    torch.onnx.export(module, (x,), f, dynamo=False, opset_version=int(opset),
                                      input_names=["x"], output_names=["y"],
                                      dynamic_axes={"x": {0: "batch", 1: "seq"}})
                    cache[name] = onnx.load_from_string(f.getvalue())
                else:
                    dim = torch.export.Dim
                    kwargs = {"opset_version": int(opset)} if opset else {}
                    cache[name] = torch.onnx.export(
                        module, (x,), dynamo=True, input_names=["x"], verbose=False,
                        dynamic_shapes={"x": {0: dim("batch"), 1: dim("seq")}}, **kwargs,
                    ).model_proto
        return cache[name]

    return get


def _gelu_kinds(model: onnx.ModelProto) -> Counter:
    """Fused GELUs by approximation: Gelu (opset 20) or com.microsoft Gelu / FastGelu."""
    kinds = Counter()
    for n in model.graph.node:
        if n.op_type == "Gelu":
            kinds[_attrs(n).get("approximate", b"none").decode()] += 1
        elif (n.domain, n.op_type) == ("com.microsoft", "FastGelu"):
            kinds["tanh"] += 1
    return kinds


@pytest.mark.parametrize("name", EXPORTS)
def test_torch_export_fuses_every_pattern(exported, name):
    result, after = _fuse(exported(name), explain=True)
    assert {k: result.stats[k] for k in NO_MATCHES} == EXPORTS[name]
    assert result.stats["near_misses"] == []
    ops = _ops(after)
    assert ops["LayerNormalization"] == 3 and ops["Gemm"] == 3
    assert _gelu_kinds(after) == Counter({"none": 2, "tanh": 2})
    assert not {"ReduceMean", "Sqrt", "Erf", "Tanh", "Pow", "MatMul"} & set(ops)
    if name == "torchscript-14":
        assert result.stats["opset_converted"] == "14->17" and _opset(after) == 17


@pytest.mark.parametrize("name", EXPORTS)
@pytest.mark.parametrize("dims", [DIMS, OTHER_DIMS])
def test_torch_export_matches_ort(exported, name, dims):
    before = exported(name)
    _assert_matches_ort(before, _fuse(before)[1], dims=dims)


@pytest.mark.parametrize("name", ["torchscript-14", "dynamo"])
def test_torch_export_compiles_with_tvm_and_matches_ort(exported, name):
    before = exported(name)
    _, after = _fuse(before)
    for x, got in _tvm_run(after, [(2, 5, 16), (1, 3, 16)]):
        ref = run_ort(before, {"x": x})
        result = compare(ref, {output: got for output in ref})
        assert result.ok, result.detail


@pytest.mark.parametrize("option, leftover", [
    ("layernorm", "ReduceMean"), ("gelu", "Erf"), ("matmul_bias", "MatMul"),
])
def test_each_option_turns_its_rules_off(exported, option, leftover):
    result, after = _fuse(exported("torchscript-17"), **{option: False})
    assert result.stats[option] == 0 and leftover in _ops(after)
    assert sum(result.stats[k] for k in NO_MATCHES) > 0  # the other groups still fire

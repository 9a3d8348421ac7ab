"""fuse: decomposed LayerNorm, GELU and MatMul+bias subgraphs become single ops.

Each fusion is an onnxscript rewrite rule: pattern -> check (which says why it rejects) ->
rewrite. Library rules are reused where they fit: `LayerNormFusion` (its dtype/epsilon check
and its rewrite) and `LayerNormBiasFusion` for LayerNorm, `MatMulAddToGemm` (its pattern and
rank-2 rewrite) for MatMul+bias. The library GELU rules (ort_fusions.gelu/erfgelu) cover the
exporters' own groupings of 0.5 * x * (1 + T) but not a hand-written `(0.5 * x) * (1 + T)`, nor
`x * 0.7071` for `x / sqrt(2)`, nor TorchScript's tanh form (`x * (x * x)`, `0.5 * (x * ...)`),
and they always emit com.microsoft ops; so GELU has its own rule.

Commutative operands are matched by `_either`, an OrValue of both operand orders tried in place,
instead of `RewriteRuleSet(commute=True)`, which copies a rule once per combination of swapped
nodes (2^6 = 64 copies of one tanh-GELU pattern, each tried on every node). A pattern's root
cannot be an OrValue, so the root's two operand orders are generated as two rules.
"""

from __future__ import annotations

import math

import onnx.version_converter
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import MatMulAddToGemm
from onnxscript.rewriter.rules.fusion._layer_norm import LayerNormBiasFusion, LayerNormFusion

from edgecc.core.ir import infer_shapes
from edgecc.core.pass_base import Option, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_array
from edgecc.core.rewrite_pass import RewritePass, RuleGroups, would_fire
from edgecc.core.static_values import node_axes

LAYERNORM_OPSET = 17  # the first opset with LayerNormalization
GELU_OPSET = 20  # the first opset with Gelu in the default domain
SHAPE_START_END_OPSET = 15  # the first opset where Shape takes start/end

# Exports store the GELU constants as float32; a constant further off is another function.
CONSTANT_RTOL = 1e-4
GELU_CONSTANTS = {
    "half": 0.5,
    "one": 1.0,
    "sqrt2": math.sqrt(2.0),
    "inv_sqrt2": 1.0 / math.sqrt(2.0),
    "three": 3.0,
    "cubic_coeff": 0.044715,
    "sqrt_2_over_pi": math.sqrt(2.0 / math.pi),
}
_INT64 = ir.DataType.INT64


def _either(op_fn, a, b):
    """A commutative binary op with its operands in either order."""
    return pattern.OrValue([op_fn(a, b), op_fn(b, a)])


def _const(name: str):
    """Any scalar or one-element constant, bound to `name`.

    Its value is compared in check(), so a wrong constant is reported with its value; matching
    only constants is what lets `_either(op.Mul, x, c)` settle the operand order while matching.
    """
    anything = {"rel_tol": 0.0, "abs_tol": math.inf}
    return pattern.OrValue(
        [pattern.Constant(0.0, **anything), pattern.Constant([0.0], **anything)], name=name
    )


def _check_constants(found: dict[str, ir.Value], expected: dict[str, float]) -> pattern.MatchResult:
    result = pattern.MatchResult()
    for name, value in found.items():
        array = constant_array(value)
        if array is None:
            return result.fail(f"{name} '{value.name}' is a graph input, not a constant", value)
        got = array.item()
        if not math.isclose(got, expected[name], rel_tol=CONSTANT_RTOL):
            return result.fail(f"{name} is {got:.7g}, expected {expected[name]:.7g}", value)
    return result


class LayerNormDecomposition(LayerNormFusion):
    """(x - mean) / sqrt(var + eps) * scale -> LayerNormalization(x, scale, epsilon=eps).

    The library pattern takes only ReduceMean with its axes as an input (opset >= 18) and an
    explicit keepdims; this one also takes the axes attribute (what TorchScript emits below 18),
    `d * (1 / sqrt)` (torch.rsqrt under TorchScript), `scale * normalized`, and checks the
    reduced axes in check(). The library's check and rewrite do the rest.
    """

    def __init__(self, swap: bool, opset: int):
        super().__init__(name="layernorm")
        self.swap = swap
        self.opset = opset

    def pattern(self, op, x, scale, epsilon):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        square = pattern.OrValue([op.Mul(d, d), op.Pow(d, _const("two"))])
        var = op.ReduceMean(square, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(_either(op.Add, var, epsilon))
        inv_std = pattern.OrValue([op.Reciprocal(std), op.Div(_const("one"), std)])
        normalized = pattern.OrValue([op.Div(d, std), _either(op.Mul, d, inv_std)])
        return op.Mul(scale, normalized) if self.swap else op.Mul(normalized, scale)

    def check(self, context, x, scale, epsilon, mean, var, **constants) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if self.opset < LAYERNORM_OPSET:
            return result.fail(
                f"LayerNormalization needs opset {LAYERNORM_OPSET}; model has {self.opset}"
            )
        library = super().check(context, x=x, epsilon=epsilon)  # float/double x, scalar epsilon
        if not library:
            return library
        constants_ok = _check_constants(constants, {"two": 2.0, "one": 1.0})
        if not constants_ok:
            return constants_ok
        if x.shape is None:
            return result.fail(f"rank of '{x.name}' is unknown", x)
        rank = x.shape.rank()
        for reduction in (mean, var):
            node = reduction.producer()
            axes = node_axes(node)
            if axes is None or sorted({a % rank for a in axes}) != [rank - 1]:
                reason = f"ReduceMean '{node.name}' reduces axes {axes}, not the last only"
                return result.fail(reason, node)
            if node.attributes.get_int("keepdims", 1) != 1:
                return result.fail(f"ReduceMean '{node.name}' has keepdims=0", node)
        width = x.shape[-1]
        if not isinstance(width, int):
            return result.fail(f"last dim of '{x.name}' is symbolic ({width})", x)
        if scale.shape is None or list(scale.shape) != [width]:
            return result.fail(f"scale shape {scale.shape} is not [{width}]", scale)
        return result


class LayerNormBias(LayerNormBiasFusion):
    """Library rule: LayerNormalization(x, scale) + bias -> LayerNormalization(x, scale, bias).

    Its pattern takes any addend, a residual connection too; check that it has the scale's shape,
    as LayerNormalization's bias must.
    """

    def __init__(self):
        super().__init__(name="layernorm_bias")

    def check(self, context, x, scale, bias, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if len(normalized.producer().outputs) != 1:
            # The library rewrite keeps every output; the one-output pattern cannot replace them.
            return result.fail("LayerNormalization also returns its mean / inv_std_dev", normalized)
        if bias.shape is None or scale.shape is None or list(bias.shape) != list(scale.shape):
            reason = f"addend shape {bias.shape} is not the scale shape {scale.shape}"
            return result.fail(reason, bias)
        return result


class GeluFusion(pattern.RewriteRuleClassBase):
    """0.5 * x * (1 + T) -> Gelu, for T = Erf(x / sqrt(2)) (approximate="none") or
    T = Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) (approximate="tanh").

    `grouping` names the two factors multiplied first (torch emits all three groupings), `swap`
    the operand order of the root Mul.
    """

    def __init__(self, approximate: str, grouping: str, swap: bool, opset: int):
        super().__init__(name="gelu")
        self.approximate = approximate
        self.grouping = grouping
        self.swap = swap
        self.opset = opset

    def pattern(self, op, x):
        if self.approximate == "tanh":
            cube = pattern.OrValue([op.Pow(x, _const("three")), _either(op.Mul, x, op.Mul(x, x))])
            inner = _either(op.Add, x, _either(op.Mul, _const("cubic_coeff"), cube))
            t = op.Tanh(_either(op.Mul, _const("sqrt_2_over_pi"), inner))
        else:
            scaled = [op.Div(x, _const("sqrt2")), _either(op.Mul, x, _const("inv_sqrt2"))]
            t = op.Erf(pattern.OrValue(scaled))
        one_plus_t = _either(op.Add, t, _const("one"))
        half = _const("half")
        if self.grouping == "x*half":
            first, second = _either(op.Mul, x, half), one_plus_t
        elif self.grouping == "x*(1+t)":
            first, second = _either(op.Mul, x, one_plus_t), half
        else:  # "half*(1+t)"
            first, second = _either(op.Mul, half, one_plus_t), x
        return op.Mul(second, first) if self.swap else op.Mul(first, second)

    def check(self, context, x, **constants) -> pattern.MatchResult:
        # No dtype check: Mul with the float constants 0.5, 1/sqrt(2)... makes x a float type.
        return _check_constants(constants, GELU_CONSTANTS)

    def rewrite(self, op, x, **_):
        if self.opset >= GELU_OPSET:
            return op.Gelu(x, approximate=self.approximate)
        # Below opset 20 there are only ONNX Runtime's contrib ops; TVM's importer takes them too.
        if self.approximate == "tanh":
            return op.FastGelu(x, _domain="com.microsoft")
        return op.Gelu(x, _domain="com.microsoft")


class MatMulBias(MatMulAddToGemm):
    """Add(MatMul(x, W), b) -> Gemm(x, W, b), for W a constant [K, N] and b a constant [N].

    The library rule stops at rank-2 x. torch's nn.Linear over tokens has x of rank >= 3: that
    becomes Reshape(x, [-1, K]) -> Gemm -> Reshape to x's leading dims + [N]. The leading dims
    are read with Shape(x) at run time, so symbolic batch/seq dims stay symbolic; TVM 0.27's ONNX
    importer turns Shape/Slice/Concat of a known-rank input into a shape expression and compiles
    the result with dynamic dims (tests/passes/test_fuse.py runs it).
    """

    def __init__(self, opset: int):
        super().__init__(name="matmul_bias")
        self.opset = opset

    def check(self, context, input_a, input_b, input_c, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        weight = constant_array(input_b)
        if weight is None:
            return result.fail(f"weight '{input_b.name}' is not a constant", input_b)
        if len(weight.shape) != 2:
            return result.fail(f"weight '{input_b.name}' has rank {len(weight.shape)}", input_b)
        bias = constant_array(input_c)
        if bias is None:
            return result.fail(f"bias '{input_c.name}' is not a constant", input_c)
        n = weight.shape[1]
        if list(bias.shape) != [n]:
            reason = f"bias '{input_c.name}' has shape {list(bias.shape)}, not [{n}]"
            return result.fail(reason, input_c)
        if input_a.shape is None or input_a.shape.rank() < 2:
            return result.fail(f"rank of '{input_a.name}' is unknown or below 2", input_a)
        return result

    def rewrite(self, op, input_a, input_b, input_c):
        if input_a.shape.rank() == 2:
            return super().rewrite(op, input_a, input_b, input_c)
        k, n = constant_array(input_b).shape
        flat = op.Reshape(input_a, op.Constant(value=ir.tensor([-1, k], dtype=_INT64)))
        product = op.Gemm(flat, input_b, input_c)
        if self.opset >= SHAPE_START_END_OPSET:
            leading = op.Shape(input_a, start=0, end=-1)
        else:
            start, end = (op.Constant(value=ir.tensor([i], dtype=_INT64)) for i in (0, -1))
            leading = op.Slice(op.Shape(input_a), start, end)
        width = op.Constant(value=ir.tensor([n], dtype=_INT64))
        return op.Reshape(product, op.Concat(leading, width, axis=0))


def _layernorm_rules(opset: int) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [LayerNormDecomposition.rule(swap, opset) for swap in (False, True)]
    )


def _layernorm_bias_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([LayerNormBias.rule()], commute=True)


def _gelu_rules(opset: int) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet(
        [
            GeluFusion.rule(approximate, grouping, swap, opset)
            for approximate in ("none", "tanh")
            for grouping in ("x*half", "x*(1+t)", "half*(1+t)")
            for swap in (False, True)
        ]
    )


def _matmul_bias_rules(opset: int) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([MatMulBias.rule(opset)], commute=True)


def _convert_opset(model: ir.Model, version: int) -> ir.Model:
    proto = onnx.version_converter.convert_version(ir.to_proto(model), version)
    return infer_shapes(ir.from_proto(proto))


@register_pass
class Fuse(RewritePass):
    name = "fuse"
    description = (
        "fuse LayerNorm, GELU (erf, tanh) and MatMul+bias decompositions into "
        "LayerNormalization, Gelu/FastGelu and Gemm"
    )
    options = (
        Option("layernorm", bool, True, "ReduceMean/Sub/Sqrt/Div/Mul/Add -> LayerNormalization"),
        Option("gelu", bool, True, "erf/tanh GELU -> Gelu (com.microsoft below opset 20)"),
        Option("matmul_bias", bool, True, "MatMul + constant bias -> Gemm (reshaped if rank > 2)"),
    )
    provides = ("fused",)
    needs_shapes = True  # the checks read ranks, dims and dtypes

    def rules(self, model: ir.Model, ctx: PassContext) -> RuleGroups:
        # Matches per rule; layernorm_bias counts biases folded into a LayerNormalization.
        opset = model.opset_imports.get("", 1)
        on = self.opts
        return [
            ("layernorm", _layernorm_rules(opset) if on["layernorm"] else None),
            ("layernorm_bias", _layernorm_bias_rules() if on["layernorm"] else None),
            ("gelu", _gelu_rules(opset) if on["gelu"] else None),
            ("matmul_bias", _matmul_bias_rules(opset) if on["matmul_bias"] else None),
        ]

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        # LayerNormalization needs opset 17. Below it, the model is converted with ONNX's version
        # converter, but only when a LayerNorm would then fuse: converting bumps every op's
        # version. If the converter fails, the LayerNorm checks reject, naming the opset.
        opset = model.opset_imports.get("", 1)
        if not (self.opts["layernorm"] and opset < LAYERNORM_OPSET
                and would_fire(model, _layernorm_rules(LAYERNORM_OPSET))):
            return super().run(model, ctx)
        try:
            model = _convert_opset(model, LAYERNORM_OPSET)
        except Exception as e:  # RuntimeError or InferenceError, for an op it cannot adapt
            failed = f"layernorm: converting opset {opset} to 17 failed: {e}"
            return self.apply(model, ctx, self.rules(model, ctx), (failed,))
        result = super().run(model, ctx)
        result.stats["opset_converted"] = f"{opset}->{LAYERNORM_OPSET}"
        result.changed = True
        return result

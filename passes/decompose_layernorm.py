"""decompose-layernorm: LayerNormalization -> the mean / variance / rsqrt ops an int8 TFLite model has.

TFLite has no LayerNorm op, and the Edge TPU maps MEAN, SUB, MUL, ADD and RSQRT. So
LayerNormalization(x, scale, bias) over the last axis becomes

    d = x - ReduceMean(x);  y = d * Reciprocal(Sqrt(ReduceMean(d * d) + eps)) * scale + bias

`Reciprocal(Sqrt(.))` is exported as one RSQRT. It runs after `fuse`, which turns the many forms
exporters write a LayerNorm in (Pow or Mul, Div or Reciprocal, either operand order) into the one
LayerNormalization op; this pass then writes the single form the exporter maps. The rewrite is
exact in fp32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from edgecc.core.pass_base import PassContext, register_pass
from edgecc.core.rewrite_pass import RewritePass, RuleGroups

REDUCE_AXES_INPUT_OPSET = 18  # ReduceMean takes its axes as an input from opset 18 on


class _Decompose(pattern.RewriteRuleClassBase):
    def __init__(self, opset: int):
        super().__init__(name="decompose-layernorm")
        self.opset = opset

    def pattern(self, op, x, scale):
        return op.LayerNormalization(
            x, scale, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"]
        )

    def check(self, context, x, scale, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = y.producer()
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            return result.fail("its mean or inverse std-dev output is used", y)
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("input is not float32", x)
        rank = x.shape.rank() if x.shape is not None else None
        axis = node.attributes.get_int("axis", -1)
        if rank is None or axis not in (-1, rank - 1):
            return result.fail(
                f"normalizes from axis {axis} of rank {rank}; only the last axis is decomposed", x
            )
        return result

    def rewrite(self, op, x, scale, y, **_):
        node = y.producer()
        eps = node.attributes.get_float("epsilon", 1e-5)
        bias = node.inputs[2] if len(node.inputs) > 2 else None

        def mean(v):
            if self.opset >= REDUCE_AXES_INPUT_OPSET:
                return op.ReduceMean(v, op.Constant(value=ir.tensor(np.array([-1], np.int64))), keepdims=1)
            return op.ReduceMean(v, axes=[-1], keepdims=1)

        d = op.Sub(x, mean(x))
        var = mean(op.Mul(d, d))
        inv_std = op.Reciprocal(op.Sqrt(op.Add(var, op.Constant(value=ir.tensor(np.array(eps, np.float32))))))
        out = op.Mul(op.Mul(d, inv_std), scale)
        return op.Add(out, bias) if bias is not None else out


@register_pass
class DecomposeLayerNorm(RewritePass):
    name = "decompose-layernorm"
    description = (
        "LayerNormalization -> ReduceMean/Sub/Mul/Add/Sqrt/Reciprocal (int8 TFLite has no LayerNorm)"
    )
    requires = ("fused",)  # fuse turns every exporter's LayerNorm into the one op matched here

    shapes_after = True

    def rules(self, model: ir.Model, ctx: PassContext) -> RuleGroups:
        return [("layernorms", pattern.RewriteRuleSet([_Decompose.rule(model.opset_imports.get("", 1))]))]

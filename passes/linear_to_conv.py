"""linear-to-conv: a linear layer over many rows (tokens) -> a 1x1 convolution over a 1xR image.

The Edge TPU maps FULLY_CONNECTED only when its output is one-dimensional (a single row), so
x[..., R, K] @ W[K, N] (+ b) with R > 1 rows, as a transformer applies to every token, would end
the TPU segment at the first projection. The same product is a 1x1 CONV_2D over an image of 1 x R
pixels with K channels, which the Edge TPU maps with per-channel int8 weights. In ONNX (NCHW):

    Reshape(x, [1, R, K]) -> Transpose(0, 2, 1) -> Reshape([1, K, 1, R]) -> Conv(W^T[N, K, 1, 1], b)
    -> Reshape([1, N, R]) -> Transpose(0, 2, 1) -> Reshape(x's leading dims + [N])

which ONNX Runtime runs exactly; the TFLite exporter folds each chain of reshapes and transposes
around the convolution into one RESHAPE (the data order of [R, K] rows and of a 1xR NHWC image is
the same). A single row stays a linear layer (FULLY_CONNECTED). Needs static shapes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from edgecc.core.pass_base import PassContext, register_pass
from edgecc.core.pass_helpers import constant_array, constant_matrix, gemm_refusal
from edgecc.core.rewrite_pass import RewritePass, RuleGroups


def _i64(values: list[int]):
    return ir.tensor(np.array(values, np.int64))


class _LinearToConv(pattern.RewriteRuleClassBase):
    """MatMul(x, W) [+ b], or Gemm(x, W, b) with transB, alpha = beta = 1."""

    def __init__(self, form: str):
        super().__init__(name=f"linear-to-conv.{form}")
        self.form = form

    def pattern(self, op, x, w):
        if self.form == "gemm":
            return op.Gemm(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])
        if self.form == "matmul+bias":
            return op.Add(op.MatMul(x, w, _outputs=["y"]), pattern.Var("bias"))
        return op.MatMul(x, w, _outputs=["y"])

    def check(self, context, x, w, y, bias=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        weight = constant_matrix(w)
        if weight is None:
            return result.fail(f"weight '{w.name}' is not a constant 2-D float32 tensor", w)
        if x.shape is None or not all(isinstance(d, int) for d in x.shape) or x.shape.rank() < 2:
            return result.fail(f"'{x.name}' has no static shape of rank >= 2 (run static-shapes first)", x)
        if math.prod(x.shape[:-1]) < 2:
            return result.fail("one row: FULLY_CONNECTED's output is one-dimensional already", x)
        node = y.producer()
        if self.form == "gemm":
            if refusal := gemm_refusal(node):
                return result.fail(refusal, y)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
        n = (
            weight.shape[0]
            if self.form == "gemm" and node.attributes.get_int("transB", 0)
            else weight.shape[1]
        )
        if bias is not None:
            b = constant_array(bias)
            if b is None or b.size != n or (b.ndim > 1 and b.shape[-1] != n):
                return result.fail(f"bias '{bias.name}' is not a constant of {n} values", bias)
        return result

    def rewrite(self, op, x, w, y, bias=None, **_):
        weight = constant_matrix(w)
        node = y.producer()
        if self.form == "gemm":
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if not node.attributes.get_int("transB", 0):
                weight = weight.T
        else:
            weight = weight.T
        n, k = weight.shape
        lead = list(x.shape[:-1])
        rows = math.prod(lead)
        kernel = op.initializer(
            ir.tensor(np.ascontiguousarray(weight).reshape(n, k, 1, 1)), f"{w.name}_conv1x1"
        )
        inputs = [kernel]
        if bias is not None:
            inputs.append(
                op.initializer(
                    ir.tensor(constant_array(bias).reshape(n).astype(np.float32)), f"{w.name}_conv1x1_bias"
                )
            )
        image = op.Reshape(
            op.Transpose(op.Reshape(x, op.Constant(value=_i64([1, rows, k]))), perm=[0, 2, 1]),
            op.Constant(value=_i64([1, k, 1, rows])),
        )
        conv = op.Conv(image, *inputs, kernel_shape=[1, 1])
        rows_out = op.Transpose(op.Reshape(conv, op.Constant(value=_i64([1, n, rows]))), perm=[0, 2, 1])
        return op.Reshape(rows_out, op.Constant(value=_i64(lead + [n])))


@register_pass
class LinearToConv(RewritePass):
    name = "linear-to-conv"
    description = (
        "linear layers over R > 1 rows (tokens) -> 1x1 Conv over a 1xR image, which the Edge TPU maps"
    )
    requires = ("static-shapes",)
    shapes_after = True

    def rules(self, model: ir.Model, ctx: PassContext) -> RuleGroups:
        # One form at a time, biased first: a rule set tries its rules node by node, and the bare
        # MatMul rule would take the MatMul before the Add that holds its bias is visited.
        return [("linears", pattern.RewriteRuleSet([_LinearToConv.rule(form)], commute=True))
                for form in ("matmul+bias", "gemm", "matmul")]

"""layernorm-row-scale: shrink the rows (tokens) whose residual sum holds outliers, before LayerNorm.

BERT-like encoders put "massive activations" into a few tokens: all-MiniLM-L6-v2's FFN output
reaches 223 in one channel of [CLS] while every other token stays within about +-10. An int8 tensor
has one scale, so that single row sets the step for all rows: the residual sum, its deviations and
their squares inside the decomposed LayerNorm lose the other tokens almost entirely.

LayerNorm normalizes each row, so it does not change when a row is multiplied by p > 0 (up to its
epsilon). For LayerNorm(x + MatMul(h, W) + b) this pass writes

    LayerNorm(x * p + MatMul(h * p, W) + b * p)

with p a constant column ([rows, 1]) measured on the calibration inputs: rows whose largest |x + h W + b|
exceeds `ratio` times the median row's are scaled down to the median row's size, the others keep
p = 1. The FFN input h is scaled too, so the projection's output is never int8 at the outlier's
size. The row positions are those of the static shapes (static-shapes first), and p is floored so that
p^2 times the row's smallest calibrated variance stays far above epsilon: the rewrite is exact to
fp32 rounding on the calibration data.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from edgecc.core.pass_base import Option, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_array, constant_matrix
from edgecc.core.calibration import calibration_feeds
from edgecc.core.rewrite_pass import RewritePass
from edgecc.core.verify import ort_session

EPS_MARGIN = 1e4  # p^2 * variance stays this many times above LayerNorm's epsilon


class _ScaleRows(pattern.RewriteRuleClassBase):
    """LayerNorm(x + (MatMul(h, W) + b)), the residual sum of a post-LN block, with row scales."""

    def __init__(self, scales: dict[str, np.ndarray], applied: list[str]):
        super().__init__(name="layernorm-row-scale")
        self.scales = scales
        self.applied = applied  # the sums rewritten, for the pass's stats

    def pattern(self, op, x, h, w, b):
        z = op.Add(x, op.Add(op.MatMul(h, w), b), _outputs=["z"])
        return op.LayerNormalization(
            z, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"]
        )

    def check(self, context, x, h, w, b, z, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if z.name not in self.scales:
            return result.fail("no row of the residual sum exceeds ratio x the median row", z)
        if len(z.uses()) != 1:
            return result.fail("the residual sum is used besides the LayerNorm", z)
        weight, bias = constant_matrix(w, dtype=None), constant_array(b)
        if weight is None or bias is None or bias.size != weight.shape[1]:
            return result.fail("the projection has no constant 2-D weight and bias", w)
        if x.shape != z.shape or h.shape is None or list(h.shape[:-1]) != list(z.shape[:-1]):
            return result.fail("the residual and the projection's input do not have the sum's rows", x)
        axis = y.producer().attributes.get_int("axis", -1)
        if axis not in (-1, z.shape.rank() - 1):
            return result.fail(f"LayerNorm over axis {axis}: only the last axis is row-invariant", z)
        return result

    def rewrite(self, op, x, h, w, b, z, y, **_):
        node = y.producer()
        p = self.scales[z.name]
        self.applied.append(z.name)
        column = op.initializer(ir.tensor(p.reshape(-1, 1).astype(np.float32)), f"{z.name}_row_scale")
        bias = op.initializer(
            ir.tensor((constant_array(b).reshape(1, -1) * p.reshape(-1, 1)).astype(np.float32)),
            f"{b.name}_row_scaled",
        )
        scaled = op.Add(op.Mul(x, column), op.Add(op.MatMul(op.Mul(h, column), w), bias))
        return op.LayerNormalization(
            scaled, *node.inputs[1:], axis=node.attributes.get_int("axis", -1),
            epsilon=node.attributes.get_float("epsilon", 1e-5),
        )


def _candidates(model: ir.Model) -> dict[str, float]:
    """LayerNorm inputs produced by an Add over static [.., rows, channels], with their epsilon."""
    found = {}
    for node in model.graph:
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        z = node.inputs[0]
        producer = z.producer()
        if producer is None or producer.op_type != "Add" or z.shape is None or z.shape.rank() < 2:
            continue
        if all(isinstance(d, int) for d in z.shape) and z.shape[-2] > 1:
            found[z.name] = node.attributes.get_float("epsilon", 1e-5)
    return found


def row_scales(model: ir.Model, ctx: PassContext, ratio: float) -> dict[str, np.ndarray]:
    """Per candidate residual sum: the row scales p, where some row exceeds ratio x the median row."""
    eps = _candidates(model)
    if not eps:
        return {}
    names = sorted(eps)
    session = ort_session(model, outputs=names)  # weights in an external-data file stay there
    peak: dict[str, np.ndarray] = {}
    low_var: dict[str, np.ndarray] = {}
    for feeds in calibration_feeds(model, ctx):
        for name, value in zip(names, session.run(names, feeds)):
            rows = value.reshape(-1, value.shape[-2], value.shape[-1])
            m, v = np.abs(rows).max(axis=(0, 2)), rows.var(axis=2).min(axis=0)
            peak[name] = m if name not in peak else np.maximum(peak[name], m)
            low_var[name] = v if name not in low_var else np.minimum(low_var[name], v)
    scales = {}
    for name in names:
        typical = float(np.median(peak[name]))
        if not typical or peak[name].max() <= ratio * typical:
            continue
        p = np.minimum(1.0, typical / np.maximum(peak[name], typical / ratio))
        floor = np.sqrt(EPS_MARGIN * eps[name] / np.maximum(low_var[name], 1e-30))
        scales[name] = np.clip(p, np.minimum(floor, 1.0), 1.0)
    return scales


@register_pass
class LayerNormRowScale(RewritePass):
    name = "layernorm-row-scale"
    description = (
        "scale down the rows (tokens) with outliers in a post-LN residual sum: LayerNorm ignores a row's "
        "scale, int8 keeps the other rows' precision"
    )
    options = (
        Option("ratio", float, 4.0, "scale rows whose peak exceeds ratio x the median row's peak", low=1.0),
    )
    requires = ("static-shapes", "fused")
    needs_shapes = True  # the candidates are found by their static shapes

    shapes_after = True

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        scales = row_scales(model, ctx, self.opts["ratio"])
        applied: list[str] = []
        rules = pattern.RewriteRuleSet([_ScaleRows.rule(scales, applied)], commute=True)
        result = self.apply(model, ctx, [("layernorms", rules)])
        result.stats["rows_scaled"] = sum(int((scales[name] < 1).sum()) for name in applied)
        return result

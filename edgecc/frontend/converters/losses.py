"""Loss ops (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss), which TVM 0.27's importer lacks:
training graphs and exported evaluation graphs compute their loss in the model."""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter


def _nll(bb, log_prob, target, weight, attr):
    """ONNX's negative log likelihood of `log_prob` [N, C, d1, ...] at `target` [N, d1, ...].

    A target equal to ignore_index contributes 0 and its weight is 0; that target may lie outside
    [0, C), so class 0 stands in for it wherever it indexes. Mean divides by the sum of the
    weights picked (the count of targets not ignored when there are no weights)."""
    reduction = attr.get("reduction", b"mean").decode()
    if reduction not in ("none", "sum", "mean"):
        raise UserError(f"node '{node_name(attr)}': a loss with reduction '{reduction}' is not lowered "
                        "(ONNX has none, sum and mean)")
    dtype = bb.normalize(log_prob).ty.dtype
    zero = relax.const(0, dtype)
    kept = None
    if "ignore_index" in attr:
        ignored = relax.op.equal(target, relax.const(attr["ignore_index"], target.ty.dtype))
        kept = relax.op.logical_not(ignored)
        target = relax.op.where(ignored, relax.op.zeros_like(target), target)
    picked = relax.op.gather_elements(log_prob, relax.op.expand_dims(target, 1), axis=1)
    loss = relax.op.negative(relax.op.squeeze(picked, [1]))
    scale = None
    if weight is not None:
        scale = relax.op.take(weight, target, axis=0)
        if kept is not None:
            scale = relax.op.where(kept, scale, zero)
    elif kept is not None:
        scale = relax.op.astype(kept, dtype)
    if kept is not None:
        loss = relax.op.where(kept, loss, zero)
    if scale is not None:
        loss = relax.op.multiply(loss, scale)
    if reduction == "none":
        return loss
    if reduction == "mean" and scale is not None:
        return relax.op.divide(relax.op.sum(loss), relax.op.sum(scale))
    return relax.op.sum(loss) if reduction == "sum" else relax.op.mean(loss)


@converter("NegativeLogLikelihoodLoss")
class NegativeLogLikelihoodLoss(OnnxOpConverter):
    """The loss of log-probabilities [N, C, d1, ...] at class targets [N, d1, ...], optionally
    weighted per class, with ignore_index and the reductions none, sum and mean."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        return _nll(bb, inputs[0], inputs[1], inputs[2], attr)


@converter("SoftmaxCrossEntropyLoss")
class SoftmaxCrossEntropyLoss(OnnxOpConverter):
    """NegativeLogLikelihoodLoss of log_softmax over the class axis (1); the optional second output
    is that log_softmax."""

    computed_outputs = (0, 1)

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        log_prob = bb.normalize(relax.op.nn.log_softmax(inputs[0], axis=1))
        loss = _nll(bb, log_prob, inputs[1], inputs[2], attr)
        if attr["tvm_custom"]["num_outputs"] == 1:
            return loss
        return relax.Tuple([loss, log_prob])

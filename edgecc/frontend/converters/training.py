"""The optimizers of ai.onnx.preview.training (Adagrad, Adam, Momentum), which TVM 0.27's importer
lacks: one update step of an on-device training graph, as the element-wise formulas of their specs.

Each node takes a learning rate R and an update count T (scalars), then per optimized tensor its
value X, gradient G and state (one list of tensors after another), and returns the new values and
then the new states, list after list. Every tensor is updated on its own by the same formula.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter

_DOMAIN = "ai.onnx.preview.training"


def _groups(inputs, per_tensor: int):
    """The per-tensor operand groups (X, G, state...) of an optimizer node's variadic inputs."""
    tensors = inputs[2:]
    n = len(tensors) // per_tensor
    return [tensors[i::n] for i in range(n)]


def _scalar(value, like):
    """A scalar operand (R, T) in the dtype of the tensor it scales."""
    return relax.op.astype(value, like.ty.dtype)


def _const(value: float, like):
    return relax.const(value, like.ty.dtype)


def _regularized(x, g, attr):
    """G + norm_coefficient * X: the gradient of the L2 term added."""
    return relax.op.add(relax.op.multiply(_const(attr.get("norm_coefficient", 0.0), x), x), g)


def _outputs(updates) -> relax.Tuple:
    """[(x_new, state_new, ...) per tensor] as the node's outputs: all X_new, then each state's."""
    return relax.Tuple([u[i] for i in range(len(updates[0])) for u in updates])


@converter("Adagrad", domain=_DOMAIN)
class Adagrad(OnnxOpConverter):
    """Adagrad: inputs R, T, X..., G..., H...; outputs X_new..., H_new..."""

    computed_outputs = range(1 << 16)  # every output: the new values and accumulated squares

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        updates = []
        for x, g, h in _groups(inputs, 3):
            # r = R / (1 + T * decay_factor)
            decay = relax.op.multiply(_scalar(inputs[1], x), _const(attr.get("decay_factor", 0.0), x))
            r = relax.op.divide(_scalar(inputs[0], x), relax.op.add(_const(1.0, x), decay))
            g_reg = _regularized(x, g, attr)
            h_new = relax.op.add(h, relax.op.multiply(g_reg, g_reg))
            h_adaptive = relax.op.add(relax.op.sqrt(h_new), _const(attr.get("epsilon", 1e-6), x))
            x_new = relax.op.subtract(x, relax.op.divide(relax.op.multiply(r, g_reg), h_adaptive))
            updates.append((x_new, h_new))
        return _outputs(updates)


@converter("Adam", domain=_DOMAIN)
class Adam(OnnxOpConverter):
    """Adam: inputs R, T, X..., G..., V..., H...; outputs X_new..., V_new..., H_new..."""

    computed_outputs = range(1 << 16)  # every output: the new values and both moments

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        alpha, beta = attr.get("alpha", 0.9), attr.get("beta", 0.999)
        updates = []
        for x, g, v, h in _groups(inputs, 4):
            one = _const(1.0, x)
            g_reg = _regularized(x, g, attr)
            v_new = relax.op.add(relax.op.multiply(_const(alpha, x), v),
                                 relax.op.multiply(_const(1 - alpha, x), g_reg))
            h_new = relax.op.add(relax.op.multiply(_const(beta, x), h),
                                 relax.op.multiply(_const(1 - beta, x), relax.op.multiply(g_reg, g_reg)))
            h_sqrt = relax.op.add(relax.op.sqrt(h_new), _const(attr.get("epsilon", 1e-6), x))
            # The bias correction R * sqrt(1 - beta^T) / (1 - alpha^T) applies from T = 1 on.
            r, t = _scalar(inputs[0], x), _scalar(inputs[1], x)
            corrected = relax.op.divide(
                relax.op.multiply(r, relax.op.sqrt(relax.op.subtract(one, relax.op.power(_const(beta, x), t)))),
                relax.op.subtract(one, relax.op.power(_const(alpha, x), t)))
            r = relax.op.where(relax.op.greater(t, _const(0.0, x)), corrected, r)
            x_new = relax.op.subtract(x, relax.op.multiply(r, relax.op.divide(v_new, h_sqrt)))
            x_final = relax.op.multiply(_const(1 - attr.get("norm_coefficient_post", 0.0), x), x_new)
            updates.append((x_final, v_new, h_new))
        return _outputs(updates)


@converter("Momentum", domain=_DOMAIN)
class Momentum(OnnxOpConverter):
    """SGD with momentum, standard or Nesterov: inputs R, T, X..., G..., V...; outputs X_new...,
    V_new..."""

    computed_outputs = range(1 << 16)  # every output: the new values and momenta

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        mode = attr["mode"].decode()
        if mode not in ("standard", "nesterov"):
            raise UserError(f"node '{node_name(attr)}': Momentum with mode '{mode}' is not lowered "
                            "(ONNX has standard and nesterov)")
        alpha = attr["alpha"]
        updates = []
        for x, g, v in _groups(inputs, 3):
            g_reg = _regularized(x, g, attr)
            # The gradient's coefficient is 1 at the first update (T = 0), beta after.
            t = _scalar(inputs[1], x)
            beta = relax.op.where(relax.op.greater(t, _const(0.0, x)), _const(attr["beta"], x), _const(1.0, x))
            v_new = relax.op.add(relax.op.multiply(_const(alpha, x), v), relax.op.multiply(beta, g_reg))
            step = v_new if mode == "standard" else relax.op.add(g_reg, relax.op.multiply(_const(alpha, x), v_new))
            x_new = relax.op.subtract(x, relax.op.multiply(_scalar(inputs[0], x), step))
            updates.append((x_new, v_new))
        return _outputs(updates)

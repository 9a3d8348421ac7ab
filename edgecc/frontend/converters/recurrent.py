"""Recurrent ops (RNN, GRU, LSTM), which TVM's importer lacks: unrolled over the sequence, whose
length is static in exported models.

The input projection of every step is one matmul over the whole sequence; each step adds the
recurrent matmul and applies the cell. With sequence_lens, a batch entry past its length keeps
its state and outputs zeros (as ONNX Runtime does); a reverse direction then starts at each
entry's own last element, since the steps past it leave the initial state as it was.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter

# name -> (alpha default, beta default, f(x, alpha, beta)); None: the activation takes no such value
_ACTIVATIONS = {
    "sigmoid": (None, None, lambda x, a, b: relax.op.sigmoid(x)),
    "tanh": (None, None, lambda x, a, b: relax.op.tanh(x)),
    "relu": (None, None, lambda x, a, b: relax.op.nn.relu(x)),
    "leakyrelu": (0.01, None, lambda x, a, b: relax.op.where(relax.op.greater(x, _c(0, x)), x,
                                                             relax.op.multiply(x, _c(a, x)))),
    "thresholdedrelu": (1.0, None, lambda x, a, b: relax.op.where(relax.op.greater(x, _c(a, x)), x,
                                                                  relax.op.zeros_like(x))),
    "scaledtanh": (1.0, 1.0, lambda x, a, b: relax.op.multiply(_c(a, x), relax.op.tanh(
        relax.op.multiply(_c(b, x), x)))),
    "hardsigmoid": (0.2, 0.5, lambda x, a, b: relax.op.clip(
        relax.op.add(relax.op.multiply(_c(a, x), x), _c(b, x)), 0, 1)),
    "elu": (1.0, None, lambda x, a, b: relax.op.where(relax.op.greater(x, _c(0, x)), x, relax.op.multiply(
        _c(a, x), relax.op.subtract(relax.op.exp(x), _c(1, x))))),
    "softsign": (None, None, lambda x, a, b: relax.op.divide(x, relax.op.add(_c(1, x), relax.op.abs(x)))),
    "softplus": (None, None, lambda x, a, b: relax.op.log(relax.op.add(relax.op.exp(x), _c(1, x)))),
    "affine": (1.0, 0.0, lambda x, a, b: relax.op.add(relax.op.multiply(_c(a, x), x), _c(b, x))),
}


def _c(value, like):
    return relax.const(value, like.ty.dtype)


def _index(x, i: int, axis: int = 0):
    """x[i] along `axis` (the axis dropped)."""
    return relax.op.squeeze(relax.op.strided_slice(x, [axis], [i], [i + 1]), [axis])


def _chunk(x, k: int, size: int):
    """The k-th block of `size` along the last axis (a gate's part of a projection)."""
    return relax.op.strided_slice(x, [x.ty.ndim - 1], [k * size], [(k + 1) * size])


class _Recurrent(OnnxOpConverter):
    """The unrolled recurrence shared by RNN, GRU and LSTM; a subclass gives its cell."""

    gates = 1                       # blocks of hidden_size in W's and R's rows
    default_activations: tuple = ()
    cell_state = False              # LSTM's C beside H (with initial_c and peepholes as inputs 6, 7)

    @classmethod
    def _cell(cls, bb, x_proj, h, c, r_t, rb, p, acts, attr):
        """(H, C) of one step, from the step's input projection (biases of W added)."""
        raise NotImplementedError

    @classmethod
    def _activations(cls, bb, attr, directions: int) -> list[list]:
        """Per direction, the cell's activation functions, with alpha and beta bound in order."""
        names = [n.decode().lower() for n in attr.get("activations", ())] or \
            list(cls.default_activations) * directions
        alphas, betas = list(attr.get("activation_alpha", ())), list(attr.get("activation_beta", ()))
        fns = []
        for name in names:
            if name not in _ACTIVATIONS or len(names) != len(cls.default_activations) * directions:
                raise UserError(f"node '{node_name(attr)}': {cls.__name__} with activations "
                                f"{[n.decode() for n in attr['activations']]} is not lowered")
            alpha, beta, fn = _ACTIVATIONS[name]
            alpha = alphas.pop(0) if alpha is not None and alphas else alpha
            beta = betas.pop(0) if beta is not None and betas else beta
            fns.append(lambda x, fn=fn, a=alpha, b=beta: fn(bb.normalize(x), a, b))
        n = len(cls.default_activations)
        return [fns[d * n:(d + 1) * n] for d in range(directions)]

    @classmethod
    def _impl_v7(cls, bb, inputs, attr, params):
        x, w, r, b, seq_lens, h0 = inputs[:6]
        c0, p = (inputs[6], inputs[7]) if cls.cell_state else (None, None)
        if attr.get("layout", 0):  # batch first: [batch, seq, ...] and [batch, directions, hidden]
            x = bb.normalize(relax.op.permute_dims(x, [1, 0, 2]))
            h0, c0 = (None if s is None else relax.op.permute_dims(s, [1, 0, 2]) for s in (h0, c0))
        steps, batch = x.ty.shape.values[:2]
        if not isinstance(steps, tvm.tirx.IntImm):
            raise UserError(f"node '{node_name(attr)}': {cls.__name__} over a sequence of symbolic length "
                            f"{steps} is not lowered (it is unrolled over a static length)")
        direction = attr.get("direction", b"forward").decode()
        reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        hidden = int(r.ty.shape.values[-1])
        acts = cls._activations(bb, attr, len(reverse))
        mask = None
        if seq_lens is not None:  # [steps, batch, 1]: step t counts for the entries longer than t
            positions = relax.const([[t] for t in range(int(steps))], seq_lens.ty.dtype)
            mask = bb.emit(relax.op.expand_dims(relax.op.less(positions, seq_lens), [2]))
        ys, hs, cs = [], [], []
        for d, backward in enumerate(reverse):
            w_d = _index(w, d)
            # W's and R's biases of every gate, added together unless the cell keeps R's apart.
            bias = relax.op.zeros((2 * cls.gates * hidden,), x.ty.dtype) if b is None else _index(b, d)
            wb, rb = (bb.emit(_chunk(bb.normalize(bias), k, cls.gates * hidden)) for k in (0, 1))
            x_proj = bb.emit(relax.op.add(relax.op.matmul(x, relax.op.permute_dims(w_d)), wb))
            r_t = bb.emit(relax.op.permute_dims(_index(r, d)))
            zeros = relax.op.zeros((batch, hidden), x.ty.dtype)
            h = bb.emit(zeros if h0 is None else _index(h0, d))
            c = bb.emit(zeros if c0 is None else _index(c0, d)) if cls.cell_state else None
            p_d = bb.emit(_index(p, d)) if p is not None else None
            y = [None] * int(steps)
            for t in (reversed(range(int(steps))) if backward else range(int(steps))):
                new_h, new_c = cls._cell(bb, bb.emit(_index(x_proj, t)), h, c, r_t, rb, p_d, acts[d], attr)
                if mask is None:
                    h, c, y[t] = new_h, new_c, new_h
                    continue
                valid = _index(mask, t)
                h = bb.emit(relax.op.where(valid, new_h, h))
                c = bb.emit(relax.op.where(valid, new_c, c)) if cls.cell_state else None
                y[t] = bb.emit(relax.op.where(valid, new_h, relax.op.zeros_like(new_h)))
            ys.append(relax.op.stack(y, 0))
            hs.append(h)
            cs.append(c)
        outputs = [relax.op.stack(ys, 1), relax.op.stack(hs, 0)] + ([relax.op.stack(cs, 0)] if cls.cell_state else [])
        if attr.get("layout", 0):
            outputs = [relax.op.permute_dims(outputs[0], [2, 0, 1, 3])] + \
                [relax.op.permute_dims(s, [1, 0, 2]) for s in outputs[1:]]
        n = attr["tvm_custom"]["num_outputs"]
        return outputs[0] if n == 1 else relax.Tuple(outputs[:n])


def _clipped(x, attr):
    """The input of an activation, clipped to [-clip, clip] when the node sets `clip`."""
    return relax.op.clip(x, -attr["clip"], attr["clip"]) if "clip" in attr else x


@converter("RNN")
class RNN(_Recurrent):
    """RNN: H = f(X W^T + H R^T + Wb + Rb)."""

    computed_outputs = (0, 1)
    gates = 1
    default_activations = ("tanh",)

    @classmethod
    def _cell(cls, bb, x_proj, h, c, r_t, rb, p, acts, attr):
        (f,) = acts
        pre = relax.op.add(relax.op.add(x_proj, relax.op.matmul(h, r_t)), rb)
        return bb.emit(f(_clipped(pre, attr))), None


@converter("GRU")
class GRU(_Recurrent):
    """GRU (gates z, r, h), with linear_before_reset."""

    computed_outputs = (0, 1)
    gates = 3
    default_activations = ("sigmoid", "tanh")

    @classmethod
    def _cell(cls, bb, x_proj, h, c, r_t, rb, p, acts, attr):
        f, g = acts
        size = int(h.ty.shape.values[-1])
        h_proj = bb.emit(relax.op.matmul(h, _chunk(r_t, 0, 2 * size)))
        z, r = (bb.emit(f(_clipped(relax.op.add(relax.op.add(_chunk(x_proj, k, size), _chunk(h_proj, k, size)),
                                                _chunk(rb, k, size)), attr))) for k in (0, 1))
        rh, rbh = _chunk(r_t, 2, size), _chunk(rb, 2, size)
        if attr.get("linear_before_reset", 0):
            recurrent = relax.op.multiply(r, relax.op.add(relax.op.matmul(h, rh), rbh))
        else:
            recurrent = relax.op.add(relax.op.matmul(relax.op.multiply(r, h), rh), rbh)
        candidate = g(_clipped(relax.op.add(_chunk(x_proj, 2, size), recurrent), attr))
        one = _c(1, x_proj)
        return bb.emit(relax.op.add(relax.op.multiply(relax.op.subtract(one, z), candidate),
                                    relax.op.multiply(z, h))), None


@converter("LSTM")
class LSTM(_Recurrent):
    """LSTM (gates i, o, f, c), with peepholes and input_forget."""

    computed_outputs = (0, 1, 2)
    gates = 4
    default_activations = ("sigmoid", "tanh", "tanh")
    cell_state = True

    @classmethod
    def _cell(cls, bb, x_proj, h, c, r_t, rb, p, acts, attr):
        f, g, act_h = acts
        size = int(h.ty.shape.values[-1])
        pre = bb.emit(relax.op.add(relax.op.add(x_proj, relax.op.matmul(h, r_t)), rb))

        def gate(k, peephole=None, state=None):
            x = _chunk(pre, k, size)
            if p is not None and peephole is not None:
                x = relax.op.add(x, relax.op.multiply(_chunk(p, peephole, size), state))
            return _clipped(x, attr)

        i = bb.emit(f(gate(0, 0, c)))
        forget = relax.op.subtract(_c(1, i), i) if attr.get("input_forget", 0) else f(gate(2, 2, c))
        new_c = bb.emit(relax.op.add(relax.op.multiply(forget, c), relax.op.multiply(i, g(gate(3)))))
        o = f(gate(1, 1, new_c))
        return bb.emit(relax.op.multiply(o, act_h(new_c))), new_c

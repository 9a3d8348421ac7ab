"""Recurrent-state ops of linear-attention and state-space models (opset 27): LinearAttention and
CausalConvWithState."""

from __future__ import annotations

import math

import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter


def _static_shape(bb, x, op: str, attr) -> list[int]:
    dims = bb.normalize(x).ty.shape.values
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        raise UserError(f"node '{node_name(attr)}': {op} is lowered with static shapes only")
    return [int(d) for d in dims]


@converter("LinearAttention")
class LinearAttention(OnnxOpConverter):
    """Linear attention over [batch, seq, heads * size] query, key and value with a
    [batch, kv_heads, key size, value size] state, as onnx's reference computes it, in float32:
    per step the state decays by exp(decay) (gated rules), the value is corrected by what the state
    already holds for the key, times beta (delta rules), the key-value outer product is added, and
    the query reads the state (kv heads repeated for grouped queries).

    The recurrence is unrolled over the (static) sequence: one step per token, so a long prefill
    makes a long graph; decoding (seq 1) is one step.
    """

    computed_outputs = (0, 1)

    @classmethod
    def _impl_v27(cls, bb, inputs, attr, params):
        query, key, value, past, decay, beta = inputs[:6]
        name = node_name(attr)
        rule = attr.get("update_rule", b"gated_delta").decode()
        if rule not in ("linear", "gated", "delta", "gated_delta"):
            raise UserError(f"node '{name}': LinearAttention update_rule '{rule}' is not lowered")
        gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
        if gated != (decay is not None) or delta != (beta is not None):
            needs = {True: "needs", False: "takes no"}
            raise UserError(f"node '{name}': LinearAttention update_rule '{rule}' {needs[gated]} decay and "
                            f"{needs[delta]} beta")
        q_heads, kv_heads = attr.get("q_num_heads"), attr.get("kv_num_heads")
        if not q_heads or not kv_heads:
            raise UserError(f"node '{name}': LinearAttention needs q_num_heads and kv_num_heads")
        batch, steps, q_hidden = _static_shape(bb, query, "LinearAttention", attr)
        key_size = q_hidden // q_heads
        value_size = _static_shape(bb, value, "LinearAttention", attr)[2] // kv_heads
        out_dtype = str(bb.normalize(query).ty.dtype)

        def heads(x, n):  # [batch, seq, n * size] -> [batch, n, seq, size], in float32
            x = relax.op.reshape(bb.normalize(relax.op.astype(x, "float32")), [batch, steps, n, -1])
            return relax.op.permute_dims(x, [0, 2, 1, 3])

        def step(x, t):  # [batch, heads, seq, size] -> [batch, heads, 1, size] at step t
            return relax.op.strided_slice(x, [2], [t], [t + 1])

        q, k, v = heads(query, q_heads), heads(key, kv_heads), heads(value, kv_heads)
        if gated:  # per-head [batch, seq, kv_heads] or per-key-feature [batch, seq, kv_heads * key size]
            decay = bb.normalize(relax.op.exp(heads(decay, kv_heads)))
        if delta:  # [batch, seq, kv_heads or 1]
            beta = bb.normalize(heads(beta, _static_shape(bb, beta, "LinearAttention", attr)[2]))
        shape = [batch, kv_heads, key_size, value_size]
        state = relax.op.zeros(shape, "float32") if past is None else relax.op.astype(past, "float32")
        scale = attr.get("scale", 0.0) or 1 / math.sqrt(key_size)
        outputs = []
        for t in range(steps):
            k_t, v_t = step(k, t), step(v, t)
            if gated:  # the decay scales the state's key rows: [batch, kv_heads, 1 or key size, 1]
                state = relax.op.multiply(state, relax.op.permute_dims(step(decay, t), [0, 1, 3, 2]))
            if delta:
                v_t = relax.op.multiply(step(beta, t), relax.op.subtract(v_t, relax.op.matmul(k_t, state)))
            written = relax.op.matmul(relax.op.permute_dims(k_t, [0, 1, 3, 2]), v_t)  # k_t outer v_t
            state = bb.normalize(relax.op.add(state, written))
            read = state if q_heads == kv_heads else relax.op.repeat(state, q_heads // kv_heads, axis=1)
            outputs.append(relax.op.matmul(step(q, t), read))
        out = relax.op.multiply(relax.op.concat(outputs, axis=2), relax.const(scale, "float32"))
        out = relax.op.reshape(relax.op.permute_dims(out, [0, 2, 1, 3]), [batch, steps, q_heads * value_size])
        state_dtype = out_dtype if past is None else str(bb.normalize(past).ty.dtype)
        return relax.Tuple([relax.op.astype(out, out_dtype), relax.op.astype(state, state_dtype)])


@converter("CausalConvWithState")
class CausalConvWithState(OnnxOpConverter):
    """Depthwise causal 1D convolution of [batch, channels, length] input with a carried state,
    as onnx's reference computes it: the input is left-padded with past_state (zeros when absent),
    convolved without padding, given the optional bias and SiLU (in float32), and the last
    kernel - 1 padded positions are the present state."""

    computed_outputs = (0, 1)

    @classmethod
    def _impl_v27(cls, bb, inputs, attr, params):
        x, weight, bias, past = inputs[:4]
        activation = attr.get("activation", b"none").decode()
        if activation not in ("none", "silu", "swish"):
            raise UserError(f"node '{node_name(attr)}': CausalConvWithState activation '{activation}' is not "
                            "lowered")
        batch, channels, length = _static_shape(bb, x, "CausalConvWithState", attr)
        kernel = _static_shape(bb, weight, "CausalConvWithState", attr)[2]
        dtype = str(bb.normalize(x).ty.dtype)
        if past is None and kernel > 1:
            past = relax.op.zeros([batch, channels, kernel - 1], dtype)
        # A kernel of 1 has an empty state: no empty constant for it, which a TVM executable
        # saves but cannot load ("Invalid DLTensor file format").
        padded = x if past is None else bb.normalize(relax.op.concat([past, x], axis=2))
        out = relax.op.nn.conv1d(padded, weight, groups=channels)
        if bias is not None:
            out = relax.op.add(out, relax.op.reshape(bias, [1, channels, 1]))
        if activation != "none":
            wide = relax.op.astype(out, "float32")
            out = relax.op.astype(relax.op.multiply(wide, relax.op.sigmoid(wide)), dtype)
        present = relax.op.strided_slice(padded, [2], [length], [length + kernel - 1])
        return relax.Tuple([out, present])

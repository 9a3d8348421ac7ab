"""ONNX's Attention op (opset 23 on)."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import node_name
from edgecc.frontend.registry import converter


@converter("Attention")
class Attention(OnnxOpConverter):
    """ONNX's Attention (opset 23-25): scaled dot-product attention over 3D or 4D Q, K, V, with
    grouped KV heads, a boolean or additive mask, bottom-right causal masking, a local window,
    softcap, a KV cache (past in, present out) or an external cache whose valid lengths per batch
    row are nonpad_kv_seqlen, and the QK product in any of its four modes (raw, softcapped, with
    the mask, softmaxed), as onnx's reference computes it (fully masked rows are 0).

    TVM's importer ignores domains and its Attention converter is ORT's contrib
    com.microsoft.Attention, whose `num_heads` attribute is required: such a node goes there.
    """

    computed_outputs = (0, 1, 2, 3)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "num_heads" in attr:
            return onnx_frontend.Attention.get_converter(1)(bb, inputs, attr, params)
        return cls._standard(bb, inputs, attr)

    @classmethod
    def _standard(cls, bb, inputs, attr):
        import numpy as np
        from onnx import helper

        q, k, v, mask, past_k, past_v, nonpad = (inputs[i] for i in range(7))
        mode = attr.get("qk_matmul_output_mode", 0)
        wants_qk = attr["tvm_custom"]["num_outputs"] > 3
        if nonpad is not None and past_k is not None:
            raise UserError(f"node '{node_name(attr)}': Attention with both nonpad_kv_seqlen and past_key "
                            "is not lowered (the spec allows one cache at a time)")
        if wants_qk and mode not in (0, 1, 2, 3):
            raise UserError(f"node '{node_name(attr)}': Attention's qk_matmul_output in mode {mode} is not "
                            "lowered (modes 0 to 3 are)")

        def shape(x) -> list[int]:
            dims = bb.normalize(x).ty.shape.values
            if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
                raise UserError(f"node '{node_name(attr)}': Attention is lowered with static shapes only")
            return [int(d) for d in dims]

        rank = len(shape(q))
        batch = shape(q)[0]

        def heads(x, n):  # [batch, seq, n * size] -> [batch, n, seq, size]
            if rank == 4:
                return x
            if n is None:
                raise UserError(f"node '{node_name(attr)}': 3D Attention needs q_num_heads and kv_num_heads")
            _, seq, hidden = shape(x)
            return relax.op.permute_dims(relax.op.reshape(x, [batch, seq, n, hidden // n]), [0, 2, 1, 3])

        q = heads(q, attr.get("q_num_heads"))
        k, v = heads(k, attr.get("kv_num_heads")), heads(v, attr.get("kv_num_heads"))
        if past_k is not None:
            k, v = relax.op.concat([past_k, k], axis=2), relax.op.concat([past_v, v], axis=2)
        present_k, present_v = k, v
        (_, q_heads, q_len, size), (_, kv_heads, kv_len, _) = shape(q), shape(k)
        if q_heads != kv_heads:
            k, v = relax.op.repeat(k, q_heads // kv_heads, axis=1), relax.op.repeat(v, q_heads // kv_heads, axis=1)
        dtype = str(bb.normalize(q).ty.dtype)

        def const(value):
            return relax.const(value, dtype)

        root_scale = const(float(np.sqrt(attr.get("scale", 1 / np.sqrt(size)))))
        scores = relax.op.matmul(relax.op.multiply(q, root_scale),
                                 relax.op.multiply(relax.op.permute_dims(k, [0, 1, 3, 2]), root_scale))
        softcap = attr.get("softcap", 0.0)
        if softcap > 0:
            scores = relax.op.multiply(relax.op.tanh(relax.op.divide(scores, const(softcap))), const(softcap))
        qk = scores  # modes 0 and 1: the product, softcapped where there is a softcap
        # Which keys each query sees, as booleans: a fully masked row is found without comparing
        # floats to -inf (the compiled code does not keep such comparisons).
        allowed = None
        if mask is not None:
            mask_shape = shape(mask)
            boolean = str(bb.normalize(mask).ty.dtype) == "bool"
            if mask_shape[-1] < kv_len:  # keys past the mask's end are masked out
                # a float32 constant cast to the mask's dtype: TVM 0.27 cannot legalize a float full
                pad = np.full(mask_shape[:-1] + [kv_len - mask_shape[-1]], False if boolean else -np.inf,
                              "bool" if boolean else "float32")
                mask = relax.op.concat([mask, relax.op.astype(relax.const(pad), str(bb.normalize(mask).ty.dtype))],
                                       axis=-1)
            if boolean:
                allowed = mask
            else:
                scores = relax.op.add(scores, mask)
        # Query i sits at position i + offset among the keys: offset is the past's length, or with
        # an external cache, per batch row, its valid length less the queries'.
        left, right = attr.get("left_window_size", -1), attr.get("right_window_size", -1)
        causal = attr.get("is_causal", 0)
        if nonpad is None:
            offset = shape(past_k)[2] if past_k is not None else 0
            distance = np.arange(q_len)[:, None] + offset - np.arange(kv_len)
            window = np.full(distance.shape, True)
            if causal:
                window &= distance >= 0
            if left >= 0:
                window &= distance <= left
            if right >= 0:
                window &= -distance <= right
            window = None if window.all() else relax.const(window)
        else:  # [batch, 1, q_len, kv_len]: the keys past a row's valid length are padding
            valid = relax.op.reshape(relax.op.astype(nonpad, "int64"), [batch, 1, 1, 1])
            distance = np.arange(q_len)[:, None] - q_len - np.arange(kv_len)
            distance = relax.op.add(relax.const(distance, "int64"), valid)
            window = relax.op.less(relax.const(np.arange(kv_len), "int64"), valid)

            def within(compare, bound):
                return relax.op.logical_and(window, compare(distance, relax.const(bound, "int64")))

            if causal:
                window = within(relax.op.greater_equal, 0)
            if left >= 0:
                window = within(relax.op.less_equal, left)
            if right >= 0:
                window = within(relax.op.greater_equal, -right)
        if window is not None:
            allowed = window if allowed is None else relax.op.logical_and(allowed, window)
        if allowed is not None:
            scores = relax.op.where(allowed, scores, const(-np.inf))
        if mode == 2:  # the product with the mask and the masked keys' -inf
            qk = scores
        precision = attr.get("softmax_precision")
        if precision:
            scores = relax.op.astype(scores, helper.tensor_dtype_to_np_dtype(precision).name)
        if allowed is None:
            weights = relax.op.nn.softmax(scores, axis=-1)
        else:  # a fully masked row gets weights 0, as onnx's reference has it, not softmax's NaN
            none = relax.op.equal(relax.op.sum(relax.op.astype(allowed, "int32"), axis=-1, keepdims=True),
                                  relax.const(0, "int32"))
            zero = relax.op.zeros_like(scores)
            weights = relax.op.where(none, zero, relax.op.nn.softmax(relax.op.where(none, zero, scores), axis=-1))
        weights = relax.op.astype(weights, dtype)
        y = relax.op.matmul(weights, v)
        if rank == 3:
            y = relax.op.reshape(relax.op.permute_dims(y, [0, 2, 1, 3]), [batch, q_len, q_heads * shape(v)[3]])
        outputs = [y, present_k, present_v, weights if mode == 3 else qk]
        return relax.Tuple(outputs[:attr["tvm_custom"]["num_outputs"]])

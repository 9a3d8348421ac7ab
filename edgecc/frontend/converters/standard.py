"""Standard ONNX ops: ones TVM 0.27's importer lacks, ones whose TVM converter computes an output
wrongly, and forms it fails on, where a one-line refusal naming the node is due."""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import axes_from, checked, constant, constant_operands, node_name
from edgecc.frontend.registry import converter


@converter("Range")
class Range(OnnxOpConverter):
    """Range with integer bounds taken from shapes keeps its length symbolic.

    `torch.arange(x.shape[1])` exports as Range(0, Gather(Shape(x), 1), 1). TVM's converter gives
    the result a fresh length variable, so positions of length `seq` no longer broadcast with
    tensors of length `seq` and every shape after them is lost. When start, limit and delta are
    integer constants or shape expressions, relax's arange states the length itself.

    Bounds read from tensor data (a window function's size input) give a length known only at
    run time. TVM's converter binds that length with a match_cast that nothing reads, and FuseOps
    may then hoist a fused kernel of that length above the match_cast (the build fails with
    "range_len_0 has not been computed"); here the positions are read through a tuple holding the
    matched shape, so every kernel of that length depends on it.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        bounds, dtypes, from_data = [], set(), False
        for value in inputs:
            value = onnx_frontend.get_constant(value, params)
            if isinstance(value, tvm.ir.GenericConst) and value.value.numpy().size == 1:
                number = value.value.numpy()
                bounds.append(int(number.item()) if number.dtype.kind in "iu" else None)
                dtypes.add(str(number.dtype))
            elif tvm.ir.is_prim_expr(value):  # a shape dimension, as Gather(Shape(x)) imports
                dtype = str(getattr(value, "dtype", None) or value.ty)
                bounds.append(value if dtype.startswith("int") else None)
                dtypes.add(dtype)
            else:
                bounds.append(None)
                from_data = True
        start, limit, delta = bounds
        if None not in bounds and isinstance(delta, int) and delta > 0 and len(dtypes) == 1:
            return relax.op.arange(start, limit, delta, dtypes.pop())
        if not from_data:
            return onnx_frontend.Range._impl_v12(bb, inputs, attr, params)
        return cls._from_data(bb, inputs, attr, params)

    @classmethod
    def _from_data(cls, bb, inputs, attr, params):
        """Range(start, limit, delta) = start + delta * [0, n), n = max(ceil((limit - start) / delta), 0),
        counted in float64 for float bounds as TVM's converter does."""
        if any(tvm.ir.is_prim_expr(onnx_frontend.get_constant(v, params)) for v in inputs):
            raise UserError(f"node '{node_name(attr)}': Range with bounds from both tensor data and shapes "
                            "is not lowered")
        dtype = str(bb.normalize(inputs[0]).ty.dtype)
        start, limit, delta = (relax.op.reshape(v, ()) for v in inputs)
        if dtype.startswith("float"):
            wide = [relax.op.astype(v, "float64") for v in (relax.op.subtract(limit, start), delta)]
            count = relax.op.astype(relax.op.ceil(relax.op.divide(*wide)), "int64")
        else:
            start_, limit_, delta_ = (relax.op.astype(v, "int64") for v in (start, limit, delta))
            count = relax.op.negative(relax.op.floor_divide(relax.op.subtract(start_, limit_), delta_))
        count = relax.op.reshape(relax.op.maximum(count, relax.const(0, "int64")), (1,))
        count = bb.match_cast(bb.normalize(count), relax.TensorType([1], "int64"))
        length = tvm.tirx.Var("range_len", "int64")
        shape = bb.match_cast(bb.emit(relax.op.tensor_to_shape(count)), relax.ShapeType([length]))
        positions = bb.emit(relax.op.arange(0, length, 1, "int64"))
        positions = bb.emit(relax.TupleGetItem(bb.emit(relax.Tuple([shape, positions])), 1))
        return relax.op.add(relax.op.multiply(relax.op.astype(positions, dtype), delta), start)


@converter("LayerNormalization")
class LayerNormalization(OnnxOpConverter):
    """LayerNormalization with its optional Mean and InvStdDev outputs, which TVM's converter
    returns as zeros. They are computed (in the stash type) only when the node has them: the
    LayerNorms of transformer exports ask for Y alone, which stays relax's fused layer_norm."""

    computed_outputs = (0, 1, 2)

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        from onnx import helper

        y = onnx_frontend.LayerNormalization._impl_v17(bb, inputs, attr, params)[0]
        if attr["tvm_custom"]["num_outputs"] == 1:
            return y
        stash = helper.tensor_dtype_to_np_dtype(attr.get("stash_type", 1)).name
        axes = axes_from(inputs[0], attr.get("axis", -1))
        x = relax.op.astype(inputs[0], stash)
        mean = relax.op.mean(x, axes, keepdims=True)
        var = relax.op.mean(relax.op.square(relax.op.subtract(x, mean)), axes, keepdims=True)
        inv_std = relax.op.rsqrt(relax.op.add(var, relax.const(attr.get("epsilon", 1e-5), stash)))
        return relax.Tuple([y, mean, inv_std])


@converter("Dropout")
class Dropout(OnnxOpConverter):
    """Inference Dropout: Y = X and a mask of ones, as bool (TVM's mask is float32)."""

    computed_outputs = (0, 1)

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        training = inputs[2] if inputs[2] is None else constant(inputs[2], params)
        if inputs[2] is not None and (training is None or training.any()):
            raise UserError(f"node '{node_name(attr)}': Dropout in training mode (random masks) is not "
                            "compiled; edgecc compiles inference graphs")
        if attr["tvm_custom"]["num_outputs"] == 1:
            return inputs[0]
        return relax.Tuple([inputs[0], relax.op.ones_like(inputs[0], "bool")])


@converter("BatchNormalization")
class BatchNormalization(OnnxOpConverter):
    """Inference BatchNormalization; training mode (batch statistics, updated running mean and
    variance) is refused: TVM's converter computes its running statistics wrongly."""

    computed_outputs = (0, 1, 2)

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        if attr.get("training_mode", 0):
            raise UserError(f"node '{node_name(attr)}': BatchNormalization with training_mode=1 is not "
                            "compiled; edgecc compiles inference graphs")
        return onnx_frontend.BatchNormalization._impl_v15(bb, inputs, attr, params)


@converter("Constant")
class Constant(OnnxOpConverter):
    """Every form of Constant: TVM's converter takes only `value`, not the scalar and list forms
    that function bodies use (value_float, value_ints, ...), and turns a string into a zero."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        import numpy as np
        from onnx import TensorProto

        for key, dtype in (("value_float", "float32"), ("value_floats", "float32"),
                           ("value_int", "int64"), ("value_ints", "int64")):
            if key in attr:
                return relax.const(np.array(attr[key], dtype), dtype)
        value = attr.get("value")
        if not isinstance(value, TensorProto) or value.data_type == TensorProto.STRING:
            raise UserError(f"node '{node_name(attr)}': a Constant of strings or a sparse Constant, which "
                            "edgecc does not compile")
        return onnx_frontend.Constant._impl_v13(bb, inputs, attr, params)


@converter("IsInf")
class IsInf(OnnxOpConverter):
    """IsInf with its detect_negative / detect_positive attributes (TVM's converter ignores them)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        x = inputs[0]
        inf, zero = relax.op.isinf(x), relax.const(0, x.ty.dtype)
        if not attr.get("detect_negative", 1):
            inf = relax.op.logical_and(inf, relax.op.greater(x, zero))
        if not attr.get("detect_positive", 1):
            inf = relax.op.logical_and(inf, relax.op.less(x, zero))
        return inf


@converter("EyeLike")
class EyeLike(OnnxOpConverter):
    """EyeLike with a `dtype` other than its input's (TVM's converter refuses one, and relax's
    eye_like keeps the input's dtype whatever it is asked: hence the cast)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        dtype = onnx_frontend.get_type(attr["dtype"]) if "dtype" in attr else inputs[0].ty.dtype
        return relax.op.astype(relax.op.eye_like(inputs[0], attr.get("k", 0)), dtype)


@converter("BitShift")
class BitShift(OnnxOpConverter):
    """BitShift; a left shift by a negative amount or by the width or more is 0, as ONNX's
    reference says (in the generated code it is undefined behaviour)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        shifted = onnx_frontend.BitShift._impl_v11(bb, inputs, attr, params)
        if attr.get("direction", b"LEFT") != b"LEFT":
            return shifted
        amount = inputs[1]
        dtype = amount.ty.dtype
        bits = int("".join(c for c in str(dtype) if c.isdigit()))
        in_range = relax.op.logical_and(relax.op.greater_equal(amount, relax.const(0, dtype)),
                                        relax.op.less(amount, relax.const(bits, dtype)))
        return relax.op.where(in_range, shifted, relax.op.zeros_like(shifted))


@converter("ConvTranspose")
class ConvTranspose(OnnxOpConverter):
    """TVM's ConvTranspose, which ignores `output_shape`: a node that sets it is refused."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if "output_shape" in attr:
            raise UserError(f"node '{node_name(attr)}': ConvTranspose with output_shape is not lowered "
                            "(TVM's converter ignores it); give pads and output_padding instead")
        return onnx_frontend.ConvTranspose._impl_v1(bb, inputs, attr, params)


@converter("RMSNormalization")
class RMSNormalization(OnnxOpConverter):
    """RMSNormalization; over every axis of its input as explicit reductions, where relax's rms_norm
    fails to legalize (it reduces to a rank-0 tensor)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v23(cls, bb, inputs, attr, params):
        from onnx import helper

        data, scale = inputs[0], inputs[1]
        if axes_from(data, attr.get("axis", -1))[0] != 0:
            return onnx_frontend.RMSNormalization._impl_v23(bb, inputs, attr, params)
        stash = helper.tensor_dtype_to_np_dtype(attr.get("stash_type", 1)).name
        x = relax.op.astype(data, stash)
        mean_square = relax.op.mean(relax.op.square(x), axes_from(data, 0), keepdims=True)
        scaled = relax.op.multiply(relax.op.multiply(x, relax.op.rsqrt(relax.op.add(
            mean_square, relax.const(attr.get("epsilon", 1e-5), stash)))), relax.op.astype(scale, stash))
        return relax.op.astype(scaled, data.ty.dtype)


@converter("Pow")
class Pow(OnnxOpConverter):
    """Pow of any base and exponent types (TVM's needs both the same float type): computed in
    float64 where either is an integer, cast back to the base's type, as ONNX's output is."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v15(cls, bb, inputs, attr, params):
        base, exponent = inputs[0], inputs[1]
        dtype = str(base.ty.dtype)
        if dtype == str(exponent.ty.dtype) and "float" in dtype:
            return onnx_frontend.Pow.get_converter(15)(bb, inputs, attr, params)
        wide = "float64"
        power = relax.op.power(relax.op.astype(base, wide), relax.op.astype(exponent, wide))
        if "int" in dtype:
            power = relax.op.round(power)
        return relax.op.astype(power, dtype)


@converter("Mod")
class Mod(OnnxOpConverter):
    """TVM's Mod, except a float Mod with fmod=0: Python's modulo, whose sign follows the divisor.

    TVM's floor_mod computes a - floor(a / b) * b, which is NaN for a finite a and an infinite b
    (ONNX: a where the signs agree, else b). Built instead on fmod, as numpy's np.mod is: a
    remainder of the dividend's sign moves by one divisor, and a zero takes the divisor's sign.
    """

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        a, b = inputs[0], inputs[1]
        dtype = str(a.ty.dtype)
        if "float" not in dtype or attr.get("fmod", 0):
            return onnx_frontend.Mod._impl_v10(bb, inputs, attr, params)
        zero = relax.const(0, dtype)
        rem = bb.normalize(relax.op.mod(a, b))
        moved = relax.op.logical_and(relax.op.not_equal(rem, zero),
                                     relax.op.logical_xor(relax.op.less(rem, zero), relax.op.less(b, zero)))
        signed_zero = relax.op.where(relax.op.less(b, zero), relax.const(-0.0, dtype), zero)
        return relax.op.where(moved, relax.op.add(rem, b),
                              relax.op.where(relax.op.equal(rem, zero), signed_zero, rem))


@converter("NonMaxSuppression")
class NonMaxSuppression(OnnxOpConverter):
    """Refused: TVM 0.27's converter selects no box at all (ONNX's node tests)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        raise UserError(f"node '{node_name(attr)}': op NonMaxSuppression cannot be lowered to TVM "
                        "(TVM 0.27's converter selects no boxes); run it on the host after the model")


@converter("RoiAlign")
class RoiAlign(OnnxOpConverter):
    """TVM's RoiAlign in mode 'avg'; mode 'max' is refused (TVM's differs from ONNX's reference)."""

    computed_outputs = (0,)

    @classmethod
    def _check(cls, attr):
        if attr.get("mode", b"avg") != b"avg":
            raise UserError(f"node '{node_name(attr)}': RoiAlign with mode 'max' is not lowered "
                            "(TVM's differs from ONNX's)")

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        cls._check(attr)
        return onnx_frontend.RoiAlign._impl_v10(bb, inputs, attr, params)

    @classmethod
    def _impl_v16(cls, bb, inputs, attr, params):
        cls._check(attr)
        return onnx_frontend.RoiAlign._impl_v16(bb, inputs, attr, params)


@converter("MaxPool")
class MaxPool(onnx_frontend.MaxPool):
    """TVM's MaxPool, which computes no Indices output: check_supported refuses a node whose
    Indices are used."""

    computed_outputs = (0,)


def _elu(bb, x, alpha: float):
    """x where x > 0, else alpha * (exp(x) - 1), in x's dtype."""
    dtype = bb.normalize(x).ty.dtype
    alpha, one, zero = (relax.const(v, dtype) for v in (alpha, 1.0, 0.0))
    negative = relax.op.multiply(alpha, relax.op.subtract(relax.op.exp(x), one))
    return relax.op.where(relax.op.greater(x, zero), x, negative)


@converter("Elu")
class Elu(OnnxOpConverter):
    """Elu in its input's dtype (TVM's converter mixes in float32 constants: float16 fails)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return _elu(bb, inputs[0], attr.get("alpha", 1.0))


@converter("Celu")
class Celu(OnnxOpConverter):
    """Celu: alpha * Elu(x / alpha), which TVM's importer lacks."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v12(cls, bb, inputs, attr, params):
        x, alpha = inputs[0], attr.get("alpha", 1.0)
        scale = relax.const(alpha, bb.normalize(x).ty.dtype)
        return relax.op.multiply(scale, _elu(bb, relax.op.divide(x, scale), 1.0))


@converter("SpaceToDepth")
class SpaceToDepth(OnnxOpConverter):
    """SpaceToDepth, with its mode CRD (column, row, depth: each channel's blocks stay together),
    which TVM's converter ignores; DCR (the default) goes to TVM's."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if attr.get("mode", b"DCR") != b"CRD":
            return onnx_frontend.SpaceToDepth.get_converter(13)(bb, inputs, attr, params)
        x, b = inputs[0], attr["blocksize"]
        n, c, h, w = bb.normalize(x).ty.shape.values
        blocks = relax.op.reshape(x, [n, c, h // b, b, w // b, b])
        return relax.op.reshape(relax.op.permute_dims(blocks, [0, 1, 3, 5, 2, 4]), [n, c * b * b, h // b, w // b])


def _refusing(op: str, unsupported: Callable) -> type:
    """TVM's converter for `op`, refusing by name the nodes where `unsupported(inputs, attr)` names
    a form it cannot lower."""
    def check(bb, inputs, attr, params):
        form = unsupported(inputs, attr)
        if form:
            raise UserError(f"node '{node_name(attr)}': {op} {form} is not lowered (TVM 0.27 has no "
                            "conversion for it)")

    return checked(op, check)


converter("OptionalHasElement")(_refusing(
    "OptionalHasElement", lambda inputs, attr: None if inputs[0] is not None else "without an input"))


# Inputs that TVM's converters take only as constants: a value computed or fed at run time is
# refused, naming the node and the input, rather than failing inside the importer. (Reductions,
# TopK, Split, OneHot and Resize check theirs in modules of their own.)
CONSTANT_OPERANDS: dict[str, dict[int, str]] = {
    "CumSum": {1: "axis"}, "Pad": {1: "pads", 2: "constant_value", 3: "axes"}, "AffineGrid": {1: "size"},
    "MaxUnpool": {2: "output_shape"},
}
for _op, _operands in CONSTANT_OPERANDS.items():
    converter(_op)(constant_operands(_op, _operands))
# TVM's Upsample also takes scales computed from shapes: only a graph input is refused.
converter("Upsample")(constant_operands("Upsample", {1: "scales"}, computed_ok=True))

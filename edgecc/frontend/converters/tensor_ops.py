"""TopK, Split, OneHot and Resize: their size operands taken as constants (a graph input is fixed with
--const), and the forms TVM's converters compute wrongly either done here or refused by name."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import check_constant_operands, constant, node_name
from edgecc.frontend.registry import converter


@converter("TopK")
class TopK(OnnxOpConverter):
    """TVM's TopK with a constant k; uint64 data, which TVM's topk kernel rejects at build time,
    is refused."""

    computed_outputs = (0, 1)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return onnx_frontend.TopK._impl_v1(bb, inputs, attr, params)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        check_constant_operands("TopK", {1: "k"}, False, bb, inputs, attr, params)
        if str(inputs[0].ty.dtype) == "uint64":
            raise UserError(f"node '{node_name(attr)}': TopK of uint64 is not lowered (TVM 0.27's topk has "
                            "no uint64 kernel)")
        return onnx_frontend.TopK._impl_v11(bb, inputs, attr, params)


@converter("Split")
class Split(OnnxOpConverter):
    """Split by given sizes as one slice per output, so a size of 0 gives an empty output (TVM's
    split takes sorted cut points and rejects a repeated one); even splits go to TVM's."""

    computed_outputs = range(1 << 16)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        if attr.get("split") is None:
            return onnx_frontend.Split._impl_v1(bb, inputs, attr, params)
        return cls._slices(inputs[0], attr.get("split"), attr.get("axis", 0))

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        sizes = check_constant_operands("Split", {1: "split"}, False, bb, inputs, attr, params)[0]
        if sizes is None or sizes.ndim == 0:
            return onnx_frontend.Split._impl_v13(bb, inputs, attr, params)
        return cls._slices(inputs[0], sizes.tolist(), attr.get("axis", 0))

    @staticmethod
    def _slices(x, sizes: list[int], axis: int):
        axis = axis + len(x.ty.shape) if axis < 0 else axis  # TVM's slice kernel takes no negative axis
        ends = np.cumsum(sizes).tolist()
        return relax.Tuple([relax.op.strided_slice(x, [axis], [end - size], [end])
                            for size, end in zip(sizes, ends)])


@converter("OneHot")
class OneHot(OnnxOpConverter):
    """OneHot with a constant depth of any numeric type (TVM's takes an int only), negative indices
    counted from depth and out-of-range ones all off, as the spec says."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v9(cls, bb, inputs, attr, params):
        depth = int(check_constant_operands("OneHot", {1: "depth"}, False, bb, inputs, attr, params)[0].item())
        indices, values = inputs[0], inputs[2]
        rank = len(indices.ty.shape) + 1
        axis = attr.get("axis", -1)
        axis = axis + rank if axis < 0 else axis
        index = relax.op.astype(indices, "int64")
        index = relax.op.where(relax.op.less(index, relax.const(0, "int64")),
                               relax.op.add(index, relax.const(depth, "int64")), index)
        classes = relax.op.reshape(relax.op.arange(0, depth, 1, "int64"),
                                   [depth if i == axis else 1 for i in range(rank)])
        hot = relax.op.equal(relax.op.expand_dims(index, axis), classes)
        off, on = (relax.op.take(values, relax.const(i, "int64"), axis=0) for i in (0, 1))
        return relax.op.where(hot, on, off)


@converter("Resize")
class Resize(OnnxOpConverter):
    """TVM's Resize, refusing the forms it computes differently from the spec: antialiasing,
    exclude_outside, half_pixel_symmetric, aspect-ratio policies, axes, align_corners onto a
    size-1 dim (TVM divides by zero), and scales that are not a ratio of whole sizes (the spec maps
    coordinates by the scale, TVM by the ratio of the sizes)."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v10(cls, bb, inputs, attr, params):
        return cls._checked(bb, [inputs[0], None, inputs[1]], attr, params)

    @classmethod
    def _impl_v11(cls, bb, inputs, attr, params):
        return cls._checked(bb, inputs, attr, params)

    @classmethod
    def _checked(cls, bb, inputs, attr, params):
        _, scales, sizes = check_constant_operands("Resize", {1: "roi", 2: "scales", 3: "sizes"}, True, bb, inputs,
                                                   attr, params)
        mode = attr.get("coordinate_transformation_mode", b"half_pixel").decode()
        form = next((what for what, unsupported in (
            ("with antialias", attr.get("antialias", 0)),
            ("with exclude_outside", attr.get("exclude_outside", 0)),
            (f"with coordinate_transformation_mode {mode}", mode == "half_pixel_symmetric"),
            ("with keep_aspect_ratio_policy", attr.get("keep_aspect_ratio_policy", b"stretch") != b"stretch"),
            ("with axes", attr.get("axes") is not None),
        ) if unsupported), None)
        dims = [getattr(d, "value", None) for d in inputs[0].ty.shape.values]
        if scales is not None and scales.size and None not in dims:
            exact = [d * s for d, s in zip(dims, scales.tolist())]
            if any(abs(e - round(e)) > 1e-6 for e in exact):
                form = form or "with scales that do not map the input onto whole sizes"
            sizes = np.floor(np.array(exact) + 1e-6)
        if mode == "align_corners" and sizes is not None and 1 in sizes.tolist()[2:]:
            form = form or "with align_corners onto a dim of size 1"
        if form:
            raise UserError(f"node '{node_name(attr)}': Resize {form} is not lowered (TVM 0.27 computes it "
                            "differently from the ONNX spec)")
        return onnx_frontend.Resize._impl_v18(bb, inputs, attr, params)


@converter("Unsqueeze")
class Unsqueeze(OnnxOpConverter):
    """TVM's Unsqueeze, with a scalar axes input (as ONNX Runtime takes it) read as one axis."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        return onnx_frontend.Unsqueeze._impl_v1(bb, inputs, attr, params)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):
        axes = constant(inputs[1], params)
        if axes is not None and axes.ndim == 0:
            inputs = [inputs[0], relax.const(axes.reshape(1))]
        return onnx_frontend.Unsqueeze._impl_v13(bb, inputs, attr, params)

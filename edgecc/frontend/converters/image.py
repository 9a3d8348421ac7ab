"""Image ops TVM's importer lacks: CenterCropPad, Col2Im and DeformConv (2-D)."""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import constant, node_name
from edgecc.frontend.registry import converter


def _constant_input(value, params, attr, op: str, what: str) -> np.ndarray:
    """A constant input's value; one fed or computed at run time is refused (with the --const that
    fixes a graph input)."""
    array = constant(value, params)
    if array is None:
        fix = f"fix it with --const {value.name}=VALUES or " if isinstance(value, relax.Var) and \
            not isinstance(value, relax.DataflowVar) else ""
        raise UserError(f"node '{node_name(attr)}': {op}'s {what} is computed at run time; edgecc compiles "
                        f"{op} only with a constant {what} ({fix}make it an initializer)")
    return array


@converter("CenterCropPad")
class CenterCropPad(OnnxOpConverter):
    """CenterCropPad: each axis cropped or zero-padded to its size around the center (the odd
    element of a crop or pad at the end), as a slice and a pad."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        x = inputs[0]
        shape = _constant_input(inputs[1], params, attr, "CenterCropPad", "shape").tolist()
        dims = [int(d) for d in x.ty.shape.values]
        axes = [a % len(dims) for a in attr.get("axes", range(len(dims)))]
        begin, end, pad = [0] * len(dims), list(dims), [0] * (2 * len(dims))
        for axis, size in zip(axes, shape):
            if size < dims[axis]:
                begin[axis] = (dims[axis] - size) // 2
                end[axis] = begin[axis] + size
            else:
                pad[2 * axis] = (size - dims[axis]) // 2
                pad[2 * axis + 1] = size - dims[axis] - pad[2 * axis]
        cropped = relax.op.strided_slice(x, list(range(len(dims))), begin, end)
        return relax.op.nn.pad(cropped, pad) if any(pad) else cropped


@converter("Col2Im")
class Col2Im(OnnxOpConverter):
    """Col2Im, the adjoint of im2col, as a grouped transposed convolution whose weights are one-hot
    per kernel position: each column block is added into the image at its kernel offset."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v18(cls, bb, inputs, attr, params):
        x = inputs[0]
        image = _constant_input(inputs[1], params, attr, "Col2Im", "image_shape").tolist()
        block = _constant_input(inputs[2], params, attr, "Col2Im", "block_shape").tolist()
        n = len(image)
        if n not in (1, 2, 3):
            raise UserError(f"node '{node_name(attr)}': Col2Im of {n} spatial dims is not lowered")
        dilations, strides = attr.get("dilations", [1] * n), attr.get("strides", [1] * n)
        pads = attr.get("pads", [0] * 2 * n)
        blocks = [(image[i] + pads[i] + pads[n + i] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1
                  for i in range(n)]
        # the rows the transposed convolution falls short of the image by (less than a stride)
        extra = [image[i] + pads[i] + pads[n + i] - ((blocks[i] - 1) * strides[i] + dilations[i] * (block[i] - 1) + 1)
                 for i in range(n)]
        batch, rows = (int(d) for d in x.ty.shape.values[:2])
        size = int(np.prod(block))
        channels = rows // size
        weight = np.tile(np.eye(size, dtype=str(x.ty.dtype)).reshape(size, 1, *block), (channels,) + (1,) * (n + 1))
        op = {1: relax.op.nn.conv1d_transpose, 2: relax.op.nn.conv2d_transpose, 3: relax.op.nn.conv3d_transpose}[n]
        layout = {1: ("NCW", "IOW"), 2: ("NCHW", "IOHW"), 3: ("NCDHW", "IODHW")}[n]
        return op(relax.op.reshape(x, [batch, rows, *blocks]), relax.const(weight), strides=strides, padding=pads,
                  output_padding=extra, dilation=dilations, groups=channels, data_layout=layout[0],
                  kernel_layout=layout[1])


@converter("DeformConv")
class DeformConv(OnnxOpConverter):
    """DeformConv (2-D): the input sampled bilinearly (zero outside, as GridSample with
    align_corners) at each kernel position moved by its offset, scaled by the mask, then
    contracted with the weights per group."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v19(cls, bb, inputs, attr, params):
        x, w, offset, bias, mask = inputs[:5]
        if x.ty.ndim != 4:
            raise UserError(f"node '{node_name(attr)}': DeformConv of {x.ty.ndim - 2} spatial dims is not lowered "
                            "(ONNX's reference has 2)")
        n, c, h, wd = (int(d) for d in x.ty.shape.values)
        oc, kh, kw = int(w.ty.shape.values[0]), *(attr.get("kernel_shape") or [int(d) for d in w.ty.shape.values[2:]])
        oh, ow = (int(d) for d in offset.ty.shape.values[2:])
        groups, offset_groups = attr.get("group", 1), attr.get("offset_group", 1)
        (sh, sw), (dh, dw) = attr.get("strides", [1, 1]), attr.get("dilations", [1, 1])
        pads = attr.get("pads", [0, 0, 0, 0])
        k, points = kh * kw, oh * ow
        dtype = str(x.ty.dtype)
        # where kernel position (i, j) of output (p, q) samples before its offset: [K, oh, 1], [K, 1, ow]
        base_y = np.array([[[-pads[0] + p * sh + i * dh] for p in range(oh)] for i in range(kh) for _ in range(kw)])
        base_x = np.array([[[-pads[1] + q * sw + j * dw for q in range(ow)]] for _ in range(kh) for j in range(kw)])
        moved = bb.emit(relax.op.reshape(offset, [n, offset_groups, k, 2, oh, ow]))
        y, xs = (bb.emit(relax.op.add(relax.const(base.astype(dtype)), relax.op.squeeze(
            relax.op.strided_slice(moved, [3], [d], [d + 1]), [3]))) for d, base in ((0, base_y), (1, base_x)))
        y0, x0 = bb.emit(relax.op.floor(y)), bb.emit(relax.op.floor(xs))
        flat = bb.emit(relax.op.reshape(x, [n, c, h * wd]))
        per_group = c // offset_groups

        def spread(v):  # [n, G, K, oh, ow] -> [n, G, c/G, K*oh*ow], each offset group's channels alike
            return relax.op.broadcast_to(relax.op.reshape(v, [n, offset_groups, 1, k * points]),
                                         [n, offset_groups, per_group, k * points])

        sampled = None
        for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            yy, xx = relax.op.add(y0, relax.const(cy, dtype)), relax.op.add(x0, relax.const(cx, dtype))
            inside = relax.op.logical_and(
                relax.op.logical_and(relax.op.greater_equal(yy, relax.const(0, dtype)),
                                     relax.op.less_equal(yy, relax.const(h - 1, dtype))),
                relax.op.logical_and(relax.op.greater_equal(xx, relax.const(0, dtype)),
                                     relax.op.less_equal(xx, relax.const(wd - 1, dtype))))
            weight_y = relax.op.subtract(y, y0) if cy else relax.op.subtract(relax.const(1, dtype), relax.op.subtract(y, y0))
            weight_x = relax.op.subtract(xs, x0) if cx else relax.op.subtract(relax.const(1, dtype), relax.op.subtract(xs, x0))
            weight = relax.op.multiply(relax.op.multiply(weight_y, weight_x), relax.op.astype(inside, dtype))
            index = relax.op.add(relax.op.multiply(relax.op.clip(yy, 0, h - 1), relax.const(wd, dtype)),
                                 relax.op.clip(xx, 0, wd - 1))
            index = relax.op.reshape(spread(relax.op.astype(index, "int64")), [n, c, k * points])
            value = relax.op.reshape(relax.op.gather_elements(flat, index, 2), [n, offset_groups, per_group, k * points])
            term = bb.emit(relax.op.multiply(value, spread(weight)))
            sampled = term if sampled is None else bb.emit(relax.op.add(sampled, term))
        if mask is not None:
            sampled = relax.op.multiply(sampled, spread(relax.op.reshape(mask, [n, offset_groups, k, oh, ow])))
        # [n, groups, c/groups * K, oh*ow] contracted with the weights [groups, oc/groups, c/groups * K]
        columns = relax.op.reshape(sampled, [n, groups, c // groups * k, points])
        kernel = relax.op.reshape(w, [groups, oc // groups, c // groups * k])
        out = relax.op.reshape(relax.op.matmul(kernel, columns), [n, oc, oh, ow])
        return out if bias is None else relax.op.add(out, relax.op.reshape(bias, [1, oc, 1, 1]))

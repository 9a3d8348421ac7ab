"""Signal processing ops: the window functions, MelWeightMatrix, DFT and STFT.

Their sizes (a window's length, a DFT's length and axis, an STFT's frame step) fix the output's
shape, so edgecc takes them only as constants; the windows and MelWeightMatrix are then constants
themselves, computed here as onnx's reference computes them. A DFT is a product with cosine and
sine matrices of the transform's length, which keeps it a matmul for the schedulers.
"""

from __future__ import annotations

import numpy as np
from onnx import helper
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from edgecc.errors import UserError
from edgecc.frontend.converters.common import check_constant_operands, node_name
from edgecc.frontend.registry import converter


def _output_dtype(attr) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(attr.get("output_datatype", 1))


class _Window(OnnxOpConverter):
    """A window of constant size, periodic (the default) or symmetric: a subclass's `window`
    (size, periodic, output dtype) computes it."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        size = int(check_constant_operands(cls.__name__, {0: "size"}, False, bb, inputs, attr, params)[0])
        dtype = _output_dtype(attr)
        return relax.const(cls.window(size, attr.get("periodic", 1) == 1, dtype).astype(dtype))


@converter("HannWindow")
class HannWindow(_Window):
    """sin^2(pi n / N'), N' = size (periodic) or size - 1 (symmetric)."""

    @staticmethod
    def window(size, periodic, dtype):
        return np.sin(np.arange(size, dtype=dtype) * np.pi / (size if periodic else size - 1)) ** 2


@converter("HammingWindow")
class HammingWindow(_Window):
    """alpha - beta cos(2 pi n / N'), alpha = 25/46, beta = 1 - alpha."""

    @staticmethod
    def window(size, periodic, dtype):
        alpha, n = 25.0 / 46.0, np.arange(size, dtype=dtype)
        return alpha - np.cos(n * np.pi * 2 / (size if periodic else size - 1)) * (1 - alpha)


@converter("BlackmanWindow")
class BlackmanWindow(_Window):
    """0.42 - 0.5 cos(2 pi n / N') + 0.08 cos(4 pi n / N'), in float64 as the reference has it."""

    @staticmethod
    def window(size, periodic, dtype):
        n, length = np.arange(size), size if periodic else size - 1
        return np.cos(n * (np.pi * 2) / length) * -0.5 + np.cos(n * (np.pi * 4) / length) * 0.08 + 0.42


@converter("MelWeightMatrix")
class MelWeightMatrix(OnnxOpConverter):
    """The [dft_length / 2 + 1, num_mel_bins] matrix of triangular mel filters, a constant."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        names = ("num_mel_bins", "dft_length", "sample_rate", "lower_edge_hertz", "upper_edge_hertz")
        bins, length, rate, low, high = check_constant_operands("MelWeightMatrix", dict(enumerate(names)), False,
                                                                bb, inputs, attr, params)
        bins, length = int(bins), int(length)
        edges = np.arange(0, bins + 2)
        low_mel, high_mel = (2595 * np.log1p(hertz / 700) / np.log(10) for hertz in (low, high))
        edges = edges * ((high_mel - low_mel) / edges.shape[0]) + low_mel
        edges = 700 * np.expm1(edges / 2595 * np.log(10))
        edges = (((length + 1) * edges) // rate).astype(int)
        out = np.zeros((length // 2 + 1, bins))
        for i in range(bins):
            left, center, right = edges[i:i + 3]
            if center == left:
                out[center, i] = 1
            else:
                out[left:center + 1, i] = (np.arange(left, center + 1) - left) / (center - left)
            if right > center:
                out[center:right, i] = (right - np.arange(center, right)) / (right - center)
        return relax.const(out.astype(_output_dtype(attr)))


def _dft(bb, x, axis: int, length: int | None, inverse: bool, onesided: bool):
    """DFT of x ([..., 1 or 2]: real, or real and imaginary parts) along `axis`, as onnx's reference
    computes it: the signal cut or zero-padded to `length`; onesided keeps bins [0, length / 2]; an
    inverse onesided transform takes those bins and gives a real signal ([..., 1]) of `length`."""
    shape = [int(d) for d in bb.normalize(x).ty.shape.values]
    rank, size = len(shape) - 1, shape[axis]
    if length is None:
        length = 2 * (size - 1) if inverse and onesided else size
    dtype = str(bb.normalize(x).ty.dtype)
    # Summed in float64, as numpy's FFT gives the reference's outputs: in float32 the outputs near
    # zero (a cancelling sum) miss them by more than the 1e-7 the node tests allow.
    wide = relax.op.astype(x, "float64")
    order = [d for d in range(rank) if d != axis] + [axis]  # the transformed axis last, for matmuls

    def part(c):  # the real (0) or imaginary (1) part, [..., size]
        if c >= shape[-1]:
            return None
        values = relax.op.squeeze(relax.op.strided_slice(wide, [rank], [c], [c + 1]), [rank])
        return relax.op.permute_dims(values, order)

    re, im = part(0), part(1)

    def product(part, matrix):
        return None if part is None else relax.op.matmul(part, relax.const(matrix, "float64"))

    def plus(a, b):
        return a if b is None else relax.op.add(a, b)

    rows = np.arange(size)[:, None]
    if inverse and onesided:
        # irfft: bins past 0 and length / 2 stand for their conjugates too; those two are real
        # (their imaginary parts are ignored, as numpy's irfft does)
        kept = rows < length // 2 + 1
        edge = (rows == 0) | (2 * rows == length)
        angle = 2 * np.pi * rows * np.arange(length) / length
        cos = np.where(edge, 1, 2) * np.cos(angle) * kept / length
        sin = np.where(edge, 0, 2) * np.sin(angle) * kept / length
        result = [plus(product(re, cos), product(im, -sin))]
    else:
        bins = length // 2 + 1 if onesided else length
        angle = 2 * np.pi * rows * np.arange(bins) / length
        cos, sin = np.cos(angle) * (rows < length), np.sin(angle) * (rows < length)
        if inverse:  # e^{+i angle} / length; forward: e^{-i angle}
            cos, sin = cos / length, -sin / length
        imag = product(re, -sin) if im is None else relax.op.subtract(product(im, cos), product(re, sin))
        result = [plus(product(re, cos), product(im, sin)), imag]
    stacked = relax.op.astype(relax.op.stack(result, axis=-1), dtype)
    return relax.op.permute_dims(stacked, [int(d) for d in np.argsort(order)] + [rank])


@converter("DFT")
class DFT(OnnxOpConverter):
    """DFT with a constant dft_length (and, from opset 20, a constant axis)."""

    computed_outputs = (0,)

    @classmethod
    def _transform(cls, bb, inputs, attr, params, axis):
        x = inputs[0]
        rank = len(bb.normalize(x).ty.shape)
        length = check_constant_operands("DFT", {1: "dft_length"}, False, bb, inputs, attr, params)[0]
        axis = int(axis) + rank if int(axis) < 0 else int(axis)
        if not 0 <= axis < rank - 1:
            raise UserError(f"node '{node_name(attr)}': DFT axis {axis} is not a signal axis of a "
                            f"rank-{rank} input")
        return _dft(bb, x, axis, None if length is None else int(length), bool(attr.get("inverse", 0)),
                    bool(attr.get("onesided", 0)))

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        return cls._transform(bb, inputs, attr, params, attr.get("axis", 1))

    @classmethod
    def _impl_v20(cls, bb, inputs, attr, params):
        axis = check_constant_operands("DFT", {2: "axis"}, False, bb, inputs, attr, params)[0]
        return cls._transform(bb, inputs, attr, params, -2 if axis is None else axis)


@converter("STFT")
class STFT(OnnxOpConverter):
    """STFT with a constant frame_step and frame_length: frames gathered by constant indices, each
    weighted by the window and transformed by _dft."""

    computed_outputs = (0,)

    @classmethod
    def _impl_v17(cls, bb, inputs, attr, params):
        signal, window = inputs[0], inputs[2]
        operands = {1: "frame_step", 3: "frame_length"}
        step, length = check_constant_operands("STFT", operands, False, bb, inputs, attr, params)
        step = int(step)
        _, samples, _ = (int(d) for d in bb.normalize(signal).ty.shape.values)
        width = int(bb.normalize(window).ty.shape.values[0]) if window is not None else None
        length = int(length) if length is not None else width or samples
        width = width or length
        frames = 1 + (samples - length) // step
        # A frame wider than what is left of the signal is zero-padded, as the reference does.
        end = (frames - 1) * step + width
        if end > samples:
            signal = relax.op.nn.pad(signal, [0, 0, 0, end - samples, 0, 0])
        starts = np.arange(frames)[:, None] * step + np.arange(width)
        framed = relax.op.take(signal, relax.const(starts.astype("int64")), axis=1)
        if window is not None:
            framed = relax.op.multiply(framed, relax.op.reshape(window, [width, 1]))
        return _dft(bb, framed, 2, length, False, bool(attr.get("onesided", 1)))

"""Helpers shared by edgecc's converters."""

from __future__ import annotations

import tvm
from tvm.relax.frontend.onnx import onnx_frontend


def axes_from(data, axis: int) -> list[int]:
    """The axes from `axis` (negative counts from the end) to the last of `data`."""
    ndim = len(data.ty.shape)
    axis = axis + ndim if axis < 0 else axis
    return list(range(axis, ndim))


def node_name(attr) -> str:
    """The converted node's name, for refusals."""
    return attr["tvm_custom"]["name"] or "<unnamed>"


def constant(value, params):
    """The value of a constant input as a numpy array; None when it is not a constant."""
    value = onnx_frontend.get_constant(value, params)
    return value.value.numpy() if isinstance(value, tvm.ir.GenericConst) else None

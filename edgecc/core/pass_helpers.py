"""What passes match on, defined once so that every pass means the same by it.

A constant is a value held by an initializer or a Constant node that is not also a graph input:
a caller can override an input at run time, so an initializer listed as one is not constant.
A weight is a constant matrix; a linear layer's Gemm is the form `fuse` emits (alpha = beta = 1,
no transA). A check that fails in a hand-written pass raises `Rejected`, whose message says why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecc.core.ir import ALIGN


class Rejected(Exception):
    """A check failed; the message says why (passes report it in their stats)."""


def node_name(node: ir.Node) -> str:
    """The node's name, or its first output's when it has none."""
    return node.name or node.outputs[0].name


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array whose data starts on an ALIGN-byte boundary. A pass's new weight made
    here reaches TVM as its own memory; numpy's allocations are 16-byte aligned, which TVM must copy
    (edgecc.frontend.lower)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind `value` (initializer or Constant node), unless a caller can override it."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    attr = next(iter(node.attributes.values()), None)
    if attr is None:
        return None
    if attr.name == "value":
        return attr.value.numpy()
    if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
        return np.array(attr.value)
    return None


def constant_matrix(value: ir.Value | None, dtype: type | None = np.float32) -> np.ndarray | None:
    """The constant 2-D weight behind `value` when its element type is `dtype` (None: any float)."""
    w = constant_array(value)
    if w is None or w.ndim != 2:
        return None
    return w if (w.dtype == dtype if dtype is not None else w.dtype.kind == "f") else None


def gemm_refusal(node: ir.Node) -> str | None:
    """Why a Gemm is not y = x @ W (+ b) as `fuse` emits it; None when it is. transB is the
    caller's to read: W is then [N, K]."""
    attrs = node.attributes
    if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
        return "Gemm with alpha or beta != 1"
    if attrs.get_int("transA", 0):
        return "Gemm with transA"
    return None


def matmul_activations(model: ir.Model) -> list[str]:
    """Names of the inputs of MatMul and Gemm nodes with a constant float32 weight: the
    activations a quantizer calibrates."""
    return sorted({n.inputs[0].name for n in model.graph if n.op_type in ("MatMul", "Gemm")
                   and n.inputs[0] is not None and constant_matrix(n.inputs[1]) is not None})


RIDGE = 1e-2  # a refit's damping, relative to the mean diagonal of its normal equations


def ridge_refit(gram: np.ndarray, kept: np.ndarray, target: np.ndarray) -> np.ndarray:
    """V = argmin ||X[:, kept] V - X W||^2, damped by RIDGE x the mean diagonal of the normal
    equations, from gram = X^T X and target = X^T X W (float64): the weights a pruned layer keeps,
    refit to make up what the removed ones did, as far as the kept inputs predict it."""
    a = gram[np.ix_(kept, kept)]
    a[np.diag_indices_from(a)] += RIDGE * max(float(np.mean(np.diag(a))), np.finfo(np.float64).tiny)
    return np.linalg.solve(a, target[kept])


def output_error(gram: np.ndarray, approx: np.ndarray, w: np.ndarray) -> float:
    """||X V - X W|| / ||X W|| from gram = X^T X: how far a changed weight V moves the output."""
    diff = approx.astype(np.float64) - w
    num = float(np.sum(diff * (gram @ diff)))
    den = max(float(np.sum(w * (gram @ w))), np.finfo(np.float64).tiny)
    return float(np.sqrt(max(num, 0.0) / den))

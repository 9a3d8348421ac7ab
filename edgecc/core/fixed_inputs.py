"""Graph inputs fixed to constants at compile time (`edgecc compile --const NAME=VALUES`).

Some models take as graph inputs what the compiled code must know: the axes of a reduction, the
k of a TopK, the sizes of a Resize, the pads of a Pad, a Reshape's target shape. ONNX Runtime
reads them at run time; a compiler that specializes kernels cannot. Fixing such an input makes
it an initializer before any pass runs, so simplification folds it and the converters see a
constant, as XLA's compile-time constants or TensorRT's shape tensors work.

The artifact no longer takes the input, but still accepts it so that the feeds of ONNX Runtime
work unchanged: the manifest records the fixed value (`constants`), and a fed value that differs
is refused at run time rather than silently ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgecc.errors import UserError

if TYPE_CHECKING:
    import onnx_ir as ir


def parse(items: list[str] | None) -> dict[str, list[float]]:
    """`NAME=V,V,...` items (an empty list after `=` is an empty tensor) as {name: values}."""
    fixed: dict[str, list[float]] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UserError(f"--const {item}: expected NAME=VALUE[,VALUE...]")
        try:
            fixed[name] = [float(v) for v in text.split(",")] if text.strip() else []
        except ValueError:
            raise UserError(f"--const {item}: values must be numbers separated by commas") from None
    return fixed


def fix(model: ir.Model, values: dict[str, Any], source: str) -> tuple[ir.Model, dict]:
    """`model` with the named graph inputs turned into initializers holding `values` (in place),
    and the manifest's record of them ({name: {dtype, shape, value}})."""
    import onnx_ir as ir  # here: a device checks fixed inputs (`check`) without onnx

    if not values:
        return model, {}
    inputs = {v.name: v for v in model.graph.inputs}
    initialized = set(model.graph.initializers)
    records: dict[str, dict] = {}
    for name, given in values.items():
        if name not in inputs or name in initialized:
            names = ", ".join(n for n in inputs if n not in initialized) or "none"
            raise UserError(f"--const {name}: {source} has no graph input of that name (its inputs: {names})")
        value = inputs[name]
        array = _typed(name, ir.to_proto(value).type.tensor_type, given)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(array, name=name)
        model.graph.register_initializer(value)
        records[name] = {"dtype": array.dtype.name, "shape": list(array.shape), "value": array.ravel().tolist()}
    return model, records


def _typed(name: str, tensor_type, given: Any) -> np.ndarray:
    """`given` as an array of the input's element type and declared shape, exactly."""
    import onnx

    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    except (KeyError, ValueError):
        dtype = None
    floating = dtype is not None and (dtype.kind == "f" or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"))
    if dtype is None or not (floating or dtype.kind in "biu"):
        raise UserError(f"--const {name}: the input is not a numeric tensor")
    values = np.asarray(given, dtype=np.float64 if floating else object)
    array = values.astype(dtype)
    if not floating and not np.array_equal(array.astype(np.float64), np.asarray(given, np.float64)):
        raise UserError(f"--const {name}: {np.asarray(given).ravel().tolist()} are not all {dtype.name} values")
    if not tensor_type.HasField("shape"):
        return array
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if None not in dims:
        if array.size != int(np.prod(dims, dtype=np.int64)):
            raise UserError(f"--const {name}: {array.size} values for an input of shape {dims}")
        return array.reshape(dims)
    if len(dims) == 1:  # a vector of unstated length takes the values given
        return array.reshape(-1)
    raise UserError(f"--const {name}: the input's shape {['?' if d is None else d for d in dims]} is not "
                    "static; only vectors and static shapes can be fixed")


def check(records: dict[str, dict], name: str, fed: Any) -> None:
    """A value fed for a fixed input must be the value it was fixed to."""
    fixed = records[name]
    fed = np.asarray(fed.numpy() if hasattr(fed, "numpy") else fed)
    if (fed.dtype.name != fixed["dtype"] or list(fed.shape) != fixed["shape"]
            or fed.ravel().tolist() != fixed["value"]):
        raise UserError(f"input '{name}' was fixed to {fixed['value']} ({fixed['dtype']}, shape {fixed['shape']}) "
                        f"when the artifact was compiled (--const); got {fed.ravel().tolist()[:16]} "
                        f"({fed.dtype.name}, shape {list(fed.shape)}): recompile with the new value")

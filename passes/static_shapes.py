"""static-shapes: every input dim a number, batch 1, so TFLite and the Edge TPU get static tensors.

The Edge TPU runs only static shapes and edgecc compiles it for batch 1 (dim 0 of every input is
the batch). A symbolic dim takes its size from `--shape NAME=N` or `--dim NAME=N`, else from the
calibration data (its arrays are batches of the model's inputs, so their other dims are the sizes
the model will see), and a symbolic dim 0 becomes 1. A dim with no size, or a batch > 1, is an error
naming the input and the dim. Every other value's shape is then inferred again from the inputs, and
`simplify` after this pass folds the shape arithmetic of the export into constants.
"""

from __future__ import annotations

import onnx_ir as ir

from edgecc.core.ir import infer_shapes
from edgecc.core.pass_base import Pass, PassContext, PassResult, register_pass
from edgecc.errors import UserError


def _size(value: ir.Value, axis: int, dim: ir.SymbolicDim, ctx: PassContext) -> int:
    name = dim.value
    if name is not None and name in ctx.dim_values:
        return ctx.dim_values[name]
    if axis == 0:
        return 1
    data = (ctx.calibration or {}).get(value.name)
    if data is not None and data.ndim == len(value.shape):
        return int(data.shape[axis])
    raise UserError(
        f"input '{value.name}': dim {axis} ('{name or '?'}') is symbolic and the Edge TPU "
        f"needs static shapes; give its size with --shape {name or 'NAME'}=N or --calibration"
    )


@register_pass
class StaticShapes(Pass):
    name = "static-shapes"
    description = "fix every symbolic input dim (batch -> 1, others from --shape/--dim or calibration data)"
    provides = ("static-shapes",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        fixed: dict[str, list[int]] = {}
        for value in model.graph.inputs:
            if value.shape is None:
                raise UserError(f"input '{value.name}' has no shape; the Edge TPU needs static shapes")
            dims = [d if isinstance(d, int) else _size(value, i, d, ctx) for i, d in enumerate(value.shape)]
            if dims and dims[0] > 1:
                raise UserError(
                    f"input '{value.name}' has batch {dims[0]} (dim 0): the Edge TPU target "
                    "compiles batch 1; export with batch 1 or a symbolic batch dim"
                )
            if any(not isinstance(d, int) for d in value.shape):
                fixed[value.name] = dims
            value.shape = ir.Shape(dims)
        if not fixed:
            return PassResult(model, False, {"inputs_fixed": 0})
        # Shapes inferred from the symbolic inputs are stale: infer every one again.
        for node in model.graph:
            for out in node.outputs:
                out.shape = None
        # ONNX's inference leaves some dims the export computes with Shape ops unknown; simplify
        # folds those, and the exporter refuses any value still dynamic after the pipeline.
        model = infer_shapes(model)
        return PassResult(
            model,
            True,
            {"inputs_fixed": len(fixed), "shapes": "; ".join(f"{k} {v}" for k, v in fixed.items())},
        )

"""pack-weights: the target's weight layout for the compressed-weight kernels.

Runs after a pass that compresses weights (quantize-int8, quantize-int4, block-sparsity); the
pass manager refuses it anywhere else. The ONNX graph keeps its standard ops and values, so
ONNX Runtime still runs it as the reference; the layout is recorded on each node
(a KernelMark: int8 with its tile) and the lowering stores the weights in it.

  int8 (MatMulInteger, int8 [K, N] weight): panels of `tile` output columns, int8
       [N/tile, K, tile], pre-transposed so each panel is one contiguous stream and the
       kernel keeps `tile` int32 accumulators in vector registers. `tile=0` takes the
       target's width (edgecc.kernels.int8.panel_width: four int32 vectors on CPUs, 1 — plain
       pre-transposition — on GPUs, whose GEMV rules want a contiguous reduction). On a target
       with int8 dot products (AVX-512 VNNI, Arm dotprod) it is marked `int8_dot` with the
       instruction set: the lowering gives the panels four k per column
       ([N/tile, K/4, tile, 4], edgecc.kernels.int8_dot) and computes the product with its
       rescale (quantize-int8's Cast and two Muls) in one kernel.
  int4 (MatMulNBits): already nibble-packed and pre-transposed, [N, K/2] bytes, which is
       the layout the int4 kernels read; left as it is and counted. A node with
       accuracy_level 4 (int8 activations allowed) on a target with int8 dot products
       (AVX-512 VNNI, Arm dotprod) is marked `int4_dot` with the instruction set: the
       lowering stores its nibbles in 16-output tiles for edgecc.kernels.int4_dot, which
       multiplies them with int8 activations.
  int8 columns (a Gather, axis 1, of a packed int8 weight: quantize-embeddings' lookup of a tied
       embedding table): marked `int8_columns` with the same tile, so it reads the panels.
  BSR (nodes block-sparsity marked): stored as block columns by construction; counted.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecc.core.kernel_mark import KernelMark
from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_matrix
from edgecc.kernels import int4_dot, int8_dot
from edgecc.kernels.int8 import panel_width

NO_TARGET_TILE = 32  # without a target (a target-independent run): AVX2's four int32 vectors


def _int8_weight(node: ir.Node) -> np.ndarray | None:
    """The constant int8 [K, N] weight of a MatMulInteger edgecc's int8 kernel can take."""
    if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx"):
        return None
    if any(v is not None for v in node.inputs[2:]):
        return None  # zero points: TVM's own conversion handles those
    x, weight = node.inputs[0], constant_matrix(node.inputs[1], np.int8)
    return weight if x is not None and x.dtype == ir.DataType.INT8 else None


def _int4_dot(node: ir.Node, ctx: PassContext) -> str | None:
    """The dot-product ISA a MatMulNBits that may run on int8 activations gets, if the target
    has one the int4_dot kernel uses and the shape fits it."""
    attrs = node.attributes
    if attrs.get_int("accuracy_level", 0) != 4 or ctx.target is None or ctx.target.device_kind != "llvm":
        return None
    K, N, block = (attrs[k].as_int() for k in ("K", "N", "block_size"))
    return int4_dot.isa(ctx.target.tvm_target()) if int4_dot.fits(K, N, block) else None


def _int8_dot(weight: np.ndarray, tile: int, ctx: PassContext) -> str | None:
    """The dot-product ISA an int8 MatMulInteger gets, if the target has one and the shape fits."""
    if ctx.target is None or ctx.target.device_kind != "llvm":
        return None
    isa = int4_dot.isa(ctx.target.tvm_target())
    return isa if isa and int8_dot.fits(weight.shape[0], tile, isa) else None


def _target_tile(ctx: PassContext) -> tuple[int, str]:
    if ctx.target is None:
        return NO_TARGET_TILE, "no target given"
    tile = panel_width(ctx.target.tvm_target())
    return tile, f"target {ctx.target.name}"


@register_pass
class PackWeights(Pass):
    name = "pack-weights"
    description = ("target-aware weight layout for the int8/int4/BSR kernels: int8 panels of the "
                   "target's vector width, pre-transposed")
    options = (
        Option("tile", int, 0, "int8 output columns per panel (0: the target's vector width; "
               "1: pre-transposed only)", low=0, high=256),
    )
    requires = ("compressed-weights",)
    needs_shapes = True  # the dtype check needs the types quantize-int8's casts made

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        tile, source = (self.opts["tile"], "tile option") if self.opts["tile"] else _target_tile(ctx)
        int8 = int4 = dot = dot8 = bsr = 0
        packed_bytes = 0
        for node in model.graph:  # the lowering routes top-level nodes
            weight = _int8_weight(node)
            if weight is not None:
                isa = _int8_dot(weight, tile, ctx)
                (KernelMark("int8_dot", tile=tile, isa=isa) if isa else KernelMark("int8", tile=tile)).write(node)
                int8 += 1
                dot8 += bool(isa)
                packed_bytes += weight.shape[0] * -(-weight.shape[1] // tile) * tile
            elif node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
                int4 += 1
                isa = _int4_dot(node, ctx)
                if isa:
                    KernelMark("int4_dot", isa=isa).write(node)
                    dot += 1
            elif (mark := KernelMark.read(node)) is not None and mark.kernel == "bsr":
                bsr += 1
        # A lookup of a packed weight's columns (a tied embedding) reads the same panels.
        columns = 0
        packed = {n.inputs[1] for n in model.graph if (m := KernelMark.read(n)) and m.kernel in ("int8", "int8_dot")}
        for node in model.graph:
            if node.op_type == "Gather" and node.inputs[0] in packed and node.attributes.get_int("axis", 0) == 1:
                KernelMark("int8_columns", tile=tile).write(node)
                columns += 1
        stats = {"int8_packed": int8, "int8_dot": dot8, "int8_column_lookups": columns, "tile": tile, "tile_from": source, "int8_packed_bytes": packed_bytes,
                 "int4_nibble_packed": int4, "int4_int8_dot": dot, "bsr": bsr}
        return PassResult(model, int8 + dot + columns > 0, stats)

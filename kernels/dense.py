"""fp32 matmul against a constant weight, for rows TVM cannot tune: a symbolic M.

MetaSchedule tunes only static shapes, and TVM's default CPU code for a matmul is a naive
single-threaded loop (SmolLM2-135M decoding: 1.5 tokens/s). A causal LM compiled once for
prefill and decode has a symbolic sequence length, so on CPU targets every `matmul(x, W)` with a
constant 2-D fp32 W and symbolic rows comes here instead: W is stored in panels of `tile`
columns ([ceil(N/t), K, t], kernels.int8.pack_panels) and the kernel is int8's CPU schedule,
parallel over panels, the t accumulators vectorized, each panel streamed once per call. Static
shapes keep TVM's path, where tuning records apply.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

import numpy as np

from edgecc.kernels.common import rewrite_functions
from edgecc.kernels.int8 import over_rows, pack_panels, panel_width, schedule_panels_cpu, unscheduled_kernels

KERNEL_ATTR = "edgecc.dense_tile"  # func attr marking the PrimFuncs `schedule` owns


def _dense_te(x, w, tile: int, K: int):
    from tvm import te

    k = te.reduce_axis((0, K), "k")
    return te.compute((x.shape[0], w.shape[0] * tile),
                      lambda m, n: te.sum(x[m, k] * w[n // tile, k, n % tile], axis=k), name="dense")


def emit_dense(bb, x, weight: np.ndarray, tile: int):
    """Emit fp32 x [..., K] @ weight [K, N] (numpy, packed here) into `bb`; leading dims may be symbolic."""
    from tvm import relax

    K, N = weight.shape
    packed = relax.const(pack_panels(weight, tile))

    def emit(rows):
        y = bb.emit_te(_dense_te, rows, packed, tile, K, primfunc_name_hint="dense",
                       primfunc_attrs={KERNEL_ATTR: tile, "op_pattern": 8})  # 8: kOpaque, kept whole
        if N % tile == 0:
            return y
        return bb.normalize(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))  # padded panels

    return over_rows(bb, x, K, N, emit)


def route_symbolic_matmuls(mod, target):
    """Every fp32 `matmul(x, constant W [K, N])` whose rows are symbolic becomes the dense kernel
    (CPU targets; `mod` before the "zero" pipeline). Returns the module and how many it routed."""
    import tvm
    from tvm import relax, tirx

    tile = panel_width(target)
    routed = 0

    @relax.expr_functor.mutator
    class Route(relax.PyExprMutator):
        def visit_call_(self, call):
            nonlocal routed
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.matmul" or len(call.args) != 2:
                return call
            x, w = call.args
            shape = getattr(x.ty, "shape", None)
            if (not isinstance(w, tvm.ir.Constant) or len(w.ty.shape) != 2 or str(w.ty.dtype) != "float32"
                    or str(x.ty.dtype) != "float32" or not isinstance(shape, relax.ShapeExpr)
                    or len(shape.values) < 2 or all(isinstance(d, tirx.IntImm) for d in shape.values[:-1])):
                return call
            routed += 1
            return emit_dense(self.builder_, x, w.value.numpy(), tile)

    routed_mod = rewrite_functions(mod, Route)
    return relax.transform.DeadCodeElimination()(routed_mod), routed


def schedule(mod, target):
    """Schedule the dense kernels in `mod` (after the "zero" pipeline) for a CPU `target`."""
    from tvm.s_tir import Schedule

    mod = mod.clone()
    for gv, func in unscheduled_kernels(mod, KERNEL_ATTR):
        sch = Schedule(func)
        schedule_panels_cpu(sch, sch.get_sblock("dense"), int(func.attrs[KERNEL_ATTR]))
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64)

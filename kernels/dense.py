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


def emit_dense(bb, x, panels, K: int, N: int, tile: int):
    """Emit fp32 x [..., K] @ W [K, N] into `bb`, W given as its `panels` (pack_panels' layout, a
    constant or a parameter); leading dims may be symbolic."""
    from tvm import relax

    def emit(rows):
        y = bb.emit_te(_dense_te, rows, panels, tile, K, primfunc_name_hint="dense",
                       primfunc_attrs={KERNEL_ATTR: tile, "op_pattern": 8})  # 8: kOpaque, kept whole
        if N % tile == 0:
            return y
        return bb.normalize(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))  # padded panels

    return over_rows(bb, x, K, N, emit)


def route_symbolic_matmuls(mod, target, weights: list | None = None):
    """Every fp32 `matmul(x, W [K, N])` whose rows are symbolic and whose W is a constant becomes
    the dense kernel (CPU targets; `mod` before the "zero" pipeline). Returns the module and how
    many it routed.

    `weights`: the values of `main`'s trailing parameters, lifted from its constants by
    edgecc.runtime.weights.lift. A W among them is routed too: its parameter becomes one holding
    the panels, and its entry a function that packs them from the original when the weight file
    is written, so the packed copy of every weight is never held at once. (A W that something
    else still reads keeps its parameter; the panels are appended.)
    """
    import tvm
    from tvm import relax, tirx

    tile = panel_width(target)
    routed = 0
    weights = weights if weights is not None else []
    params = list(mod["main"].params)[-len(weights):] if weights else []
    lifted = {p.name: (i, p) for i, p in enumerate(params)}  # parameter name -> (index in `weights`, it)
    panels: dict[str, relax.Var] = {}  # lifted parameter -> the parameter of its panels

    @relax.expr_functor.mutator
    class Route(relax.PyExprMutator):
        def visit_call_(self, call):
            nonlocal routed
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.matmul" or len(call.args) != 2:
                return call
            x, w = call.args
            constant = isinstance(w, tvm.ir.Constant)
            param = isinstance(w, relax.Var) and w.name in lifted and w.same_as(lifted[w.name][1])
            shape = getattr(x.ty, "shape", None)
            if (not (constant or param) or len(w.ty.shape) != 2 or str(w.ty.dtype) != "float32"
                    or str(x.ty.dtype) != "float32" or not isinstance(shape, relax.ShapeExpr)
                    or len(shape.values) < 2 or all(isinstance(d, tirx.IntImm) for d in shape.values[:-1])):
                return call
            routed += 1
            K, N = (int(d) for d in w.ty.shape)
            if constant:
                return emit_dense(self.builder_, x, relax.const(pack_panels(w.value.numpy(), tile)), K, N, tile)
            if w.name not in panels:
                panels[w.name] = relax.Var(f"{w.name}_panels", relax.TensorType((-(-N // tile), K, tile), "float32"))
            return emit_dense(self.builder_, x, panels[w.name], K, N, tile)

    routed_mod = rewrite_functions(mod, Route)
    if panels:
        routed_mod = _panel_params(routed_mod, weights, lifted, panels, tile)
    return relax.transform.DeadCodeElimination()(routed_mod), routed


def _panel_params(mod, weights: list, lifted: dict, panels: dict, tile: int):
    """`main` with each routed weight's parameter replaced by (or, still read elsewhere, followed by)
    its panels' parameter, and `weights` entries to match."""
    import functools

    from tvm import relax

    main = mod["main"]
    still_read = {v.name for v in relax.analysis.free_vars(main.body)}
    params, first = list(main.params), len(main.params) - len(weights)
    for name, var in panels.items():
        i, _ = lifted[name]
        pack = functools.partial(pack_panels, weights[i], tile)
        if name in still_read:
            params.append(var)
            weights.append(pack)
        else:
            params[first + i] = var
            weights[i] = pack
    out = mod.clone()
    out["main"] = relax.Function(params, main.body, main.ret_ty, main.is_pure, main.attrs, main.span)
    return out


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

"""fp32 matmul against a constant weight, for rows TVM cannot tune: a symbolic M.

MetaSchedule tunes only static shapes, and TVM's default CPU code for a matmul is a naive
single-threaded loop (SmolLM2-135M decoding: 1.5 tokens/s). A causal LM compiled once for
prefill and decode has a symbolic sequence length, so on CPU targets every `matmul(x, W)` with a
constant 2-D fp32 W and symbolic rows comes here instead: W is stored in panels of `tile`
columns ([ceil(N/t), K, t], kernels.int8.pack_panels), and the kernel, parallel over panels,
computes a block of `rows` rows by `tile` columns in registers at a time: per k it loads the
panel's `tile` weights once and multiplies them by each row's x[r, k], so a prompt's rows share
every weight load (row-blocked, the micro-kernel of BLAS libraries). Rows past the last whole
block, and a decode step's single row, go one at a time, each panel streamed once. On a 2-core
AVX-512 host (AMD EPYC) a [128, 576] x [576, 1536] product runs at about 225 GFLOP/s, as fast as
ONNX Runtime's MLAS (benchmarks/gemm.py), and ran at 73 when the accumulators sat in a heap
workspace (rows_for). Static shapes keep TVM's path, where tuning records apply.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

import numpy as np
from edgecc.kernels.common import rewrite_functions
from edgecc.kernels.int8 import over_rows, pack_panels, panel_width

KERNEL_ATTR = "edgecc.dense_tile"  # func attr marking the PrimFuncs `schedule` owns
STACK_BYTES = 1024  # TVM puts a constant-size buffer under this on the stack (runtime::kMaxStackAlloca)


def vector_bits(target) -> int:
    """The width of `target`'s vector registers, in bits."""
    from tvm.target import codegen

    with target:
        return codegen.llvm_get_vector_width(target)


def dense_tile(target) -> int:
    """Columns per panel. On AVX-512, two vectors (32), so 7 rows a block (block_rows): 9
    panels of 64 split unevenly over threads where N is 576, and 3 rows of 64 reload the panel
    more often; SmolLM2-135M's 128-token prefill ran 5% faster, its decode 5% (2 threads, AMD
    EPYC). Elsewhere pack-weights' four vectors (kernels.int8.panel_width), not measured
    against two."""
    tile = panel_width(target)
    return tile // 2 if vector_bits(target) >= 512 else tile


def block_rows(target, tile: int) -> int:
    """Rows a block computes at once on `target`, `tile` columns wide (rows_for)."""
    lanes = vector_bits(target) // 32
    arm = "aarch64" in str(target.attrs.get("mtriple", ""))
    return rows_for(32 if lanes >= 16 or arm else 16, -(-tile // lanes), tile)


def rows_for(registers: int, vectors: int, tile: int) -> int:
    """Rows whose accumulators, `vectors` registers a row, take at most half of `registers`
    vector registers (32 on AVX-512 and Arm, 16 on AVX2), leaving the panel's vectors and the
    broadcasts room; and fit a stack buffer (under STACK_BYTES), which LLVM keeps in registers: a
    larger one is a heap workspace whose every update goes through memory (on AVX-512, 4 rows of
    64 fp32 accumulators ran at 73 GFLOP/s, 3 rows at 150)."""
    return max(1, min(registers // 2 // vectors, (STACK_BYTES - 1) // (4 * tile)))


def dense_primfunc(K: int, panels: int, tile: int, rows: int):
    """x [m, K] @ the panels [panels, K, tile] -> [m, panels * tile], m symbolic; scheduled as
    written (see the module docstring)."""
    from tvm import tirx
    from tvm.script import tirx as T

    if rows > 8:
        raise ValueError(f"dense: at most 8 rows a block, got {rows}")
    K, P, t, R = (tirx.IntImm("int64", v) for v in (K, panels, tile, rows))

    @T.macro
    def row_block(x, w, y, acc, p, m0, count):
        """Rows m0 .. m0 + count - 1 of panel p, their accumulators in registers."""
        for r in T.unroll(count):
            for j in T.vectorized(t):
                acc[r, j] = T.float32(0)
        for k in range(K):
            for r in T.unroll(count):
                for j in T.vectorized(t):
                    acc[r, j] = acc[r, j] + x[m0 + r, k] * w[p, k, j]
        for r in T.unroll(count):
            for j in T.vectorized(t):
                y[m0 + r, p * t + j] = acc[r, j]

    @T.macro
    def rest(x, w, y, acc, p, m, count):
        """The last m % R rows as one block, if there are `count` of them (`rows > count` is
        resolved as the script is parsed)."""
        if rows > count:
            if m % R == count:
                row_block(x, w, y, acc, p, m - count, count)

    @T.prim_func(private=True)
    def dense(var_x: T.handle, w: T.Buffer((P, K, t), "float32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, KERNEL_ATTR: tile})
        m = T.int64()
        x = T.match_buffer(var_x, (m, K), "float32")
        y = T.match_buffer(var_y, (m, P * t), "float32")
        for p in T.parallel(P):
            acc = T.decl_buffer((R, t), "float32")
            for b in range(m // R):
                row_block(x, w, y, acc, p, b * R, R)
            # The rows left (m % R) as one block of that many: row by row, 4 rows cost twice
            # what a block of 4 does (one row's 2-vector FMA chain waits on its latency).
            rest(x, w, y, acc, p, m, 1)
            rest(x, w, y, acc, p, m, 2)
            rest(x, w, y, acc, p, m, 3)
            rest(x, w, y, acc, p, m, 4)
            rest(x, w, y, acc, p, m, 5)
            rest(x, w, y, acc, p, m, 6)
            rest(x, w, y, acc, p, m, 7)

    return dense


def emit_dense(bb, x, panels, K: int, N: int, tile: int, rows: int):
    """Emit fp32 x [..., K] @ W [K, N] into `bb`, W given as its `panels` (pack_panels' layout, a
    constant or a parameter); leading dims may be symbolic."""
    from tvm import relax

    count = -(-N // tile)
    gv = bb.add_func(dense_primfunc(K, count, tile, rows), "dense")  # one per shape, shared by layers

    def emit(x2):
        m = x2.ty.shape.values[0]
        y = bb.emit(relax.call_tir(gv, [x2, panels], out_ty=relax.TensorType((m, count * tile), "float32")))
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

    tile = dense_tile(target)
    rows = block_rows(target, tile)
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
                return emit_dense(self.builder_, x, relax.const(pack_panels(w.value.numpy(), tile)), K, N, tile, rows)
            if w.name not in panels:
                panels[w.name] = relax.Var(f"{w.name}_panels", relax.TensorType((-(-N // tile), K, tile), "float32"))
            return emit_dense(self.builder_, x, panels[w.name], K, N, tile, rows)

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


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w.astype(np.float64)

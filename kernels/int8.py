"""int8 x int8 -> int32 matmul, the kernel behind quantize-int8's MatMulInteger.

y[m, n] = sum_k x[m, k] * w[k, n], x and w int8, y int32 (ONNX MatMulInteger without zero
points; quantize-int8 then rescales y to float). The module stores the weights as int8: one
byte a weight, never widened at load time.

Weight layouts (`tile`):
  0   "kn": the ONNX initializer as it is, int8 [K, N].
  t   "panels of t": int8 [ceil(N/t), K, t], panel p holds columns p*t .. p*t+t-1 (zero padded).
      This is what `pack-weights` chooses, with t the target's vector width in int32 lanes
      times the unroll that fills its registers: each panel is one contiguous stream that
      the kernel walks once, accumulating t outputs in vector registers. With "kn" the same
      loop reads t bytes from each of K rows N bytes apart: a strided walk that wastes most of
      every cache line it touches when N is large.
  1   pre-transposed [N, K] (panels of one column): each output is a contiguous dot product
      along K, the access GPU GEMV rules recognise.

CPU schedule (both layouts): parallel over panels of t outputs, K walked in order, the t
accumulators vectorized and kept in registers; rows of x are processed inside the panel so a
panel is read once per call. GPU: dlight's rules, like every other kernel there.

tvm is imported inside the functions that need it: the numpy half must stay cheap to import.
"""

from __future__ import annotations

import numpy as np

KERNEL_ATTR = "edgecc.int8_tile"  # marks the kernel; fused with its epilogue, only its block names it
ACCUMULATOR_VECTORS = 4
UNPACKED_TILE = 32  # output columns per task when the weights are not packed


def pack_int8(w: np.ndarray, tile: int) -> np.ndarray:
    """int8 [K, N] -> the layout for `tile` (see the module docstring)."""
    if w.dtype != np.int8 or w.ndim != 2:
        raise TypeError(f"pack_int8 takes a 2-D int8 weight, got {w.dtype} {w.shape}")
    return w if tile == 0 else pack_panels(w, tile)


def pack_panels(w: np.ndarray, tile: int) -> np.ndarray:
    """[K, N] -> [ceil(N/tile), K, tile], columns zero padded (any dtype; kernels.dense uses it too)."""
    K, N = w.shape
    panels = -(-N // tile)
    padded = np.zeros((K, panels * tile), w.dtype)
    padded[:, :N] = w
    return np.ascontiguousarray(padded.reshape(K, panels, tile).transpose(1, 0, 2))


def unpack_int8(packed: np.ndarray, tile: int, N: int) -> np.ndarray:
    """Inverse of pack_int8: int8 [K, N]."""
    if tile == 0:
        return packed
    panels, K, _ = packed.shape
    return np.ascontiguousarray(packed.transpose(1, 0, 2).reshape(K, panels * tile)[:, :N])


def panel_width(target) -> int:
    """The `tile` pack-weights picks for a TVM target: 1 (pre-transposed) on GPUs; on CPUs four
    vector registers of int32 accumulators (benchmarks/gemv.py: 4 beat 1, 2 and 8 on this host)."""
    from tvm.target import codegen

    if "gpu" in target.keys:
        return 1
    with target:
        return ACCUMULATOR_VECTORS * codegen.llvm_get_vector_width(target) // 32


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """numpy: int8 [M, K] @ int8 [K, N] -> int32 [M, N], exact."""
    return x.astype(np.int32) @ w.astype(np.int32)


# ---------------------------------------------------------------- TVM kernel


def _int8_matmul_te(x, w, tile: int, K: int, N: int):
    from tvm import te

    def weight(k, n):
        return w[k, n] if tile == 0 else w[n // tile, k, n % tile]

    k = te.reduce_axis((0, K), "k")
    return te.compute(
        (*x.shape[:-1], N),
        lambda *i: te.sum(x[(*i[:-1], k)].astype("int32") * weight(k, i[-1]).astype("int32"), axis=k),
        name="int8_matmul",
    )


def emit_int8_matmul(bb, x, w, tile: int, K: int, N: int):
    """Emit int8 x [..., K] @ weights -> int32 [..., N] into the BlockBuilder `bb`.

    w is a relax.Constant from pack_int8(_, tile) (or a lifted weight); the leading dims may be
    symbolic. FuseOps may fuse what follows elementwise into it (op pattern kOutEWiseFusable):
    quantize-int8's rescale to float, which then runs on each panel of accumulators as it is
    finished instead of on an int32 [..., N] tensor written whole (a 25 MB buffer for
    SmolLM2's LM head after a 128-token prompt).
    """
    from tvm import tirx

    shape = x.ty.shape
    if len(shape) < 2 or not (isinstance(shape[-1], tirx.IntImm) and int(shape[-1]) == K):
        raise ValueError(f"emit_int8_matmul: x must be [..., {K}], got {list(shape)}")
    if str(x.ty.dtype) != "int8" or str(w.ty.dtype) != "int8":
        raise ValueError(f"emit_int8_matmul: operands must be int8, got {x.ty.dtype} x {w.ty.dtype}")
    return bb.emit_te(_int8_matmul_te, x, w, tile, K, N, primfunc_name_hint="int8_matmul",
                      primfunc_attrs={KERNEL_ATTR: tile, "op_pattern": 4})  # 4: kOutEWiseFusable


def emit_int8_columns(bb, w, ids, tile: int, K: int, N: int, dot: bool = False):
    """Emit Gather(W, ids, axis=1) -> int8 [K, *ids.shape] from the weight in its `tile` layout
    (`dot`: kernels.int8_dot's, four k per column): the columns of a packed matmul weight looked
    up without a second, unpacked copy of it (a tied embedding table,
    passes/quantize_embeddings.py). Negative ids count from the end, as ONNX's; ids out of range
    are clipped, as the importer's Gather is."""
    from tvm import te, tirx

    def columns(w, ids):
        def at(k, *i):
            n, size = ids[i].astype("int64"), tirx.const(N, "int64")
            n = tirx.Min(tirx.Max(tirx.Select(n < 0, n + size, n), tirx.const(0, "int64")), size - 1)
            if dot:
                return w[n // tile, k // 4, n % tile, k % 4]
            return w[k, n] if tile == 0 else w[n // tile, k, n % tile]

        return te.compute((K, *ids.shape), at, name="int8_columns")

    return bb.emit_te(columns, w, ids, primfunc_name_hint="int8_columns")


def schedule_panels_cpu(sch, mm, tile: int) -> None:
    """The CPU schedule of a [..., N] += x[..., k] * w(k, n) block,
    and of the elementwise epilogue fused after it: inlined into its last block, which runs on
    each panel of accumulators once the panel is complete."""
    *rows, n, k = sch.get_loops(mm)
    n_out, n_in = sch.split(n, [None, tile or UNPACKED_TILE])
    sch.reorder(n_out, *rows, k, n_in)
    sch.vectorize(n_in)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    epilogue = blocks[[sch.get(b).name_hint for b in blocks].index(sch.get(mm).name_hint) + 1:]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    if epilogue:
        sch.reverse_compute_at(epilogue[-1], n_out)
        sch.vectorize(sch.get_loops(epilogue[-1])[-1])
    sch.parallel(n_out)
    init = sch.decompose_reduction(mm, k)
    sch.vectorize(sch.get_loops(init)[-1])


def over_rows(bb, x, K: int, N: int, emit):
    """x [..., K] through `emit(rows [M, K]) -> [M, N]` as one matrix of rows, reshaped back to
    [..., N]: the kernels take 2-D operands (used by every edgecc matmul lowering)."""
    from tvm import relax

    lead = list(x.ty.shape)[:-1]
    if len(lead) == 1:
        return emit(x)
    return relax.op.reshape(emit(bb.normalize(relax.op.reshape(x, (-1, K)))), (*lead, N))


def _kernels(mod) -> list:
    """(GlobalVar, PrimFunc, tile) of the unscheduled PrimFuncs holding an int8 matmul, alone or
    with the epilogue FuseOps put after it (a fused function keeps neither the kernel's name nor
    its attributes, only the block; the weight's layout gives the tile)."""
    import tvm
    import tvm_ffi

    found = []
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
            continue
        blocks: list = []
        tvm_ffi.structural_walk(func.body, [(tvm.s_tir.stmt.SBlock, blocks.append)], order="post")
        matmul = [b for b in blocks if b.name_hint == "int8_matmul"]
        if matmul:
            weight = matmul[0].reads[1].source.shape
            found.append((gv, func, int(weight[-1]) if len(weight) == 3 else 0))
    return found


def schedule(mod, target):
    """Schedule every int8 kernel in `mod` (after the Relax "zero" pipeline) for `target`.

    CPU: the schedule above. GPU: dlight's GEMV rule, else its Fallback; not its Matmul rule,
    which picks a tensor-core (wmma) schedule for int8 x int8 -> int32 that TVM 0.27 fails to
    lower. Scheduled kernels are marked, so later dlight passes over the module skip them.
    """
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import dlight as dl

    mod = mod.clone()
    for gv, func, tile in _kernels(mod):
        if "gpu" in target.keys:
            with target:
                one = dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Fallback())(tvm.IRModule({"main": func}))
            mod[gv] = one["main"].with_attr("tirx.is_scheduled", True)
            continue
        sch = Schedule(func)
        schedule_panels_cpu(sch, sch.get_sblock("int8_matmul"), tile)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def linear_module(w: np.ndarray, tile: int, M: int | None = None):
    """Relax module `main(x int8 [M, K]) = x @ w` (int32), unscheduled; M None means symbolic."""
    from tvm import relax, tirx

    K, N = w.shape
    bb = relax.BlockBuilder()
    rows = tirx.Var("m", "int64") if M is None else M
    x = relax.Var("x", relax.TensorType((rows, K), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit_int8_matmul(bb, x, relax.const(pack_int8(w, tile)), tile, K, N))
        bb.emit_func_output(out)
    return bb.get()


def build_module(w: np.ndarray, tile: int, target, M: int | None = None):
    """linear_module compiled for `target`: the "zero" pipeline, schedule, tvm.compile."""
    import tvm
    from tvm import relax

    with target:
        mod = relax.get_pipeline("zero")(linear_module(w, tile, M))
    return tvm.compile(schedule(mod, target), target=target)

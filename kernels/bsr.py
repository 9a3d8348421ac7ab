"""Block-sparse matmul y = x @ W for weights pruned in whole blocks (BSR storage).

Conventions (W is the ONNX MatMul weight, [K, N], y = x @ W):

* ``block = (R, C)`` is a block of W itself: R rows along K, C columns along N.
* Storage is block-compressed by *output* block column (the BSR form of Wᵀ, blocks kept in
  W's orientation), so every output block column is computed from its own list of blocks
  with no atomics, and the C output columns of a block are contiguous for SIMD:

      indptr  int32 [N/C + 1]      blocks of block column j are data[indptr[j]:indptr[j+1]]
      indices int32 [nnz]          block row (along K) of each block, ascending within a column
      data    f32   [nnz, R, C]    data[b] == W[indices[b]*R : +R, j*C : +C]

  So ``1x16`` blocks (16 consecutive outputs of one input row) are the SIMD-friendly shape;
  ``Rx1`` blocks work but are not vectorized.

The TVM kernel is TVMScript, not TE: TE's data-dependent reduction (``te.reduce_axis((0,
ptr[j+1]-ptr[j]))``) lowers to nested blocks with the ``init`` inside the inner block, so an
empty block column (common at high sparsity) is never zeroed and returns garbage, and the
nesting cannot be reordered to vectorize over C. Flow: ``emit_bsr_matmul`` while building
Relax, ``relax.get_pipeline("zero")``, then ``schedule`` (CPU: parallel over block columns,
vectorized over C; CUDA: dlight's GPU Fallback), then ``tvm.compile``.

TVM is imported inside the functions that need it: the numpy side (pruning, storage, the
cost model) serves ONNX-level passes, and ``import tvm`` costs about 5 s.
"""

from __future__ import annotations

import math

import numpy as np

from edgecc.errors import UserError

KERNEL_ATTR = "edgecc.bsr_block"  # func attr (R, C) marking the PrimFuncs `schedule` owns
DENSE_VECTOR = 32  # dense panel width: of 8/16/32/64, best at M=32 and within 12% of 64 at M=1
# choose_kernel's calibration (see its docstring).
BSR_MAX_EFFICIENCY = 0.9
BSR_COLUMNS_PER_EFFICIENCY = 25
GPU_MIN_SPARSITY = 0.95


# ---------------------------------------------------------------- numpy side


def _check_block(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise UserError(f"block sparsity needs a 2-D weight [K, N], got shape {tuple(shape)}")
    R, C = (int(v) for v in block)
    K, N = shape
    if R < 1 or C < 1 or K % R or N % C:
        raise UserError(f"block {R}x{C} does not divide the weight shape {K}x{N}")
    return R, C


def _blocks(w: np.ndarray, R: int, C: int) -> np.ndarray:
    """View of W as [K/R, N/C, R, C] (block row, block column, in-block row, in-block column)."""
    K, N = w.shape
    return w.reshape(K // R, R, N // C, C).transpose(0, 2, 1, 3)


def magnitude_block_prune(w: np.ndarray, block: tuple[int, int], sparsity: float) -> np.ndarray:
    """Zero the floor(sparsity * #blocks) blocks of W with the smallest L2 norm.

    Ties go to the lower (row-major) block index, so the result is deterministic. Blocks
    that are already zero have norm 0 and are counted first.
    """
    R, C = _check_block(w.shape, block)
    if not 0.0 <= sparsity <= 1.0:
        raise UserError(f"sparsity must be in [0, 1], got {sparsity}")
    norms = np.sqrt(np.square(_blocks(w, R, C), dtype=np.float64).sum(axis=(2, 3)))
    # round() first so that e.g. 0.29 * 100 = 28.999999999999996 counts 29 blocks.
    n_zero = math.floor(round(sparsity * norms.size, 9))
    keep = np.ones(norms.size, dtype=bool)
    keep[np.argsort(norms, axis=None, kind="stable")[:n_zero]] = False
    out = _blocks(w, R, C) * keep.reshape(norms.shape)[:, :, None, None]
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3).reshape(w.shape))


def to_bsr(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data [nnz, R, C], indices int32 [nnz], indptr int32 [N/C + 1]) of the nonzero blocks."""
    R, C = _check_block(w.shape, block)
    by_column = _blocks(w, R, C).transpose(1, 0, 2, 3)  # [N/C, K/R, R, C]
    keep = np.any(by_column != 0, axis=(2, 3))
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return np.ascontiguousarray(by_column[keep]), np.nonzero(keep)[1].astype(np.int32), indptr


def from_bsr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The dense W [K, N] that `to_bsr` came from."""
    _, R, C = data.shape
    K, N = shape
    _check_block(shape, (R, C))
    by_column = np.zeros((N // C, K // R, R, C), dtype=data.dtype)
    by_column[np.repeat(np.arange(N // C), np.diff(indptr)), indices] = data
    return np.ascontiguousarray(by_column.transpose(1, 2, 0, 3).reshape(K, N))


def bsr_matmul_reference(x: np.ndarray, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray,
                         shape: tuple[int, int]) -> np.ndarray:
    """y = x @ W straight from the BSR arrays (x [..., K] -> y [..., N])."""
    _, R, C = data.shape
    N = shape[1]
    y = np.zeros((*x.shape[:-1], N), dtype=np.result_type(x, data))
    for j in range(N // C):
        for b in range(indptr[j], indptr[j + 1]):
            k = int(indices[b]) * R
            y[..., j * C:(j + 1) * C] += x[..., k:k + R] @ data[b]
    return y


# ---------------------------------------------------------------- TVM kernel


def bsr_matmul_primfunc(K: int, N: int, block: tuple[int, int]):
    """The unscheduled PrimFunc (x [m, K], data [nnz, R, C], indices, indptr) -> y [m, N].

    m and nnz are symbolic, so layers with the same (K, N, block) share one kernel. Each output
    element is one block whose body zeroes it and then walks its block column; that keeps the
    zeroing unconditional and leaves C as a plain spatial loop to vectorize.
    """
    from tvm import tirx
    from tvm.script import tirx as T

    block = _check_block((K, N), block)
    K, N, R, C, NB1 = (tirx.IntImm("int64", v) for v in (K, N, *block, N // block[1] + 1))

    @T.prim_func(private=True, s_tir=True)
    def bsr_matmul(var_x: T.handle, var_data: T.handle, var_indices: T.handle,
                   indptr: T.Buffer((NB1,), "int32"), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, KERNEL_ATTR: block})
        m = T.int64()
        nnz = T.int64()
        x = T.match_buffer(var_x, (m, K), "float32")
        data = T.match_buffer(var_data, (nnz, R, C), "float32")
        indices = T.match_buffer(var_indices, (nnz,), "int32")
        y = T.match_buffer(var_y, (m, N), "float32")
        for i, n in T.grid(m, N):
            with T.sblock("bsr_matmul"):
                vi, vn = T.axis.remap("SS", [i, n])
                T.reads(x[vi, 0:K], data[0:nnz, 0:R, vn % C], indices[0:nnz], indptr[vn // C:vn // C + 2])
                T.writes(y[vi, vn])
                y[vi, vn] = T.float32(0)
                start = T.Cast("int64", indptr[vn // C])
                for e in range(T.Cast("int64", indptr[vn // C + 1]) - start):
                    # The row index stays inline: bound to a name inside the e or r loop, it
                    # made the vectorized kernel 3-3.4x slower.
                    for r in range(R):
                        y[vi, vn] = y[vi, vn] + (x[vi, T.Cast("int64", indices[start + e]) * R + r]
                                                 * data[start + e, r, vn % C])

    return bsr_matmul


def emit_bsr_matmul(bb, x, data, indices, indptr, K: int, N: int, block: tuple[int, int]):
    """Emit y = x @ W into the BlockBuilder `bb`; x is [..., K] float32 (dims may be symbolic).

    data/indices/indptr are relax.Constants from `to_bsr`. Leading dims of x are flattened
    into the kernel's m and restored on the result.
    """
    from tvm import relax

    R, C = _check_block((K, N), block)
    (nnz, *rc), (n_indices,), (n_ptr,) = ([int(d) for d in a.ty.shape.values]
                                          for a in (data, indices, indptr))
    if rc != [R, C] or n_indices != nnz or n_ptr != N // C + 1:
        raise UserError(f"BSR arrays do not match a {K}x{N} weight in {R}x{C} blocks")
    if str(x.ty.dtype) != "float32" or int(x.ty.shape.values[-1]) != K:
        raise UserError(f"the BSR kernel takes float32 x [..., {K}], got {x.ty.dtype} {x.ty.shape}")
    gv = bb.add_func(bsr_matmul_primfunc(K, N, (R, C)), "bsr_matmul")
    lead = list(x.ty.shape.values[:-1])
    m = math.prod(lead[1:], start=lead[0]) if lead else 1
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (m, K)))
    y = bb.emit(relax.call_tir(gv, [x2, data, indices, indptr],
                               out_ty=relax.TensorType((m, N), "float32")))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, N)))


def schedule(mod, target):
    """Schedule the BSR kernels of `mod` (run after the "zero" pipeline); other functions untouched.

    CPU: parallel over output block columns, vectorized over the C columns of a block. CUDA:
    dlight's GPU Fallback (one thread per output element). Scheduled functions are marked
    `tirx.is_scheduled`, so a later dlight pass over the module leaves them alone.
    """
    import tvm
    from tvm.s_tir import dlight as dl

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or KERNEL_ATTR not in func.attrs:
            continue
        if target.kind.name == "cuda":
            sch = dl.gpu.Fallback().apply(func, target, False)
        else:
            C = int(func.attrs[KERNEL_ATTR][1])
            sch = tvm.s_tir.Schedule(func)
            i, n = sch.get_loops(sch.get_sblock("bsr_matmul"))
            j, c = sch.split(n, [None, C])
            sch.reorder(j, i, c)
            sch.parallel(j)
            if C > 1:
                sch.vectorize(c)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def _dense_packed(x, wp):
    from tvm import te

    _, K = x.shape
    nb, _, v = wp.shape
    k = te.reduce_axis((0, K), name="k")
    return te.compute((x.shape[0], nb * v), lambda i, n: te.sum(x[i, k] * wp[n // v, k, n % v], axis=k),
                      name="matmul")


def schedule_dense(mod, vector: int = DENSE_VECTOR):
    """The dense counterpart's schedule, the same effort as the BSR one: parallel over panels
    of `vector` output columns, vectorized across the panel, scalar-broadcast FMAs along K."""
    import tvm

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = tvm.s_tir.Schedule(func)
        blk = sch.get_sblock("matmul")
        i, n, k = sch.get_loops(blk)
        jo, ji = sch.split(n, [None, vector])
        sch.reorder(jo, i, k, ji)
        sch.parallel(jo)
        sch.vectorize(ji)
        sch.decompose_reduction(blk, k)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def _x_var(x_shape_or_M, K: int):
    """x's relax Var: an int M or a str (symbolic M) gives [M, K]; a tuple is the whole shape."""
    from tvm import relax, tirx

    shape = x_shape_or_M if isinstance(x_shape_or_M, (tuple, list)) else (x_shape_or_M, K)
    if shape[-1] != K:
        raise UserError(f"x shape {tuple(shape)} does not end in K={K}")
    dims = [tirx.Var(d, "int64") if isinstance(d, str) else int(d) for d in shape]
    return relax.Var("x", relax.TensorType(dims, "float32"))


def _compile(bb, x, emit, target, sched):
    import tvm
    from tvm import relax

    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit())
        bb.emit_func_output(out)
    with target:
        mod = relax.get_pipeline("zero")(bb.get())
    return tvm.compile(sched(mod), target=target)


def build_module(x_shape_or_M, w_pruned: np.ndarray, block: tuple[int, int], target):
    """Compile `main(x) = x @ w_pruned` with the weight stored as BSR; returns the executable."""
    from tvm import relax

    K, N = w_pruned.shape
    arrays = [relax.const(a) for a in to_bsr(np.asarray(w_pruned, np.float32), block)]
    bb, x = relax.BlockBuilder(), _x_var(x_shape_or_M, K)
    return _compile(bb, x, lambda: emit_bsr_matmul(bb, x, *arrays, K, N, block), target,
                    lambda mod: schedule(mod, target))


def build_dense_module(x_shape_or_M, w: np.ndarray, target, packed: bool = True,
                       vector: int = DENSE_VECTOR):
    """The dense counterpart of `build_module`, CPU only: same pipeline, same schedule effort.

    packed=True stores W as panels [N/vector, K, vector] so each thread streams its weights
    contiguously, as the BSR data does (the fair baseline); packed=False is relax.op.matmul on
    the row-major W the ONNX graph holds.
    """
    from tvm import relax

    K, N = w.shape
    w = np.asarray(w, np.float32)
    if N % vector:
        raise UserError(f"dense panel width {vector} does not divide N={N}")
    bb, x = relax.BlockBuilder(), _x_var(x_shape_or_M, K)

    def emit():
        if not packed:
            return bb.emit(relax.op.matmul(x, relax.const(w)))
        panels = np.ascontiguousarray(w.reshape(K, N // vector, vector).transpose(1, 0, 2))
        return bb.emit_te(_dense_packed, x, relax.const(panels), primfunc_name_hint="dense_matmul")

    return _compile(bb, x, emit, target, lambda mod: schedule_dense(mod, vector))


# ---------------------------------------------------------------- cost model


def choose_kernel(K: int, N: int, block: tuple[int, int], sparsity: float, gpu: bool) -> tuple[str, str]:
    """("bsr" | "dense", reason): BSR where it is predicted faster than the same-effort dense kernel.

    Model (CPU): t_bsr / t_dense = (1 - sparsity) / eff, where eff = min(0.9, C / 25) is the
    BSR kernel's speed per *stored* weight relative to dense; BSR is chosen when
    sparsity > 1 - eff: C >= 23 -> 0.10, C = 16 -> 0.36, C = 8 -> 0.68, C = 4 -> 0.84,
    C = 1 -> 0.96. Why C: with several rows of x, both kernels are chains of broadcast-FMAs into
    vector accumulators (one per vector register of output columns; see the generated code) and
    wait on FMA latency, so throughput follows the accumulator count: C columns for BSR against
    the dense panel's DENSE_VECTOR = 32. R does not matter (1x16 and 16x16 measured the same):
    one index load per R*C FMAs is lost in the noise.

    Calibrated with benchmarks/bsr_vs_dense.py (results/bsr_vs_dense.json) on this project's
    2-core AMD EPYC (Zen 3) VM, TVM_NUM_THREADS=2, W 2048x2048 and 768x3072, both shapes alike.
    eff at M=32, sparsity 0-0.9: 0.88-0.97 (1x32), 0.61-0.67 (1x16, 16x16), 0.32-0.36 (8x8),
    0.16-0.19 (4x4), 0.04-0.05 (16x1); measured crossovers 0.09, 0.34-0.36, 0.65, 0.77, none up
    to 0.95. At M=1 the kernels are memory-bound and BSR does better (crossovers 0.03, 0.15-0.33,
    0.55, 0.73, 0.92), so the M=32 figures are the conservative choice when M is unknown.
    Untested on a Pi: assumed to keep the same C/32 ratio, since the vector width scales both
    kernels alike. Untested on a GPU: for CUDA (`gpu`) the BSR kernel is
    dlight's Fallback, one thread per output walking its blocks serially, up against dlight's
    tiled dense rules, so BSR is only chosen from sparsity 0.95. That threshold is a guess.
    """
    R, C = _check_block((K, N), block)
    if not 0.0 <= sparsity <= 1.0:
        raise UserError(f"sparsity must be in [0, 1], got {sparsity}")
    if gpu:
        if sparsity >= GPU_MIN_SPARSITY:
            return "bsr", f"GPU: sparsity {sparsity:.2f} >= {GPU_MIN_SPARSITY} (uncalibrated threshold)"
        return "dense", f"GPU: sparsity {sparsity:.2f} < {GPU_MIN_SPARSITY} (uncalibrated threshold)"
    eff = min(BSR_MAX_EFFICIENCY, C / BSR_COLUMNS_PER_EFFICIENCY)
    threshold = 1 - eff
    if sparsity == 1:
        return "bsr", "every block is zero"
    if sparsity > threshold:
        speedup = eff / (1 - sparsity)
        return "bsr", (f"{R}x{C} blocks at sparsity {sparsity:.2f} > {threshold:.2f}: "
                       f"predicted {speedup:.1f}x faster")
    return "dense", f"{R}x{C} blocks need sparsity > {threshold:.2f} to beat dense, got {sparsity:.2f}"

"""CPU schedules for the kernels nothing else schedules: the fused elementwise chains, norms,
softmaxes, masks and casts between the matmuls.

Unscheduled, TVM compiles such a kernel as legalized: every intermediate of the fused chain is a
whole buffer, one pass over memory each, allocated from TVM's per-thread workspace pool, which
keeps the largest size it ever handed out (a causal LM's LM-head dequantization after a
128-token prefill: two [128, 49152] float buffers, 50 MB held for the rest of the process).
Here each such kernel gets its elementwise intermediates inlined into their consumers, so it
makes one pass with no workspace; what cannot be inlined (a norm's mean, a softmax's max and
sum), and an intermediate that a reduction and another block both read (a softmax's exp, which
inlined would be computed twice), is computed row by row under the leading loops it shares with
the output, which run in parallel; the output's innermost axis, and such an intermediate's, is
vectorized. The expression of each element is TVM's,
unchanged: no block is "normalized" (dlight's rules do that, and its simplifier turns a
division by a constant into a multiplication by its inverse, which moved a nearest-neighbour
Resize onto other pixels).

Vector code only for buffers of the plain numeric types: TVM 0.27 cannot vectorize a store of
bool (kept as int8), and the narrow float types are emulated element by element anyway.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

from itertools import dropwhile

from edgecc.kernels.common import is_gpu

_VECTOR_DTYPES = {"float32", "float64", "float16", "int8", "int16", "int32", "int64", "uint8", "uint16",
                  "uint32", "uint64"}
_DATA_PAR = 0  # tirx.IterVar.DataPar
_ROUNDING = {"floor", "ceil", "round", "trunc", "nearbyint"}


def _vectorizable(func) -> bool:
    """Whether every buffer `func` reads, writes or allocates has a type TVM vectorizes."""
    import tvm
    import tvm_ffi

    buffers = [p.ty for p in func.params if isinstance(p.ty, tvm.tirx.BufferType)]
    tvm_ffi.structural_walk(func.body, [(tvm.s_tir.stmt.SBlock, lambda b: buffers.extend(b.alloc_buffers))],
                            order="post")
    return all(str(b.dtype) in _VECTOR_DTYPES for b in buffers)


def _reads_at_rounded_floats(func) -> bool:
    """Whether `func` reads a buffer at an index computed from a float (a nearest-neighbour
    Resize, a grid sample): such a kernel keeps TVM's default code. TVM lets LLVM contract a
    multiply and an add into one FMA, and an index the two roundings put on either side of an
    integer moves to the next element: a Resize of static shape, folded at compile time as a
    plain loop, read its source pixels right, and the same expression in a parallel loop read a
    neighbour of one. Where a rounded float is a value (a quantization, fast_exp's exponent),
    such a flip moves it by one step, as any other float summation order may."""
    import tvm
    import tvm_ffi

    def from_float(expr) -> bool:
        found = []

        def call(c) -> None:
            if getattr(c.op, "name", "").rsplit(".", 1)[-1] in _ROUNDING:
                found.append(c)

        def cast(c) -> None:
            if str(c.value.ty).startswith(("float", "bfloat")):
                found.append(c)

        tvm_ffi.structural_walk(expr, [(tvm.ir.Call, call), (tvm.tirx.Cast, cast)], order="post")
        return bool(found)

    loads: list = []
    tvm_ffi.structural_walk(func.body, [(tvm.ir.expr.TensorLoad, loads.append)], order="post")
    return any(from_float(index) for load in loads for index in load.indices)


def _spatial(sch, block) -> bool:
    """Whether a block writes each output element once (no reduction, no init)."""
    stmt = sch.get(block)
    return stmt.init is None and all(int(iv.iter_type) == _DATA_PAR for iv in stmt.iter_vars)


def _inline_producers(sch, blocks: list, keep_shared: bool) -> list:
    """Inline every elementwise block into its consumers, as often as one more can be; the
    blocks left. Not dlight's `try_inline`: its reverse_compute_inline of an epilogue into a
    matmul whose reduction has extent 1 keeps the reduction's init and adds the epilogue's
    operand twice (TVM 0.27; the ONNX LinearAttention decode cases caught it)."""
    from tvm.s_tir.schedule import ScheduleError

    inlined = True
    while inlined:
        inlined = False
        for block in blocks[:-1]:
            if not _spatial(sch, block) or (keep_shared and _read_by_reduction_and_more(sch, block)):
                continue
            try:
                sch.compute_inline(block)
            except ScheduleError:  # an output, or read where it cannot be substituted
                continue
            blocks.remove(block)
            inlined = True
            break
    return blocks


def _read_by_reduction_and_more(sch, block) -> bool:
    """Whether a reduction and another block both read `block` (a softmax's exp, read by its sum
    and by the normalization): inlined, each would compute it again, so it is computed once per
    row instead (a [12, 128, 128] softmax of MiniLM: 0.47 ms with exp computed twice, 0.24 once
    and vectorized)."""
    consumers = sch.get_consumers(block)
    return len(consumers) > 1 and any(not _spatial(sch, c) for c in consumers)


def _shared_rows(sch, blocks: list) -> int:
    """How many leading loops the last block shares with every other block: loops of the same
    extent over spatial axes, under which each of them can be computed row by row."""
    import tvm_ffi

    def leading(block) -> list:
        loops = sch.get_loops(block)
        kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
        spatial = len(kinds) - len(list(dropwhile(lambda k: k == _DATA_PAR, kinds)))
        return [sch.get(loop).extent for loop in loops[:min(spatial, len(loops))]]

    rows = leading(blocks[-1])
    for block in blocks[:-1]:
        theirs = leading(block)
        n = 0
        while n < min(len(rows), len(theirs)) and tvm_ffi.structural_equal(rows[n], theirs[n]):
            n += 1
        rows = rows[:n]
    return len(rows)


def _schedule_one(func, lanes: int, keep_shared: bool = True):
    """`func` with its elementwise intermediates inlined, what is left computed row by row
    under its last block's shared leading loops, which run in parallel, and that block's
    innermost axis vectorized when static and a multiple of `lanes`; None when its last block
    is a reduction and nothing could be inlined."""
    from tvm import tirx
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    before = len(blocks)
    blocks = _inline_producers(sch, blocks, keep_shared)
    changed = sch if len(blocks) < before else None
    # an intermediate kept to be computed per row; with no rows to compute it by, it is inlined after all
    held = keep_shared and any(_spatial(sch, b) and _read_by_reduction_and_more(sch, b) for b in blocks[:-1])
    last = blocks[-1]
    loops = sch.get_loops(last)
    extents = [sch.get(loop).extent for loop in loops]
    if not _spatial(sch, last) or not loops or any(isinstance(e, tirx.IntImm) and e.value == 0 for e in extents):
        return _schedule_one(func, lanes, keep_shared=False) if held else changed
    inner, extent = loops[-1], extents[-1]
    # after inlining: a bool intermediate (an isnan) inlined away no longer stops vectorization
    vector = isinstance(extent, tirx.IntImm) and extent.value % lanes == 0 and _vectorizable(sch.mod["main"])
    if len(blocks) > 1:  # reductions (a norm's mean, a softmax's max and sum) before the last block
        n = _shared_rows(sch, blocks)
        if n == 0:
            return _schedule_one(func, lanes, keep_shared=False) if held else changed
        rows = sch.fuse(*loops[:n]) if n > 1 else loops[0]
        sch.parallel(rows)
        for block in reversed(blocks[:-1]):
            sch.compute_at(block, rows, preserve_unit_loops=True)
        if vector and n < len(loops):
            sch.vectorize(sch.split(inner, [None, lanes])[1])
            for block in blocks[:-1]:  # a row of an intermediate kept per row (_read_by_reduction_and_more)
                own = sch.get_loops(block)
                last_extent = sch.get(own[-1]).extent
                if (_spatial(sch, block) and len(own) > 1 and isinstance(last_extent, tirx.IntImm)
                        and last_extent.value == extent.value):
                    sch.vectorize(sch.split(own[-1], [None, lanes])[1])
        return sch
    outer = loops[:-1]
    if vector:
        outer.append(sch.split(inner, [None, lanes])[0])
        sch.vectorize(sch.get_loops(last)[-1])
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return sch


def schedule(mod, target):
    """Schedule every PrimFunc of `mod` (after the Relax "zero" pipeline, tuning records and
    edgecc's kernels) that is still unscheduled, for a CPU `target`; GPU modules go to dlight."""
    import tvm
    from tvm.s_tir.schedule import ScheduleError
    from tvm.target import codegen

    if is_gpu(target):
        return mod
    with target:
        lanes = max(codegen.llvm_get_vector_width(target) // 32, 1)
    mod = mod.clone()
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
            continue
        if _reads_at_rounded_floats(func):
            continue
        try:
            sch = _schedule_one(func, lanes)
        except ScheduleError:  # a schedule TVM rejects: the kernel keeps its default code
            sch = None
        if sch is not None:
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod

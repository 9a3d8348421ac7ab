"""CPU schedule for matmuls between two activations with symbolic shapes: attention's scores
(Q @ K^T) and weighted sum (P @ V) in a causal LM compiled once for prefill and decode.

TVM legalizes them to a loop nest with the reduction innermost and strided, on one thread
(SmolLM2-135M decoding at past 128: ~50 us per call, 60 calls per token), and MetaSchedule
cannot tune symbolic shapes. This schedule moves the reduction outside the last output axis, so
the inner loop walks contiguous rows of the right operand and of the output (vectorized here
when its extent is static, by LLVM's loop vectorizer when it is symbolic), runs the leading
output axes in parallel, and computes a fused elementwise epilogue (the score scale and mask)
row by row under the same parallel loop: ~10x on those calls. The summation order over k is
unchanged, so results are bit-identical to TVM's default code.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

from edgecc.kernels.common import is_gpu

_SPATIAL, _REDUCE = 0, 2  # tirx.IterVar iter_type values


def _candidate(func) -> bool:
    """An unscheduled PrimFunc, not an edgecc kernel, with a symbolic extent (static shapes are
    left to tuning). Matmuls against a constant weight with symbolic rows went to kernels.dense
    before legalization, so the matmuls left here are between activations."""
    import tvm

    if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None:
        return False
    attrs = func.attrs
    if attrs.get("tirx.is_scheduled") or any(str(k).startswith("edgecc.") for k in attrs.keys()):
        return False
    shapes = [p.ty.shape for p in func.params if hasattr(p.ty, "shape")]
    return any(not isinstance(d, tvm.tirx.IntImm) for shape in shapes for d in shape)


def _schedule_one(func, lanes: int):
    """The scheduled PrimFunc, or None when `func` is not a matmul with an elementwise epilogue."""
    from tvm import tirx
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in blocks]
    if not names or names[0] != "matmul":
        return None
    kinds = [int(iv.iter_type) for iv in sch.get(blocks[0]).iter_vars]
    if kinds[-1] != _REDUCE or any(k != _SPATIAL for k in kinds[:-1]) or len(kinds) < 3:
        return None
    if any(int(iv.iter_type) != _SPATIAL for b in blocks[1:] for iv in sch.get(b).iter_vars):
        return None
    mm = blocks[0]
    *outer, last, k = sch.get_loops(mm)
    sch.reorder(k, last)
    rows = sch.fuse(*outer)

    def vectorize_inner(loop) -> None:
        if isinstance(sch.get(loop).extent, tirx.IntImm):
            sch.vectorize(sch.split(loop, [None, lanes])[1])

    vectorize_inner(last)
    for name in names[1:-1]:
        sch.compute_inline(sch.get_sblock(name))
    if len(names) > 1:
        epilogue = sch.get_sblock(names[-1])
        sch.reverse_compute_at(epilogue, rows)
        vectorize_inner(sch.get_loops(epilogue)[-1])
    sch.parallel(rows)
    sch.decompose_reduction(mm, k)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule(mod, target):
    """Schedule the activation matmuls with symbolic shapes in `mod` (after the Relax "zero"
    pipeline) for a CPU `target`; GPU modules are left to dlight."""
    from tvm.s_tir.schedule import ScheduleError
    from tvm.target import codegen

    if is_gpu(target):
        return mod
    with target:
        lanes = codegen.llvm_get_vector_width(target) // 32
    mod = mod.clone()
    for gv, func in list(mod.functions.items()):
        if not _candidate(func):
            continue
        try:
            scheduled = _schedule_one(func, lanes)
        except ScheduleError:  # an epilogue that cannot follow the rows: TVM's default code
            scheduled = None
        if scheduled is not None:
            mod[gv] = scheduled
    return mod

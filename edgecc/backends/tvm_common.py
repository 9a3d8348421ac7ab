"""Target backends: Relax IRModule -> compiled, exported shared library for the target.

CPU targets run the Relax "zero" pipeline first (tvm.compile alone does not fuse on CPU),
apply the tuning records that match the target, give edgecc's kernels their hand schedules,
leave the rest to TVM's defaults, lift the weights out into a file beside the library
(edgecc.runtime.weights), build, and export through the target's toolchain.
CUDA targets are built by edgecc.backends.tvm_cuda, which embeds nvcc-compiled device code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgecc.runtime import weights
from edgecc.errors import UserError
from edgecc.core.target import TargetDesc

LIBRARY_NAME = "model.so"


def require_tool(target: TargetDesc, key: str) -> str:
    """The toolchain program `key` of the target, or a one-line error saying how to get it."""
    program = target.toolchain[key]
    if shutil.which(program) is None:
        package = target.toolchain.get("package")
        how = f"; install it with: apt-get install {package}" if package else ""
        raise UserError(f"target '{target.name}': toolchain program '{program}' not found on PATH{how}")
    return program


def prepare(mod, target: TargetDesc):
    """Relax's "zero" pipeline for the target: the legalized, fused PrimFuncs that tuning measures
    and build schedules. Tuning and compiling must both start here for records to match.

    FastMathTransform first: erf, tanh and exp become TVM's polynomial approximations (float32
    accurate to about 1e-6, like ONNX Runtime's MLAS kernels), which vectorize; the exact ones
    call libm once per element. On CPUs, matmuls with a constant weight and symbolic rows then
    go to edgecc's dense kernel (kernels/dense.py), which no tuning could reach.
    """
    from tvm import relax

    from edgecc.kernels import dense

    mod = fast_math(mod)
    if target.device_kind == "llvm":
        mod, _ = dense.route_symbolic_matmuls(mod, target.tvm_target())
    with target.tvm_target():
        return relax.get_pipeline("zero")(unfused_dim_readers(relax.transform.LegalizeOps()(mod)))


def unfused_dim_readers(mod):
    """Kernels that read a symbolic dim as a value (a scalar parameter no buffer's shape has, as
    shape_to_tensor's) are kept out of fusion. Fused, the dim becomes a scalar parameter of the
    fused function while being a shape variable of the module too, and FuseTIR stops in RenewDefs
    (`VarRemapGet(source) == nullptr`). They write a handful of integers; fusing them gains nothing.
    """
    import tvm

    opaque = 8  # relax.OpPatternKind.kOpaque: FuseOps leaves the kernel alone
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        buffers = [p.ty for p in func.params if isinstance(p.ty, tvm.tirx.BufferType)]
        in_shapes = {v for buf in buffers for dim in buf.shape for v in tvm.tirx.analysis.undefined_vars(dim)}
        if any(isinstance(p.ty, tvm.ir.PrimType) and p not in in_shapes for p in func.params):
            mod[gv] = func.with_attr("op_pattern", opaque)
    return mod


def fast_math(mod):
    """relax.transform.FastMathTransform, except on tensors whose shape Relax does not know (an
    ONNX Reshape to a computed shape makes one): TVM's pass asserts on those; they keep the exact op."""
    from tvm import relax, topi

    fast = {"relax.nn.softmax": lambda b, c: b.call_te(topi.nn.fast_softmax, c.args[0], c.attrs.axis),
            "relax.exp": lambda b, c: b.call_te(topi.fast_exp, c.args[0]),
            "relax.erf": lambda b, c: b.call_te(topi.fast_erf, c.args[0]),
            "relax.tanh": lambda b, c: b.call_te(topi.fast_tanh, c.args[0])}

    @relax.expr_functor.mutator
    class FastMath(relax.PyExprMutator):
        def visit_call_(self, call):
            rewrite = fast.get(getattr(call.op, "name", None))
            if rewrite and isinstance(getattr(call.args[0].ty, "shape", None), relax.ShapeExpr):
                return rewrite(self.builder_, call)
            return super().visit_call_(call)

    return rewrite_functions(mod, FastMath)


def rewrite_functions(mod, mutator):
    """`mod` with every Relax function rewritten by `mutator` (a relax.PyExprMutator class)."""
    from tvm import relax

    gen = mutator(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            gen.builder_.update_func(gv, gen.visit_expr(func))
    return gen.builder_.get()


def apply_records(mod, tgt, records) -> tuple[Any, list[str]]:
    """Schedule the PrimFuncs that have a tuning record; returns the module and their names."""
    import tvm
    from tvm import relax

    from edgecc.core.tuning_log import to_ms_database

    if not records:
        return mod, []
    with tgt, to_ms_database(records):
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    names = [gv.name_hint for gv, f in tuned.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and not f.same_as(mod[gv])]
    return tuned, names


def schedule_kernels(mod, tgt):
    """edgecc's kernels get their hand schedules, unless a tuning record scheduled them already;
    so do the activation matmuls with symbolic shapes, which no tuning can reach."""
    from edgecc.kernels import activation_matmul, bsr, dense, int4, int8

    for kernels in (int8, int4, bsr, dense, activation_matmul):
        mod = kernels.schedule(mod, tgt)
    return mod


def build(mod, target: TargetDesc, lib_path: Path, records=()) -> dict:
    """Compile `mod` for `target` into `lib_path`; returns build facts for the manifest.

    `records` are tuning records that apply to this target (edgecc.autotune.tuning.records_for).
    """
    import tvm

    cc = require_tool(target, "cc")
    if target.device_kind == "cuda":
        from edgecc.backends.tvm_cuda import build_cuda

        facts = build_cuda(mod, target.tvm_target(), str(lib_path), cc, records)
        return {"library": LIBRARY_NAME, **facts, "tvm_target": str(target.tvm_target())}
    tgt = target.tvm_target()
    mod, tuned = apply_records(prepare(mod, target), tgt, records)
    mod = schedule_kernels(mod, tgt)
    mod, arrays = weights.lift(mod)
    executable = tvm.compile(mod, target=tgt)
    if target.runs_here():
        executable.export_library(str(lib_path))
    else:
        from tvm.support import cc as tvm_cc

        executable.export_library(str(lib_path), fcompile=tvm_cc.cross_compiler(cc))
    facts = {"library": LIBRARY_NAME, **tuning_facts(mod, tuned, records), "tvm_target": str(tgt)}
    if arrays:
        facts["weights"] = {"file": weights.FILE, "tensors": weights.write(lib_path.with_name(weights.FILE), arrays)}
    return facts


def tuning_facts(mod, tuned: list[str], records) -> dict:
    """What the manifest says about schedules: how many kernels were tuned, how many were not."""
    import tvm

    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return {"kernels": len(kernels), "tuned_kernels": len(tuned),
            "default_schedule_kernels": len(kernels) - len(tuned),
            "tuning_records_available": len(records), "tuned": sorted(tuned)}

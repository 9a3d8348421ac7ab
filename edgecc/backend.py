"""Target backends: Relax IRModule -> compiled, exported shared library for the target.

CPU targets run the Relax "zero" pipeline first (tvm.compile alone does not fuse on CPU),
then build with TVM's default schedules and export through the target's toolchain.
CUDA targets are built by edgecc.cuda, which embeds nvcc-compiled device code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edgecc.errors import UserError
from edgecc.target import TargetDesc

LIBRARY_NAME = "model.so"


def require_tool(target: TargetDesc, key: str) -> str:
    """The toolchain program `key` of the target, or a one-line error saying how to get it."""
    program = target.toolchain[key]
    if shutil.which(program) is None:
        package = target.toolchain.get("package")
        how = f"; install it with: apt-get install {package}" if package else ""
        raise UserError(f"target '{target.name}': toolchain program '{program}' not found on PATH{how}")
    return program


def build(mod, target: TargetDesc, lib_path: Path) -> dict:
    """Compile `mod` for `target` into `lib_path`; returns build facts for the manifest."""
    import tvm
    from tvm import relax

    cc = require_tool(target, "cc")
    if target.device_kind == "cuda":
        from edgecc.cuda import build_cuda

        facts = build_cuda(mod, target.tvm_target(), str(lib_path), cc)
        return {"library": LIBRARY_NAME, **facts, "tvm_target": str(target.tvm_target())}
    from edgecc.kernels import bsr, int4, int8

    tgt = target.tvm_target()
    with tgt:
        mod = relax.get_pipeline("zero")(mod)
    # edgecc's own kernels carry their schedules; the rest keep TVM's defaults.
    mod = bsr.schedule(int4.schedule_int4(int8.schedule(mod, tgt), tgt), tgt)
    executable = tvm.compile(mod, target=tgt)
    if target.runs_here():
        executable.export_library(str(lib_path))
    else:
        from tvm.support import cc as tvm_cc

        executable.export_library(str(lib_path), fcompile=tvm_cc.cross_compiler(cc))
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return {"library": LIBRARY_NAME, "kernels": len(kernels), "schedules": "tvm-default",
            "tvm_target": str(tgt)}

"""CPU targets (x86, ARM NEON): the weights lifted into a file beside the library
(edgecc.runtime.weights), the prepared module with its tuning records and edgecc's hand
schedules, built and exported through the target's toolchain."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax
from tvm.support import cc as tvm_cc

from edgecc.backends import decode_step
from edgecc.backends.tvm_common import (LIBRARY_NAME, TVMBackend, apply_records, prepare, require_tool,
                                        tuning_facts)
from edgecc.kernels import activation_matmul, bsr, fallback, int4, int8
from edgecc.runtime import weights


class TVMCPUBackend(TVMBackend):
    def build_lowered(self, lowered: list, stage_dir: Path) -> dict:
        target, tgt = self.target, self.target.tvm_target()
        # Weights become parameters before anything copies or repacks them (the dense kernel's
        # panels are packed one at a time as the file is written), once what is computed from
        # weights alone (a transposed Gemm weight, a cast) is folded into new constants.
        mod, arrays = weights.lift(_folded(lowered.pop()))
        step = self.step  # an LM's one-token step: a function of its own (edgecc.backends.decode_step)
        mod, tuned = apply_records(prepare(mod, tgt, arrays, step.dims if step else None), tgt, self.records)
        mod = schedule_kernels(mod, tgt)
        stored = weights.write(stage_dir / weights.FILE, arrays) if arrays else None  # empties `arrays`
        executable = tvm.compile(mod, target=tgt)
        lib_path = stage_dir / LIBRARY_NAME
        if target.runs_here():
            executable.export_library(str(lib_path))
        else:
            executable.export_library(str(lib_path), fcompile=tvm_cc.cross_compiler(require_tool(target, "cc")))
        facts = {"library": LIBRARY_NAME, **tuning_facts(mod, tuned, self.records), "tvm_target": str(tgt)}
        if decode_step.FUNCTION in [gv.name_hint for gv in mod.functions]:
            facts[decode_step.FUNCTION] = {"shapes": {step.ids: step.ids_shape}}
        if stored is not None:
            facts["weights"] = {"file": weights.FILE, "tensors": stored}
        return facts


def _folded(mod):
    """relax.transform.FoldConstant, or the module as it is where that pass breaks it: it does on
    shape_to_tensor of a static shape, which it legalizes into a call of a `shape_func` PrimFunc it
    never adds to the module. Folding here only spares the run time what is computed from weights
    alone; the "zero" pipeline folds everything else, as always."""
    try:
        folded = relax.transform.FoldConstant()(mod)
        if relax.analysis.well_formed(folded):
            return folded
    except (RuntimeError, ValueError):  # TVM's errors for an ill-formed module
        pass
    return mod


def schedule_kernels(mod, tgt):
    """edgecc's kernels get their hand schedules, unless a tuning record scheduled them already;
    so do the activation matmuls with symbolic shapes, which no tuning can reach."""
    for kernels in (int8, int4, bsr, activation_matmul, fallback):
        mod = kernels.schedule(mod, tgt)
    return mod

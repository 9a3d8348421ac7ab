"""edgecc: an optimizing compiler for ONNX models on edge hardware.

The public names are imported on first use: `edgecc --help` and `edgecc passes` must not pay for
ONNX, ONNX Runtime and TVM before they are needed.
"""

import importlib

_PUBLIC = {
    "Artifact": "edgecc.runtime.artifact", "compile": "edgecc.compiler", "CompileOptions": "edgecc.core.optimize", "EdgeccError": "edgecc.errors",
    "UserError": "edgecc.errors", "VerificationError": "edgecc.errors", "Option": "edgecc.core.pass_base",
    "Pass": "edgecc.core.pass_base", "PassContext": "edgecc.core.pass_base", "PassResult": "edgecc.core.pass_base",
    "register_pass": "edgecc.core.pass_base", "PassManager": "edgecc.core.pass_manager",
    "parse_pipeline": "edgecc.core.pipeline",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'edgecc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value

"""edgecc: an optimizing compiler for ONNX models on edge hardware."""

from edgecc.artifact import Artifact
from edgecc.compiler import compile
from edgecc.errors import EdgeccError, UserError, VerificationError
from edgecc.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.pass_manager import PassManager
from edgecc.pipeline import parse_pipeline

__all__ = [
    "Artifact", "EdgeccError", "Option", "Pass", "PassContext", "PassManager", "PassResult",
    "UserError", "VerificationError", "compile", "parse_pipeline", "register_pass",
]

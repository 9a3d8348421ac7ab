"""Backends turn an optimized model into a target's artifact files (edgecc.backends.base).
The target's data picks one: its `backend` key, then its TVM target's kind."""

from __future__ import annotations

from edgecc.backends.base import Backend, Log
from edgecc.backends.edgetpu.backend import EdgeTPUBackend
from edgecc.backends.tvm_cpu import TVMCPUBackend
from edgecc.backends.tvm_cuda import TVMCudaBackend
from edgecc.core.optimize import CompileOptions
from edgecc.core.target import TargetDesc

BACKENDS: dict[tuple[str, str], type[Backend]] = {
    ("tvm", "llvm"): TVMCPUBackend,
    ("tvm", "cuda"): TVMCudaBackend,
    ("tflite", "edgetpu"): EdgeTPUBackend,
}


def for_target(target: TargetDesc, options: CompileOptions, log: Log) -> Backend:
    return BACKENDS[target.backend, target.device_kind](target, options, log)

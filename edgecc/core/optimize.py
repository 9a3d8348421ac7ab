"""The target-independent front of every build: compile options, then load and run the pipeline.

`compile` (edgecc.compiler) and `tune` (edgecc.autotune.tuning) both start here, so what they
build and what they tune come from the same optimized model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_ir as ir

from edgecc.core import fixed_inputs
from edgecc.core.calibration import load_calibration, text_calibration
from edgecc.core.digest import sha256_file
from edgecc.core.ir import (forget_removed_inputs, graph_proto, load_model, release_mappings, shared_copy,
                            spill_weights)
from edgecc.core.pass_base import PassContext, unknown_message
from edgecc.core.pass_manager import Instrument, PassManager, PrintIRAfter, VerifyEachPass
from edgecc.core.pipeline import Pipeline, parse_pipeline
from edgecc.core.target import TargetDesc, load_target
from edgecc.core.verify import graph_inputs, graph_outputs
from edgecc.errors import UserError


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Everything a build depends on besides the model and the target; the manifest records it."""

    pipeline: str | None = None  # None: the target's default pipeline
    force: bool = False  # replace an existing artifact directory
    verify: bool = True  # check the artifact against ONNX Runtime before it is published
    verify_each_pass: bool = False  # run ORT after every pass; the first pass that drifts fails
    print_ir_after: tuple[str, ...] = ()  # pass names, or "all"
    dim_values: dict[str, int] = dataclasses.field(default_factory=dict)  # sizes verification feeds
    shapes: dict[str, int] = dataclasses.field(default_factory=dict)  # symbolic dims bound in the module
    constants: dict[str, Any] = dataclasses.field(default_factory=dict)  # graph inputs fixed (--const)
    calibration: str | os.PathLike | None = None  # an .npz of representative inputs
    calibration_text: str | os.PathLike | None = None  # or a text file, tokenized with `tokenizer`
    tokenizer: str | os.PathLike | None = None  # None: the model's own (metadata, or beside it)
    explain: bool = False  # passes report their near misses
    seed: int = 0  # seeds random inputs and synthetic calibration
    tuning_logs: tuple[str | os.PathLike, ...] = ()  # tuning-record files to apply
    tuning_store: str | os.PathLike | None | bool = None  # a store directory, None: default, False: none
    keep_reference: bool = False  # also ship model.opt.onnx, a second copy of every weight
    memory_check: bool = True  # refuse up front a model whose compile would not fit in memory

    def to_json(self) -> dict:
        """The options as the manifest records them (fixed inputs' values are under `constants`)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "constants":
                value = sorted(value)
            elif isinstance(value, (tuple, list)):
                value = [str(v) for v in value]
            elif isinstance(value, os.PathLike):
                value = str(value)
            out[f.name] = value
        return out


@dataclasses.dataclass
class Optimized:
    """A model after edgecc's passes: what a backend builds and what tuning measures.

    `source` (the model as loaded, with --const inputs fixed) and `optimized` share every weight
    the passes left alone; ONNX Runtime runs either as it is (edgecc.core.verify). `proto` and
    `source_proto` are their graphs as ModelProtos, large weights as data-less stubs
    (edgecc.core.ir.light_proto), for reading signatures and metadata.
    """

    target: TargetDesc
    pipeline: Pipeline
    ctx: PassContext
    source: ir.Model
    source_proto: onnx.ModelProto  # `source`'s graph
    optimized: ir.Model
    reports: list
    timings: dict[str, float]
    constants: dict[str, dict]  # graph inputs fixed with --const, as the manifest records them
    calibration: dict | None  # where the calibration data came from, as the manifest records it
    scratch: Any  # the temporary directory of the weights it reads (ir.spill_weights), removed with it; or None

    @functools.cached_property
    def proto(self) -> onnx.ModelProto:
        return graph_proto(self.optimized)


def run_pipeline(
    model: str | os.PathLike,
    target: str | TargetDesc,
    options: CompileOptions,
    log: Callable[[str], None] = lambda _msg: None,
    before_load: Callable[[TargetDesc], None] = lambda _t: None,
) -> Optimized:
    """Load a model and run the pipeline (the target's by default).

    `before_load` runs once the target and pipeline are known to be valid, before the long
    work: the place for a caller's own up-front checks (an output directory, a toolchain).
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tdesc = target if isinstance(target, TargetDesc) else load_target(target)
    pipe = parse_pipeline(options.pipeline if options.pipeline is not None else tdesc.default_pipeline)
    release = ReleaseMemory()
    manager = PassManager(pipe, _instruments(pipe, options) + (release,), log=log)  # checks the contract up front
    before_load(tdesc)
    # Verification must feed the sizes the module is specialized to.
    ctx = PassContext(target=tdesc, seed=options.seed, explain=options.explain,
                      dim_values={**options.dim_values, **options.shapes})

    if options.calibration is not None and options.calibration_text is not None:
        raise UserError("--calibration and --calibration-text: give one source of calibration data")
    if options.tokenizer is not None and options.calibration_text is None:
        raise UserError("--tokenizer: it reads --calibration-text, which is not given")

    log(f"loading {model}")
    loaded = load_model(model)
    if options.memory_check:
        check_memory(loaded, model)
    loaded, scratch = spill_weights(loaded)
    loaded, fixed = fixed_inputs.fix(loaded, options.constants, str(model))
    source = shared_copy(loaded)  # the pipeline changes `loaded` in place
    release.models.append(source)
    source_proto = graph_proto(source)
    symbolic = {d for spec in graph_inputs(source_proto) for d in spec.shape if isinstance(d, str)}
    graph_outputs(source_proto)  # an output edgecc cannot compile (a sequence) is refused up front
    unknown = sorted(set(options.shapes) - symbolic)
    if unknown:
        raise UserError(f"--shape {unknown[0]}: {model} has no symbolic dim of that name "
                        f"(its symbolic dims: {', '.join(sorted(symbolic)) or 'none'})")
    calibration = None
    if options.calibration is not None:
        ctx.calibration = load_calibration(options.calibration, source_proto)
        calibration = {"source": "npz", "file": str(options.calibration),
                       "sha256": sha256_file(Path(options.calibration))}
    elif options.calibration_text is not None:
        ctx.calibration, calibration = text_calibration(options.calibration_text, model, source_proto,
                                                        options.tokenizer)
    timings["load"] = round(time.perf_counter() - t, 3)
    log(f"loaded {model}: {len(source_proto.graph.node)} nodes, target {tdesc.name}, pipeline {pipe}")

    t = time.perf_counter()
    optimized, reports = manager.run(loaded, ctx)
    timings["passes"] = round(time.perf_counter() - t, 3)
    for r in reports if options.explain else ():
        for miss in r.stats.get("near_misses", []):
            log(f"{r.name}: near miss: {miss}")
    return Optimized(tdesc, pipe, ctx, source, source_proto, optimized, reports, timings, fixed,
                     calibration, scratch)


# A compile's peak resident memory, measured (benchmarks/compile_memory.py: 1.43 x the weights
# + 1 GB for TinyLlama-1.1B's shape, fp32 and int4): the libraries and the build's own, plus about
# one copy of the weights (a pass's new ones, the pages of the weight file that are read) and a
# margin. A model whose weights sit inside its protobuf is parsed twice while it is loaded.
PEAK_BASE_BYTES = 1.0e9
PEAK_PER_WEIGHT_BYTE = {"external": 1.6, "embedded": 2.2}


def check_memory(model: ir.Model, path, available: int | None = None) -> None:
    """A one-line UserError, before any pass runs, when the compile's estimated peak exceeds the
    memory available (MemAvailable; `available` in bytes overrides it)."""
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    weights = sum(t.nbytes for t in tensors)
    where = "external" if any(isinstance(t, ir.ExternalTensor) for t in tensors) else "embedded"
    need = PEAK_BASE_BYTES + PEAK_PER_WEIGHT_BYTE[where] * weights
    available = available if available is not None else available_memory()
    if available is not None and need > available:
        raise UserError(
            f"{path}: compiling it needs about {need / 1e9:.1f} GB at its peak, while building "
            f"({PEAK_PER_WEIGHT_BYTE[where]} x its {weights / 1e9:.2f} GB of weights + "
            f"{PEAK_BASE_BYTES / 1e9:.0f} GB), and {available / 1e9:.1f} GB of memory is available; free "
            "memory or compile on a larger machine (--no-memory-check tries anyway)")


def available_memory() -> int | None:
    """Bytes of memory the kernel can give without swapping (Linux MemAvailable), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class ReleaseMemory(Instrument):
    """After each pass, the memory of what it read or replaced is given back: the weights it
    replaced (ir.forget_removed_inputs), and the pages of external-data weights it read
    (ir.release_mappings), the model's and those of the `models` that share its tensors (the
    source keeps the weights a pass replaced, until verification maps them again)."""

    def __init__(self):
        self.models: list[ir.Model] = []

    def after_pass(self, p, model: ir.Model, report) -> None:
        forget_removed_inputs(model)
        release_mappings(model, *self.models)


def _instruments(pipe: Pipeline, options: CompileOptions) -> tuple[Instrument, ...]:
    in_pipeline = {spec.name for spec in pipe.passes}
    for name in options.print_ir_after:
        if name != "all" and name not in in_pipeline:
            raise UserError(unknown_message("--print-ir-after: no pass", name, in_pipeline | {"all"}) +
                            f" in pipeline '{pipe}'")
    return ((PrintIRAfter(set(options.print_ir_after)),) if options.print_ir_after else ()) + (
        (VerifyEachPass(),) if options.verify_each_pass else ())

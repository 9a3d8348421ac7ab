"""`edgecc.compile`: load, run the pipeline, build with the target's backend, verify, package.

One straight line of named stages over one backend (edgecc.backends), chosen by the target's
data. Everything is written into a staged directory that becomes the artifact only when every
stage (verification included) passed.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from edgecc import backends
from edgecc.core import lm_signature
from edgecc.core.ir import save_model
from edgecc.core.optimize import CompileOptions, Optimized, run_pipeline
from edgecc.core.target import TargetDesc, load_target
from edgecc.core.verify import TensorSpec, graph_inputs, graph_outputs, integer_ranges
from edgecc.errors import UserError
from edgecc.runtime.artifact import (REFERENCE_MODEL, Artifact, check_replaceable, staged_output,
                                     write_manifest)


def compile(
    model: str | os.PathLike,
    target: str | TargetDesc = "host",
    output: str | os.PathLike | None = None,
    pipeline: str | None = None,
    *,
    log: Callable[[str], None] = lambda _msg: None,
    **options: Any,
) -> Artifact:
    """Compile an ONNX file for a target into an artifact directory and return it loaded.

    `options` are edgecc.core.optimize.CompileOptions' fields (verify, shapes, constants,
    calibration, tuning_logs, ...). Tuning records that apply to the target come from
    `tuning_logs` files and from the local store (`tuning_store`: a directory, None for the
    default, False for none).
    """
    opts = CompileOptions(pipeline=pipeline, **options)
    tdesc = target if isinstance(target, TargetDesc) else load_target(target)
    backend = backends.for_target(tdesc, opts, log)
    out_dir = Path(output) if output is not None else Path("build") / tdesc.name

    def checks(_t: TargetDesc) -> None:
        check_replaceable(out_dir, opts.force, protect=(Path(model),))
        backend.check()

    opt = run_pipeline(model, tdesc, opts, log, before_load=checks)
    with staged_output(out_dir, opts.force, protect=(Path(model),)) as stage_dir:
        lm = _lm_facts(opt.source_proto, opt.proto, Path(model), stage_dir)
        t = time.perf_counter()
        built = backend.build(opt, stage_dir)
        opt.timings["build"] = round(time.perf_counter() - t, 3)
        if opts.keep_reference:  # verification below runs the optimized model from memory, not this file
            save_model(opt.optimized, stage_dir / REFERENCE_MODEL)
        manifest = {**manifest_head(opt, model, opts, backend.builder), **built, "timings_s": opt.timings,
                    **({"lm": lm} if lm else {})}
        write_manifest(stage_dir, manifest)

        verification = {"skipped": "disabled (--no-verify)"}
        if opts.verify:
            log("verifying the artifact against ONNX Runtime")
            t = time.perf_counter()
            verification = backend.verify(Artifact.load(stage_dir), opt)
            if "skipped" not in verification:
                opt.timings["verify"] = round(time.perf_counter() - t, 3)
        manifest = write_manifest(stage_dir, dict(manifest, verification=verification, timings_s=opt.timings))
        (stage_dir / "report.md").write_text(backend.report(manifest))
        write_manifest(stage_dir, manifest)
    return Artifact.load(out_dir)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def manifest_head(opt: Optimized, model, options: CompileOptions, builder: str) -> dict:
    """What every artifact's manifest records first: when and with which versions it was built
    (`builder`: the distribution that builds it), from what source, for which target, pipeline
    and options, its inputs and outputs (the optimized model's, with the dims `--shape` fixed
    written as numbers; an integer input that indexes a table or divides with the `range` [low,
    high) of the values it may take), and the passes' reports."""
    t = opt.target
    inputs, outputs = _bind(graph_inputs(opt.proto), options.shapes), _bind(graph_outputs(opt.proto), options.shapes)
    ranges = _input_ranges(opt)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {d: _version(d) for d in ("edgecc", builder, "onnx", "onnxruntime", "onnx-ir",
                                               "onnxscript", "onnxsim")},
        "source": {"path": str(model), "nodes": len(opt.source_proto.graph.node)},
        "target": dict(t.to_json(), fingerprint=t.fingerprint(), device_kind=t.device_kind,
                       host_arch=t.host_arch(), num_cores=t.num_cores()),
        "pipeline": str(opt.pipeline.resolved()),
        "pipeline_given": str(opt.pipeline),
        "options": options.to_json(),
        "inputs": [dict(s.to_json(), **({"range": list(ranges[s.name])} if s.name in ranges else {}))
                   for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        **({"constants": opt.constants} if opt.constants else {}),
        **({"calibration": opt.calibration} if opt.calibration else {}),
        "passes": [r.to_json() for r in opt.reports],
    }


def _lm_facts(source: onnx.ModelProto, optimized: onnx.ModelProto, model_path: Path, stage_dir: Path) -> dict:
    """A language model's facts: its signature recognized from the graph (lm_signature), the
    generation facts of its `edgecc.lm.*` metadata, and the tokenizer the metadata names (else a
    tokenizer.json beside the model) copied into the artifact, so `generate` and `bench` need only
    the artifact. Empty for a model that is not a causal LM with a KV cache and has no metadata."""
    lm = lm_signature.metadata(source, str(model_path))
    sig = lm_signature.find(source)
    if sig is not None:
        # the cache as the artifact takes it: a pass may shrink it (prune-heads drops K/V heads)
        shapes = {s.name: tuple(s.shape) for s in graph_inputs(optimized)}
        cache = tuple(dataclasses.replace(e, shape=shapes.get(e.past, e.shape)) for e in sig.cache)
        lm["signature"] = dataclasses.replace(sig, cache=cache).to_json()
    tokenizer = lm_signature.tokenizer_file(model_path, source) if sig is not None or "tokenizer" in lm else None
    if tokenizer is not None:
        shutil.copyfile(tokenizer, stage_dir / lm_signature.TOKENIZER)
        lm["tokenizer"] = lm_signature.TOKENIZER
    return lm


def _input_ranges(opt: Optimized) -> dict[str, tuple[int, int]]:
    """What `edgecc run` needs to draw integer inputs the model can take once the graph is gone."""
    try:
        return integer_ranges(opt.proto, opt.ctx.dim_values)
    except UserError:  # an input random data cannot stand in for (a shape): `run` needs --inputs anyway
        return {}


def _bind(specs: list[TensorSpec], shapes: dict[str, int]) -> list[TensorSpec]:
    """I/O signatures with the dims `--shape` fixed written as numbers."""
    return [dataclasses.replace(s, shape=tuple(shapes.get(d, d) if isinstance(d, str) else d for d in s.shape))
            for s in specs]

"""`edgecc.compile`: load, run the pipeline, lower, build, verify, package.

The whole flow is one straight line of named stages. Everything is written into a staged
directory that becomes the artifact only when every stage (verification included) passed.
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

import numpy as np
import onnx
import onnx_ir as ir

from edgecc.core import fixed_inputs
from edgecc.core import lm_signature
from edgecc.frontend import lower
from edgecc.backends import tvm_report as report
from edgecc.autotune import tuning
from edgecc.core.calibration import load_calibration
from edgecc.runtime.artifact import Artifact, check_replaceable, staged_output, write_manifest
from edgecc.backends.tvm_common import LIBRARY_NAME, build, require_tool
from edgecc.errors import UserError, VerificationError
from edgecc.core.ir import load_model, save_model, to_proto
from edgecc.runtime.isolate import ModuleCrash, run_isolated
from edgecc.core.pass_base import Pass, PassContext, unknown_message
from edgecc.core.pass_manager import Instrument, PassManager, PrintIRAfter, VerifyEachPass
from edgecc.core.pipeline import Pipeline, parse_pipeline
from edgecc.core.target import TargetDesc, load_target
from edgecc.core.verify import (TensorSpec, compare, cosine, graph_inputs, graph_outputs, input_rules,
                           random_inputs, relative_error, relative_rmse, run_ort, with_int8_activations)

OPT_MODEL = "model.opt.onnx"
TOKENIZER = "tokenizer.json"
# How far a lossy pipeline's module may be from ORT on the same graph (see _verify).
INT8_STEPS = 127
NOISE_FACTOR = 2.0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass
class Optimized:
    """A model after edgecc's passes, lowered to Relax: what compile builds and tune measures."""

    target: TargetDesc
    pipeline: Pipeline
    ctx: PassContext
    source: onnx.ModelProto
    optimized: ir.Model
    proto: onnx.ModelProto  # `optimized` as a ModelProto
    reports: list
    mod: Any  # the Relax IRModule; None until lowered (never, for a target that is not TVM's)
    timings: dict[str, float]
    constants: dict[str, dict]  # graph inputs fixed with --const, as the manifest records them


def run_pipeline(
    model: str | os.PathLike,
    target: str | TargetDesc = "host",
    pipeline: str | None = None,
    *,
    verify_each_pass: bool = False,
    print_ir_after: tuple[str, ...] = (),
    dim_values: dict[str, int] | None = None,
    calibration: str | os.PathLike | None = None,
    explain: bool = False,
    seed: int = 0,
    shapes: dict[str, int] | None = None,
    constants: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    before_load: Callable[[TargetDesc], None] = lambda _t: None,
) -> Optimized:
    """Load a model and run the pipeline (the target's by default); `optimize` then lowers it.

    `constants` fixes graph inputs to values (edgecc.core.fixed_inputs): the model is compiled, and
    verified, as if they were initializers. `before_load` runs once the target and pipeline are
    known to be valid, before the long work: the place for a caller's own up-front checks.
    """
    timings: dict[str, float] = {}

    def stage(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 3)

    t = time.perf_counter()
    tdesc = target if isinstance(target, TargetDesc) else load_target(target)
    pipe = parse_pipeline(pipeline if pipeline is not None else tdesc.default_pipeline)
    instruments: list[Instrument] = []
    in_pipeline = {spec.name for spec in pipe.passes}
    for name in print_ir_after:
        if name != "all" and name not in in_pipeline:
            raise UserError(unknown_message("--print-ir-after: no pass", name, in_pipeline | {"all"}) +
                            f" in pipeline '{pipe}'")
    if print_ir_after:
        instruments.append(PrintIRAfter(set(print_ir_after)))
    if verify_each_pass:
        instruments.append(VerifyEachPass())
    manager = PassManager(pipe, tuple(instruments), log=log)  # checks the contract up front
    before_load(tdesc)
    shapes = dict(shapes or {})
    # Verification must feed the sizes the module is specialized to.
    ctx = PassContext(target=tdesc, seed=seed, explain=explain, dim_values={**(dim_values or {}), **shapes})

    source_proto, fixed = fixed_inputs.fix(to_proto(load_model(model)), constants or {}, str(model))
    symbolic = {d for spec in graph_inputs(source_proto) for d in spec.shape if isinstance(d, str)}
    graph_outputs(source_proto)  # an output edgecc cannot compile (a sequence) is refused up front
    unknown = sorted(set(shapes) - symbolic)
    if unknown:
        raise UserError(f"--shape {unknown[0]}: {model} has no symbolic dim of that name "
                        f"(its symbolic dims: {', '.join(sorted(symbolic)) or 'none'})")
    if calibration is not None:
        ctx.calibration = load_calibration(calibration, source_proto)
    stage("load", t)
    log(f"loaded {model}: {len(source_proto.graph.node)} nodes, target {tdesc.name}, pipeline {pipe}")

    t = time.perf_counter()
    optimized, pass_reports = manager.run(ir.from_proto(source_proto), ctx)
    stage("passes", t)
    for r in pass_reports if explain else ():
        for miss in r.stats.get("near_misses", []):
            log(f"{r.name}: near miss: {miss}")
    return Optimized(tdesc, pipe, ctx, source_proto, optimized, to_proto(optimized), pass_reports, None,
                     timings, fixed)


def optimize(
    model: str | os.PathLike,
    target: str | TargetDesc = "host",
    pipeline: str | None = None,
    *,
    shapes: dict[str, int] | None = None,
    before_load: Callable[[TargetDesc], None] = lambda _t: None,
    **kwargs: Any,
) -> Optimized:
    """`run_pipeline`, then lower the optimized model to Relax (the target must be TVM's).

    `shapes` binds symbolic dims (by name) to sizes in the Relax module: its kernels become
    static, which tuning needs, and the module then accepts only those sizes.
    """
    def checks(tdesc: TargetDesc) -> None:
        if not tdesc.lowers_to_tvm:
            raise UserError(f"target '{tdesc.name}' has backend '{tdesc.backend}': it is not lowered to TVM "
                            "(tuning and Relax modules are TVM's); use `edgecc compile`")
        before_load(tdesc)

    opt = run_pipeline(model, target, pipeline, shapes=shapes, before_load=checks, **kwargs)
    t = time.perf_counter()
    opt.mod = lower.to_relax(opt.proto)
    if shapes:
        from tvm import relax

        opt.mod = relax.transform.BindSymbolicVars(shapes)(opt.mod)
    opt.timings["lower"] = round(time.perf_counter() - t, 3)
    return opt


def compile(
    model: str | os.PathLike,
    target: str | TargetDesc = "host",
    output: str | os.PathLike | None = None,
    pipeline: str | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    verify_each_pass: bool = False,
    print_ir_after: tuple[str, ...] = (),
    dim_values: dict[str, int] | None = None,
    calibration: str | os.PathLike | None = None,
    explain: bool = False,
    seed: int = 0,
    tuning_logs: tuple[str | os.PathLike, ...] = (),
    tuning_store: str | os.PathLike | None | bool = None,
    shapes: dict[str, int] | None = None,
    constants: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Artifact:
    """Compile an ONNX file for a target into an artifact directory and return it loaded.

    Tuning records that apply to the target come from `tuning_logs` files and from the local
    store (`tuning_store`: a directory, None for the default, False for none).
    """
    tdesc = target if isinstance(target, TargetDesc) else load_target(target)
    if not tdesc.lowers_to_tvm:  # the target says how it is built; edgecc never asks its name
        from edgecc.backends.edgetpu.backend import compile_tflite

        if tuning_logs:
            raise UserError(f"--tuning-log: target '{tdesc.name}' is not built by TVM; "
                            "tuning records do not apply")
        return compile_tflite(model, tdesc, output, pipeline, force=force, verify=verify,
                              verify_each_pass=verify_each_pass, print_ir_after=print_ir_after,
                              dim_values=dim_values, calibration=calibration, explain=explain, seed=seed,
                              shapes=shapes, constants=constants, log=log)
    out_dir = Path(output) if output is not None else None
    runner_info: dict[str, Any] = {}

    def checks(tdesc: TargetDesc) -> None:
        nonlocal out_dir
        out_dir = out_dir if out_dir is not None else Path("build") / tdesc.name
        check_replaceable(out_dir, force, protect=(Path(model),))
        require_tool(tdesc, "cc")  # a missing cross toolchain must fail before the long work
        runner_info["runner"], runner_info["why_not"] = _runner_for(tdesc)
        runner_info["records"] = tuning.records_for(tdesc, tuning_logs, tuning_store, log)

    opt = optimize(model, tdesc, pipeline, verify_each_pass=verify_each_pass, print_ir_after=print_ir_after,
                   dim_values=dim_values, calibration=calibration, explain=explain, seed=seed,
                   shapes=shapes, constants=constants, log=log, before_load=checks)
    tdesc, pipe, ctx, timings = opt.target, opt.pipeline, opt.ctx, opt.timings
    source_proto, optimized, opt_proto, pass_reports, mod = opt.source, opt.optimized, opt.proto, opt.reports, opt.mod
    runner, why_not = runner_info["runner"], runner_info["why_not"]
    inputs, outputs = (_bind(graph_inputs(source_proto), shapes or {}),
                       _bind(graph_outputs(source_proto), shapes or {}))

    def stage(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 3)

    with staged_output(out_dir, force, protect=(Path(model),)) as stage_dir:
        lm = _lm_facts(source_proto, Path(model), stage_dir)
        t = time.perf_counter()
        log(f"building for {tdesc.name} ({tdesc.device_kind}, host {tdesc.host_arch()})")
        build_facts = build(mod, tdesc, stage_dir / LIBRARY_NAME, runner_info["records"])
        stage("build", t)
        save_model(optimized, stage_dir / OPT_MODEL)

        manifest = {
            **manifest_head(opt, model, inputs, outputs, "apache-tvm"),
            "build": build_facts,
            "timings_s": timings,
            **({"lm": lm} if lm else {}),
        }
        write_manifest(stage_dir, manifest)

        verification = {"skipped": "disabled (--no-verify)"}
        if verify and runner is None:
            verification = {"skipped": f"artifact for {tdesc.name} cannot run on this host: {why_not}"}
            log(f"not verified: {verification['skipped']}")
        elif verify:
            t = time.perf_counter()
            lossy = [spec.instantiate() for spec in pipe.passes if spec.pass_class().drift is not None]
            synthetic = [r.name for r in pass_reports if r.stats.get("calibration") == "synthetic"]
            hint = (f" ({', '.join(synthetic)} calibrated on synthetic inputs: give real ones with "
                    "--calibration)") if synthetic else ""
            verification = _verify(Artifact.load(stage_dir), runner, source_proto, opt_proto, lossy, ctx, hint)
            stage("verify", t)
            log(f"verified against ONNX Runtime ({verification['runner']}): "
                f"max abs error {verification['max_abs']:.3g}")
        manifest["verification"] = verification
        manifest["timings_s"] = timings
        manifest = write_manifest(stage_dir, manifest)
        (stage_dir / "report.md").write_text(report.render(manifest))
        manifest = write_manifest(stage_dir, manifest)
    return Artifact.load(out_dir)


def manifest_head(opt: Optimized, model, inputs: list[TensorSpec], outputs: list[TensorSpec],
                  builder: str) -> dict:
    """What every artifact's manifest records first: when and with which versions it was built
    (`builder`: the distribution that builds it), from what source, for which target and
    pipeline, its inputs and outputs, and the passes' reports."""
    t = opt.target
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {d: _version(d) for d in ("edgecc", builder, "onnx", "onnxruntime", "onnx-ir",
                                               "onnxscript", "onnxsim")},
        "source": {"path": str(model), "nodes": len(opt.source.graph.node)},
        "target": dict(t.to_json(), fingerprint=t.fingerprint(), device_kind=t.device_kind,
                       host_arch=t.host_arch(), num_cores=t.num_cores()),
        "pipeline": str(opt.pipeline.resolved()),
        "pipeline_given": str(opt.pipeline),
        "inputs": [s.to_json() for s in inputs],
        "outputs": [s.to_json() for s in outputs],
        **({"constants": opt.constants} if opt.constants else {}),
        "passes": [r.to_json() for r in opt.reports],
    }


def _lm_facts(source: onnx.ModelProto, model_path: Path, stage_dir: Path) -> dict:
    """A language model's facts: its signature recognized from the graph (lm_signature), the
    generation facts of its `edgecc.lm.*` metadata, and the tokenizer the metadata names (else a
    tokenizer.json beside the model) copied into the artifact, so `generate` and `bench` need only
    the artifact. Empty for a model that is not a causal LM with a KV cache and has no metadata."""
    lm = lm_signature.metadata(source, str(model_path))
    sig = lm_signature.find(source)
    if sig is not None:
        lm["signature"] = sig.to_json()
        if "tokenizer" not in lm and (model_path.parent / TOKENIZER).is_file():
            lm["tokenizer"] = TOKENIZER
    if "tokenizer" in lm:
        tokenizer = model_path.parent / lm["tokenizer"]
        # Metadata is data from the model's author: it may name a file beside the model, no other.
        if not isinstance(lm["tokenizer"], str) or tokenizer.resolve().parent != model_path.resolve().parent:
            raise UserError(f"{model_path}: its metadata names tokenizer {lm['tokenizer']!r}, which is not "
                            "a file in the model's directory")
        if not tokenizer.is_file():
            raise UserError(f"{model_path}: its metadata names tokenizer '{lm['tokenizer']}', "
                            f"which is not beside it ({tokenizer})")
        shutil.copyfile(tokenizer, stage_dir / TOKENIZER)
        lm["tokenizer"] = TOKENIZER
    return lm


def _bind(specs: list[TensorSpec], shapes: dict[str, int]) -> list[TensorSpec]:
    """I/O signatures with the dims `--shape` fixed written as numbers."""
    return [dataclasses.replace(s, shape=tuple(shapes.get(d, d) if isinstance(d, str) else d for d in s.shape))
            for s in specs]


def _describe_shapes(shapes: dict[str, list[int]]) -> str:
    """Input shapes for a message; a run of inputs with one shape (a KV cache) as first .. last."""
    groups: list[tuple[list[int], list[str]]] = []
    for name, shape in shapes.items():
        if groups and groups[-1][0] == shape:
            groups[-1][1].append(name)
        else:
            groups.append((shape, [name]))
    return ", ".join(f"{names[0]} .. {names[-1]} ({len(names)} inputs) {shape}" if len(names) > 3
                     else ", ".join(f"{n} {shape}" for n in names) for shape, names in groups)


def _runner_for(target: TargetDesc) -> tuple[Callable | None, str]:
    """How to run this target's artifacts here: natively, under emulation, or not (and why)."""
    if target.runs_here():
        return run_isolated, ""  # a crash in the module must not end edgecc
    if target.device_kind != "llvm" or target.host_arch() != "aarch64":
        return None, f"{target.device_kind} code for {target.host_arch()} needs the device"
    from edgecc.runtime import emulator

    state = emulator.status()
    if not state["ok"]:
        return None, f"aarch64 emulator not set up ({state['reason']}); run `edgecc emulator setup`"
    return (lambda art, feeds: emulator.run_artifact(art.path, feeds)), ""


def _verify(artifact: Artifact, runner: Callable, source: onnx.ModelProto, optimized: onnx.ModelProto,
            lossy: list[Pass], ctx: PassContext, hint: str = "") -> dict:
    """The compiled module vs ONNX Runtime on seeded random inputs.

    A lossless pipeline is checked elementwise against the source model at the fp32 tolerance
    for two engines (verify.ACROSS_ENGINES). A
    lossy one is checked against ORT running the optimized model, the same quantized graph,
    by relative RMS error. Not elementwise, and not to a fixed bound: where a value lands on a
    rounding boundary, another float summation order rounds it to the neighbouring int8 level,
    and in a deep model that flip spreads (MiniLM, dynamic int8, random inputs: the first flips
    appear in layer 2, and after 6 layers the two runs differ by a relative RMS error of 0.052,
    less than either's own distance from fp32). So the bound is the reference's own
    quantization noise: the module may differ from it by at most twice what the reference
    differs from fp32 (and always by one int8 step, 1/127); a wrong kernel or layout is off by
    far more. Then the module against the fp32 source, within the relative RMS error its lossy
    passes declare together.
    """
    feeds = random_inputs(source, ctx.seed, ctx.dim_values)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    described = _describe_shapes(shapes)
    fp32 = run_ort(source, feeds)  # first: inputs the model itself cannot take are the user's to fix
    try:
        got = runner(artifact, feeds)
    except ModuleCrash as e:
        raise VerificationError(f"{e} while verifying on inputs {described}") from None
    except UserError:
        raise
    except Exception as e:  # the module raised where ONNX Runtime ran (a shape check, a kernel)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VerificationError(f"compiled module failed on inputs {described} where ONNX Runtime ran: "
                                f"{type(e).__name__}: {detail[:300]}") from None
    extra = {}
    if lossy:
        reference = run_ort(with_int8_activations(optimized), feeds)
        result = compare(reference, got, tolerance=(np.inf, 0.0))  # names, shapes, NaNs, infinities
        rmse, noise = relative_rmse(reference, got), relative_rmse(fp32, reference)
        bound = max(1 / INT8_STEPS, NOISE_FACTOR * noise)
        extra = {"relative_rmse_vs_reference": rmse, "reference_relative_rmse_vs_fp32": noise,
                 "tolerance": f"relative RMS error <= max(1/{INT8_STEPS}, {NOISE_FACTOR} x "
                              f"the reference's {noise:.3g} from fp32) = {bound:.3g}"}
        if result.ok and rmse > bound:
            raise VerificationError(
                f"compiled module disagrees with the optimized model in ONNX Runtime on inputs {described}: "
                f"relative RMS error {rmse:.3g} > {bound:.3g} (ORT's own distance from fp32 is {noise:.3g})")
    else:
        result = compare(fp32, got, across_engines=True)
    if not result.ok:
        what = "the optimized model in ONNX Runtime" if lossy else "ONNX Runtime"
        raise VerificationError(f"compiled module disagrees with {what} on inputs {described}: {result.detail}")
    accuracy = {"relative_rmse_vs_fp32": relative_rmse(fp32, got),
                "relative_error_vs_fp32": relative_error(fp32, got), "cosine_vs_fp32": cosine(fp32, got)}
    allowed = sum(p.drift for p in lossy)
    if lossy and accuracy["relative_rmse_vs_fp32"] > allowed:
        raise VerificationError(
            f"compiled module is a relative RMS error of {accuracy['relative_rmse_vs_fp32']:.3g} away from "
            f"the fp32 model, more than the {allowed:g} its lossy passes declare "
            f"({', '.join(p.name for p in lossy)}){hint}")
    how = "native" if artifact.runs_here() else "qemu-user emulation"
    return dict(result.to_json(), **extra, **accuracy, seed=ctx.seed, input_shapes=shapes,
                inputs_drawn=input_rules(source, ctx.dim_values),
                reference="onnxruntime (optimized model)" if lossy else "onnxruntime", runner=how)

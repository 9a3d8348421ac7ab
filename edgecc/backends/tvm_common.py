"""What the TVM backends share: lowering to Relax, the "zero" pipeline tuning and building both
start from, tuning records, and verification of a TVM artifact against ONNX Runtime.

CPU targets are built by edgecc.backends.tvm_cpu, CUDA targets by edgecc.backends.tvm_cuda; both
build from `prepare`, which `edgecc tune` measures, so tuning records match what is built.
"""

from __future__ import annotations

import abc
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import tvm
from tvm import relax, topi

from edgecc.backends import decode_step, tvm_report
from edgecc.backends.base import Backend
from edgecc.core.ir import graph_proto, light_proto
from edgecc.core.optimize import Optimized
from edgecc.core.pass_base import Pass, PassContext
from edgecc.core.target import TargetDesc
from edgecc.core.tuning_log import records_for, to_ms_database
from edgecc.core.verify import (compare, cosine, input_rules, narrow, narrowed_io, random_inputs, relative_error, relative_rmse,
                                run_ort, with_int8_activations)
from edgecc.errors import UserError, VerificationError
from edgecc.frontend import lower as frontend
from edgecc.kernels import attention, dense, rms_norm
from edgecc.kernels.common import rewrite_functions
from edgecc.runtime import emulator
from edgecc.runtime.artifact import Artifact
from edgecc.runtime.isolate import ModuleCrash, run_isolated

LIBRARY_NAME = "model.so"
# How far a lossy pipeline's module may be from ORT on the same graph (see _verify).
INT8_STEPS = 127
NOISE_FACTOR = 2.0


class TVMBackend(Backend):
    """A target built by TVM: the CPU and CUDA backends differ only in `build`."""

    builder = "apache-tvm"

    def check(self) -> None:
        require_tool(self.target, "cc")  # a missing cross toolchain must fail before the long work
        self.runner, self.why_not = _runner_for(self.target)
        self.records = records_for(self.target, self.options.tuning_logs, self.options.tuning_store, self.log)

    def build(self, opt: Optimized, stage_dir: Path) -> dict:
        self.log("lowering to TVM Relax")
        lowered = [lower(opt, self.options.shapes)]  # first: an op nobody can lower fails before the long work
        self.step = decode_step.of_model(opt.proto)
        t = self.target
        self.log(f"building for {t.name} ({t.device_kind}, host {t.host_arch()})")
        return {"build": self.build_lowered(lowered, stage_dir)}

    @abc.abstractmethod
    def build_lowered(self, lowered: list, stage_dir: Path) -> dict:
        """Build the lowered Relax module, which it takes out of the one-element list `lowered`
        (so that nothing else keeps its weights alive once a build step has replaced them), into
        `stage_dir`; returns the manifest's `build` entry."""

    def verify(self, artifact: Artifact, opt: Optimized) -> dict:
        if self.runner is None:
            skipped = f"artifact for {self.target.name} cannot run on this host: {self.why_not}"
            self.log(f"not verified: {skipped}")
            return {"skipped": skipped}
        lossy = [spec.instantiate() for spec in opt.pipeline.passes if spec.pass_class().drift is not None]
        synthetic = [r.name for r in opt.reports if r.stats.get("calibration") == "synthetic"]
        hint = (f" ({', '.join(synthetic)} calibrated on synthetic inputs: give real ones with "
                "--calibration)") if synthetic else ""
        result = _verify(artifact, self.runner, opt.source, opt.optimized, lossy, opt.ctx, hint)
        self.log(f"verified against ONNX Runtime ({result['runner']}): max abs error {result['max_abs']:.3g}")
        if "decode" in artifact.manifest["build"]:  # the one-token step's own function, on a step's inputs
            ctx = dataclasses.replace(opt.ctx, dim_values={**opt.ctx.dim_values, **self.step.dims})
            result["decode"] = _verify(artifact, self.runner, opt.source, opt.optimized, lossy, ctx, hint)
            self.log(f"verified the one-token step: max abs error {result['decode']['max_abs']:.3g}")
        return result

    def report(self, manifest: dict) -> str:
        return tvm_report.render(manifest)


def lower(opt: Optimized, shapes: dict[str, int]):
    """The optimized model as a Relax module. `shapes` binds symbolic dims (by name) to sizes:
    the kernels become static, which tuning needs, and the module then accepts only those sizes."""
    t = time.perf_counter()
    mod = frontend.to_relax(*light_proto(opt.optimized), pinned=shapes)
    left = {str(v) for f in mod.functions.values() if isinstance(f, relax.Function)
            for v in relax.analysis.defined_symbolic_vars(f)}
    if left & shapes.keys():  # a dim no graph input has, only an op's output
        mod = relax.transform.BindSymbolicVars({k: v for k, v in shapes.items() if k in left})(mod)
    opt.timings["lower"] = round(time.perf_counter() - t, 3)
    return mod


def require_tool(target: TargetDesc, key: str) -> str:
    """The toolchain program `key` of the target, or a one-line error saying how to get it."""
    program = target.toolchain[key]
    if shutil.which(program) is None:
        package = target.toolchain.get("package")
        how = f"; install it with: apt-get install {package}" if package else ""
        raise UserError(f"target '{target.name}': toolchain program '{program}' not found on PATH{how}")
    return program


def prepare(mod, tgt: tvm.target.Target, weights: list | None = None, decode: dict[str, int] | None = None):
    """Relax's "zero" pipeline for the TVM target: the legalized, fused PrimFuncs that tuning measures
    and build schedules. Tuning and compiling must both start here for records to match.

    On CPUs, attention with symbolic lengths first becomes edgecc's attention kernel
    (kernels/attention.py), and RMSNorm with the residual add before it one kernel
    (kernels/rms_norm.py). Then FastMathTransform: erf, tanh and exp become TVM's polynomial
    approximations (float32 accurate to about 1e-6, like ONNX Runtime's MLAS kernels), which
    vectorize; the exact ones call libm once per element. On CPUs, matmuls with a constant
    weight and symbolic rows then go to edgecc's dense kernel (kernels/dense.py); no tuning could
    reach either. `weights`: the values of `main`'s lifted parameters
    (edgecc.runtime.weights.lift), which that routing updates. `decode`: an LM's one-token dims,
    for a `decode` function beside `main` (edgecc.backends.decode_step).
    """
    if tgt.kind.name == "llvm":
        mod, _ = attention.route(mod, tgt)
        mod, _ = rms_norm.route(mod, tgt)
    mod = fast_math(mod)
    if tgt.kind.name == "llvm":
        mod, _ = dense.route_symbolic_matmuls(mod, tgt, weights)
    if decode:
        mod = decode_step.add(mod, decode)
    with tgt:
        return relax.get_pipeline("zero")(unfused_dim_readers(relax.transform.LegalizeOps()(mod)))


def unfused_dim_readers(mod):
    """Kernels that read a symbolic dim as a value (a scalar parameter no buffer's shape has, as
    shape_to_tensor's) are kept out of fusion. Fused, the dim becomes a scalar parameter of the
    fused function while being a shape variable of the module too, and FuseTIR stops in RenewDefs
    (`VarRemapGet(source) == nullptr`). They write a handful of integers; fusing them gains nothing.
    """
    opaque = 8  # relax.OpPatternKind.kOpaque: FuseOps leaves the kernel alone
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        buffers = [p.ty for p in func.params if isinstance(p.ty, tvm.tirx.BufferType)]
        in_shapes = {v for buf in buffers for dim in buf.shape for v in tvm.tirx.analysis.undefined_vars(dim)}
        if any(isinstance(p.ty, tvm.ir.PrimType) and p not in in_shapes for p in func.params):
            mod[gv] = func.with_attr("op_pattern", opaque)
    return mod


def _fast_sigmoid(x):
    """1 / (1 + e^-x) on fast_exp. fast_exp clamps its argument to +-88.4, so a very negative x
    gives 1e-38 rather than 0, and a very positive one 1."""
    one = tvm.tirx.const(1, x.dtype)  # float16 stays float16 (fast_exp is exp there)
    return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))


def fast_math(mod):
    """relax.transform.FastMathTransform, except on tensors whose shape Relax does not know (an
    ONNX Reshape to a computed shape makes one): TVM's pass asserts on those; they keep the exact op.
    Sigmoid too, which TVM's pass leaves exact (SiLU: 9 of SmolLM2's 204 ms prefill at 128 tokens)."""
    fast = {"relax.nn.softmax": lambda b, c: b.call_te(topi.nn.fast_softmax, c.args[0], c.attrs.axis),
            "relax.exp": lambda b, c: b.call_te(topi.fast_exp, c.args[0]),
            "relax.erf": lambda b, c: b.call_te(topi.fast_erf, c.args[0]),
            "relax.tanh": lambda b, c: b.call_te(topi.fast_tanh, c.args[0]),
            "relax.sigmoid": lambda b, c: b.call_te(_fast_sigmoid, c.args[0])}

    @relax.expr_functor.mutator
    class FastMath(relax.PyExprMutator):
        def visit_call_(self, call):
            rewrite = fast.get(getattr(call.op, "name", None))
            if rewrite and isinstance(getattr(call.args[0].ty, "shape", None), relax.ShapeExpr):
                return rewrite(self.builder_, call)
            return super().visit_call_(call)

    return rewrite_functions(mod, FastMath)


def apply_records(mod, tgt, records) -> tuple[Any, list[str]]:
    """Schedule the PrimFuncs that have a tuning record; returns the module and their names."""
    if not records:
        return mod, []
    with tgt, to_ms_database(records):
        tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
    names = [gv.name_hint for gv, f in tuned.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and not f.same_as(mod[gv])]
    return tuned, names


def tuning_facts(mod, tuned: list[str], records) -> dict:
    """What the manifest says about schedules: how many kernels were tuned, how many were not."""
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    return {"kernels": len(kernels), "tuned_kernels": len(tuned),
            "default_schedule_kernels": len(kernels) - len(tuned),
            "tuning_records_available": len(records), "tuned": sorted(tuned)}


def _runner_for(target: TargetDesc) -> tuple[Callable | None, str]:
    """How to run this target's artifacts here: natively, under emulation, or not (and why)."""
    if target.runs_here():
        return run_isolated, ""  # a crash in the module must not end edgecc
    if target.device_kind != "llvm" or target.host_arch() != "aarch64":
        return None, f"{target.device_kind} code for {target.host_arch()} needs the device"
    state = emulator.status()
    if not state["ok"]:
        return None, f"aarch64 emulator not set up ({state['reason']}); run `edgecc emulator setup`"
    return (lambda art, feeds: emulator.run_artifact(art.path, feeds)), ""


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


def _verify(artifact: Artifact, runner: Callable, source: ir.Model, optimized: ir.Model,
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
    source_feeds = random_inputs(source, ctx.seed, ctx.dim_values)
    narrowed = narrowed_io(optimized)  # a pruned KV cache: the source's feeds and outputs at its heads
    feeds = narrow(source_feeds, narrowed)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    described = _describe_shapes(shapes)
    fp32 = narrow(run_ort(source, source_feeds), narrowed)  # first: inputs the model cannot take are the user's to fix
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
        graph, weights = light_proto(optimized)
        reference = run_ort(with_int8_activations(graph), feeds, weights=weights)
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
                inputs_drawn=input_rules(graph_proto(source), ctx.dim_values),
                reference="onnxruntime (optimized model)" if lossy else "onnxruntime", runner=how)

"""The Edge TPU backend (`--target coral-edgetpu`): the optimized model as a fully-int8 TFLite.

`build`, after the target's pipeline (static shapes, legalizations):
1. the host cut recorded by `host-embedding`: its nodes become `host.onnx` (ONNX Runtime), the
   rest is the device part whose inputs are the cut's tensors;
2. calibration: the batch-1 samples of `--calibration` (arrays stacked along the batch dim), or,
   without it, SYNTHETIC_SAMPLES seeded random batches with a warning (what quantize-int8's static
   mode does): scales from random inputs are a guess, and the manifest says which was used;
3. `model.tflite` (edgecc.backends.edgetpu.tflite), its predicted mapping (`edgetpu_predict.json`,
   `edgetpu_compiler.log`) and, when edgetpu_compiler is installed, its real one beside it.

`verify` runs the artifact as `edgecc run` runs it (LiteRT) on the calibration inputs against
ONNX Runtime fp32 on the source model, within the target's cosine and relative RMS error bounds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.utils
import onnx_ir as ir

from edgecc.backends.base import Backend
from edgecc.backends.edgetpu import predict, tflite
from edgecc.backends.edgetpu.report import render
from edgecc.core.optimize import Optimized
from edgecc.core.target import TargetDesc
from edgecc.core.verify import cosine, graph_inputs, ort_session, random_inputs, relative_rmse
from edgecc.errors import UserError, VerificationError
from edgecc.passes.host_embedding import HOST_OUTPUTS_KEY, host_nodes
from edgecc.runtime import litert
from edgecc.runtime.artifact import Artifact

SYNTHETIC_SAMPLES = 8
PREDICT_JSON = "edgetpu_predict.json"
PREDICT_LOG = "edgetpu_compiler.log"
COMPILER_LOG = "edgetpu_compiler.actual.log"
PREDICTION_KEYS = ("label", "compiler_version", "ops_total", "ops_on_edgetpu", "ops_on_cpu", "macs_total",
                   "macs_on_edgetpu", "mac_coverage", "segment_ends_at", "table")


def _samples(
    opt: onnx.ModelProto, data: dict[str, np.ndarray] | None, seed: int, log: Callable[[str], None]
) -> tuple[list[dict], str]:
    """Batch-1 feeds for calibration and verification, and where they came from."""
    specs = graph_inputs(opt)
    if data is None:
        log(
            f"warning: no --calibration: int8 scales come from {SYNTHETIC_SAMPLES} seeded random batches; "
            "give real inputs for real accuracy"
        )
        return [random_inputs(opt, seed + i) for i in range(SYNTHETIC_SAMPLES)], "synthetic"
    counts = {len(data[s.name]) for s in specs}
    if len(counts) != 1:
        raise UserError(
            f"--calibration: inputs hold different numbers of samples along dim 0: {sorted(counts)}"
        )
    samples = [{s.name: data[s.name][i : i + 1] for s in specs} for i in range(counts.pop())]
    for s in specs:
        if tuple(samples[0][s.name].shape) != tuple(s.shape):
            raise UserError(
                f"--calibration: '{s.name}' samples have shape {list(samples[0][s.name].shape)}, "
                f"the compiled model takes {list(s.shape)}"
            )
    return samples, "calibration data"


def _host_split(opt) -> tuple[set[int], list[str]]:
    """Indices of the host nodes and the names of the tensors the device part reads from them."""
    if HOST_OUTPUTS_KEY not in opt.optimized.metadata_props:
        ints = [s for s in graph_inputs(opt.proto) if s.dtype.kind in "iub"]
        if ints:
            raise UserError(
                f"input '{ints[0].name}' is {ints[0].dtype}: the Edge TPU computes int8 activations "
                "only; add host-embedding to the pipeline to leave lookups to the host"
            )
        return set(), []
    host = set(host_nodes(opt.optimized.graph))
    return (
        {i for i, n in enumerate(opt.optimized.graph) if n in host},
        json.loads(opt.optimized.metadata_props[HOST_OUTPUTS_KEY]),
    )


class EdgeTPUBackend(Backend):
    builder = "ai-edge-litert"

    def check(self) -> None:
        if self.options.tuning_logs:
            raise UserError(f"--tuning-log: target '{self.target.name}' is not built by TVM; "
                            "tuning records do not apply")

    def build(self, opt: Optimized, stage_dir: Path) -> dict:
        self.log("calibrating int8 ranges in ONNX Runtime")
        t = time.perf_counter()
        model = ir.to_proto(opt.optimized)  # with its weights: the TFLite writer reads them from the proto
        self.samples, self.origin = _samples(model, opt.ctx.calibration, self.options.seed, self.log)
        skip, host_outputs = _host_split(opt)
        device_inputs = host_outputs + [s.name for s in graph_inputs(model) if s.dtype.kind == "f"]
        ranges = tflite.calibrate(model, self.samples)
        opt.timings["calibrate"] = round(time.perf_counter() - t, 3)
        self.log(f"writing {litert.TFLITE}")
        t = time.perf_counter()
        exported = tflite.export(model, ranges, skip, device_inputs)
        opt.timings["export"] = round(time.perf_counter() - t, 3)
        prediction = predict.predict(exported.flatbuffer, self.target.edgetpu)
        self.log(
            f"predicted: {prediction['ops_on_edgetpu']} of {prediction['ops_total']} ops on the Edge TPU, "
            f"{prediction['mac_coverage']:.1%} of MACs ({predict.LABEL})"
        )
        (stage_dir / litert.TFLITE).write_bytes(exported.flatbuffer)
        if host_outputs:
            ints = [s.name for s in graph_inputs(model) if s.dtype.kind in "iub"]
            onnx.save(onnx.utils.Extractor(model).extract_model(ints, host_outputs),
                      stage_dir / litert.HOST_MODEL)
        (stage_dir / PREDICT_JSON).write_text(json.dumps(prediction, indent=2) + "\n")
        (stage_dir / PREDICT_LOG).write_text(predict.render_log(prediction, litert.TFLITE))
        compiled = _run_compiler(self.target, stage_dir, prediction, self.log)
        return {
            "build": {
                "format": "tflite",
                "library": litert.TFLITE,
                "runtime": "litert",
                "ops": prediction["ops_total"],
                "tflite_bytes": len(exported.flatbuffer),
            },
            "edgetpu": {
                "tflite_inputs": exported.inputs,
                "tflite_outputs": exported.outputs,
                "host_model": litert.HOST_MODEL if host_outputs else None,
                "host_outputs": host_outputs,
                "calibration": {"source": self.origin, "samples": len(self.samples)},
                "prediction": {k: prediction[k] for k in PREDICTION_KEYS},
                "compiler": compiled,
            },
        }

    def verify(self, artifact: Artifact, opt: Optimized) -> dict:
        result = _verify(artifact, opt.source, self.samples, self.origin, self.target.edgetpu["verify"])
        self.log(f"verified in LiteRT against ONNX Runtime fp32: cosine {result['cosine_vs_fp32']:.5f}, "
                 f"relative RMS error {result['relative_rmse_vs_fp32']:.4f}")
        return result

    def report(self, manifest: dict) -> str:
        return render(manifest)


def _run_compiler(target: TargetDesc, stage_dir: Path, prediction: dict, log) -> dict | None:
    """edgetpu_compiler's own mapping, when it is installed, and where the prediction differed."""
    exe = target.toolchain.get("edgetpu_compiler", "edgetpu_compiler")
    with tempfile.TemporaryDirectory() as tmp:
        result = predict.run_compiler(exe, stage_dir / litert.TFLITE, Path(tmp))
        if result is None:
            return None
        if result.get("compiled_model"):
            (stage_dir / "model_edgetpu.tflite").write_bytes(
                (Path(tmp) / result["compiled_model"]).read_bytes()
            )
            result["compiled_model"] = "model_edgetpu.tflite"
    (stage_dir / COMPILER_LOG).write_text(result.pop("log"))
    result["log"] = COMPILER_LOG
    if "table" in result:
        result["differences"] = predict.differences(prediction["table"], result["table"])
        log(
            f"edgetpu_compiler: {result['ops_on_edgetpu']} ops on the Edge TPU; "
            f"{len(result['differences'])} rows differ from the prediction"
        )
    else:
        log(f"edgetpu_compiler failed: {result['error']}")
    return result


def _verify(
    artifact: Artifact, source: ir.Model, samples: list[dict], origin: str, bounds: dict
) -> dict:
    got: dict[str, list] = {}
    ref: dict[str, list] = {}
    run, reference = litert.runner(artifact), ort_session(source)
    names = [o.name for o in reference.get_outputs()]
    for feeds in samples:
        for name, value in run(feeds).items():
            got.setdefault(name, []).append(value)
        for name, value in zip(names, reference.run(names, feeds)):
            ref.setdefault(name, []).append(value)
    got_all = {k: np.concatenate(v) for k, v in got.items()}
    ref_all = {k: np.concatenate(v) for k, v in ref.items()}
    cos, rmse = cosine(ref_all, got_all), relative_rmse(ref_all, got_all)
    result = {
        "reference": "onnxruntime fp32 (source model)",
        "runner": "ai-edge-litert Interpreter (CPU)",
        "inputs": f"{len(samples)} {origin} samples",
        "cosine_vs_fp32": cos,
        "relative_rmse_vs_fp32": rmse,
        "min_cosine": bounds["min_cosine"],
        "max_relative_rmse": bounds["max_relative_rmse"],
    }
    if cos < bounds["min_cosine"] or rmse > bounds["max_relative_rmse"]:
        raise VerificationError(
            f"the int8 TFLite model is too far from fp32 on the {origin}: cosine {cos:.4f} (at least "
            f"{bounds['min_cosine']}), relative RMS error {rmse:.4f} (at most {bounds['max_relative_rmse']})"
        )
    return result

"""The Edge TPU backend (`--target coral-edgetpu`): the optimized model as a chain of fully-int8
TFLite segments for the Edge TPU and ONNX segments for the host.

`build`, after the target's pipeline (static shapes, legalizations):
1. calibration: the batch-1 samples of `--calibration` (arrays stacked along the batch dim), or,
   without it, SYNTHETIC_SAMPLES seeded random batches with a warning (what quantize-int8's static
   mode does): scales from random inputs are a guess, and the manifest says which was used;
2. segmentation (edgecc.backends.edgetpu.segment): every node that maps goes to an Edge TPU segment
   (`tpuN.tflite`, fully int8), the rest to host segments (`hostN.onnx`, float, ONNX Runtime);
3. the predicted mapping of the whole chain (`edgetpu_predict.json`, `edgetpu_compiler.log`) and,
   when edgetpu_compiler is installed, its real one beside it (the segments co-compiled).

`verify` runs the chain as `edgecc run` runs it (LiteRT and ONNX Runtime) on the calibration inputs
against ONNX Runtime fp32 on the source model, within the target's cosine and relative RMS bounds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir

from edgecc.backends.base import Backend
from edgecc.backends.edgetpu import predict, segment, tflite
from edgecc.backends.edgetpu.report import render
from edgecc.core.calibration import one_at_a_time
from edgecc.core.optimize import Optimized
from edgecc.core.target import TargetDesc
from edgecc.core.verify import cosine, graph_inputs, ort_session, random_inputs, relative_rmse
from edgecc.errors import UserError, VerificationError
from edgecc.runtime import litert
from edgecc.runtime.artifact import Artifact

SYNTHETIC_SAMPLES = 8
MASK_INPUT = "attention_mask"  # an encoder's padding mask: its outputs at padding positions mean nothing
PREDICT_JSON = "edgetpu_predict.json"
PREDICT_LOG = "edgetpu_compiler.log"
COMPILER_LOG = "edgetpu_compiler.actual.log"
SEGMENT_KEYS = ("index", "kind", "file", "nodes", "ops", "macs", "transfer_bytes", "why")


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
    samples = one_at_a_time({s.name: data[s.name] for s in specs})
    for s in specs:
        if tuple(samples[0][s.name].shape) != tuple(s.shape):
            raise UserError(
                f"--calibration: '{s.name}' samples have shape {list(samples[0][s.name].shape)}, "
                f"the compiled model takes {list(s.shape)}"
            )
    return samples, "calibration data"


class EdgeTPUBackend(Backend):
    builder = "ai-edge-litert"

    def check(self) -> None:
        if self.options.tuning_logs:
            raise UserError(f"--tuning-log: target '{self.target.name}' is not built by TVM; "
                            "tuning records do not apply")

    def build(self, opt: Optimized, stage_dir: Path) -> dict:
        self.log("calibrating int8 ranges in ONNX Runtime")
        t = time.perf_counter()
        # With its weights in memory (an exporter may keep them in a .data file beside the model):
        # the TFLite writer reads them from the proto, and host segments carry their own.
        model = ir.to_proto(ir.external_data.load_to_model(opt.optimized))
        self.samples, self.origin = _samples(model, opt.ctx.calibration, self.options.seed, self.log)
        ranges = tflite.calibrate(model, self.samples)
        opt.timings["calibrate"] = round(time.perf_counter() - t, 3)
        self.log("cutting the graph into Edge TPU and host segments")
        t = time.perf_counter()
        plan = segment.plan(model, ranges, self.target.edgetpu)
        files = _file_names(plan.segments)
        for s, file in zip(plan.segments, files):
            if s.kind == segment.EDGETPU:
                (stage_dir / file).write_bytes(s.exported.flatbuffer)
            else:
                onnx.save(segment.host_model(model, s, plan.int8), stage_dir / file)
        opt.timings["export"] = round(time.perf_counter() - t, 3)
        prediction = predict.summarize(plan, files, self.target.edgetpu["compiler_version"])
        self.log(
            f"predicted: {prediction['segments_on_edgetpu']} Edge TPU segment(s) holding "
            f"{prediction['mac_coverage']:.1%} of MACs, {prediction['segments_on_host']} host segment(s), "
            f"{prediction['transfers']['bytes']:,} bytes host<->TPU per inference ({predict.LABEL})"
        )
        if not prediction["segments_on_edgetpu"]:
            self.log("warning: no op of this model is predicted to map to the Edge TPU: all of it runs on the host")
        (stage_dir / PREDICT_JSON).write_text(json.dumps(prediction, indent=2) + "\n")
        (stage_dir / PREDICT_LOG).write_text(predict.render_log(prediction))
        tpu_files = [f for s, f in zip(plan.segments, files) if s.kind == segment.EDGETPU]
        compiled = _run_compiler(self.target, stage_dir, tpu_files, prediction, self.log)
        return {
            "build": {
                "format": "tflite",
                "library": files[0],
                "runtime": "litert",
                "segments": len(files),
                "ops": prediction["ops_on_edgetpu"],
                "tflite_bytes": sum(len(s.exported.flatbuffer) for s in plan.segments if s.exported),
            },
            "edgetpu": {
                "segments": [
                    {"kind": s.kind, "file": f, "inputs": s.inputs, "outputs": s.outputs}
                    for s, f in zip(plan.segments, files)
                ],
                "int8": {name: q.to_json() for name, q in sorted(plan.int8.items())},
                "calibration": {"source": self.origin, "samples": len(self.samples)},
                "prediction": {k: v for k, v in prediction.items() if k != "segments"}
                | {"segments": [{k: r[k] for k in SEGMENT_KEYS if k in r} for r in prediction["segments"]]},
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


def _file_names(segments: list) -> list[str]:
    count = {segment.EDGETPU: 0, segment.HOST: 0}
    names = []
    for s in segments:
        names.append(f"{'tpu' if s.kind == segment.EDGETPU else 'host'}{count[s.kind]}"
                     f".{'tflite' if s.kind == segment.EDGETPU else 'onnx'}")
        count[s.kind] += 1
    return names


def _run_compiler(target: TargetDesc, stage_dir: Path, files: list[str], prediction: dict, log) -> dict | None:
    """edgetpu_compiler's own mapping of every Edge TPU segment (co-compiled), when it is installed,
    and where the prediction differed."""
    exe = target.toolchain.get("edgetpu_compiler", "edgetpu_compiler")
    predicted = {r["file"]: r["table"] for r in prediction["segments"] if r["kind"] == segment.EDGETPU}
    with tempfile.TemporaryDirectory() as tmp:
        result = predict.run_compiler(exe, [stage_dir / f for f in files], Path(tmp))
        if result is None:
            return None
        for entry in result["models"].values():
            if entry["compiled_model"]:
                (stage_dir / entry["compiled_model"]).write_bytes((Path(tmp) / entry["compiled_model"]).read_bytes())
    (stage_dir / COMPILER_LOG).write_text(result.pop("log"))
    result["log"] = COMPILER_LOG
    for file, entry in result["models"].items():
        if "table" in entry:
            entry["differences"] = predict.differences(predicted[file], entry["table"])
            log(f"edgetpu_compiler: {file}: {entry['ops_on_edgetpu']} ops on the Edge TPU; "
                f"{len(entry['differences'])} rows differ from the prediction")
        else:
            log(f"edgetpu_compiler failed on {file}: {entry['error']}")
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
    result = {
        "reference": "onnxruntime fp32 (source model)",
        "runner": "ai-edge-litert Interpreter (CPU) and ONNX Runtime, segment by segment",
        "inputs": f"{len(samples)} {origin} samples",
    }
    mask = _attention_mask(samples)
    if mask is not None:
        result["cosine_all_positions"] = cosine(ref_all, got_all)
        got_all, ref_all = _unpadded(got_all, mask), _unpadded(ref_all, mask)
        result["positions"] = (f"{int(mask.sum())} of {mask.size} (attention_mask = 1; outputs at padding "
                               "positions are not compared)")
    cos, rmse = cosine(ref_all, got_all), relative_rmse(ref_all, got_all)
    result |= {
        "cosine_vs_fp32": cos,
        "relative_rmse_vs_fp32": rmse,
        "min_cosine": bounds["min_cosine"],
        "max_relative_rmse": bounds["max_relative_rmse"],
    }
    if cos < bounds["min_cosine"] or rmse > bounds["max_relative_rmse"]:
        raise VerificationError(
            f"the int8 chain is too far from fp32 on the {origin}: cosine {cos:.4f} (at least "
            f"{bounds['min_cosine']}), relative RMS error {rmse:.4f} (at most {bounds['max_relative_rmse']})"
        )
    return result


def _attention_mask(samples: list[dict]) -> np.ndarray | None:
    """An encoder's attention mask over all samples ([samples, positions], True where a token is),
    when the samples pad anything."""
    masks = [s.get(MASK_INPUT) for s in samples]
    if any(m is None or np.ndim(m) != 2 for m in masks):
        return None
    mask = np.concatenate(masks).astype(bool)
    return mask if not mask.all() else None


def _unpadded(outputs: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token outputs ([samples, positions, ...]) at the unpadded positions; others whole."""
    return {k: v[mask] if v.shape[:2] == mask.shape else v for k, v in outputs.items()}

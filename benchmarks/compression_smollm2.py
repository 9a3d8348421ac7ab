"""SmolLM2-135M: what each compression pipeline costs in perplexity and saves in artifact size.

    .venv/bin/python benchmarks/compression_smollm2.py [--only "LABEL;..."]
        [--out benchmarks/results/compression_smollm2.json] [--work-dir out/compression-smollm2]

Every pipeline is compiled for this host with verification on, its calibrating passes reading
the end of The Devil's Dictionary (`--calibration-text`, 8 windows of 256 tokens); perplexity is
measured on the text's first 8 windows of 256 tokens, which calibration never saw, and size is
the artifact's library + weights. The rows:

- fp32, and bench's int8 / int4 presets with and without quantize-embeddings (the int4 preset's
  float zero points reproduce SmolLM2's shipped Q4_1 grid, so its loss flatters int4);
- symmetric int4, block 128, LM head in int8, by RTN, AWQ and GPTQ (act-order): a grid that does
  not match the shipped one, which is what a model trained in float meets.

About 15 minutes on 2 cores; accuracy only, so it may share the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgecc.benchmark import bench
from edgecc.benchmark.bench_worker import perplexity
from edgecc.compiler import compile as compile_model
from edgecc.core import lm_signature
from edgecc.core import text as corpus
from edgecc.core.tuning_log import cpu_model
from edgecc.models import examples

BASE = bench.PRESETS["fp32"]
SYMMETRIC = "quantize-int4{{block=128,symmetric=true,skip_outputs=true,method={}}},quantize-int8,pack-weights"
PIPELINES = {
    "fp32": BASE,
    "int8 preset": bench.PRESETS["int8"],
    "int8 preset, float embeddings": bench.PRESETS["int8"].replace(f",{bench.EMBEDDINGS}", ""),
    "int4 preset": bench.PRESETS["int4"],
    "int4 preset, float embeddings": bench.PRESETS["int4"].replace(f",{bench.EMBEDDINGS}", ""),
    "int4 sym b128 rtn": f"{BASE},{SYMMETRIC.format('rtn')}",
    "int4 sym b128 awq": f"{BASE},{SYMMETRIC.format('awq')}",
    "int4 sym b128 gptq": f"{BASE},{SYMMETRIC.format('gptq')}",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="labels separated by ';' (labels hold commas)")
    ap.add_argument("--out", default="benchmarks/results/compression_smollm2.json")
    ap.add_argument("--work-dir", default="out/compression-smollm2")
    a = ap.parse_args()
    model = examples.cached("smollm2")
    windows, text = corpus.token_windows(model.with_name("tokenizer.json"), None, 8, 256)
    labels = a.only.split(";") if a.only else list(PIPELINES)
    if unknown := [label for label in labels if label not in PIPELINES]:
        raise SystemExit(f"--only: unknown label(s) {unknown}; the labels: {list(PIPELINES)}")
    rows = []
    for label in labels:
        print(f"[compression] {label}: {PIPELINES[label]}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        art = compile_model(model, "host", Path(a.work_dir) / label.replace(" ", "-").replace(",", ""),
                            PIPELINES[label], force=True, calibration_text=text)
        compile_s = time.perf_counter() - t
        art.load_vm(2)
        sig = lm_signature.of_manifest(art.manifest, str(art.path))
        stats = {p["name"]: p["stats"] for p in art.manifest["passes"]}
        rows.append({"label": label, "pipeline": PIPELINES[label], "compile_s": round(compile_s, 1),
                     "model_bytes": art.model_bytes, "perplexity": perplexity(art.run, sig, windows)["perplexity"],
                     "verification": {k: art.manifest["verification"].get(k) for k in
                                      ("ok", "relative_rmse_vs_fp32", "cosine_vs_fp32")},
                     **({"gptq_error": stats["quantize-int4"].get("gptq_error")}
                        if "gptq" in PIPELINES[label] else {})})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    out = Path(a.out)
    previous = json.loads(out.read_text())["rows"] if a.only and out.exists() else []
    rows = sorted([r for r in previous if r["label"] not in labels] + rows, key=lambda r: list(PIPELINES).index(r["label"]))
    fp32 = next((r for r in rows if r["label"] == "fp32"), None)
    for r in rows:
        if fp32:
            r["perplexity_vs_fp32"] = round(r["perplexity"] / fp32["perplexity"], 4)
            r["size_vs_fp32"] = round(r["model_bytes"] / fp32["model_bytes"], 4)
    print(f"{'pipeline':34} {'perplexity':>10} {'vs fp32':>8} {'MB':>8} {'vs fp32':>8}")
    for r in rows:
        print(f"{r['label']:34} {r['perplexity']:10.2f} {r.get('perplexity_vs_fp32', 0):8.3f} "
              f"{r['model_bytes'] / 1e6:8.1f} {r.get('size_vs_fp32', 0):8.3f}")
    out.write_text(json.dumps({"benchmark": "compression_smollm2", "cpu": cpu_model(), "model": str(model),
                               "text": text, "eval_windows": "first 8 x 256 tokens",
                               "calibration": "last 8 x 256 tokens", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

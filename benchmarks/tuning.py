"""Tuned vs untuned vs ONNX Runtime: latency after 250 / 1000 / 2000 MetaSchedule trials.

    .venv/bin/python benchmarks/tuning.py [--trials 250,1000,2000] [--models block,tiny-lm]
        [--out benchmarks/results/tuning.json] [--work-dir DIR] [--remeasure]

Models, both batch 1, sequence 32, fp32, pipeline simplify,fuse:
  block    two post-norm transformer encoder layers (d_model 256, 4 heads, FFN 1024, GELU),
           torch.nn.TransformerEncoder exported with the TorchScript exporter
  tiny-lm  `edgecc example tiny-lm` (2 layers, d 128, vocab 512)
Symbolic dims are fixed with --shape (tuning needs static kernels).

For each model: ORT (ORT_ENABLE_ALL, 2 threads), the untuned edgecc artifact, then `edgecc tune`
resumed up to each trial count in turn (so 1000 includes the first 250), each followed by a
compile that uses the store. Latency: median over interleaved rounds of 50 calls after warm-up,
all variants in this one process, TVM_NUM_THREADS=2; ORT also alone in a process of its own
(`ort_alone_ms`), where it is faster. Tuning wall time is measured per step.
Per-kernel time of the most tuned module comes from the records (best measured run time x the
kernel's call count), which is what the tuner optimized. Finally the store is exported to one
file, the model compiled again with only that file (an empty store) and no tuning: zero trials,
and its latency is measured beside the others. `--remeasure` measures the artifacts a run left in
its --work-dir again, without tuning (for a run whose measurement a busy machine spoiled).
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edgecc
from edgecc.autotune import tuning
from edgecc.core import tuning_log
from edgecc.core.verify import random_inputs
from edgecc.models.examples import build_example

THREADS = 2
SEQ = 32
ROUNDS = 7
CALLS = 50


def block_model(path: Path) -> dict[str, int]:
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, activation="gelu", batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(1, SEQ, 256)
    # Grad mode on: with it off, eval-mode encoder layers take a fused fast path ONNX cannot export.
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)
    return {}


def models(work: Path) -> dict[str, tuple[Path, dict[str, int]]]:
    block = work / "block.onnx"
    shapes = block_model(block)
    lm = build_example("tiny-lm", work / "tiny-lm.onnx")
    return {"block": (block, shapes), "tiny-lm": (Path(lm), {"batch": 1, "seq": SEQ})}


def ort_call(path: Path, feeds: dict):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)


def artifact_call(art, feeds: dict):
    import tvm

    vm = art.load_vm(THREADS)["main"]  # the call a deployment makes, without Artifact.run's checks
    args = [tvm.runtime.tensor(a) for a in art.check_inputs(feeds)]
    return lambda: vm(*args)


ORT_ALONE = """
import sys, time, numpy as np, onnxruntime as ort
feeds = dict(np.load(sys.argv[2]))
so = ort.SessionOptions()
so.intra_op_num_threads = int(sys.argv[3])
sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
for _ in range(20):
    sess.run(None, feeds)
times = []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter()
    sess.run(None, feeds)
    times.append(time.perf_counter() - t)
print(np.median(times) * 1e3)
"""


def ort_alone_ms(path: Path, feeds: dict, work: Path) -> float:
    """ORT in a process of its own, nothing else running in it: interleaved with TVM's thread pool
    in one process ORT measures slower (block: 1.48 ms vs 0.78 ms alone), so both are reported."""
    import subprocess
    import sys

    npz = work / "ort-alone-feeds.npz"
    np.savez(npz, **feeds)
    out = subprocess.run([sys.executable, "-c", ORT_ALONE, str(path), str(npz), str(THREADS),
                          str(ROUNDS * CALLS)], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip()), 4)


def measure(calls: dict) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        for _ in range(10):
            fn()
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            time.sleep(0.05)
            for _ in range(CALLS):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e3, 4) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", default="250,1000,2000")
    ap.add_argument("--models", default="block,tiny-lm")
    ap.add_argument("--out", default="benchmarks/results/tuning.json")
    ap.add_argument("--work-dir")
    ap.add_argument("--remeasure", action="store_true",
                    help="measure the artifacts an earlier run left in --work-dir again (no tuning) "
                         "and update the latencies in --out")
    args = ap.parse_args()
    steps = [int(t) for t in args.trials.split(",")]
    if args.remeasure:
        if not args.work_dir:
            ap.error("--remeasure needs the --work-dir of the earlier run")
        return remeasure(Path(args.work_dir), steps, args.models.split(","), Path(args.out))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="edgecc-tuning-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, (path, shapes) in models(work).items():
        if name not in args.models.split(","):
            continue
        store = work / f"store-{name}"
        common = dict(pipeline="simplify,fuse", shapes=shapes, force=True)
        feeds = random_inputs(__import__("onnx").load(str(path)), seed=0, dim_values=shapes)
        calls = {"ort": ort_call(path, feeds)}
        untuned = edgecc.compile(path, "host", work / f"{name}-untuned", tuning_store=False, **common)
        calls["untuned"] = artifact_call(untuned, feeds)
        steps_out = []
        summary = {}
        for trials in steps:
            t = time.perf_counter()
            summary = tuning.tune(path, "host", "simplify,fuse", trials=trials, store=store, shapes=shapes,
                                  progress=None, log=lambda m: print(f"[{name}] {m}", flush=True))
            tune_s = time.perf_counter() - t
            art = edgecc.compile(path, "host", work / f"{name}-{trials}", tuning_store=store, **common)
            b = art.manifest["build"]
            calls[f"tuned {trials}"] = artifact_call(art, feeds)
            steps_out.append({"trials": summary["trials"], "tune_wall_s": round(tune_s, 1),
                              "tuned_kernels": b["tuned_kernels"], "kernels": b["kernels"],
                              "estimated_ms": summary["estimated_model_ms"]})
            print(f"[{name}] {trials} trials: tuned {b['tuned_kernels']}/{b['kernels']} kernels in "
                  f"{tune_s:.0f} s", flush=True)
        exported = work / f"{name}-records.jsonl.gz"
        n = tuning_log.Store(store).export(exported)
        shared = edgecc.compile(path, "host", work / f"{name}-from-log", tuning_store=work / "empty-store",
                                tuning_logs=(exported,), **common)
        calls["from exported log"] = artifact_call(shared, feeds)
        load_before = os.getloadavg()[0]
        latency = measure(calls)
        alone = ort_alone_ms(path, feeds, work)
        per_kernel = sorted(((k, v) for k, v in summary["best_ms"].items()), key=lambda kv: -kv[1])
        results[name] = {
            "shapes": shapes, "latency_ms": latency,
            "ort_alone_ms": alone, "speedup_vs_ort_alone": {k: round(alone / v, 3) for k, v in latency.items()},
            "load_average_before_after_measuring": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "speedup_vs_ort": {k: round(latency["ort"] / v, 3) for k, v in latency.items()},
            "tuning": steps_out, "exported_records": n,
            "from_exported_log": {"trials_spent": 0, "tuned_kernels": shared.manifest["build"]["tuned_kernels"]},
            "slowest_kernels_ms_per_call": per_kernel[:8],
        }
        print(json.dumps(results[name], indent=1), flush=True)
        write(Path(args.out), results)  # after each model: a long run keeps what it finished
    return 0


def remeasure(work: Path, steps: list[int], names: list[str], out: Path) -> int:
    """Latencies of the artifacts in `work` again, all variants interleaved as in a full run."""
    results = json.loads(out.read_text())["results"]
    for name in names:
        path = work / f"{name}.onnx"
        shapes = results[name]["shapes"] or {}
        feeds = random_inputs(__import__("onnx").load(str(path)), seed=0, dim_values=shapes)
        calls = {"ort": ort_call(path, feeds)}
        dirs = {"untuned": f"{name}-untuned", **{f"tuned {t}": f"{name}-{t}" for t in steps},
                "from exported log": f"{name}-from-log"}
        for label, d in dirs.items():
            calls[label] = artifact_call(edgecc.Artifact.load(work / d), feeds)
        load_before = os.getloadavg()[0]
        latency = measure(calls)
        alone = ort_alone_ms(path, feeds, work)
        results[name].update({
            "latency_ms": latency, "speedup_vs_ort": {k: round(latency["ort"] / v, 3) for k, v in latency.items()},
            "ort_alone_ms": alone, "speedup_vs_ort_alone": {k: round(alone / v, 3) for k, v in latency.items()},
            "load_average_before_after_measuring": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
        print(json.dumps({name: results[name]["latency_ms"]}, indent=1), flush=True)
    write(out, results)
    return 0


def write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": tuning_log.host_device(), "logical_cpus": os.cpu_count(), "threads": THREADS,
                    "python": platform.python_version()},
        "versions": {"tvm": tuning_log.installed_tvm_version(), "onnxruntime": ort.__version__},
        "method": __doc__.split("\n\n", 2)[2].strip(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())

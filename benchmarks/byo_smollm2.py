"""SmolLM2-135M-Instruct as a user brings it: transformers' model exported with torch.onnx.export
(dynamo, PyTorch's default exporter, Optimum's names), against the artifact of `edgecc example
smollm2` (edgecc's own export module), decode interleaved in one process.

    .venv/bin/python benchmarks/byo_smollm2.py [--rounds 12] [--out benchmarks/results/byo_smollm2.json]

Checks on the way: the user's export compiles with no hints, its fp32 artifact generates the same
greedy tokens as ONNX Runtime on the export, and its int4 preset decodes within 10% of the example's
int4 artifact (the ratio is the median over rounds of the per-round ratio: both take turns, so the
host's drift over minutes cancels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.hf_models: the user's export

from edgecc.benchmark import bench  # noqa: E402
from edgecc.benchmark.bench_worker import decode_tokens_per_s  # noqa: E402
from edgecc.compiler import compile as compile_model  # noqa: E402
from edgecc.core import lm_signature
from edgecc.core.tuning_log import cpu_model  # noqa: E402
from edgecc.lm import generate
from edgecc.models import examples
from tests import hf_models  # noqa: E402

THREADS = 2
PROMPT = "The capital of France is"


def user_export(directory: Path) -> Path:
    """transformers' SmolLM2 exported with the dynamo exporter and its tokenizer beside it, once."""
    path = directory / "model.onnx"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        hf, tokenizer = examples.smollm2_transformers()
        print("exporting with torch.onnx.export(dynamo=True) ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            hf_models.export_model(hf, "dynamo", Path(tmp) / "model.onnx")
            tokenizer.backend_tokenizer.save(str(Path(tmp) / "tokenizer.json"))
            for name in ("tokenizer.json", "model.onnx"):  # the model last: its presence means done
                os.replace(Path(tmp) / name, directory / name)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens compared with ONNX Runtime")
    ap.add_argument("--out", default="benchmarks/results/byo_smollm2.json")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    mine = user_export(examples.examples_dir() / "smollm2-byo")
    theirs = examples.cached("smollm2")
    result: dict = {"model": str(mine), "threads": THREADS,
                    "machine": {"cpu": cpu_model(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="edgecc-byo-") as work:
        work = Path(work)
        t = time.perf_counter()
        fp32 = compile_model(mine, "host", work / "fp32", force=True)
        result["compile_s"] = {"fp32": round(time.perf_counter() - t, 1)}
        sig = lm_signature.of_file(mine)
        ids = Tokenizer.from_file(str(mine.parent / "tokenizer.json")).encode(PROMPT).ids
        want = generate.greedy(generate.ort_step(str(mine), threads=THREADS), sig, ids, a.tokens).tokens
        got = generate.greedy(lambda f: fp32.run(f, threads=THREADS, as_numpy=False), sig, ids, a.tokens).tokens
        result["greedy"] = {"tokens": a.tokens, "same_as_ort": got == want,
                            "first_difference": next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)}
        print(f"greedy tokens, fp32 artifact vs ORT: {'same' if got == want else 'DIFFERENT'}", file=sys.stderr)
        del fp32
        arts = {}
        for name, model in (("user export int4", mine), ("edgecc example int4", theirs)):
            t = time.perf_counter()
            arts[name] = compile_model(model, "host", work / name.replace(" ", "-"), bench.PRESETS["int4"],
                                       force=True)
            result["compile_s"][name] = round(time.perf_counter() - t, 1)
            arts[name].load_vm(THREADS)
        sigs = {name: lm_signature.of_manifest(art.manifest, str(art.path)) for name, art in arts.items()}
        rates: dict[str, list[float]] = {name: [] for name in arts}
        for r in range(a.rounds):
            for name, art in arts.items():
                rng = np.random.default_rng(r)  # the same prompt for both in a round
                step = (lambda f, art=art: art.run(f, threads=THREADS, as_numpy=False))
                rates[name].append(decode_tokens_per_s(step, sigs[name], a.past, a.steps, 1, rng,
                                                       sigs[name].vocab)["tokens_per_s"])
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    ratio = np.array(rates["user export int4"]) / np.array(rates["edgecc example int4"])
    result.update({
        "rounds": a.rounds, "steps": a.steps, "past": a.past,
        "tokens_per_s": {n: {"median": float(np.median(v)), "runs": [round(x, 2) for x in v]} for n, v in rates.items()},
        "user_over_example": {"median_ratio": float(np.median(ratio)), "min_ratio": float(ratio.min()),
                              "max_ratio": float(ratio.max())},
    })
    for n, v in result["tokens_per_s"].items():
        print(f"{n:22} {v['median']:7.1f} tok/s")
    r = result["user_over_example"]
    print(f"user export / example: {r['median_ratio']:.2f}x (rounds {r['min_ratio']:.2f}-{r['max_ratio']:.2f})")
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SmolLM2 decode speed, edgecc int4 against ONNX Runtime, interleaved in one process.

    .venv/bin/python benchmarks/decode_ab.py [--rounds 12] [--out benchmarks/results/decode_ab.json]

`edgecc bench` measures each configuration in its own process, one after another; on a shared
2-core host the machine's speed drifts by 20-30% over minutes, which can decide a comparison of
two configurations measured a minute apart. Here the configurations take turns: each round
decodes 32 greedy tokens after a 128-token cache with every configuration in turn, and the
reported ratio is the median over rounds of the per-round ratio. Configurations: ONNX Runtime
fp32 on the exported model, ONNX Runtime's own int4 (its MatMulNBits quantizer, block 32,
accuracy_level 4) and the edgecc int4 artifact (the bench's int4 preset), 2 threads each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgecc.benchmark import bench
from edgecc.benchmark.bench_worker import decode_tokens_per_s
from edgecc.compiler import compile as compile_model
from edgecc.core import lm_signature
from edgecc.core.tuning_log import cpu_model
from edgecc.lm.generate import ort_step
from edgecc.models import examples

THREADS = 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/decode_ab.json")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    model = examples.cached("smollm2")
    with tempfile.TemporaryDirectory(prefix="edgecc-ab-") as work:
        work = Path(work)
        print("quantizing with ONNX Runtime's MatMulNBits quantizer ...", file=sys.stderr)
        ort_int4 = bench.ort_int4(model, 32, work / "ort-int4")
        print("compiling edgecc int4 ...", file=sys.stderr)
        art = compile_model(model, "host", work / "int4", bench.PRESETS["int4"], force=True)
        art.load_vm(THREADS)
        sig = lm_signature.of_file(model)  # the quantized models and the artifact keep its I/O
        configs = {name: ort_step(str(path), threads=THREADS)
                   for name, path in (("ort fp32", model), ("ort int4 (own quantizer)", ort_int4))}
        configs["edgecc int4"] = lambda feeds: art.run(feeds, threads=THREADS, as_numpy=False)
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for r in range(a.rounds):
            for name, step in configs.items():
                rng = np.random.default_rng(r)  # the same prompt for every configuration of a round
                rate = decode_tokens_per_s(step, sig, a.past, a.steps, 1, rng, sig.vocab)["tokens_per_s"]
                rates[name].append(rate)
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()), file=sys.stderr)
    edgecc = np.array(rates["edgecc int4"])
    result = {
        "model": str(model), "rounds": a.rounds, "steps": a.steps, "past": a.past, "threads": THREADS,
        "machine": {"cpu": cpu_model(), "platform": platform.platform()},
        "tokens_per_s": {n: {"median": float(np.median(v)), "runs": [round(x, 2) for x in v]} for n, v in rates.items()},
        "edgecc_int4_over": {n: {"median_ratio": float(np.median(edgecc / np.array(v))),
                                 "min_ratio": float((edgecc / np.array(v)).min()),
                                 "max_ratio": float((edgecc / np.array(v)).max())}
                             for n, v in rates.items() if n != "edgecc int4"},
    }
    for n, v in result["tokens_per_s"].items():
        print(f"{n:26} {v['median']:7.1f} tok/s")
    for n, v in result["edgecc_int4_over"].items():
        print(f"edgecc int4 / {n:26} {v['median_ratio']:.2f}x (rounds {v['min_ratio']:.2f}-{v['max_ratio']:.2f})")
    out = Path(a.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

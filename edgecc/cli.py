"""The `edgecc` command line. Exit codes: 0 success, 2 user error (one line), 1 internal error."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from edgecc.core import fixed_inputs
from edgecc.errors import EdgeccError, UserError, VerificationError


_START = time.perf_counter()  # when the command started (main resets it)


def _log(msg: str) -> None:
    """A progress line, with the seconds since the command started: a long stage is never silent."""
    print(f"[edgecc {time.perf_counter() - _START:5.1f}s] {msg}", file=sys.stderr, flush=True)


def _parse_dims(items: list[str], flag: str = "--dim") -> dict[str, int]:
    dims = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise UserError(f"{flag} '{item}': expected NAME=POSITIVE_INT, e.g. {flag} seq=32")
        dims[name] = int(value)
    return dims


def _warnings_only(message: str) -> None:
    """--quiet's log: a pass's warning still says what it did not do."""
    if message.startswith("warning: "):
        _log(message)


def cmd_compile(a: argparse.Namespace) -> int:
    from edgecc.compiler import compile as compile_model

    start = time.perf_counter()
    art = compile_model(
        a.model, a.target, a.output, a.pipeline, force=a.force, verify=not a.no_verify,
        verify_each_pass=a.verify, print_ir_after=tuple(a.print_ir_after or ()),
        dim_values=_parse_dims(a.dim or []), calibration=a.calibration, calibration_text=a.calibration_text,
        tokenizer=a.tokenizer, explain=a.explain, seed=a.seed,
        shapes=_parse_dims(a.shape or [], "--shape"), constants=fixed_inputs.parse(a.const),
        tuning_logs=tuple(a.tuning_log or ()),
        tuning_store=False if a.no_tuning_store else a.tuning_store, keep_reference=a.keep_reference,
        memory_check=not a.no_memory_check, log=_warnings_only if a.quiet else _log,
    )
    build = art.manifest["build"]
    log = _warnings_only if a.quiet else _log
    if "tuned_kernels" in build:
        log(f"schedules: {build['tuned_kernels']} of {build['kernels']} kernels tuned, "
            f"{build['default_schedule_kernels']} on default or edgecc schedules")
    size = sum(f["bytes"] for f in art.manifest["files"].values())
    log(f"wrote {art.path} ({size / 1e6:.2f} MB) in {time.perf_counter() - start:.1f} s")
    print(art.path)
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from edgecc.autotune.tuning import tune

    summary = tune(
        a.model, a.target, a.pipeline, trials=a.trials, max_trials_per_task=a.max_trials_per_task,
        store=a.tuning_store, rpc_tracker=a.rpc_tracker, rpc_key=a.rpc_key,
        shapes=_parse_dims(a.shape or [], "--shape"), constants=fixed_inputs.parse(a.const),
        calibration=a.calibration, calibration_text=a.calibration_text, tokenizer=a.tokenizer, seed=a.seed,
        log=_log,
    )
    for name, ms in sorted(summary["best_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:40} {ms:10.4f} ms")
    print(f"{summary['trials']} trials ({summary['failed_trials']} failed) on {summary['device']}; "
          f"{summary['tuned_tasks']}/{summary['tasks']} tasks tuned; estimated model time "
          f"{summary['estimated_model_ms']:.3f} ms; {summary['records_added']} new records in {summary['store']}")
    if summary["status"] == "interrupted":
        print("interrupted: every measured record was kept; run the same command again to resume")
        return 130
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from edgecc.runtime.artifact import Artifact, runtime_only

    runtime_only()
    art = Artifact.load(a.artifact)
    runs = 0

    def run(feeds: dict) -> dict:
        nonlocal runs
        runs += 1
        if a.emulate:
            from edgecc.runtime import emulator

            return emulator.run_artifact(art.path, feeds, threads=a.threads)
        return art.run(feeds, threads=a.threads)

    if a.inputs:
        from edgecc.core.calibration import read_npz

        feeds = read_npz(a.inputs)
    else:
        feeds = _random_inputs(art, a.seed, _parse_dims(a.dim or []), run)
        _log(f"no --inputs: seeded random inputs {({k: list(v.shape) for k, v in feeds.items()})}")
    start = time.perf_counter()
    outputs = run(feeds)
    if a.emulate:
        _log("ran under qemu-user emulation: its timings say nothing about the device, none shown")
    elif art.manifest["build"].get("runtime") == "litert":
        _log("ran the Edge TPU segments in LiteRT's interpreter on this CPU (not on an Edge TPU), the host "
             "segments in ONNX Runtime: no timing shown")
    else:
        loading = " (first run, includes loading)" if runs == 1 else ""
        _log(f"ran in {(time.perf_counter() - start) * 1000:.1f} ms{loading}")
    for name, value in outputs.items():
        print(f"{name}: {value.dtype} {list(value.shape)} mean={value.mean():.6g} std={value.std():.6g}")
    if a.output:
        _write_npz(Path(a.output), outputs)
    return 0


def _random_inputs(art, seed: int, dims: dict[str, int], run) -> dict:
    """Seeded inputs drawn by edgecc.core.verify's rules from the manifest alone (an artifact need
    not ship its graph): its input signatures and integer ranges, and of a causal LM its signature,
    the cache made by the artifact itself (`run`)."""
    from edgecc.core.lm_signature import LMSignature
    from edgecc.core.verify import TensorSpec, draw_inputs

    specs = [TensorSpec.from_json(s) for s in art.inputs]
    ranges = {s["name"]: tuple(s["range"]) for s in art.inputs if "range" in s}
    signature = art.manifest.get("lm", {}).get("signature")
    lm = LMSignature.from_json(signature) if signature else None
    return draw_inputs(specs, seed, dims, ranges, lm, run)


def _write_npz(out: Path, arrays: dict) -> None:
    """`arrays` into `out` through a temporary file beside it: nothing half-written, nothing left."""
    if out.is_dir():
        raise UserError(f"--output {out}: is a directory")
    if not out.parent.is_dir():
        raise UserError(f"--output {out}: {out.parent} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".npz")
    except OSError as e:
        raise UserError(f"--output {out}: cannot write there: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_generate(a: argparse.Namespace) -> int:
    from edgecc.core import lm_signature
    from edgecc.lm.generate import greedy, ort_step

    path = Path(a.artifact)
    exported = path.suffix == ".onnx" and not path.is_dir()  # the exported model, in ONNX Runtime
    if exported:
        proto = lm_signature.read_graph(path)
        sig, lm = lm_signature.of_model(proto, str(path)), lm_signature.metadata(proto, str(path))
        tokenizer_path = path.parent / lm.get("tokenizer", "tokenizer.json")
        has_tokenizer = tokenizer_path.is_file()
    else:
        from edgecc.runtime.artifact import Artifact, runtime_only

        runtime_only()
        art = Artifact.load(a.artifact)
        sig, lm = lm_signature.of_manifest(art.manifest, str(art.path)), art.manifest.get("lm", {})
        tokenizer_path, has_tokenizer = art.path / lm.get("tokenizer", ""), bool(lm.get("tokenizer"))
    tokenizer = None
    if has_tokenizer:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    if a.prompt_ids is not None:
        try:
            prompt = [int(t) for t in a.prompt_ids.split(",")]
        except ValueError:
            raise UserError(f"--prompt-ids '{a.prompt_ids}': expected comma-separated token ids") from None
    elif tokenizer is None:
        raise UserError(f"{path}: no tokenizer (neither named by the model's metadata nor a "
                        "tokenizer.json beside it); give the prompt as --prompt-ids")
    else:
        prompt = tokenizer.encode(a.prompt).ids
    if not prompt:
        raise UserError("the prompt is empty")
    vocab = sig.vocab or lm.get("config", {}).get("vocab")
    if vocab and not all(0 <= t < vocab for t in prompt):
        raise UserError(f"prompt token ids must lie in [0, {vocab})")
    context = lm.get("context")
    new = a.max_new_tokens
    if new < 1:
        raise UserError(f"--max-new-tokens {new}: must be at least 1")
    if context and len(prompt) >= context:
        raise UserError(f"the prompt is {len(prompt)} tokens; the model's context is {context}")
    if context and len(prompt) + new > context:
        new = context - len(prompt)
        _log(f"generating {new} tokens: the model's context of {context} ends there")
    if exported:
        step = ort_step(str(path), threads=a.threads or 0)
    else:
        art.load_vm(a.threads)
        step = lambda feeds: art.run(feeds, threads=a.threads, as_numpy=False)  # noqa: E731
    shown = ""

    def show(token: int) -> None:
        nonlocal shown
        if tokenizer is None or a.print_ids:
            print(token, end=" ", flush=True)
            return
        text = tokenizer.decode(gen_ids + [token])
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next byte
            print(text[len(shown):], end="", flush=True)
            shown = text
        gen_ids.append(token)

    gen_ids: list[int] = []
    result = greedy(step, sig, prompt, new, tuple(lm.get("eos_token_ids", ())), on_token=show)
    print()
    _log(f"prompt {len(prompt)} tokens, prefill {result.prefill_s * 1000:.1f} ms; {len(result.tokens)} "
         f"tokens generated, decode {result.decode_tokens_per_s:.1f} tok/s")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from edgecc.benchmark import bench

    lengths = []
    for item in a.prompt_lengths.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise UserError(f"--prompt-lengths '{a.prompt_lengths}': expected positive integers, e.g. 32,128")
        lengths.append(int(item))
    for flag, value in (("--past", a.past), ("--decode-steps", a.decode_steps), ("--repeats", a.repeats),
                        ("--threads", a.threads), ("--window-tokens", a.window_tokens),
                        ("--sentences", a.sentences), ("--rounds", a.rounds)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    if a.windows < 0:
        raise UserError(f"--windows {a.windows}: must be 0 (no accuracy) or more")
    llama_bench = shutil.which(a.llama_bench)
    if a.gguf:
        if not Path(a.gguf).is_file():
            raise UserError(f"--gguf {a.gguf}: no such file")
        if llama_bench is None:
            raise UserError(f"--llama-bench {a.llama_bench}: not an executable (build llama.cpp's llama-bench "
                            "and give its path)")
    settings = bench.Settings(target=a.target, pipelines=a.pipelines, threads=a.threads,
                              prompt_lengths=tuple(lengths), past=a.past, decode_steps=a.decode_steps,
                              repeats=a.repeats, windows=a.windows, window_tokens=a.window_tokens,
                              text=a.text, sentences=a.sentences, rounds=a.rounds,
                              tuning_logs=tuple(a.tuning_log or ()), seed=a.seed,
                              float_embeddings=a.float_embeddings, gguf=a.gguf,
                              llama_bench=llama_bench or a.llama_bench)
    result = bench.run(a.model, settings, a.work_dir, log=_log)
    print(bench.table(result))
    for line in result["skipped"]:
        print(f"skipped: {line}")
    if a.json:
        out = Path(a.json)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)
        _log(f"wrote {out}")
    if a.plot:
        bench.plot(result, a.plot)
        _log(f"wrote {a.plot}")
    return 0


def cmd_emulator(a: argparse.Namespace) -> int:
    from edgecc.runtime import emulator

    if a.action == "setup":
        path = emulator.setup(a.dir, progress=_log)
        print(path)
    elif a.action == "clean":
        emulator.clean(a.dir)
        _log(f"removed {a.dir or emulator.default_dir()}")
    else:
        state = emulator.status(a.dir)
        print(json.dumps(state, indent=2, default=str))
        return 0 if state["ok"] else 2
    return 0


def cmd_passes(a: argparse.Namespace) -> int:
    from edgecc.core.pass_base import registered_passes

    for name, cls in registered_passes().items():
        print(f"{name}: {cls.description}")
        for o in cls.options:
            print(f"    {o.describe()}")
        contract = [f"{k}: {', '.join(v)}" for k in ("requires", "provides", "invalidates")
                    if (v := getattr(cls, k))]
        if contract:
            print(f"    [{'; '.join(contract)}]")
    return 0


def cmd_targets(a: argparse.Namespace) -> int:
    from edgecc.core.target import list_targets, load_target

    targets = list_targets() + [load_target(p) for p in a.files]
    for t in targets:
        print(f"{t.name:18} {t.device_kind:5} {t.description}")
        print(f"{'':18} default pipeline: {t.default_pipeline}   ({t.source})")
    return 0


def cmd_example(a: argparse.Namespace) -> int:
    from edgecc.models import examples

    if not a.print_path:
        _log(f"{a.name}: {examples.EXAMPLES[a.name]}")
    if a.name in examples.CACHED and not a.output:
        if not examples.is_cached(a.name):  # on stderr: --print-path keeps stdout to the path
            _log(f"{a.name}: first use, exporting it into the example cache (1-4 minutes)")
        path = examples.cached(a.name)
    else:
        path = examples.build_example(a.name, a.output or f"examples/{a.name}.onnx", exporter=a.exporter,
                                      seed=a.seed)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgecc.models.examples import EXAMPLES

    p = argparse.ArgumentParser(prog="edgecc", description="Compile ONNX models for edge hardware.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile an ONNX model into an artifact directory")
    c.add_argument("model", help="path to the .onnx file")
    c.add_argument("--target", "-t", default="host",
                   help="target name (see 'edgecc targets') or a .toml file")
    c.add_argument("-o", "--output", help="artifact directory (default build/TARGET)")
    c.add_argument("--pipeline", "-p", help="pass pipeline, e.g. 'simplify,fuse{gelu=false}' "
                                             "(default: the target's)")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--verify", action="store_true",
                   help="run the model in ONNX Runtime after every pass; name the first that drifts")
    c.add_argument("--no-verify", action="store_true", help="skip checking the compiled module against ORT")
    c.add_argument("--print-ir-after", action="append", metavar="PASS|all", help="print the IR after a pass")
    c.add_argument("--dim", action="append", metavar="NAME=N", help="size of a symbolic dim for verification")
    c.add_argument("--calibration", metavar="DATA.npz",
                   help="model inputs (one array per input name) for passes that calibrate")
    c.add_argument("--calibration-text", metavar="FILE",
                   help="or real text (.gz/.dz read too) for an LM or encoder, tokenized with its tokenizer")
    c.add_argument("--tokenizer", metavar="tokenizer.json",
                   help="the tokenizer for --calibration-text (default: the model's own, beside it)")
    c.add_argument("--explain", action="store_true", help="report rewrites that almost matched, and why not")
    c.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs")
    c.add_argument("--shape", action="append", metavar="NAME=N",
                   help="fix a symbolic dim: static kernels (what tuning records are for); the "
                        "artifact then takes only that size")
    c.add_argument("--const", action="append", metavar="NAME=V,V,...",
                   help="fix a graph input to these values (axes, k, sizes, pads a converter needs "
                        "constant); the artifact then refuses any other value for it")
    c.add_argument("--tuning-log", action="append", metavar="PATH",
                   help="tuning records to use (JSON lines, .gz allowed; only those for this target apply)")
    c.add_argument("--tuning-store", metavar="DIR", help="local tuning-record store (default "
                   "$EDGECC_TUNING_DIR or ~/.cache/edgecc/tuning)")
    c.add_argument("--no-tuning-store", action="store_true", help="do not use the local store's records")
    c.add_argument("--keep-reference", action="store_true",
                   help="also write model.opt.onnx, the optimized graph ONNX Runtime runs as the reference "
                        "(a second copy of every weight)")
    c.add_argument("--no-memory-check", action="store_true",
                   help="compile even when the estimated peak memory exceeds what is available")
    c.add_argument("-q", "--quiet", action="store_true", help="print only warnings and the artifact's path")
    c.set_defaults(func=cmd_compile)

    tu = sub.add_parser("tune", help="tune a model's kernels for a target with MetaSchedule, here or "
                                     "on boards behind a TVM RPC tracker; records go to the store")
    tu.add_argument("model", help="path to the .onnx file")
    tu.add_argument("--target", "-t", default="host", help="target name or .toml file")
    tu.add_argument("--pipeline", "-p", help="pass pipeline (default: the target's); tune what you compile")
    tu.add_argument("--trials", type=int, default=2000, help="total measured candidates, resumed runs included")
    tu.add_argument("--max-trials-per-task", type=int, help="cap per kernel (default: --trials)")
    tu.add_argument("--rpc-tracker", metavar="HOST:PORT", help="TVM RPC tracker the boards registered with")
    tu.add_argument("--rpc-key", metavar="KEY", help="the boards' key at the tracker, e.g. rpi4")
    tu.add_argument("--tuning-store", metavar="DIR", help="record store (default $EDGECC_TUNING_DIR or "
                    "~/.cache/edgecc/tuning)")
    tu.add_argument("--shape", action="append", metavar="NAME=N",
                    help="size of each symbolic dim (tuning needs static shapes; compile with the same)")
    tu.add_argument("--const", action="append", metavar="NAME=V,V,...",
                    help="fix a graph input to these values, as compile does")
    tu.add_argument("--calibration", metavar="DATA.npz", help="inputs for passes that calibrate")
    tu.add_argument("--calibration-text", metavar="FILE", help="or real text, tokenized with the model's tokenizer")
    tu.add_argument("--tokenizer", metavar="tokenizer.json", help="the tokenizer for --calibration-text")
    tu.add_argument("--seed", type=int, default=0)
    tu.set_defaults(func=cmd_tune)

    r = sub.add_parser("run", help="run an artifact built for this host (Edge TPU artifacts: in LiteRT)")
    r.add_argument("artifact")
    r.add_argument("--inputs", help=".npz of named inputs (default: seeded random inputs)")
    r.add_argument("--output", help="write outputs to this .npz")
    r.add_argument("--threads", type=_positive_int, help="runtime threads (default: the target's core count)")
    r.add_argument("--dim", action="append", metavar="NAME=N", help="symbolic dim size for random inputs")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--emulate", action="store_true",
                   help="run an aarch64 artifact under qemu-user (see 'edgecc emulator setup')")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("generate", help="greedy decoding with a causal LM with a KV cache: a compiled "
                                        "artifact, or an exported .onnx run in ONNX Runtime")
    g.add_argument("artifact", help="artifact directory, or MODEL.onnx (tokenizer.json beside it)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, encoded with the artifact's tokenizer")
    prompt.add_argument("--prompt-ids", metavar="ID,ID,...", help="token ids (models without a tokenizer)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--print-ids", action="store_true", help="print token ids, not text")
    g.add_argument("--threads", type=_positive_int, help="runtime threads (default: the target's core count)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="ONNX Runtime vs edgecc pipelines on a causal LM: latency, tokens/s, "
                                     "memory, size, perplexity, roofline")
    b.add_argument("model", help="a causal LM .onnx with KV-cache inputs, or a BERT-style encoder "
                                 "(input_ids, attention_mask[, token_type_ids]); tokenizer.json beside it")
    b.add_argument("--target", "-t", default="host")
    b.add_argument("--pipelines", default="fp32;int8;int4",
                   help="';'-separated presets (fp32, int8, int4) or LABEL=PIPELINE")
    b.add_argument("--tuning-log", action="append", metavar="PATH", help="tuning records for the compiles")
    b.add_argument("--float-embeddings", action="store_true",
                   help="the int8/int4 presets leave embedding tables in float (no quantize-embeddings)")
    b.add_argument("--json", metavar="OUT.json")
    b.add_argument("--plot", metavar="OUT.png")
    b.add_argument("--threads", type=_positive_int, default=2, help="threads for every engine (default 2)")
    b.add_argument("--prompt-lengths", default="32,128")
    b.add_argument("--past", type=int, default=128, help="KV-cache length before the timed decode steps")
    b.add_argument("--decode-steps", type=int, default=32)
    b.add_argument("--repeats", type=int, default=10, help="timed runs per prefill length")
    b.add_argument("--windows", type=int, default=8, help="perplexity windows (0: no accuracy)")
    b.add_argument("--window-tokens", type=int, default=256)
    b.add_argument("--rounds", type=int, default=1,
                   help="time every configuration this many times, round-robin, and report the median")
    b.add_argument("--sentences", type=int, default=64,
                   help="encoders: sentences of the text whose embeddings are compared with ORT fp32's")
    b.add_argument("--text", help="accuracy text (default: The Devil's Dictionary from dict-devil)")
    b.add_argument("--work-dir", help="keep the artifacts and per-configuration results here")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--gguf", metavar="FILE", help="the same LM as a GGUF: llama.cpp is timed beside the others")
    b.add_argument("--llama-bench", default="llama-bench", metavar="PATH",
                   help="llama.cpp's llama-bench binary, for --gguf (default: on PATH)")
    b.set_defaults(func=cmd_bench)

    em = sub.add_parser("emulator", help="the cached aarch64 environment that runs Pi artifacts here")
    em.add_argument("action", choices=["setup", "status", "clean"])
    em.add_argument("--dir", help="cache directory (default $EDGECC_EMU_DIR or ~/.cache/edgecc/emu)")
    em.set_defaults(func=cmd_emulator)

    ps = sub.add_parser("passes", help="list passes with their options")
    ps.set_defaults(func=cmd_passes)

    t = sub.add_parser("targets", help="list targets (and check user target files)")
    t.add_argument("files", nargs="*", help="target .toml files to validate and list too")
    t.set_defaults(func=cmd_targets)

    e = sub.add_parser("example", help="build an example model; its path is the last line printed")
    e.add_argument("name", choices=list(EXAMPLES))
    e.add_argument("-o", "--output", help="where to write the .onnx (smollm2, minilm: default the example "
                                          "cache, $EDGECC_EXAMPLES_DIR or ~/.cache/edgecc/examples)")
    e.add_argument("--print-path", action="store_true", help="print only the path")
    e.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_example)

    from edgecc.autotune import logs_cli

    logs_cli.add_parser(sub)
    return p


def _positive_int(text: str) -> int:
    """argparse type: a count of 1 or more (argparse reports the error in one line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got '{text}'")
    return value


def main(argv: list[str] | None = None) -> int:
    global _START
    _START = time.perf_counter()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"edgecc: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"edgecc: verification failed: {e}", file=sys.stderr)
        return 1
    except EdgeccError as e:
        print(f"edgecc: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `edgecc passes | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("edgecc: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print("edgecc: internal error (a bug in edgecc); please report it with the traceback above",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

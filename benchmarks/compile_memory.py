"""Peak resident memory of `edgecc compile`, and of running what it built, against the budget.

    .venv/bin/python benchmarks/compile_memory.py [--model smollm2|tinyllama-1.1b] [--pipelines fp32,int4]
                                                  [--no-verify-too] [--no-runtime] [--out FILE]

`tinyllama-1.1b` is TinyLlama-1.1B's configuration (22 layers, d 2048, GQA 32/4, vocab 32000)
with seeded random weights, exported once by this script (edgecc.models.llama, TorchScript
exporter, weights in an external-data file as every model over 2 GB has them) into
~/.cache/edgecc/bench/tinyllama-1.1b.

Each compile runs alone in a child process (`edgecc compile ... --target host --force`, with
verification); its peak is the child's ru_maxrss as wait4 reports it, the largest of that process
and the processes it waited for (verification runs the module in a forked child). The budget the
issue sets is 1.5 x the fp32 model's bytes + 1.5 GB.

Run time (unless --no-runtime): each engine in its own process loads, prefills 128 seeded
random tokens and decodes 32 more greedily; its peak is VmHWM, also read after loading and
after the prefill. A worker imports what a device running its engine would: no onnx, no
compiler (the signature comes from the parent). The edgecc artifact of each
pipeline against ONNX Runtime at the same precision (fp32: the exported model; int4: ORT's own
MatMulNBits quantization, edgecc.benchmark.bench.ort_int4), with the greedy tokens compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecc.core.tuning_log import cpu_model

EDGECC = [sys.executable, "-m", "edgecc.cli"]
SCRIPT = [sys.executable, str(Path(__file__).resolve())]
TINYLLAMA = dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4,
                 rope_theta=10000.0, rms_eps=1e-5, context=2048)
PROMPT, DECODE = 128, 32


def _child(cmd: list[str]) -> tuple[int, int, float, list[str]]:
    """Exit code, peak RSS (bytes, wait4), seconds and the last stderr line of `cmd`."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a pipe could fill and stall the child before wait4
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        log.seek(0)
        last = log.read().strip().splitlines()[-1:]
    return code, usage.ru_maxrss * 1024, round(time.perf_counter() - t, 1), last


def measure(model: Path, pipeline: str, verify: bool, out_dir: Path) -> dict:
    cmd = [*EDGECC, "compile", str(model), "--target", "host", "-o", str(out_dir), "--force",
           "--pipeline", pipeline, *([] if verify else ["--no-verify"])]
    code, peak, wall, last = _child(cmd)
    return {"pipeline": pipeline, "verify": verify, "peak_rss_bytes": peak, "wall_s": wall, "ok": code == 0,
            **({} if code == 0 else {"error": last})}


def tinyllama(directory: Path) -> Path:
    """The 1.1B model, exported once (about 80 s and 5.5 GB)."""
    path = directory / "model.onnx"
    if not path.exists():
        from edgecc.models import llama

        cfg = llama.LlamaConfig(**TINYLLAMA)
        llama.export(llama.build(cfg, seed=0), cfg, path)
    return path


def _hwm() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def run_worker(kind: str, path: str, signature: str, out: str) -> None:
    """One engine: load, prefill PROMPT seeded tokens, decode DECODE greedily; tokens and VmHWM
    after loading, after the prefill and at the end. The worker imports what a device running
    that engine would: neither onnx nor the compiler (the parent read the signature)."""
    from edgecc.core.lm_signature import LMSignature
    from edgecc.lm.generate import greedy, ort_step
    from edgecc.runtime.artifact import Artifact, runtime_only

    runtime_only()
    sig = LMSignature.from_json(json.loads(signature))
    if kind == "ort":
        run = ort_step(path)
    else:
        art = Artifact.load(path, check_hashes=False)
        art.load_vm(None)
        run = lambda feeds: art.run(feeds, as_numpy=False)  # noqa: E731
    peaks = {"load": _hwm()}

    def step(feeds):
        outputs = run(feeds)
        peaks.setdefault("prefill", _hwm())
        return outputs

    prompt = np.random.default_rng(0).integers(0, 1000, PROMPT).tolist()  # ids every vocabulary here has
    t = time.perf_counter()
    gen = greedy(step, sig, prompt, DECODE + 1)
    Path(out).write_text(json.dumps({"tokens": gen.tokens, "peak_rss_bytes": _hwm(),
                                     "peak_rss_bytes_after": peaks,
                                     "decode_tokens_per_s": round(gen.decode_tokens_per_s, 1),
                                     "seconds": round(time.perf_counter() - t, 1)}))


def runtime(kind: str, path: Path, signature: str, work: Path) -> dict:
    out = work / f"{kind}-{path.name}.json"
    code, _, _, last = _child([*SCRIPT, "--run-worker", kind, str(path), signature, str(out)])
    return json.loads(out.read_text()) if code == 0 else {"error": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tinyllama-1.1b"), default="smollm2")
    ap.add_argument("--pipelines", default="fp32,int4", help="presets of edgecc bench, comma separated")
    ap.add_argument("--no-verify-too", action="store_true", help="also measure each without verification")
    ap.add_argument("--no-runtime", action="store_true", help="skip the run-time measurements")
    ap.add_argument("--out", help="default: benchmarks/results/compile_memory[_MODEL].json")
    ap.add_argument("--run-worker", nargs=4, metavar=("KIND", "PATH", "SIGNATURE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_worker:
        return run_worker(*args.run_worker)
    from edgecc.benchmark.bench import (  # not in a worker: it imports the compiler
        PRESETS,
        int4_block,
        ort_int4,
    )
    from edgecc.core.lm_signature import of_file

    if args.model == "smollm2":  # the cached example (exported once, then reused)
        model = Path(subprocess.check_output([*EDGECC, "example", "smollm2", "--print-path"], text=True).strip())
    else:
        model = tinyllama(Path.home() / ".cache" / "edgecc" / "bench" / args.model)
    size = sum(p.stat().st_size for p in model.parent.iterdir() if p.name.startswith(model.name))
    budget = int(1.5 * size + 1.5e9)
    signature = json.dumps(of_file(model).to_json())
    rows = []
    with tempfile.TemporaryDirectory(dir=model.parent) as d:
        for label in args.pipelines.split(","):
            art = Path(d) / label
            for verify in (False, True) if args.no_verify_too else (True,):
                row = {"label": label, **measure(model, PRESETS[label], verify, art)}
                print(f"{label:6s} verify={verify!s:5s} peak {row['peak_rss_bytes'] / 1e9:5.2f} GB "
                      f"(budget {budget / 1e9:.2f} GB) {row['wall_s']:6.1f} s ok={row['ok']}", flush=True)
                rows.append(row)
            if not row["ok"]:
                continue
            row["artifact_bytes"] = sum(p.stat().st_size for p in art.iterdir() if p.is_file())
            if args.no_runtime:
                continue
            if label == "int4":
                baseline = ort_int4(model, int4_block([(label, PRESETS[label])]), Path(d) / "ort-int4")
            else:
                baseline = model
            row["runtime"] = {"edgecc": runtime("edgecc", art, signature, Path(d)),
                              "ort": runtime("ort", baseline, signature, Path(d))}
            rt = row["runtime"]
            if "tokens" in rt["edgecc"] and "tokens" in rt["ort"]:
                rt["same_greedy_tokens"] = rt["edgecc"]["tokens"] == rt["ort"]["tokens"]
            print(f"{label:6s} artifact {row['artifact_bytes'] / 1e9:.3f} GB; run peak edgecc "
                  f"{rt['edgecc'].get('peak_rss_bytes', 0) / 1e9:.2f} GB, ORT {rt['ort'].get('peak_rss_bytes', 0) / 1e9:.2f} GB, "
                  f"same greedy tokens: {rt.get('same_greedy_tokens')}", flush=True)
    result = {"model": args.model, "model_bytes": size, "budget_bytes": budget, "results": rows,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}}
    out = args.out or f"benchmarks/results/compile_memory{'' if args.model == 'smollm2' else '_' + args.model}.json"
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

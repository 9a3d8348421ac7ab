"""Peak resident memory of `edgecc compile` on the SmolLM2 example, fp32 and int4 pipelines.

    .venv/bin/python benchmarks/compile_memory.py [--pipelines fp32,int4] [--no-verify-too]
                                                  [--out benchmarks/results/compile_memory.json]

Each compile runs alone in a child process (`edgecc compile ... --target host --force`, with
verification); its peak is the child's ru_maxrss as wait4 reports it, the largest of that process
and the processes it waited for (verification runs the module in a forked child, whose resident
set counts the pages it shares with its parent). The budget the issue sets is 1.5 x the fp32
model's bytes + 1.5 GB. Pipelines are edgecc.benchmark.bench's PRESETS.
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

from edgecc.benchmark.bench import PRESETS

EDGECC = [sys.executable, "-m", "edgecc.cli"]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def measure(model: Path, pipeline: str, verify: bool, out_dir: Path) -> dict:
    cmd = [*EDGECC, "compile", str(model), "--target", "host", "-o", str(out_dir), "--force",
           "--pipeline", pipeline, *([] if verify else ["--no-verify"])]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a pipe could fill and stall the child before wait4
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        log.seek(0)
        last = log.read().strip().splitlines()[-1:]
    return {"pipeline": pipeline, "verify": verify, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "wall_s": round(time.perf_counter() - t, 1), "ok": code == 0,
            **({} if code == 0 else {"error": last})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default="fp32,int4", help="presets of edgecc bench, comma separated")
    ap.add_argument("--no-verify-too", action="store_true", help="also measure each without verification")
    ap.add_argument("--out", default="benchmarks/results/compile_memory.json")
    args = ap.parse_args()
    # the cached example (exported once, then reused)
    model = Path(subprocess.check_output([*EDGECC, "example", "smollm2", "--print-path"], text=True).strip())
    size = model.stat().st_size
    budget = int(1.5 * size + 1.5e9)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label in args.pipelines.split(","):
            for verify in (True, False) if args.no_verify_too else (True,):
                row = {"label": label, **measure(model, PRESETS[label], verify, Path(d) / "art")}
                rows.append(row)
                print(f"{label:6s} verify={verify!s:5s} peak {row['peak_rss_bytes'] / 1e9:5.2f} GB "
                      f"(budget {budget / 1e9:.2f} GB) {row['wall_s']:6.1f} s ok={row['ok']}", flush=True)
    result = {"model": "smollm2", "model_bytes": size, "budget_bytes": budget, "results": rows,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

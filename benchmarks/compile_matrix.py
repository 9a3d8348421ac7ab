"""Compile every example model for every built-in target; record time, error and size.

    .venv/bin/python benchmarks/compile_matrix.py [--out benchmarks/results/compile_matrix.json]

Each model is built from its fixed seed, compiled with the target's default pipeline, and (on
targets this host can run) verified against ONNX Runtime. Results go to stdout as a table and
to a JSON file with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import edgecc
from edgecc.core.target import list_targets
from edgecc.core.tuning_log import cpu_model
from edgecc.models.examples import EXAMPLES, build_example


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/compile_matrix.json")
    ap.add_argument("--models", nargs="*", default=list(EXAMPLES))
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = build_example(name, Path(tmp) / f"{name}.onnx")
            for target in list_targets():
                if target.device_kind == "cuda" and shutil.which("nvcc") is None:
                    rows.append({"model": name, "target": target.name, "skipped": "nvcc not installed"})
                    continue
                start = time.perf_counter()
                art = edgecc.compile(model, target, Path(tmp) / f"{name}-{target.name}")
                seconds = time.perf_counter() - start
                m = art.manifest
                verification = m["verification"]
                rows.append({
                    "model": name,
                    "target": target.name,
                    "compile_s": round(seconds, 2),
                    "max_abs_error": verification.get("max_abs"),
                    "verification": "ok" if verification.get("ok") else verification.get("skipped"),
                    "library_bytes": m["files"]["model.so"]["bytes"],
                    "artifact_bytes": sum(f["bytes"] for f in m["files"].values()),
                    "source_onnx_bytes": model.stat().st_size,
                    "stage_s": m["timings_s"],
                })
    print(f"{'model':10} {'target':18} {'compile s':>9} {'max abs err':>12} "
          f"{'model.so':>10} {'artifact':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:10} {r['target']:18} skipped: {r['skipped']}")
            continue
        err = f"{r['max_abs_error']:.2e}" if r["max_abs_error"] is not None else "n/a"
        print(f"{r['model']:10} {r['target']:18} {r['compile_s']:9.2f} {err:>12} "
              f"{r['library_bytes'] / 1e6:9.2f}M {r['artifact_bytes'] / 1e6:9.2f}M")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "machine": platform.machine(),
               "cpu": cpu_model(), "python": sys.version.split()[0]}
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

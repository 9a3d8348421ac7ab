"""BSR matmul vs dense matmul latency on this host's CPU (by hand; not a test).

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bsr_vs_dense.py [--out benchmarks/results/bsr_vs_dense.json]

For each weight shape, M (rows of x) and block shape, the weight is magnitude-pruned to each
sparsity and compiled as BSR (edgecc.kernels.bsr); the dense baselines get the same pipeline
and the same schedule effort: "dense" stores W in column panels, as BSR's data is laid out
(the fair baseline, and the one the crossover is computed against), "dense-rowmajor" is
relax.matmul on the row-major weight. M is symbolic in every module, as in edgecc artifacts.
Everything runs in one process; each block's sparsities are timed interleaved with the dense
kernel over rounds, and medians are reported. Results go to stdout and to a JSON file with the
CPU they ran on and the load average (other work on the machine skews every figure).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import tvm
from edgecc.kernels import bsr
from tvm import relax

from edgecc.core.tuning_log import cpu_model

SHAPES = [(2048, 2048), (768, 3072)]
ROWS = [1, 32]
SPARSITIES = [0.0, 0.25, 0.5, 0.7, 0.9, 0.95]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/bsr_vs_dense.json")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--blocks", nargs="+", default=["1x16", "8x8", "16x16"], help="RxC, R along K")
    args = ap.parse_args()
    blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks]
    # TVM sizes its thread pool from this on first parallel use; unset, it runs on one thread.
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    host = tvm.target.Target.from_device(tvm.cpu()).export()
    target = tvm.target.Target({"kind": "llvm", "mtriple": host["mtriple"], "mcpu": host["mcpu"],
                                "num-cores": int(os.environ["TVM_NUM_THREADS"])})
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()[0]
    rows, crossovers = [], []
    for K, N in SHAPES:
        w = rng.standard_normal((K, N)).astype(np.float32)
        for M in ROWS:
            x = tvm.runtime.tensor(rng.standard_normal((M, K)).astype(np.float32))
            dense = bsr.build_dense_module("m", w, target)
            rowmajor = _measure({"": bsr.build_dense_module("m", w, target, packed=False)}, x, args.rounds)[""]
            print(f"\nW {K}x{N}, M={M}: dense-rowmajor {rowmajor:.3f} ms; "
                  f"BSR ms (speedup over dense), median of {args.rounds} rounds, "
                  f"{tvm.runtime.num_threads()} threads")
            print(f"{'block':>6} {'dense':>7} " + " ".join(f"{'s=' + str(s):>15}" for s in SPARSITIES))
            for block in blocks:
                # Each block is timed with its own dense runs, interleaved, so a noisy stretch of
                # the (shared) machine hits both sides of every ratio.
                variants = {"dense": dense}
                for s in SPARSITIES:
                    variants[s] = bsr.build_module("m", bsr.magnitude_block_prune(w, block, s), block, target)
                ms = _measure(variants, x, args.rounds)
                name = f"{block[0]}x{block[1]}"
                for s in SPARSITIES:
                    rows.append({"K": K, "N": N, "M": M, "block": name, "sparsity": s,
                                 "bsr_ms": round(ms[s], 4), "dense_ms": round(ms["dense"], 4),
                                 "dense_rowmajor_ms": round(rowmajor, 4),
                                 "speedup": round(ms["dense"] / ms[s], 3)})
                cross = _crossover([(s, ms["dense"] / ms[s]) for s in SPARSITIES])
                crossovers.append({"K": K, "N": N, "M": M, "block": name, "crossover": cross})
                cells = " ".join(f"{ms[s]:7.3f} ({ms['dense'] / ms[s]:4.2f}x)" for s in SPARSITIES)
                print(f"{name:>6} {ms['dense']:7.3f} {cells}   crossover {_fmt(cross)}")

    print("\ncrossover sparsity (BSR faster than dense above it; 'never' = not within the grid):")
    for c in crossovers:
        print(f"  W {c['K']}x{c['N']} M={c['M']:<3} block {c['block']:>5}: {_fmt(c['crossover'])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_model(), "platform": platform.platform(), "python": sys.version.split()[0],
               "tvm": tvm.__version__, "tvm_target": str(target), "threads": tvm.runtime.num_threads(),
               "load_average_before_after": [load_before, os.getloadavg()[0]]}
    out.write_text(json.dumps({"machine": machine, "rounds": args.rounds, "rows": rows,
                               "crossovers": crossovers}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _measure(variants: dict, x, rounds: int) -> dict:
    """Median ms per variant; variants take turns each round so machine noise hits all alike."""
    dev = tvm.cpu()
    timers = {k: relax.VirtualMachine(ex, dev).time_evaluator("main", dev, number=1, repeat=1,
                                                               min_repeat_ms=30)
              for k, ex in variants.items()}
    samples: dict = {k: [] for k in variants}
    for _ in range(rounds):
        for k, timer in timers.items():
            samples[k].append(timer(x).mean * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def _crossover(points: list[tuple[float, float]]) -> float | None:
    """Sparsity where speedup crosses 1, linearly interpolated between grid points; None if never."""
    if points[0][1] >= 1:
        return points[0][0]
    for (s0, r0), (s1, r1) in itertools.pairwise(points):
        if r1 >= 1:
            return round(s0 + (1 - r0) * (s1 - s0) / (r1 - r0), 3)
    return None


def _fmt(cross: float | None) -> str:
    return "never" if cross is None else f"{cross:.2f}"


if __name__ == "__main__":
    sys.exit(main())

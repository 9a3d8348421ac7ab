"""Batch-1 GEMV latency: edgecc int4/int8 kernels vs fp32 TVM vs ONNX Runtime fp32, int8, MatMulNBits.

    .venv/bin/python benchmarks/gemv.py [--out benchmarks/results/gemv.json] [--rounds 7]

Everything runs in one process on 2 threads (TVM_NUM_THREADS=2, ORT intra_op_num_threads=2).
Each variant is timed as a Python-level call (what a decode loop pays), in interleaved rounds
so that noise from a shared machine hits all variants alike; the figure is the median of all
calls after warm-up. Outputs are checked against numpy before timing. Two regimes:
  warm  back-to-back calls: the weights stay in cache (here all fit in L3)
  cold  each call follows a read of a buffer twice the L3 size, so the weights come from DRAM,
        as they do when decoding a model larger than the cache

Variants (weights quantized symmetric, block 32):
  int4 gemv    edgecc int4 kernel, static M = 1 (the decode kernel)
  int4 any-M   edgecc int4 kernel built for a symbolic M, called with M = 1
  int8 packed  edgecc int8 kernel on pack-weights' layout: panels of the target's width
               (edgecc.kernels.int8.panel_width), int8 x int8 -> int32, static M = 1
  int8 kn      the same kernel and schedule on ONNX's [K, N] layout (no pack-weights)
  fp32 tvm     relax matmul, "zero" pipeline, hand schedule: 32-column tiles in parallel,
               vectorized over the tile (dlight's CPU GEMV rule does not match x @ W[K, N])
  ort fp32     ONNX Runtime MatMul, ORT_ENABLE_ALL
  ort nbits    ONNX Runtime com.microsoft.MatMulNBits (bits 4, block 32), fed edgecc's packed
               bytes, which are MatMulNBits' B layout
  ort int8     ONNX Runtime MatMulInteger, int8 x int8 -> int32 (what quantize-int8 emits)
The int8 variants take the int8 activation row and return the exact int32 sums; quantize-int8's
per-token and per-channel rescaling around them is two elementwise multiplies.
The bandwidth bound (DESIGN.md) is weight bytes / DRAM bandwidth, the latter measured here as
a single-threaded numpy copy of 256 MiB (read + write); "of bound" is bound time / cold time.
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"  # read when TVM's thread pool starts

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from edgecc.kernels import int8
from edgecc.kernels.int4 import build_module, dequantize_blockwise, pack_int4, quantize_blockwise
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.s_tir import Schedule

from edgecc.core.tuning_log import cpu_model

SHAPES = [(576, 1536), (1536, 576), (2048, 2048)]
BLOCK = 32
THREADS = 2
CALLS = 200  # warm calls per variant per round
COLD_CALLS = 30  # cold calls per variant per round (each costs a cache flush)


def l3_bytes() -> int:
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    text = path.read_text().strip() if path.exists() else "32M"
    return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]


def dram_bandwidth_gbs() -> float:
    src = np.ones(32 << 20)  # 256 MiB of float64
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fp32_tvm(w: np.ndarray, target):
    """x [1, K] @ w through a plain relax matmul, with a simple CPU schedule."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(x, relax.const(w))))
        bb.emit_func_output(y)
    with target:
        mod = relax.get_pipeline("zero")(bb.get())
    gv = next(g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    sch = Schedule(mod[gv])
    mm = sch.get_sblock("matmul")
    _, n, k = sch.get_loops(mm)
    n_out, n_in = sch.split(n, [None, 32])
    sch.reorder(n_out, k, n_in)
    sch.vectorize(n_in)
    sch.parallel(n_out)
    sch.decompose_reduction(mm, k)
    mod[gv] = sch.mod["main"]
    return relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())


def ort_session(nodes, inits, K: int, N: int, x_type=TensorProto.FLOAT,
                y_type=TensorProto.FLOAT) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes, "gemv",
        [helper.make_tensor_value_info("x", x_type, [1, K])],
        [helper.make_tensor_value_info("y", y_type, [1, N])],
        inits,
    )
    model = helper.make_model(
        graph, ir_version=10,  # the newest IR version this onnxruntime reads
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def variants(K: int, N: int, target):
    """name -> (call, weight bytes it reads, numpy reference of its output) for one shape."""
    rng = np.random.default_rng(K * N)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    x = rng.standard_normal((1, K)).astype(np.float32)
    q, scales, _ = quantize_blockwise(w, BLOCK, symmetric=True)
    wq = dequantize_blockwise(q, scales, None, BLOCK)
    int4_bytes = K * N // 2 + scales.nbytes
    xt = tvm.runtime.tensor(x)

    gemv, any_m = (relax.VirtualMachine(build_module(K, N, BLOCK, True, target, M=m, weight=w),
                                        tvm.cpu()) for m in (1, None))
    fp32 = fp32_tvm(w, target)
    mm = ort_session([helper.make_node("MatMul", ["x", "W"], ["y"])],
                     [numpy_helper.from_array(w, "W")], K, N)
    nbits = ort_session(
        [helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                          K=K, N=N, bits=4, block_size=BLOCK)],
        [numpy_helper.from_array(pack_int4(q).reshape(N, K // BLOCK, BLOCK // 2), "B"),
         numpy_helper.from_array(np.ascontiguousarray(scales.T).reshape(-1), "S")],
        K, N,
    )
    # int8 operands as quantize-int8 makes them: per-channel weights, a per-token activation.
    w8 = np.rint(w / (np.abs(w).max(axis=0) / 127)).astype(np.int8)
    x8 = np.rint(x / (np.abs(x).max() / 127)).astype(np.int8)
    x8t, ref8 = tvm.runtime.tensor(x8), int8.reference(x8, w8).astype(np.float64)
    i8_packed, i8_kn = (relax.VirtualMachine(int8.build_module(w8, tile, target, M=1), tvm.cpu())["main"]
                        for tile in (int8.panel_width(target), 0))
    mm8 = ort_session([helper.make_node("MatMulInteger", ["x", "W"], ["y"])],
                      [numpy_helper.from_array(w8, "W")], K, N, TensorProto.INT8, TensorProto.INT32)
    feeds, feeds8 = {"x": x}, {"x": x8}
    f_gemv, f_any, f_fp32 = gemv["main"], any_m["main"], fp32["main"]
    return {
        "int4 gemv": (lambda: f_gemv(xt), int4_bytes, x @ wq),
        "int4 any-M": (lambda: f_any(xt), int4_bytes, x @ wq),
        "int8 packed": (lambda: i8_packed(x8t), w8.nbytes, ref8),
        "int8 kn": (lambda: i8_kn(x8t), w8.nbytes, ref8),
        "ort int8": (lambda: mm8.run(None, feeds8), w8.nbytes, ref8),
        "fp32 tvm": (lambda: f_fp32(xt), w.nbytes, x @ w),
        "ort fp32": (lambda: mm.run(None, feeds), w.nbytes, x @ w),
        "ort nbits": (lambda: nbits.run(None, feeds), int4_bytes, x @ wq),
    }


def _numpy(result) -> np.ndarray:
    return result[0] if isinstance(result, list) else result.numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gemv.json")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    target = tvm.target.Target.from_device(tvm.cpu())
    load_before = os.getloadavg()[0]  # other processes on the machine skew every figure
    bandwidth = dram_bandwidth_gbs()
    flush = np.ones(2 * l3_bytes() // 8)
    rows = []
    for K, N in SHAPES:
        cases = variants(K, N, target)
        # name -> one list of call times per round
        warm: dict[str, list[list[float]]] = {name: [] for name in cases}
        cold: dict[str, list[list[float]]] = {name: [] for name in cases}
        errors = {}
        for name, (call, _, ref) in cases.items():
            # Tolerance: fp32 sums over K terms; 1e-4 of the output scale (see the kernel tests).
            errors[name] = float(np.abs(_numpy(call()) - ref).max() / np.abs(ref).max())
            if errors[name] > 1e-4:
                raise SystemExit(f"{name} {K}x{N}: output differs from numpy by {errors[name]:.2e}")
        for name, (call, *_) in cases.items():
            for _ in range(50):
                call()
        for _ in range(args.rounds):
            for name, (call, *_) in cases.items():
                time.sleep(0.05)  # let the previous variant's spinning worker threads go idle
                warm[name].append([_timed(call) for _ in range(CALLS)])
                cold[name].append([])
                for _ in range(COLD_CALLS):
                    flush.sum()
                    cold[name][-1].append(_timed(call))
        warm_base, cold_base = np.median(warm["ort fp32"]), np.median(cold["ort fp32"])
        for name, (_, nbytes, _) in cases.items():
            warm_ms, cold_ms = np.median(warm[name]) * 1e3, np.median(cold[name]) * 1e3
            rows.append({
                "shape": f"{K}x{N}", "K": K, "N": N, "variant": name, "weight_bytes": nbytes,
                "warm_ms": round(warm_ms, 4),
                "warm_speedup_vs_ort_fp32": round(warm_base * 1e3 / warm_ms, 2),
                "cold_ms": round(cold_ms, 4),
                "cold_speedup_vs_ort_fp32": round(cold_base * 1e3 / cold_ms, 2),
                "cold_gbs": round(nbytes / cold_ms / 1e6, 1),
                "cold_fraction_of_bandwidth_bound": round(nbytes / bandwidth / 1e6 / cold_ms, 2),
                "rel_error_vs_numpy": errors[name],
                # Rounds hit by other processes on a shared machine stand out here.
                "warm_round_medians_ms": [round(np.median(r) * 1e3, 4) for r in warm[name]],
                "cold_round_medians_ms": [round(np.median(r) * 1e3, 4) for r in cold[name]],
            })

    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"CPU: {cpu_model()}, {THREADS} threads; DRAM copy bandwidth {bandwidth:.1f} GB/s; "
          f"1-min load average before/after: {load[0]} / {load[1]}")
    print(f"{'shape':10} {'variant':11} {'weight MB':>9} | {'warm ms':>8} {'vs ort':>6} | "
          f"{'cold ms':>8} {'vs ort':>6} {'GB/s':>5} {'of bound':>8}")
    for r in rows:
        print(f"{r['shape']:10} {r['variant']:11} {r['weight_bytes'] / 1e6:9.2f} | "
              f"{r['warm_ms']:8.4f} {r['warm_speedup_vs_ort_fp32']:6.2f} | {r['cold_ms']:8.4f} "
              f"{r['cold_speedup_vs_ort_fp32']:6.2f} {r['cold_gbs']:5.1f} "
              f"{r['cold_fraction_of_bandwidth_bound']:8.2f}")
    print("vs ort: speedup over ONNX Runtime fp32 MatMul (>1 is faster); "
          "of bound: (weight bytes / DRAM bandwidth) / cold time")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "l3_bytes": l3_bytes(),
                    "threads": THREADS, "load_average_before_after": load,
                    "dram_copy_gbs": round(bandwidth, 1), "tvm_target": str(target)},
        "versions": {"tvm": tvm.__version__, "onnxruntime": ort.__version__},
        "method": f"median of {args.rounds} interleaved rounds x {CALLS} warm and {COLD_CALLS} "
                  "cold (after a 2x L3 read) Python-level calls, after 50 warm-up calls; "
                  f"int4: block 32, symmetric; int8 panel width {int8.panel_width(target)}",
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

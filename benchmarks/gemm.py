"""Prefill-shaped matmuls: edgecc's symbolic-row kernels against ONNX Runtime, in GOP/s.

    .venv/bin/python benchmarks/gemm.py [--rows 32,128] [--rounds 5] [--out benchmarks/results/gemm.json]

A prompt's projections are [M, K] x [K, N] products with M the token count. Every variant is
built for a symbolic M (as an LM compiled for prefill and decode has it) and called with M rows,
in one process on 2 threads (TVM_NUM_THREADS=2, ORT intra_op_num_threads=2), round-robin so that
the machine's drift hits all alike, with a pause after each variant (both thread pools spin for a
while after a call, and would take the cores from the next variant); the figure is the median over rounds of each round's median
call. Outputs are checked against numpy before timing. SmolLM2-135M's shapes:
  fp32 dense     edgecc.kernels.dense (panels, row blocks in registers)
  int8 widening  edgecc.kernels.int8 on pack-weights' panels, int8 x int8 -> int32 (rows one at a time)
  int8 dot       edgecc.kernels.int8_dot: VNNI, row blocks, quantize-int8's rescale to float inside
  int4 dot       edgecc.kernels.int4_dot: int4 weights (block 32) x int8 activations, VNNI
  ort fp32       ONNX Runtime MatMul
  ort int8       ONNX Runtime MatMulInteger (int8 x int8 -> int32)
  ort int4       ONNX Runtime MatMulNBits, block 32, accuracy_level 4 (int8 activations)
The int8 dot and int4 dot variants need AVX-512 VNNI and are left out without it.
"""

from __future__ import annotations

import os

os.environ["TVM_NUM_THREADS"] = "2"  # read when TVM's thread pool starts

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax, tirx

from edgecc.core.target import load_target
from edgecc.core.tuning_log import cpu_model
from edgecc.kernels import dense, int4_dot, int8, int8_dot
from edgecc.kernels.int4 import dequantize_blockwise, pack_int4, quantize_blockwise

SHAPES = [(576, 1536), (1536, 576), (576, 3072)]
THREADS = 2
BLOCK = 32
PAUSE_S = 0.2  # after each variant's calls: the thread pools stop spinning


def _vm(build, K: int, dtype: str, extra=()):
    """A relax module main(x [m, K] `dtype`, *extra) = build(bb, x, *extra), compiled for this host."""
    target = load_target("host").tvm_target()
    bb = relax.BlockBuilder()
    m = tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType((m, K), dtype))
    params = [x] + [relax.Var(name, relax.TensorType((m, 1), "float32")) for name in extra]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    mod = bb.get()
    with target:
        mod = relax.get_pipeline("zero")(mod)
    return relax.VirtualMachine(tvm.compile(int8.schedule(mod, target), target=target), tvm.cpu())


def _ort(node, inits, K: int, N: int, x_type, y_type):
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("x", x_type, ["m", K])],
                              [helper.make_tensor_value_info("y", y_type, ["m", N])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def variants(K: int, N: int, M: int) -> dict:
    """name -> a call of it on M rows, each checked against numpy first."""
    target = load_target("host").tvm_target()
    rng = np.random.default_rng(K + N)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    wq = rng.integers(-127, 128, (K, N)).astype(np.int8)
    xq = rng.integers(-127, 128, (M, K)).astype(np.int8)
    exact = xq.astype(np.int64) @ wq.astype(np.int64)
    tile = int8.panel_width(target)
    out = {}

    def check(name, call, want, rtol=1e-4):
        got = np.asarray(call())
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)
        out[name] = call

    xt, xqt = tvm.runtime.tensor(x), tvm.runtime.tensor(xq)
    ft = dense.dense_tile(target)
    vm = _vm(lambda bb, v: dense.emit_dense(bb, v, relax.const(int8.pack_panels(w, ft)), K, N, ft,
                                            dense.block_rows(target, ft)), K, "float32")
    check("fp32 dense", lambda: vm["main"](xt).numpy(), x @ w)
    vm8 = _vm(lambda bb, v: int8.emit_int8_matmul(bb, v, relax.const(int8.pack_int8(wq, tile)), tile, K, N),
              K, "int8")
    check("int8 widening", lambda: vm8["main"](xqt).numpy(), exact, 0)
    isa = int4_dot.isa(target)
    if isa == "avx512vnni":
        sx = tvm.runtime.tensor(np.ones((M, 1), np.float32))
        ones = np.ones(N, np.float32)
        vmd = _vm(lambda bb, v, s: int8_dot.emit(bb, v, s, wq, ones, None, tile, isa), K, "int8", ["sx"])
        check("int8 dot", lambda: vmd["main"](xqt, sx).numpy(), exact, 1e-6)
        levels, scales, zeros = quantize_blockwise(w, BLOCK, symmetric=False, float_zeros=True)
        vm4 = _vm(lambda bb, v: int4_dot.emit(bb, v, levels, scales, zeros, BLOCK, isa), K, "float32")
        # float32 rounding of x / scale can land a value on the neighbouring int8 level
        check("int4 dot", lambda: vm4["main"](xt).numpy(), int4_dot.reference(x, levels, scales, zeros, BLOCK), 1e-2)
    mm = _ort(helper.make_node("MatMul", ["x", "W"], ["y"]), [numpy_helper.from_array(w, "W")], K, N,
              TensorProto.FLOAT, TensorProto.FLOAT)
    check("ort fp32", lambda: mm.run(None, {"x": x})[0], x @ w)
    mi = _ort(helper.make_node("MatMulInteger", ["x", "W"], ["y"]), [numpy_helper.from_array(wq, "W")], K, N,
              TensorProto.INT8, TensorProto.INT32)
    check("ort int8", lambda: mi.run(None, {"x": xq})[0], exact, 0)
    q, scales, _ = quantize_blockwise(w, BLOCK, symmetric=True)
    nbits = _ort(helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=K, N=N, bits=4,
                                  block_size=BLOCK, accuracy_level=4),
                 [numpy_helper.from_array(pack_int4(q).reshape(N, K // BLOCK, BLOCK // 2), "B"),
                  numpy_helper.from_array(np.ascontiguousarray(scales.T).reshape(-1), "S")],
                 K, N, TensorProto.FLOAT, TensorProto.FLOAT)
    # int8 activations, rounded per block: a few percent of the largest output
    check("ort int4", lambda: nbits.run(None, {"x": x})[0], x @ dequantize_blockwise(q, scales, None, BLOCK), 5e-2)
    return out


def _median_call(call, calls: int) -> float:
    for _ in range(3):  # the thread pool wakes, the clock ramps up after the pause
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    time.sleep(PAUSE_S)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20, help="timed calls per variant per round")
    ap.add_argument("--out", default="benchmarks/results/gemm.json")
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    results = []
    for K, N in SHAPES:
        for M in rows:
            calls = variants(K, N, M)
            for call in calls.values():  # warm up
                _median_call(call, 3)
            per_round = {name: [] for name in calls}
            for _ in range(a.rounds):
                for name, call in calls.items():
                    per_round[name].append(_median_call(call, a.calls))
            flops = 2 * M * K * N
            row = {"K": K, "N": N, "M": M,
                   "ms": {n: round(1e3 * float(np.median(t)), 4) for n, t in per_round.items()},
                   "gops": {n: round(flops / float(np.median(t)) / 1e9, 1) for n, t in per_round.items()}}
            results.append(row)
            print(f"[{M}, {K}] x [{K}, {N}]: " + ", ".join(f"{n} {g}" for n, g in row["gops"].items()) + " GOP/s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"cpu": cpu_model(), "threads": THREADS, "rounds": a.rounds,
                                       "results": results}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""The ONNX backend node tests through edgecc and, as the yardstick, ONNX Runtime.

usage: python tests/conformance/run.py [--update] [--cases REGEX] [--jobs N]

Each case is a one-node model with its own inputs and expected outputs. The cases come from the
installed onnx package's case definitions (onnx.backend.test.case.node), which generate the
data that older onnx wheels shipped as onnx/backend/test/data/node. Per case:
  ORT: the model on the case's inputs vs its outputs -> pass / fail / error;
  edgecc: compile for host (verify=False), run the artifact on the case's inputs vs its outputs
    -> pass / refused (a one-line UserError naming the op) / wrong / error (any other exception)
    / crash (a signal or a timeout). Where a refusal's hint is to fix a graph input with --const
    (a reduction's axes, a TopK's k fed as inputs), the case's value is fixed and the compile
    retried, as a user would; such passes are counted as "pass with --const" too.
Outputs are compared as the onnx backend runner does: same dtype, allclose with the case's
rtol and atol (1e-3 and 1e-7 for node cases), NaNs equal; float16 and bfloat16 outputs at
edgecc's tolerances for those dtypes (edgecc.core.verify.TOLERANCES: 1e-2, 2e-2), since 1e-3 is
about one float16 rounding.

The cases run in a few long-lived worker processes (TVM is imported once per worker); a worker
that dies takes only its current case with it and is replaced. The compiled module runs in a
forked child of the worker (edgecc.runtime.isolate), so a module crash costs no worker.
--update writes expected.json beside this file (with --cases, updates those cases' entries).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

EXPECTED = Path(__file__).with_name("expected.json")
BAD = ("wrong", "error", "crash")  # never acceptable: a failure must be a refusal
CASE_TIMEOUT = 300  # seconds for one case (compile and both runs)


def node_cases(pattern: str | None = None) -> list:
    """The onnx package's node test cases, by name, generated in memory (a few seconds)."""
    import warnings

    import numpy as np
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators divide by zero on purpose
        np.random.seed(0)  # they draw inputs from numpy's global generator: the same data every run
        cases = node.collect_testcases(None)
    return sorted((c for c in cases if pattern is None or re.search(pattern, c.name)), key=lambda c: c.name)


def mismatch(expected: list, got: list, rtol: float, atol: float) -> str:
    """Why `got` is not the case's `expected` outputs (positional), or "" when it is."""
    import numpy as np

    from edgecc.core.verify import TOLERANCES

    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (r, g) in enumerate(zip(expected, got)):
        if isinstance(r, (list, tuple)):
            return f"output {i}: a sequence, which edgecc does not produce"
        r, g = np.asarray(r), np.asarray(g)
        if g.dtype != r.dtype:
            return f"output {i}: dtype {g.dtype}, expected {r.dtype}"
        if g.shape != r.shape:
            return f"output {i}: shape {g.shape}, expected {r.shape}"
        if r.dtype.kind in "OSU":
            if not np.array_equal(r, g):
                return f"output {i}: strings differ"
            continue
        # float16 and bfloat16 at edgecc's tolerance for their dtype; bfloat16 compares through float32
        out_atol, out_rtol = TOLERANCES.get(r.dtype, (atol, rtol)) if r.dtype.itemsize == 2 else (atol, rtol)
        rf, gf = (a.astype(np.float32) if a.dtype.kind == "V" else a for a in (r, g))
        if not np.allclose(gf, rf, rtol=out_rtol, atol=out_atol, equal_nan=True):
            return f"output {i}: values differ beyond rtol={out_rtol:g}, atol={out_atol:g}"
    return ""


def _ort(model, inputs, outputs, rtol, atol) -> tuple[str, str]:
    import onnxruntime as ort

    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        got = sess.run(None, dict(zip(names, inputs)))
    except Exception as e:
        return "error", _first_line(e)
    why = mismatch(outputs, got, rtol, atol)
    return ("fail", why) if why else ("pass", "")


def _edgecc(model, inputs, outputs, rtol, atol) -> tuple[str, str]:
    import onnx

    import edgecc
    from edgecc.errors import UserError
    from edgecc.runtime.isolate import ModuleCrash, run_isolated

    ops = {n.op_type for n in _nodes(model.graph)}
    feeds = dict(zip((i.name for i in model.graph.input), inputs))
    fixed: dict = {}  # graph inputs fixed to the case's values, as a refusal's hint says
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path)
        try:
            while True:
                try:
                    artifact = edgecc.compile(path, "host", os.path.join(tmp, "out"), verify=False,
                                              constants=fixed)
                    break
                except UserError as e:
                    hint = re.search(r"--const (\S+)=VALUES", str(e))
                    if not hint or hint.group(1) not in feeds or hint.group(1) in fixed:
                        raise
                    fixed[hint.group(1)] = feeds[hint.group(1)]
            result = run_isolated(artifact, feeds, timeout=CASE_TIMEOUT)
        except UserError as e:
            text = str(e).strip()
            named = any(re.search(rf"\b{re.escape(op)}\b", text) for op in ops)
            return ("refused" if named and "\n" not in text else "error"), text
        except ModuleCrash as e:
            return "crash", str(e).replace(tmp, "<tmp>")
        except Exception as e:
            return "error", f"{type(e).__name__}: {_first_line(e)}"
    why = mismatch(outputs, list(result.values()), rtol, atol)
    fixed_note = f"with --const {', '.join(fixed)}" if fixed else ""
    return ("wrong", f"{why} ({fixed_note})" if fixed else why) if why else ("pass", fixed_note)


def _nodes(graph):
    """The graph's nodes and those of its subgraphs (If branches, Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else attr.graphs:
                yield from _nodes(g)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _worker(conn) -> None:
    """Runs cases sent by the parent; reports ORT's result, then edgecc's, per case."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):  # TVM's C++ logging and its importer's prints
        os.dup2(devnull, fd)
    import warnings

    import onnx

    warnings.simplefilter("ignore")
    while True:
        job = conn.recv()
        if job is None:
            return
        model_bytes, inputs, outputs, rtol, atol = job
        model = onnx.ModelProto.FromString(model_bytes)
        # Dtypes numpy lacks (float8, int4, ...) come as TensorProtos.
        inputs, outputs = ([onnx.numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else v for v in values]
                           for values in (inputs, outputs))
        conn.send(_ort(model, inputs, outputs, rtol, atol))
        conn.send(_edgecc(model, inputs, outputs, rtol, atol))


class _Worker:
    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,))  # not daemonic: it forks modules
        self.proc.start()
        child.close()
        self.case = None

    def give(self, case) -> None:
        self.case, self.started, self.result = case, time.monotonic(), {}
        ins, outs = case.data_sets[0]
        self.conn.send((case.model.SerializeToString(), ins, outs, case.rtol, case.atol))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.join()


def run_cases(cases: list, jobs: int = 1, log=print) -> dict[str, dict]:
    """{case name: {"edgecc": status, "ort": status, "detail": edgecc's reason}}."""
    pending, results = list(reversed(cases)), {}
    workers = [_Worker() for _ in range(min(jobs, len(cases)))]
    idle = list(workers)

    def finish(w: _Worker, edgecc: tuple[str, str]) -> None:
        ort = w.result.get("ort", ("crash", ""))
        results[w.case.name] = {"edgecc": edgecc[0], "ort": ort[0], "detail": edgecc[1]}
        log(f"[{len(results)}/{len(cases)}] {w.case.name}: edgecc {edgecc[0]}, ort {ort[0]}"
            + (f" ({edgecc[1]})" if edgecc[1] else ""))
        w.case = None

    def replace(w: _Worker, why: str) -> None:
        w.stop()
        finish(w, ("crash", why))
        workers[workers.index(w)] = fresh = _Worker()
        idle.append(fresh)

    try:
        while pending or len(idle) < len(workers):
            while pending and idle:
                idle.pop().give(pending.pop())
            busy = {w.conn: w for w in workers if w.case is not None}
            for conn in wait(list(busy), timeout=5):
                w = busy[conn]
                try:
                    message = conn.recv()
                except EOFError:
                    code = w.proc.exitcode if w.proc.join(1) is None else None
                    replace(w, f"worker died (exit code {code}) in the {'edgecc' if w.result else 'ORT'} step")
                    continue
                if "ort" not in w.result:
                    w.result["ort"] = message
                else:
                    finish(w, message)
                    idle.append(w)
            for w in workers:
                if w.case is not None and time.monotonic() - w.started > CASE_TIMEOUT:
                    replace(w, f"no result within {CASE_TIMEOUT} s")
    finally:
        for w in workers:
            w.stop()
    return dict(sorted(results.items()))


def counts(results: dict[str, dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {"edgecc": {}, "ort": {}}
    for r in results.values():
        for engine in out:
            out[engine][r[engine]] = out[engine].get(r[engine], 0) + 1
        if r["edgecc"] == "pass" and r["detail"].startswith("with --const"):
            out["edgecc"]["pass with --const"] = out["edgecc"].get("pass with --const", 0) + 1
    return {engine: dict(sorted(c.items())) for engine, c in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true",
                    help=f"write {EXPECTED.name} from this run (with --cases: those cases' entries)")
    ap.add_argument("--cases", help="only the cases whose name matches this regular expression")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    results = run_cases(node_cases(args.cases), args.jobs, log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - t
    total = counts(results)
    print(f"{len(results)} cases in {seconds:.0f} s: edgecc {total['edgecc']}; ONNX Runtime {total['ort']}")
    if args.update:  # with --cases, only those cases' entries change
        kept = json.loads(EXPECTED.read_text())["cases"] if args.cases and EXPECTED.exists() else {}
        cases = dict(sorted({**kept, **results}.items()))
        EXPECTED.write_text(json.dumps({"counts": counts(cases), "cases": cases}, indent=1) + "\n")
        print(f"wrote {EXPECTED}")
    return 1 if any(r["edgecc"] in BAD for r in results.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())

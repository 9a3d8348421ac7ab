"""`edgecc tune`: MetaSchedule over the model after edgecc's passes, and the records compile uses.

Flow: the pipeline runs and the model is lowered exactly as `compile` does (edgecc.core.optimize.
run_pipeline, then edgecc.backends.tvm_common's lower and prepare, which both TVM backends build
from), so the tuned PrimFuncs are the ones compile will build, quantized kernels included. Their tasks are written to a work directory keyed by the tasks and
the target (under the store: `<store>/work/<key>`), and MetaSchedule runs in a separate process
(edgecc.autotune.tune_worker) that appends every measured batch to the JSONDatabase there. The CLI
watches that database for its progress line, survives the worker crashing, and on the way out
(done, Ctrl-C or crash) converts what was measured into edgecc records in the store. Running the
same command again resumes: the trials already in the work directory count toward --trials, and
MetaSchedule starts its search from them.

Measurement is local for targets this host runs, or on boards registered with a TVM RPC tracker
under a key (candidates are cross-compiled here and spread over every board under that key).
BSR kernels are not tuned: their loops run over data-dependent block lists, which MetaSchedule
cannot tile; they keep their hand schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from edgecc.backends.tvm_common import lower, prepare
from edgecc.core import tuning_log
from edgecc.core.optimize import CompileOptions, run_pipeline
from edgecc.core.target import TargetDesc
from edgecc.core.verify import graph_inputs
from edgecc.errors import EdgeccError, UserError
from edgecc.kernels.bsr import KERNEL_ATTR as BSR_ATTR

TRIALS_PER_ITER = 16  # a progress step; MetaSchedule's default of 64 makes Ctrl-C lose more
BUILD_TIMEOUT_S = 60
RUN_TIMEOUT_S = 30
POLL_S = 1.0
WORKER = "edgecc.autotune.tune_worker"  # the module run as the tuning process


@dataclasses.dataclass
class Task:
    name: str
    weight: int
    shash: str
    mod: str  # tvm.ir.save_json


@dataclasses.dataclass
class Progress:
    """What the work directory's database says so far, per task."""

    trials: int
    best_s: dict[str, float]  # shash -> best mean run time
    failures: int

    def model_estimate_s(self, tasks: list[Task]) -> float:
        """Sum over tuned tasks of weight x best time (untuned tasks are not counted)."""
        return sum(t.weight * self.best_s[t.shash] for t in tasks if t.shash in self.best_s)


def parse_tracker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rpc-tracker '{text}': expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def extract_tasks(mod, target: TargetDesc) -> tuple[list[Task], list[str]]:
    """Tuning tasks of a prepared module, and the names of kernels left out (with why)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    tasks, left_out = [], []
    for t in ms.relax_integration.extract_tasks(mod, target.tvm_target()):
        func = t.dispatched[0]["main"]
        if func.attrs is not None and BSR_ATTR in func.attrs:
            left_out.append(f"{t.task_name} (BSR: data-dependent loops; keeps its hand schedule)")
            continue
        shash = str(ms.database.Workload(t.dispatched[0]).as_json()[0])
        tasks.append(Task(t.task_name, int(t.weight), shash, tvm.ir.save_json(t.dispatched[0])))
    return tasks, left_out


def read_progress(work: Path, tasks: list[Task]) -> Progress:
    """Trials and best times from MetaSchedule's JSON files; a line being written is skipped."""
    shash_of_line: list[str] = []
    wl = work / "database_workload.json"
    if wl.exists():
        for line in wl.read_text().splitlines():
            try:
                shash_of_line.append(str(json.loads(line)[0]))
            except (ValueError, IndexError):
                shash_of_line.append("")
    wanted = {t.shash for t in tasks}
    trials = failures = 0
    best: dict[str, float] = {}
    rec = work / "database_tuning_record.json"
    for line in rec.read_text().splitlines() if rec.exists() else ():
        try:
            index, (_, run_secs, *_) = json.loads(line)
            shash = shash_of_line[index]
        except (ValueError, IndexError, TypeError):
            continue
        if shash not in wanted:
            continue
        trials += 1
        secs = [float(s) for s in run_secs or []]
        if not secs or max(secs) >= tuning_log.FAILED_RUN_SECS:
            failures += 1
            continue
        mean = sum(secs) / len(secs)
        best[shash] = min(best.get(shash, mean), mean)
    return Progress(trials, best, failures)


def _current_task(work: Path) -> str:
    """The task MetaSchedule logged last: where a crash happened."""
    logs = sorted((work / "logs").glob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return "(before the first task started)"
    stem = logs[-1].stem  # tvm.s_tir.meta_schedule.logging.task_03_fused_matmul_add
    return stem.split(".task_", 1)[-1].split("_", 1)[-1]


def _work_dir(root: Path, tasks: list[Task], target: TargetDesc, rpc_key: str | None) -> Path:
    blob = json.dumps({"tasks": sorted(t.shash for t in tasks), "target": target.fingerprint(),
                       "tvm": tuning_log.tvm_release(tuning_log.installed_tvm_version()),
                       "device": rpc_key or "local"})
    return root / "work" / hashlib.sha256(blob.encode()).hexdigest()[:16]


def _board_count(host: str, port: int, key: str) -> int:
    """Free boards registered under `key`, or a one-line error when there are none."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker(host, port).summary()
    except Exception as e:  # noqa: BLE001 (the tracker's errors are socket and RPC errors)
        raise UserError(f"--rpc-tracker {host}:{port}: cannot reach the tracker ({e})") from None
    queue = summary.get("queue_info", {}).get(key, {})
    boards = int(queue.get("free", 0)) + int(queue.get("pending", 0))
    if boards == 0:
        known = ", ".join(sorted(summary.get("queue_info", {}))) or "none"
        raise UserError(f"--rpc-key '{key}': no board is registered under it at {host}:{port} "
                        f"(keys there: {known})")
    return boards


def export_records(work: Path, tasks: list[Task], target: TargetDesc, device: str,
                   store: tuning_log.Store) -> int:
    """Add what the work dir measured to the store; returns how many records were new."""
    if not (work / "database_workload.json").exists():
        return 0
    names = {t.shash: t.name for t in tasks}
    measured = tuning_log.from_ms_database(
        work, target_name=target.name, fingerprint=target.fingerprint(), device=device,
        target=target.tvm_target(), task_names=names)
    seen = {_measurement(r) for r in store.records(target.fingerprint())}
    new = [r for r in measured if r.shash in names and _measurement(r) not in seen]
    return store.append(new)


def _measurement(r: tuning_log.Record) -> tuple:
    return r.shash, json.dumps(r.trace, sort_keys=True), r.run_secs, r.error


def tune(
    model: str | os.PathLike,
    target: str | TargetDesc = "host",
    pipeline: str | None = None,
    *,
    trials: int = 2000,
    max_trials_per_task: int | None = None,
    store: str | os.PathLike | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    shapes: dict[str, int] | None = None,
    constants: dict | None = None,
    calibration: str | os.PathLike | None = None,
    calibration_text: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    seed: int = 0,
    log: Callable[[str], None] = lambda _m: None,
    progress: TextIO | None = sys.stderr,
) -> dict:
    """Tune a model for a target; returns a summary (trials, per-task best, records added)."""
    if trials < 1:
        raise UserError(f"--trials {trials}: must be at least 1")
    if (rpc_tracker is None) != (rpc_key is None):
        raise UserError("--rpc-tracker and --rpc-key go together")
    rpc = None
    if rpc_tracker is not None:
        host, port = parse_tracker(rpc_tracker)
        rpc = {"host": host, "port": port, "key": rpc_key}

    def checks(tdesc: TargetDesc) -> None:
        if not tdesc.lowers_to_tvm:
            raise UserError(f"target '{tdesc.name}' has backend '{tdesc.backend}': it is not lowered to TVM "
                            "(tuning and Relax modules are TVM's); use `edgecc compile`")
        if rpc is None and not tdesc.runs_here():
            raise UserError(f"target '{tdesc.name}' cannot be measured on this host: tune on boards with "
                            "--rpc-tracker HOST:PORT --rpc-key KEY (README: 'Tuning on boards')")
        if tdesc.device_kind != "llvm" and rpc is None:
            raise UserError(f"target '{tdesc.name}': {tdesc.device_kind} kernels are measured on the device; "
                            "use --rpc-tracker and --rpc-key")
        if rpc is not None:
            rpc["workers"] = _board_count(rpc["host"], rpc["port"], rpc["key"])

    options = CompileOptions(pipeline=pipeline, shapes=shapes or {}, constants=constants or {},
                             calibration=calibration, calibration_text=calibration_text,
                             tokenizer=tokenizer, seed=seed)
    opt = run_pipeline(model, target, options, log, before_load=checks)
    tdesc = opt.target
    free = sorted({d for spec in graph_inputs(opt.source_proto) for d in spec.shape
                   if isinstance(d, str) and d not in (shapes or {})})
    if free:
        raise UserError(f"{model}: tuning needs static shapes; give the size of each symbolic dim with "
                        f"--shape ({' '.join(f'--shape {d}=N' for d in free)}), and compile with the same")
    tasks, left_out = extract_tasks(prepare(lower(opt, options.shapes), tdesc.tvm_target()), tdesc)
    for name in left_out:
        log(f"not tuned: {name}")
    if not tasks:
        raise UserError(f"{model}: nothing to tune (no kernels left after lowering)")
    store_ = tuning_log.Store(store)
    work = _work_dir(store_.root, tasks, tdesc, rpc_key)
    work.mkdir(parents=True, exist_ok=True)
    with _exclusive(work):
        return _tune_in(work, tasks, tdesc, rpc, rpc_key, store_, trials, max_trials_per_task, seed, log,
                        progress)


@contextlib.contextmanager
def _exclusive(work: Path):
    """One tuner per work dir: two MetaSchedule processes appending to one database corrupt it.
    (Different models or targets have different work dirs and tune side by side; the store
    itself takes its own lock.)"""
    with open(work / "tune.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{work}: another 'edgecc tune' is tuning this model for this target "
                            f"({f.read().strip() or 'pid unknown'}); wait for it, or stop it") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield


def _tune_in(work: Path, tasks: list[Task], tdesc: TargetDesc, rpc: dict | None, rpc_key: str | None,
             store_: tuning_log.Store, trials: int, max_trials_per_task: int | None, seed: int,
             log: Callable[[str], None], progress: TextIO | None) -> dict:
    """The rest of tune(), in a work dir this process holds."""
    tvm_target = tdesc.tvm_target()
    export = {k: v for k, v in json.loads(str(tvm_target)).items() if k != "host"}
    host = json.loads(str(tvm_target.host)) if tvm_target.host is not None else None
    (work / "tasks.json").write_text(json.dumps([dataclasses.asdict(t) for t in tasks]))
    (work / "config.json").write_text(json.dumps({
        "target": export, "target_host": host, "seed": seed, "threads": tdesc.num_cores(),
        "max_trials_per_task": max_trials_per_task or trials, "trials_per_iter": TRIALS_PER_ITER,
        "build_timeout_s": BUILD_TIMEOUT_S, "run_timeout_s": RUN_TIMEOUT_S, "rpc": rpc,
        "cross_cc": None if tdesc.runs_here() else tdesc.toolchain["cc"],
    }))
    device = f"rpc:{rpc_key}" if rpc else tuning_log.host_device()
    before = read_progress(work, tasks)
    remaining = trials - before.trials
    log(f"{len(tasks)} tasks, {before.trials} trials already measured in {work}; "
        f"{max(remaining, 0)} to go, measured on {device}")
    status = "done"
    if remaining > 0:
        status = _run_worker(work, remaining, tasks, trials, progress)
    added = export_records(work, tasks, tdesc, device, store_)
    final = read_progress(work, tasks)
    summary = {
        "status": status, "work_dir": str(work), "store": str(store_.root), "device": device,
        "tasks": len(tasks), "trials": final.trials, "failed_trials": final.failures, "records_added": added,
        "estimated_model_ms": round(final.model_estimate_s(tasks) * 1e3, 4),
        "tuned_tasks": len(final.best_s), "untuned_tasks": [t.name for t in tasks if t.shash not in final.best_s],
        "best_ms": {t.name: round(final.best_s[t.shash] * 1e3, 4) for t in tasks if t.shash in final.best_s},
    }
    if status.startswith("crashed"):
        raise EdgeccError(f"tuning {status}; {added} records measured before it were kept in {store_.root}")
    return summary


def _run_worker(work: Path, remaining: int, tasks: list[Task], trials: int, out: TextIO | None) -> str:
    """Run the worker to the end, a crash or Ctrl-C, drawing progress; returns how it ended."""
    cmd = [sys.executable, "-m", WORKER, str(work), str(remaining)]
    with open(work / "worker.log", "ab") as worker_log:
        proc = subprocess.Popen(cmd, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        tty = out is not None and out.isatty()
        last_line = 0.0
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                if out is not None and (tty or time.monotonic() - last_line > 10):
                    _draw(out, read_progress(work, tasks), tasks, trials, tty)
                    last_line = time.monotonic()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            if out is not None:
                out.write("\n")
            return "interrupted"
    if out is not None and tty:
        out.write("\n")
    if proc.returncode < 0:
        return (f"crashed ({signal.Signals(-proc.returncode).name}) in task '{_current_task(work)}' "
                f"(log: {work / 'worker.log'})")
    if proc.returncode != 0:
        tail = (work / "worker.log").read_text(errors="replace").strip().splitlines()[-1:]
        return f"crashed (exit {proc.returncode}) in task '{_current_task(work)}': {''.join(tail)}"
    return "done"


def _draw(out: TextIO, p: Progress, tasks: list[Task], trials: int, tty: bool) -> None:
    """One line: trials, tasks tuned, the estimated model time, and the heaviest tuned kernel
    (weight x best time) with its best time so far."""
    width = 24
    filled = min(width, width * p.trials // max(trials, 1))
    est = p.model_estimate_s(tasks) * 1e3
    untuned = len(tasks) - len(p.best_s)
    tuned = [t for t in tasks if t.shash in p.best_s]
    heaviest = max(tuned, key=lambda t: t.weight * p.best_s[t.shash], default=None)
    line = (f"[{'#' * filled}{'.' * (width - filled)}] {p.trials}/{trials} trials, "
            f"{len(p.best_s)}/{len(tasks)} tasks tuned, est. {est:.3f} ms"
            + (f" + {untuned} untuned" if untuned else "")
            + (f"; heaviest {heaviest.name} {p.best_s[heaviest.shash] * 1e3:.3f} ms x{heaviest.weight}"
               if heaviest else ""))
    out.write(("\r" + line.ljust(120)) if tty else line + "\n")
    out.flush()

"""The MetaSchedule process `edgecc tune` starts: `python -m edgecc.autotune.tune_worker WORK_DIR TRIALS`.

It runs apart from the CLI because TVM can crash a process (a segfault was seen in MetaSchedule
with large embedded constants); the CLI reports such a crash with the task it was in and keeps
every record measured before it. Its inputs are files in WORK_DIR, written by edgecc.autotune.tuning:
tasks.json ([{name, weight, shash, mod}], mod as tvm.ir.save_json) and config.json. It appends
to MetaSchedule's JSONDatabase in WORK_DIR, which is what makes Ctrl-C and resuming safe: each
measured batch is committed before the next one starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import tempfile
import types
from pathlib import Path

CROSS_CC_ENV = "EDGECC_TUNE_CROSS_CC"


def light_intrinsics(cpu_only: bool) -> None:
    """Register only the CPU tensor intrinsics (x86, Arm) when the target is a CPU.

    MetaSchedule imports tvm.s_tir.tensor_intrin, which registers every backend's intrinsics and
    takes 30-40 s on this class of machine, 25 s of it for CUDA's; the CPU ones take 2 s. The
    package is stood in by a bare module that still finds its submodules.
    """
    name = "tvm.s_tir.tensor_intrin"
    if not cpu_only or name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    stub = types.ModuleType(name)
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = stub
    for sub in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{sub}")


def fast_build(mod, target, _params):
    """MetaSchedule's default build without its import of every tensor intrinsic."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def cross_export(mod) -> str:
    """Export a candidate with the target's cross compiler, for boards of another architecture."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="edgecc-tune-"), "candidate.so")
    mod.export_library(path, fcompile=cc.cross_compiler(os.environ[CROSS_CC_ENV]))
    return path


def _builder_initializer() -> None:
    light_intrinsics(cpu_only=True)


def main(work_dir: str, trials: int) -> int:
    work = Path(work_dir)
    config = json.loads((work / "config.json").read_text())
    cpu = config["target"].get("kind") == "llvm"
    light_intrinsics(cpu)

    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(config["target"], host=config.get("target_host"))
    tasks = json.loads((work / "tasks.json").read_text())
    extracted = []
    for t in tasks:
        mod = tvm.ir.load_json(t["mod"])
        extracted.append(ms.ExtractedTask(t["name"], mod, target, [mod], int(t["weight"])))
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted, str(work), seed=config["seed"], num_threads=config["threads"])

    if config.get("cross_cc"):
        os.environ[CROSS_CC_ENV] = config["cross_cc"]
    builder = ms.builder.LocalBuilder(
        max_workers=1, timeout_sec=config["build_timeout_s"], f_build=fast_build,
        f_export=cross_export if config.get("cross_cc") else None,
        initializer=_builder_initializer if cpu else None)
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50, enable_cpu_cache_flush=False)
    rpc = config.get("rpc")
    if rpc:
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=rpc["host"], tracker_port=rpc["port"],
                                           tracker_key=rpc["key"], session_timeout_sec=config["run_timeout_s"]),
            evaluator_config=evaluator, max_workers=rpc["workers"])
    else:
        runner = ms.runner.LocalRunner(timeout_sec=config["run_timeout_s"], evaluator_config=evaluator)
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work), max_trials_global=trials,
        max_trials_per_task=config["max_trials_per_task"], num_trials_per_iter=config["trials_per_iter"],
        builder=builder, runner=runner, database=ms.database.JSONDatabase(work_dir=str(work)),
        cost_model="xgb")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))

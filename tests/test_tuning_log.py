"""The tuning-record store: validation, damaged files, concurrent appends, target/TVM compatibility,
merge/prune/export/import, the `edgecc logs` actions, and a real MetaSchedule round trip."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgecc.autotune import logs_cli
from edgecc.core import tuning_log as tl
from edgecc.errors import UserError

FP_PI, FP_HOST = "ab12ab12ab12ab12", "cd34cd34cd34cd34"
TVM = tl.installed_tvm_version()
# Well-formed JSON that is no TVM module: what a poisoned record carries.
NOT_A_MODULE = '{"root_index": 0, "nodes": []}'


def _empty_module() -> str:
    import tvm

    return tvm.ir.save_json(tvm.IRModule())


EMPTY_MODULE = _empty_module()


def record(**over) -> dict:
    """A valid record as a JSON object; keyword arguments replace fields."""
    obj = {
        "format": tl.FORMAT, "task": "fused_matmul_add",
        "workload": {"shash": "1234567890", "mod": EMPTY_MODULE},
        "trace": [[["GetSBlock", [], ["C", "main"], ["b0"]]], []],
        "args_info": [["TENSOR", "float32", [64, 64]]],
        "run_secs": [1e-3], "error": None,
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},
        "target_name": "rpi4", "fingerprint": FP_PI, "device": "rpc:rpi4",
        "tvm_version": TVM, "edgecc_version": "0.1.0", "trials": 8, "date": "2026-01-02T03:04:05+00:00",
    }
    obj.update(over)
    return obj


def rec(**over) -> tl.Record:
    return tl.validate(record(**over))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(lines))
    return path


# ---------------------------------------------------------------------------------------------- validation


def test_a_valid_record_round_trips_through_json():
    r = rec()
    assert r.ok and r.mean_secs == pytest.approx(1e-3) and r.release == tl.tvm_release(TVM)
    assert tl.validate(json.loads(r.to_line())) == r
    assert r.to_json() == record()


def _without(key):
    obj = record()
    del obj[key]
    return obj


@pytest.mark.parametrize("obj, field", [
    ([], "record"),
    (_without("trace"), "trace"),
    (record(extra=1), "extra"),
    (record(format="edgecc-tuning-record/2"), "format"),
    (record(workload={"shash": "", "mod": "{}"}), "workload.shash"),
    (record(workload={"shash": "12ab", "mod": "{}"}), "workload.shash"),
    (record(workload={"shash": "12"}), "workload"),
    (record(workload={"shash": "12", "mod": "gASV"}), "workload.mod"),
    (record(trace=[[], []]), "trace"),
    (record(trace="GetSBlock"), "trace"),
    (record(args_info={}), "args_info"),
    (record(run_secs=[-1.0]), "run_secs"),
    (record(run_secs=[float("nan")]), "run_secs"),
    (record(run_secs=["0.1"]), "run_secs"),
    (record(run_secs=[True]), "run_secs"),
    (record(run_secs=[1e10]), "run_secs"),
    (record(run_secs=[]), "run_secs"),
    (record(error="build failed", run_secs=[0.1]), "run_secs"),
    (record(error="two\nlines", run_secs=[]), "error"),
    (record(target={"mcpu": "x"}), "target"),
    (record(target_name=""), "target_name"),
    (record(fingerprint="../../etc/passwd"), "fingerprint"),
    (record(device=None), "device"),
    (record(tvm_version="latest"), "tvm_version"),
    (record(trials=-1), "trials"),
    (record(trials=1.5), "trials"),
    (record(date="yesterday"), "date"),
    (record(date="2026-01-02T03:04:05"), "date"),
])
def test_validation_names_the_bad_field(obj, field):
    with pytest.raises(tl.InvalidRecord) as e:
        tl.validate(obj)
    assert str(e.value).startswith(f"{field}:")


def test_a_failed_measurement_is_an_error_record():
    r = rec(error="LocalBuilder: Timeout", run_secs=[])
    assert not r.ok and r.mean_secs == float("inf")


# ------------------------------------------------------------------------------------------- damaged files


def test_corrupted_and_truncated_lines_are_skipped_with_file_and_line(tmp_path):
    good = [json.dumps(record(trials=i)) + "\n" for i in range(3)]
    bad_field = json.dumps(record(run_secs=[-1])) + "\n"
    truncated = json.dumps(record(trials=9))[:-40]  # a writer killed mid-line: no closing brace, no newline
    path = write_lines(tmp_path / "x.jsonl", [good[0], "{not json\n", good[1], bad_field, "\n", good[2],
                                              truncated])
    with pytest.warns(tl.TuningLogWarning) as caught:
        records = tl.read_records(path)
    assert [r.trials for r in records] == [0, 1, 2]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3
    assert messages[0].startswith(f"{path}:2: skipped: not valid JSON")
    assert messages[1].startswith(f"{path}:4: skipped: invalid record: run_secs:")
    assert messages[2].startswith(f"{path}:7: skipped: not valid JSON (truncated line)")


def test_a_truncated_gzip_file_keeps_the_lines_before_the_damage(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    tl.write_records(path, [rec(trials=i, workload={"shash": str(i), "mod": "{" + "x" * 3000 + "}"})
                            for i in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    log: list[str] = []
    records = tl.read_records(path, log=log.append)
    assert 0 < len(records) < 200
    assert [r.trials for r in records] == list(range(len(records)))
    assert len(log) == 1 and log[0].startswith(f"{path}:{len(records) + 1}: skipped: compressed data ends")


def test_unreadable_files_are_user_errors_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.jsonl: no such file"):
        tl.read_records(tmp_path / "missing.jsonl")
    fake = write_lines(tmp_path / "fake.jsonl.gz", [json.dumps(record()) + "\n"])
    with pytest.raises(UserError, match="fake.jsonl.gz: not a gzip file"):
        tl.read_records(fake)


# ------------------------------------------------------------------------------------------------ the store


def test_store_keeps_one_file_per_fingerprint_and_appends_after_a_torn_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECC_TUNING_DIR", str(tmp_path / "env"))
    assert tl.Store().root == tmp_path / "env"
    store = tl.Store(tmp_path / "s")
    assert store.records() == [] and store.fingerprints() == []
    assert store.append([rec(), record(fingerprint=FP_HOST, target_name="host")]) == 2
    assert sorted(p.name for p in store.root.glob("*.jsonl")) == [f"{FP_PI}.jsonl", f"{FP_HOST}.jsonl"]
    assert store.fingerprints() == [FP_PI, FP_HOST]
    assert [r.fingerprint for r in store.records(FP_HOST)] == [FP_HOST]
    with open(store.path(FP_PI), "a") as f:  # a writer killed mid-line
        f.write(json.dumps(record())[:50])
    store.append([rec(trials=2)])
    with pytest.warns(tl.TuningLogWarning, match=f"{FP_PI}.jsonl:2: "):
        assert [r.trials for r in store.records(FP_PI)] == [8, 2]


def test_two_processes_appending_at_once_lose_no_record(tmp_path):
    store, go = tmp_path / "store", tmp_path / "go"
    script = textwrap.dedent(f"""
        import json, os, sys, time
        from edgecc.core import tuning_log as tl
        obj = json.loads(sys.argv[1])
        store = tl.Store({str(store)!r})
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        for i in range(200):
            obj["trials"] = i
            obj["workload"]["shash"] = sys.argv[2] + str(i)
            store.append([obj])
    """)
    # 20 kB per record, so one append is more than one buffered write: interleaving would tear lines.
    big = record(workload={"shash": "0", "mod": "{" + "x" * 20000 + "}"})
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(big), tag]) for tag in ("1", "2")]
    time.sleep(1.0)
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single torn line fails the test
        records = tl.Store(store).records()
    assert len(records) == 400
    assert sorted(r.shash for r in records) == sorted(f"{t}{i}" for t in "12" for i in range(200))


# ------------------------------------------------------------------------------------------- compatibility


def test_records_apply_only_to_their_fingerprint_and_tvm_release():
    ok, why = tl.compatible(rec(), FP_PI, "0.27.1")
    assert ok if tl.tvm_release(TVM) == "0.27" else not ok
    ok, why = tl.compatible(rec(tvm_version="0.27.0.post1"), FP_HOST, "0.27.0.post1", target_name="host")
    assert not ok and why == "measured for fingerprint ab12ab12… (rpi4), compiling for cd34cd34… (host)"
    ok, why = tl.compatible(rec(tvm_version="0.26.0"), FP_PI, "0.27.0.post1")
    assert not ok and "TVM 0.26.0" in why and "0.27.0.post1" in why
    assert tl.compatible(rec(tvm_version="0.27.0"), FP_PI, "0.27.0.post1")[0]


def test_best_is_the_fastest_applicable_successful_record_per_workload(tmp_path):
    store = tl.Store(tmp_path)
    store.append([
        rec(run_secs=[3e-3]), rec(run_secs=[1e-3, 3e-3], trials=2),  # mean 2e-3: the best here
        rec(run_secs=[], error="build failed", trials=3),
        rec(run_secs=[1e-6], tvm_version="0.26.0"),  # faster, but from another TVM release
        rec(run_secs=[5e-3], workload={"shash": "42", "mod": "{}"}),
        rec(run_secs=[1e-6], fingerprint=FP_HOST),  # another target
    ])
    best = store.best(FP_PI, TVM)
    assert sorted(best) == ["1234567890", "42"]
    assert best["1234567890"].trials == 2 and best["42"].run_secs == (5e-3,)
    assert store.best(FP_PI, "0.26.3")["1234567890"].run_secs == (1e-6,)


# ------------------------------------------------------------------------------ merge, prune, export, import


def test_merge_keeps_the_best_per_workload_fingerprint_and_release(tmp_path):
    a = tmp_path / "a.jsonl"
    tl.write_records(a, [rec(run_secs=[2e-3]), rec(run_secs=[1e-3], trials=5),
                         rec(run_secs=[], error="timeout", workload={"shash": "7", "mod": "{}"})])
    b = tmp_path / "b.jsonl.gz"
    tl.write_records(b, [rec(run_secs=[4e-3]), rec(run_secs=[9e-3], tvm_version="0.26.0"),
                         rec(run_secs=[9e-3], fingerprint=FP_HOST)])
    store = tl.Store(tmp_path / "store")
    store.append([rec(run_secs=[1.5e-3], trials=3)])
    assert tl.merge([a, b], store) == {FP_HOST: 1, FP_PI: 3}
    kept = {(r.shash, r.release): r for r in store.records(FP_PI)}
    assert kept[("1234567890", tl.tvm_release(TVM))].trials == 5
    assert kept[("1234567890", "0.26")].run_secs == (9e-3,)  # kept: it never competes with this TVM's
    assert kept[("7", tl.tvm_release(TVM))].error == "timeout"  # the only record of its workload


def test_prune_keeps_the_top_k_per_workload(tmp_path):
    store = tl.Store(tmp_path)
    store.append([rec(run_secs=[s * 1e-3], trials=i) for i, s in enumerate([5, 1, 4, 2, 3])]
                 + [rec(run_secs=[], error="failed"), rec(workload={"shash": "9", "mod": "{}"})])
    assert store.prune(2) == {FP_PI: (7, 3)}
    kept = store.records(FP_PI)
    assert sorted(r.trials for r in kept if r.shash == "1234567890") == [1, 3]
    assert [r.shash for r in kept].count("9") == 1


@pytest.mark.parametrize("name", ["all.jsonl", "all.jsonl.gz"])
def test_export_then_import_round_trips(tmp_path, name):
    src = tl.Store(tmp_path / "src")
    originals = [rec(trials=i, run_secs=[i * 1e-3 + 1e-3]) for i in range(5)] + [
        rec(fingerprint=FP_HOST, target_name="host", device="host:AMD EPYC")]
    src.append(originals)
    out = tmp_path / name
    assert src.export(out) == 6
    assert (out.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temp file
    dst = tl.Store(tmp_path / "dst")
    result = tl.import_file(out, dst, fingerprint=FP_PI, tvm_version=TVM)
    assert (result.imported, result.valid, result.skipped) == (6, 6, [])
    assert result.other_targets == {"host (cd34cd34…)": 1}
    assert sorted(r.to_line() for r in dst.records()) == sorted(r.to_line() for r in originals)
    again = tl.import_file(out, dst, fingerprint=FP_PI, tvm_version=TVM)
    assert again.imported == 0 and len(again.skipped) == 6
    assert all(s.endswith("already in the store") for s in again.skipped)
    assert len(dst.records()) == 6


def test_import_skips_other_tvm_releases_and_bad_lines_with_reasons(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        json.dumps(record(tvm_version="0.26.0")) + "\n",
        "garbage\n",
        json.dumps(record(trials=3)) + "\n",
    ])
    store = tl.Store(tmp_path / "store")
    result = tl.import_file(path, store, fingerprint=FP_PI, tvm_version="0.27.0.post1")
    assert result.imported == 1 and result.valid == 2 and result.other_targets == {}
    assert result.skipped[0].startswith(f"{path}:1: measured with TVM 0.26.0")
    assert result.skipped[1].startswith(f"{path}:2: not valid JSON")
    assert [r.tvm_version for r in store.records()] == [TVM]


def test_a_poisoned_workload_is_skipped_on_import_and_never_fatal_at_compile(tmp_path):
    poisoned = record(workload={"shash": "77", "mod": NOT_A_MODULE})
    path = write_lines(tmp_path / "in.jsonl", [json.dumps(poisoned) + "\n", json.dumps(record()) + "\n"])
    store = tl.Store(tmp_path / "store")
    result = tl.import_file(path, store, fingerprint=FP_PI, tvm_version=TVM)
    assert result.imported == 1 and result.valid == 2
    assert result.skipped == [f"{path}:1: workload module does not deserialize (ValueError)"]
    # Already in a store (written by an older edgecc): skipped with a warning when compiling.
    messages = []
    db = tl.to_ms_database([tl.validate(poisoned)], log=messages.append)
    assert len(db) == 0 and messages == ["task fused_matmul_add: record skipped: workload module does "
                                         "not deserialize (ValueError)"]


def test_deeply_nested_json_is_a_skipped_line(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", ["[" * 100000 + "]" * 100000 + "\n", json.dumps(record()) + "\n"])
    result = tl.import_file(path, tl.Store(tmp_path / "store"), fingerprint=FP_PI, tvm_version=TVM)
    assert result.imported == 1
    assert result.skipped == [f"{path}:1: JSON nested too deeply"]


# ------------------------------------------------------------------------------------------- edgecc logs


def logs(*argv: str) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    logs_cli.add_parser(sub)
    args = p.parse_args(["logs", *argv])
    return args.func(args)


def test_logs_actions(tmp_path, capsys):
    store = tmp_path / "store"
    exported = tmp_path / "out.jsonl.gz"
    src = tmp_path / "src.jsonl"
    tl.write_records(src, [rec(run_secs=[2e-3], trials=4, device="rpc:pi-a"),
                           rec(run_secs=[1e-3], trials=6, device="rpc:pi-b"),
                           rec(run_secs=[], error="timeout", task="conv", workload={"shash": "5", "mod": "{}"}),
                           rec(fingerprint=FP_HOST, target_name="host", device="host:EPYC")])
    assert logs("merge", str(src), "--store", str(store)) == 0
    capsys.readouterr()
    assert logs("--store", str(store), "list") == 0
    out = capsys.readouterr().out
    assert "FINGERPRINT" in out and FP_PI in out and FP_HOST in out
    pi_row = next(line for line in out.splitlines() if line.startswith(FP_PI))
    assert pi_row.split()[1:4] == ["rpi4", "2", "(1"]  # 2 records (best per workload), 1 failed

    assert logs("show", "rpi4", "--store", str(store)) == 0
    out = capsys.readouterr().out
    assert FP_HOST not in out
    mm = next(line for line in out.splitlines() if "fused_matmul_add" in line)
    assert mm.split()[2:5] == ["1.0000", "6", "rpc:pi-b"]
    conv = next(line for line in out.splitlines() if line.strip().startswith("conv"))
    assert conv.split()[2] == "failed" and conv.endswith("timeout")

    assert logs("export", str(exported), "--target", "cd34", "--store", str(store)) == 0
    assert [r.fingerprint for r in tl.read_records(exported)] == [FP_HOST]
    assert logs("import", str(exported), "--store", str(tmp_path / "other")) == 0
    assert "imported 1 records" in capsys.readouterr().out
    assert logs("prune", "--keep", "1", "--store", str(store)) == 0


def test_logs_user_errors_name_the_file(tmp_path):
    store = str(tmp_path / "store")
    with pytest.raises(UserError, match="nope.jsonl: no such file"):
        logs("import", str(tmp_path / "nope.jsonl"), "--store", store)
    bad_gz = write_lines(tmp_path / "bad.jsonl.gz", ["hello\n"])
    with pytest.raises(UserError, match="bad.jsonl.gz: not a gzip file"):
        logs("merge", str(bad_gz), "--store", store)
    junk = write_lines(tmp_path / "junk.jsonl", ["{}\n", "nope\n"])
    with pytest.raises(UserError, match=r"junk.jsonl: no valid tuning records \(2 lines skipped\)"):
        logs("import", str(junk), "--store", store)
    with pytest.raises(UserError, match=r"junk.jsonl: no valid tuning records"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logs("merge", str(junk), "--store", store)
    with pytest.raises(UserError, match="no tuning records for 'rpi4'"):
        logs("show", "rpi4", "--store", store)
    with pytest.raises(UserError, match="--keep 0"):
        logs("prune", "--keep", "0", "--store", store)


# ------------------------------------------------------------------------ a real MetaSchedule round trip


def test_metaschedule_records_round_trip_and_apply(tmp_path, monkeypatch):
    """Tune a 64x64 matmul for 8 trials, store the records, and apply them from a rebuilt database."""
    import tvm_ffi

    # TuneContext imports tvm.s_tir.tensor_intrin (30-40 s: it registers CUDA, ARM, x86... tensorization
    # intrinsics). A float32 matmul on generic llvm uses none of them, so an empty stand-in keeps this fast.
    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        monkeypatch.setitem(sys.modules, "tvm.s_tir.tensor_intrin", types.ModuleType("tvm.s_tir.tensor_intrin"))
    import tvm
    from tvm import relax, te
    from tvm.s_tir import meta_schedule as ms

    a, b = te.placeholder((64, 64), name="A"), te.placeholder((64, 64), name="B")
    k = te.reduce_axis((0, 64), name="k")
    c = te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c]).with_attr("global_symbol", "mm")
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})

    def fast_build(mod, target, _params):  # default_build minus its 30 s tensor_intrin import
        from tvm.driver import build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    work_dir = tmp_path / "ms"
    tuned = ms.tir_integration.tune_tir(
        func, target, str(work_dir), max_trials_global=8, num_trials_per_iter=8,
        builder=ms.builder.LocalBuilder(f_build=fast_build, max_workers=1, timeout_sec=60),
        runner=ms.runner.LocalRunner(), strategy="replay-trace", cost_model="random",
        num_tuning_cores=1, seed=0)
    measured = tuned.get_all_tuning_records()
    assert len(measured) >= 4
    # A candidate that failed to build or run: MetaSchedule stores run_secs=[1e10].
    first = measured[0]
    tuned.commit_tuning_record(ms.database.TuningRecord(first.trace, first.workload, [1e10], first.target,
                                                        first.args_info))
    n_ms = len(measured) + 1

    records = tl.from_ms_database(work_dir, target_name="test-llvm", fingerprint=FP_HOST,
                                  device=tl.host_device(), target=target)
    assert len(records) == n_ms
    assert {r.task for r in records} == {"mm"} and len({r.shash for r in records}) == 1
    assert [r.trials for r in records] == list(range(1, n_ms + 1))
    assert [r.ok for r in records] == [True] * (n_ms - 1) + [False]
    assert records[-1].run_secs == () and "1e10" in records[-1].error
    assert len(tl.to_ms_database(records[-1:])) == 0  # a failed schedule is never applied
    assert tl.from_ms_database(work_dir, target_name="x", fingerprint=FP_PI, device="x",
                               target={"kind": "llvm", "mcpu": "cortex-a72",
                                       "mtriple": "aarch64-linux-gnu"}) == []

    store = tl.Store(tmp_path / "store")
    store.append(records)
    back = store.records(FP_HOST)
    assert [r.to_line() for r in back] == [r.to_line() for r in records]
    best = store.best(FP_HOST, tvm.__version__)
    assert list(best) == [records[0].shash]
    assert best[records[0].shash].mean_secs == min(r.mean_secs for r in records[:-1])
    assert store.best(FP_PI, tvm.__version__) == {}

    db = tl.to_ms_database(best.values())
    assert len(db) == 1
    # The schedule from the rebuilt database is the one MetaSchedule itself picks as best.
    tvm.ir.assert_structural_equal(ms.tir_integration.compile_tir(db, func, target).mod,
                                   ms.tir_integration.compile_tir(tuned, func, target).mod)

    bb = relax.BlockBuilder()
    x, y = relax.Var("x", relax.TensorType((64, 64), "float32")), relax.Var("y", relax.TensorType((64, 64),
                                                                                                    "float32"))
    with bb.function("main", [x, y]):
        gv = bb.add_func(func, "mm")
        bb.emit_func_output(bb.emit(relax.call_tir(gv, [x, y], relax.TensorType((64, 64), "float32"))))
    mod = bb.get()
    with target, tl.to_ms_database([]):
        untouched = relax.transform.MetaScheduleApplyDatabase()(mod)
    assert tvm_ffi.structural_equal(untouched["mm"], mod["mm"])
    with target, db:
        scheduled = relax.transform.MetaScheduleApplyDatabase()(mod)
    assert not tvm_ffi.structural_equal(scheduled["mm"], mod["mm"])

    vm = relax.VirtualMachine(tvm.compile(scheduled, target=target), tvm.cpu())
    rng = np.random.default_rng(0)
    an, bn = rng.standard_normal((64, 64), dtype="float32"), rng.standard_normal((64, 64), dtype="float32")
    out = vm["main"](tvm.runtime.tensor(an), tvm.runtime.tensor(bn)).numpy()
    np.testing.assert_allclose(out, an @ bn, rtol=1e-5, atol=1e-4)


"""edgecc tune: MetaSchedule on this host and over TVM RPC, records in the store, used by compile.

Each tune here measures one batch of 16 candidates of the example MLP (batch fixed at 1): enough
to produce real records, in under a minute on 2 cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import edgecc
from edgecc.autotune import tuning
from edgecc.core import tuning_log
from edgecc.core.target import load_target
from edgecc.core.verify import random_inputs, run_ort
from edgecc.errors import EdgeccError, UserError
from tests.conftest import run_cli

SHAPES = {"batch": 1}
TRIALS = 16


@pytest.fixture(scope="module")
def tuned(example_path, tmp_path_factory):
    """The example MLP tuned for 16 trials into a fresh store: (model, store, summary)."""
    model = example_path("mlp")
    store = tmp_path_factory.mktemp("store")
    summary = tuning.tune(model, "host", trials=TRIALS, store=store, shapes=SHAPES, progress=None)
    return model, store, summary


def test_tuning_writes_target_stamped_records(tuned):
    model, store, summary = tuned
    assert summary["status"] == "done" and summary["trials"] == TRIALS
    records = tuning_log.Store(store).records()
    assert len(records) == summary["records_added"] == TRIALS
    host = load_target("host")
    assert {r.fingerprint for r in records} == {host.fingerprint()}
    assert {r.device for r in records} == {tuning_log.host_device()}
    assert all(r.target_name == "host" and r.tvm_version == tuning_log.installed_tvm_version() for r in records)
    ok = [r for r in records if r.ok]
    assert ok and all(0 < r.mean_secs < 1 for r in ok)
    assert summary["tuned_tasks"] >= 1 and summary["estimated_model_ms"] > 0


def test_compile_applies_the_records_and_stays_correct(tuned, tmp_path):
    model, store, summary = tuned
    art = edgecc.compile(model, "host", tmp_path / "a", shapes=SHAPES, tuning_store=store)
    build = art.manifest["build"]
    assert build["tuned_kernels"] == summary["tuned_tasks"] >= 1
    assert build["tuned_kernels"] + build["default_schedule_kernels"] == build["kernels"]
    assert art.manifest["verification"]["ok"]
    assert art.manifest["inputs"][0]["shape"][0] == 1  # --shape fixed the batch
    untuned = edgecc.compile(model, "host", tmp_path / "b", shapes=SHAPES, tuning_store=False)
    assert untuned.manifest["build"]["tuned_kernels"] == 0


def test_records_never_apply_to_another_target(tuned, tmp_path):
    model, store, _ = tuned
    art = edgecc.compile(model, "rpi4", tmp_path / "pi", shapes=SHAPES, tuning_store=store, verify=False)
    assert art.manifest["build"]["tuned_kernels"] == 0


def test_a_second_run_resumes_and_spends_no_trials(tuned):
    model, store, summary = tuned
    again = tuning.tune(model, "host", trials=TRIALS, store=store, shapes=SHAPES, progress=None)
    assert again["trials"] == TRIALS and again["records_added"] == 0 and again["status"] == "done"


def test_exported_log_reproduces_the_build_with_an_empty_store(tuned, tmp_path):
    model, store, summary = tuned
    log = tmp_path / "shared.jsonl.gz"
    assert tuning_log.Store(store).export(log) == TRIALS
    art = edgecc.compile(model, "host", tmp_path / "a", shapes=SHAPES, tuning_store=tmp_path / "empty",
                         tuning_logs=(log,))
    assert art.manifest["build"]["tuned_kernels"] == summary["tuned_tasks"]
    feeds = random_inputs(__import__("onnx").load(str(model)), dim_values=SHAPES)
    np.testing.assert_allclose(art.run(feeds)["y"], run_ort(__import__("onnx").load(str(model)), feeds)["y"],
                               rtol=1e-4, atol=1e-5)


def test_a_worker_crash_is_an_error_naming_the_task(tuned, monkeypatch, tmp_path):
    model, _, _ = tuned
    monkeypatch.setattr(tuning, "WORKER", "tests.crashing_tune_worker")
    with pytest.raises(EdgeccError, match=r"crashed \(SIGSEGV\) in task 'fused_matmul_add'"):
        tuning.tune(model, "host", trials=TRIALS, store=tmp_path / "s", shapes=SHAPES, progress=None)


@pytest.mark.tuning
def test_ctrl_c_keeps_records_a_second_tuner_is_refused_and_the_next_run_resumes(example_path, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, EDGECC_TUNING_DIR=str(store), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "edgecc.cli", "tune", str(example_path("mlp")), "--shape", "batch=1",
           "--trials", "2000"]
    # A child inherits an ignored SIGINT (something earlier in a long test run can leave this
    # process ignoring it; then the tuner would never see the Ctrl-C), not a handled one.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        records = list(store.glob("work/*/database_tuning_record.json"))
        if records and records[0].stat().st_size > 0:
            break
        time.sleep(1)
    assert proc.poll() is None, proc.communicate()
    # A second tuner of the same model and target would corrupt the first one's database.
    second = run_cli(*cmd[3:], env=env)
    assert second.returncode == 2 and "another 'edgecc tune' is tuning this model" in second.stderr
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in out
    kept = len(tuning_log.Store(store).records())
    assert kept >= 1
    # Resuming with the trials already measured as the total spends nothing more.
    again = run_cli("tune", example_path("mlp"), "--shape", "batch=1", "--trials", str(kept), env=env)
    assert again.returncode == 0, again.stderr
    assert f"{kept} trials already measured" in again.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_board(port: int, key: str, timeout: float = 120) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {}).get("free"):
                return
        except Exception:  # noqa: BLE001 (the tracker is still starting)
            pass
        time.sleep(1)
    raise AssertionError(f"no RPC server registered under '{key}' within {timeout} s")


@pytest.mark.tuning
def test_tuning_over_a_loopback_rpc_tracker(example_path, tmp_path):
    """A tracker and one board (an RPC server) on 127.0.0.1: records carry the board's key."""
    port, server_port = _free_port(), _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(port), "--port-end", str(port + 1)])]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker",
                                       f"127.0.0.1:{port}", "--key", "loopback", "--host", "127.0.0.1",
                                       "--port", str(server_port), "--port-end", str(server_port + 1)]))
        _wait_for_board(port, "loopback")
        summary = tuning.tune(example_path("mlp"), "host", trials=TRIALS, store=tmp_path, shapes=SHAPES,
                              rpc_tracker=f"127.0.0.1:{port}", rpc_key="loopback", progress=None)
        records = tuning_log.Store(tmp_path).records()
        assert summary["status"] == "done" and len(records) == TRIALS
        assert {r.device for r in records} == {"rpc:loopback"} and any(r.ok for r in records)
        with pytest.raises(UserError, match="no board is registered under it"):
            tuning.tune(example_path("mlp"), "host", trials=TRIALS, store=tmp_path, shapes=SHAPES,
                        rpc_tracker=f"127.0.0.1:{port}", rpc_key="rpi9", progress=None)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)


@pytest.mark.parametrize("args, fragment", [
    (["--shape", "batch=1", "--rpc-key", "x"], "--rpc-tracker and --rpc-key go together"),
    (["--shape", "batch=1", "--rpc-tracker", "nohost", "--rpc-key", "x"], "expected HOST:PORT"),
    (["--shape", "batch=1", "--target", "rpi4"], "cannot be measured on this host"),
    (["--shape", "batch=1", "--trials", "0"], "must be at least 1"),
    ([], "tuning needs static shapes"),
    (["--shape", "seq=4"], "has no symbolic dim of that name"),
])
def test_bad_input_is_one_line(example_path, tmp_path, args, fragment):
    r = run_cli("tune", example_path("mlp"), *args, env=dict(os.environ, EDGECC_TUNING_DIR=str(tmp_path)))
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr, r.stderr

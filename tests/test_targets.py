"""Target descriptions: the built-in files, user files, and errors naming file and key."""

from __future__ import annotations

import platform

import pytest

from edgecc.core.target import builtin_target_files, list_targets, load_target
from edgecc.errors import UserError
from tests.conftest import run_cli

GOOD_BOARD = """
name = "myboard"
description = "A custom Cortex-A55 board"
default_pipeline = "simplify"

[tvm]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mcpu = "cortex-a55"
mattr = ["+neon", "+dotprod"]
num-cores = 4

[toolchain]
cc = "aarch64-linux-gnu-gcc"
"""


def test_builtin_targets():
    names = {t.name for t in list_targets()}
    assert {"host", "rpi4", "rpi5", "jetson-orin-nano"} <= names


def test_every_builtin_target_is_a_valid_tvm_target():
    """`edgecc targets` lists built-ins without importing TVM; this is where they are checked."""
    for name in builtin_target_files():
        load_target(name)  # raises a UserError naming the file for a target TVM rejects


def test_builtin_targets_resolve_to_tvm_targets():
    rpi4 = load_target("rpi4").tvm_target().export()
    assert rpi4["mcpu"] == "cortex-a72" and rpi4["num-cores"] == 4 and "+neon" in rpi4["mattr"]
    rpi5 = load_target("rpi5").tvm_target().export()
    assert rpi5["mcpu"] == "cortex-a76" and "+dotprod" in rpi5["mattr"]
    jetson = load_target("jetson-orin-nano").tvm_target().export()
    assert jetson["kind"] == "cuda" and jetson["arch"] == "sm_87"
    assert jetson["host"]["mtriple"] == "aarch64-linux-gnu"


def test_host_is_resolved_not_generic():
    # "mcpu=native" silently becomes "generic" in TVM 0.27; edgecc must resolve the real CPU.
    host = load_target("host")
    spec = host.tvm_target().export()
    assert spec["mcpu"] not in ("native", "generic")
    assert spec["num-cores"] >= 1
    assert host.runs_here() and host.host_arch() == platform.machine()


def test_builtin_targets_run_here_only_on_their_own_cpu():
    on_aarch64 = platform.machine() == "aarch64"
    assert load_target("rpi4").runs_here() == on_aarch64  # a Cortex-A72 library is native on aarch64
    assert load_target("rpi5").runs_here() == on_aarch64
    assert not load_target("jetson-orin-nano").runs_here()  # CUDA device code, on any host
    assert not load_target("coral-edgetpu").runs_here()


@pytest.mark.parametrize("same_arch", [True, False])
def test_a_cpu_target_runs_here_exactly_when_its_arch_is_this_hosts(tmp_path, same_arch):
    """On every host: a board of this host's architecture runs here, a board of the other does not."""
    boards = {"aarch64": ("aarch64-linux-gnu", "cortex-a55"), "x86_64": ("x86_64-linux-gnu", "skylake")}
    if same_arch and platform.machine() not in boards:
        pytest.skip(f"no board description for a {platform.machine()} host")
    arch = platform.machine() if same_arch else next(a for a in boards if a != platform.machine())
    triple, mcpu = boards[arch]
    f = tmp_path / "board.toml"
    f.write_text(f"""
name = "board"
description = "A {arch} board"
default_pipeline = "simplify"

[tvm]
kind = "llvm"
mtriple = "{triple}"
mcpu = "{mcpu}"

[toolchain]
cc = "gcc"
""")
    board = load_target(str(f))
    assert board.host_arch() == arch
    assert board.runs_here() == same_arch


def test_fingerprints_differ_per_target_and_are_stable():
    prints = {t.name: t.fingerprint() for t in list_targets()}
    assert len(set(prints.values())) == len(prints)
    assert load_target("rpi4").fingerprint() == prints["rpi4"]


def test_user_target_file(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text(GOOD_BOARD)
    t = load_target(str(f))
    assert t.name == "myboard" and t.host_arch() == "aarch64"
    res = run_cli("targets", f)
    assert res.returncode == 0 and "myboard" in res.stdout and "rpi5" in res.stdout


@pytest.mark.parametrize("mutate,fragment", [
    (lambda s: s.replace('name = "myboard"\n', ""), "missing key 'name'"),
    (lambda s: s.replace('kind = "llvm"', 'kind = "opencl"'), "key 'tvm.kind' must be 'llvm' or 'cuda'"),
    (lambda s: s.replace('kind = "llvm"', "kind = 3"), "key 'tvm.kind' must be a str"),
    (lambda s: s.replace('cc = "aarch64-linux-gnu-gcc"', ""), "missing key 'toolchain.cc'"),
    (lambda s: s.replace('default_pipeline = "simplify"', 'default_pipeline = "simplfy"'),
     "key 'default_pipeline': unknown pass 'simplfy'"),
    (lambda s: "bogus = 1\n" + s, "unknown key 'bogus'"),
    (lambda s: s + "\nlinker = 'ld'\n", "unknown key 'toolchain.linker'"),
    (lambda s: s + "\n[hardware]\ncores = 'four'\n", "key 'hardware.cores' has the wrong type"),
    (lambda s: s.replace('[tvm]', '[tvm'), "not valid TOML"),
    (lambda s: s.replace('mcpu = "cortex-a55"', 'mcpu = "cortex-a55"\nnot-an-attr = 1'),
     "key 'tvm' is not a valid TVM target"),
])
def test_malformed_target_names_file_and_key(tmp_path, mutate, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(mutate(GOOD_BOARD))
    with pytest.raises(UserError) as e:
        load_target(str(f))
    assert str(e.value).startswith(str(f)) and fragment in str(e.value)


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown target 'rpi-4'; did you mean 'rpi4'"):
        load_target("rpi-4")
    with pytest.raises(UserError, match=r"\(known: coral-edgetpu, host, jetson-orin-nano, rpi4, rpi5\)"):
        load_target("zzz")

"""Run aarch64 artifacts on another host under qemu-user, to check their numerics.

The cache holds an arm64 Debian root filesystem (for its Python and shared libraries) and
aarch64 wheels of the TVM runtime and numpy; the host's qemu-aarch64-static runs them with
no chroot and no binfmt. Emulated timings say nothing about a real device, so nothing here
reports any.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgecc.errors import EdgeccError, UserError
from edgecc.runtime.artifact import Artifact

TVM_VERSION = "0.27.0.post1"
WHEELS = (f"apache-tvm=={TVM_VERSION}", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes",
          "typing_extensions")
SUITE = "bookworm"  # its python3 is 3.11, the ABI the wheels are fetched for
PYTHON = "python3.11"
MIRROR = os.environ.get("EDGECC_EMU_MIRROR", "http://deb.debian.org/debian")
QEMU = "qemu-aarch64-static"
HOST_TOOLS = {QEMU: "qemu-user-static", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
STAMP = "stamp.json"
STAMP_FORMAT = 1
_STAMP_KEYS = {"format", "tvm", "tvm_ffi", "numpy", "python", "qemu", "qemu_cpus", "created", "bytes"}
# Nothing under emulation reads these (about 350 MB): docs, translations, apt's package lists,
# CUDA headers, and the compiler library that runtime-only TVM does not load.
_UNUSED = ("rootfs/debootstrap", "rootfs/usr/share/doc", "rootfs/usr/share/man", "rootfs/usr/share/info",
           "rootfs/usr/share/locale", "rootfs/var/lib/apt/lists", "site/tvm/3rdparty",
           "site/tvm/lib/libtvm_compiler.so")


def default_dir() -> Path:
    return Path(os.environ.get("EDGECC_EMU_DIR") or Path.home() / ".cache" / "edgecc" / "emu")


def _paths(root: Path) -> dict[str, Path]:
    return {"rootfs": root / "rootfs", "python": root / "rootfs" / "usr" / "bin" / PYTHON,
            "site": root / "site", "tvm": root / "site" / "tvm" / "__init__.py"}


def status(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"ok", "path", "reason"} plus the stamp's contents when ok; never raises."""
    root = Path(cache_dir) if cache_dir is not None else default_dir()
    result: dict[str, Any] = {"ok": False, "path": str(root), "reason": ""}
    if not root.is_dir():
        return dict(result, reason=f"{root} does not exist")
    try:
        stamp = json.loads((root / STAMP).read_text())
    except FileNotFoundError:
        return dict(result, reason=f"{root / STAMP} is missing (setup did not finish)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return dict(result, reason=f"{root / STAMP} is corrupt: {e}")
    if not isinstance(stamp, dict) or not _STAMP_KEYS <= set(stamp):
        return dict(result, reason=f"{root / STAMP} is corrupt: expected keys {sorted(_STAMP_KEYS)}")
    if stamp["format"] != STAMP_FORMAT or stamp["tvm"] != TVM_VERSION:
        return dict(result, reason=f"{root} holds TVM {stamp['tvm']} (cache format {stamp['format']}); "
                                   f"this edgecc needs TVM {TVM_VERSION} (format {STAMP_FORMAT})")
    missing = [str(p) for k, p in _paths(root).items() if k != "rootfs" and not p.exists()]
    if missing:
        return dict(result, reason=f"{root} is incomplete: {', '.join(missing)} missing")
    if not shutil.which(QEMU):
        return dict(result, reason=f"{QEMU} not found (apt-get install qemu-user-static)")
    return dict(stamp, ok=True, path=str(root), reason="")


def find(cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The status of a usable emulator, or a UserError saying why there is none."""
    st = status(cache_dir)
    if not st["ok"]:
        raise UserError(f"aarch64 emulator not usable: {st['reason']}; run `edgecc emulator setup`")
    return st


def clean(cache_dir: str | os.PathLike | None = None) -> None:
    """Remove the emulator cache: only a directory that setup made (it holds the stamp)."""
    root = Path(cache_dir) if cache_dir is not None else default_dir()
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink() or not root.is_dir() or not (root / STAMP).is_file():
        raise UserError(f"{root}: not an edgecc emulator cache (no {STAMP}); not removed")
    shutil.rmtree(root)


def setup(cache_dir: str | os.PathLike | None = None,
          progress: Callable[[str], None] = lambda _msg: None) -> Path:
    """Build the emulator cache unless a valid one exists; returns its path. Idempotent."""
    root = Path(cache_dir) if cache_dir is not None else default_dir()
    start = time.perf_counter()

    def step(msg: str) -> None:
        progress(f"[{time.perf_counter() - start:6.1f} s] {msg}")

    _install_host_tools(step)
    if status(root)["ok"]:
        step(f"emulator already set up in {root}")
        return root
    if os.geteuid() != 0:
        raise UserError("`edgecc emulator setup` must run as root, as debootstrap does "
                        "(EDGECC_EMU_DIR picks a cache directory other users can share)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        # Concurrent setups (pytest -n, two shells) wait here; then the first one's cache is valid.
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = status(root)
        if st["ok"]:
            step(f"emulator set up in {root} meanwhile")
            return root
        if root.exists():
            step(f"rebuilding: {st['reason']}")
        for stale in root.parent.glob(f".{root.name}.setup.*"):
            shutil.rmtree(stale)  # left by a setup that was killed; none runs now, we hold the lock
        # Built beside the cache and renamed at the end: an interrupted setup leaves no half-made cache.
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.setup.", dir=root.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a root-built cache from other users
            stamp = _build(tmp, step)
            stamp["setup_seconds"] = round(time.perf_counter() - start, 1)
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            if root.exists():
                shutil.rmtree(root)
            os.rename(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    step(f"emulator ready in {root} ({sum(stamp['bytes'].values()) / 1e6:.0f} MB)")
    return root


def _build(tmp: Path, step: Callable[[str], None]) -> dict[str, Any]:
    """Root filesystem and wheels into `tmp`; returns the stamp."""
    p = _paths(tmp)
    step(f"debootstrap arm64 {SUITE} (minbase + python3) from {MIRROR}")
    _check(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3",
            SUITE, str(p["rootfs"]), MIRROR], "debootstrap")
    # --foreign only downloads most packages; their second stage would need the target CPU.
    debs = sorted((p["rootfs"] / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    step(f"extracting {len(debs)} packages")
    for deb in debs:
        _check(["dpkg-deb", "-x", str(deb), str(p["rootfs"])], f"dpkg-deb -x {deb.name}")
        deb.unlink()

    step("downloading aarch64 wheels: " + " ".join(WHEELS))
    _check([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-compile", "--target", str(p["site"]), "--platform", "manylinux_2_28_aarch64",
            "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
            "--abi", "cp311", *WHEELS], "pip install (aarch64 wheels)")
    for rel in _UNUSED:
        path = tmp / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    step("smoke test: import tvm, numpy under qemu")
    return {
        "format": STAMP_FORMAT, **_smoke_test(tmp),
        "qemu": _output([QEMU, "--version"]).splitlines()[0],
        "qemu_cpus": _qemu_cpus(),
        "suite": SUITE, "mirror": MIRROR,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bytes": {"rootfs": _du(p["rootfs"]), "site": _du(p["site"])},
    }


def run_artifact(artifact_dir: str | os.PathLike, feeds: dict[str, np.ndarray],
                 threads: int | None = None, timeout: float = 600, *,
                 cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Run an aarch64 CPU artifact under qemu and return its outputs by name."""
    art = Artifact.load(artifact_dir)
    target = art.manifest["target"]
    if target["device_kind"] == "cuda":
        raise UserError(f"{art.path}: cannot be emulated: CUDA artifacts need a GPU")
    if target["device_kind"] != "llvm" or target["host_arch"] != "aarch64":
        raise UserError(f"{art.path}: built for {target['name']} ({target['device_kind']}, "
                        f"{target['host_arch']}); only aarch64 CPU artifacts can be emulated")
    arrays = art.check_inputs(feeds)
    st = find(cache_dir)
    p = _paths(Path(st["path"]))
    mcpu = target.get("tvm", {}).get("mcpu")
    # qemu models the named core's ISA; "max" has every feature qemu knows, a superset of any target's.
    cpu = mcpu if mcpu in st["qemu_cpus"] else "max"
    n = threads or target["num_cores"]
    with tempfile.TemporaryDirectory(prefix="edgecc-emu-") as d:
        inp, out = Path(d) / "in.npz", Path(d) / "out.npz"
        np.savez(inp, **{spec["name"]: a for spec, a in zip(art.inputs, arrays)})
        cmd = [QEMU, "-cpu", cpu, "-L", str(p["rootfs"]), str(p["python"]),
               str(Path(__file__).with_name("emu_runner.py")), str(art.path.resolve()), str(inp), str(out),
               str(n)]
        try:
            proc = subprocess.run(cmd, env=_env(p["site"]), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgeccError(f"{art.path}: emulated run timed out after {timeout:g} s") from None
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise EdgeccError(f"{art.path}: emulated run failed: "
                              f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
        with np.load(out) as z:
            return {spec["name"]: z[spec["name"]] for spec in art.outputs}


def _install_host_tools(step: Callable[[str], None]) -> None:
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise UserError(f"the aarch64 emulator needs these Debian/Ubuntu packages: {' '.join(missing)} "
                        f"(as root: apt-get install {' '.join(missing)})")
    step(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _check(["apt-get", "update", "-qq"], "apt-get update", env)
    _check(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], "apt-get install", env)


def _env(site: Path) -> dict[str, str]:
    # The host's PYTHON* variables (a venv's PYTHONPATH, PYTHONHOME) would break the emulated Python.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # Runtime-only TVM imports about twice as fast under qemu and needs no libtvm_compiler.so.
    return dict(env, PYTHONPATH=str(site), TVM_USE_RUNTIME_LIB="1")


def _smoke_test(root: Path) -> dict[str, str]:
    """Versions as the emulated Python sees them; also writes the .pyc files of those imports."""
    p = _paths(root)
    code = ("import json, sys, numpy, tvm, tvm_ffi; from tvm.runtime.vm import VirtualMachine; "
            "print(json.dumps({'tvm': tvm.__version__, 'tvm_ffi': tvm_ffi.__version__, "
            "'numpy': numpy.__version__, 'python': sys.version.split()[0]}))")
    out = _output([QEMU, "-L", str(p["rootfs"]), str(p["python"]), "-c", code], _env(p["site"]))
    return json.loads(out.strip().splitlines()[-1])


def _qemu_cpus() -> list[str]:
    """CPU models this qemu can emulate (`-cpu help` lists one per line, after a header)."""
    # qemu 7.2 exits with status 1 after printing the list, so the status says nothing.
    lines = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True).stdout.splitlines()
    return [line.split()[0] for line in lines[1:] if line.strip()]


def _du(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(path) for f in files)


def _output(cmd: list[str], env: dict[str, str] | None = None) -> str:
    return _check(cmd, cmd[0], env).stdout


def _check(cmd: list[str], what: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # Nearly always the machine's set-up (no route to the registries, no disk): the user's to fix.
        raise UserError(f"emulator setup: {what} failed (exit code {proc.returncode}): "
                        f"{lines[-1] if lines else ''} (check access to {MIRROR} and PyPI)")
    return proc

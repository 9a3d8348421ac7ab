"""Targets and toolchain checks shared by the kernel tests: every kernel builds for host, rpi4
(cross-compiled, run under qemu) and jetson-orin-nano (CUDA, compiled with nvcc, not run)."""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import tvm

CROSS_CC = "aarch64-linux-gnu-gcc"
EM_AARCH64 = 183
HOST = tvm.target.Target({"kind": "llvm", "num-cores": 2})
RPI4 = tvm.target.Target(
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
     "num-cores": 4}
)
JETSON = tvm.target.Target(
    {"kind": "cuda", "arch": "sm_87"},
    host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"},
)
needs_cross_cc = pytest.mark.skipif(
    shutil.which(CROSS_CC) is None, reason=f"needs {CROSS_CC} (apt-get install gcc-aarch64-linux-gnu)"
)
needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which(CROSS_CC) is None,
    reason=f"needs nvcc (CUDA toolkit) and {CROSS_CC} (apt-get install gcc-aarch64-linux-gnu)",
)


def e_machine(path) -> int:
    """The ELF e_machine field of a shared library (183: aarch64)."""
    with open(path, "rb") as f:
        return struct.unpack_from("<H", f.read(20), 18)[0]


def cuda_source(ex) -> str:
    """The CUDA C source TVM stored in an executable."""
    stack = [ex.mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source("")
        stack.extend(m.imports)
    raise AssertionError("no CUDA module in the executable")


def require_emulator():
    """Set up the cached aarch64 environment, or skip the test with the reason (in CI, where the
    emulation tier must run rather than vanish, fail)."""
    import os

    from edgecc.errors import UserError
    from edgecc.runtime import emulator

    try:
        emulator.setup()
    except UserError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"aarch64 emulator unavailable: {e}")


def emulated_python():
    """A function that runs a Python script, its argv[1] a directory, in the cached aarch64
    environment under qemu (cortex-a72, a Raspberry Pi 4's core); skips the test when the
    emulator is not set up (`edgecc emulator setup`)."""
    from edgecc.runtime import emulator

    st = emulator.status()
    if not st["ok"]:
        pytest.skip(f"aarch64 emulator not set up: {st['reason']}")
    p = emulator._paths(Path(st["path"]))

    def run(script: str, directory) -> None:
        subprocess.run([emulator.QEMU, "-cpu", "cortex-a72", "-L", str(p["rootfs"]), str(p["python"]),
                        "-c", script, str(directory)], env=emulator._env(p["site"]), check=True, timeout=300)

    return run

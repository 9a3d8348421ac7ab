"""Ahead-of-time CUDA builds: the exported library embeds a cubin built here with nvcc.

TVM 0.27's CUDA codegen (`target.build.cuda`) always emits CUDA C source with fmt "cuda".
On a machine without the CUDA runtime it stores that source in a fallback module; the device
later JIT-compiles it at load through `tvm_callback_cuda_compile` (NVRTC or nvcc), which a
Jetson in the field should not have to do. No build-time hook takes a compiled image, so
`build_cuda` compiles the source with nvcc itself and rewrites the serialized CUDA module to
fmt "cubin" (format: [fmt][fmap][code]) while packing the imports into the library. At load
the runtime's `ffi.Module.load_from_bytes.cuda` sees "cubin" and calls cuModuleLoadData
directly, with no compiler on the device.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import dlight as dl
from tvm.support import cc
from tvm.support import nvcc as tvm_nvcc

from edgecc.backends.tvm_common import (LIBRARY_NAME, TVMBackend, apply_records, prepare, require_tool,
                                        tuning_facts)
from edgecc.errors import UserError
from edgecc.kernels import bsr, int8

EM_CUDA = 190
_KERNEL_RE = re.compile(rb'extern "C" __global__')
# CUDA ELF ABI v2 (EI_ABIVERSION 8; CUDA 13's nvcc writes it for sm_75 through sm_120) keeps
# the SM number in e_flags bits 8-15; ABI v1 (7, older nvcc) keeps it in bits 0-7.
_ELFABIVERSION_CUDA_V2 = 8


class TVMCudaBackend(TVMBackend):
    def build_lowered(self, lowered: list, stage_dir: Path) -> dict:
        tgt = self.target.tvm_target()
        facts = build_cuda(lowered.pop(), tgt, str(stage_dir / LIBRARY_NAME), require_tool(self.target, "cc"), self.records)
        return {"library": LIBRARY_NAME, **facts, "tvm_target": str(tgt)}


def build_cuda(
    mod: tvm.IRModule, target: tvm.target.Target, lib_path: str, cross_cc: str | None, records=()
) -> dict:
    """Compile a Relax module for a CUDA target and export it with an embedded cubin.

    Returns manifest facts: device code format, arch, kernel count, cubin size, nvcc version.
    """
    if target.kind.name != "cuda":
        raise UserError(f"build_cuda needs a cuda target, got {target.kind.name}")
    nvcc_version = _check_nvcc(target)
    if cross_cc is not None and shutil.which(cross_cc) is None:
        raise UserError(
            f"cross compiler {cross_cc!r} not found on PATH "
            "(for an aarch64 host: apt-get install gcc-aarch64-linux-gnu)"
        )
    arch = str(target.arch)
    mod = prepare(mod, target)  # where `edgecc tune` extracts its tasks, so its records apply
    # Tuned kernels first; then edgecc's kernels that need other rules than the module's;
    # dlight skips both.
    mod, tuned = apply_records(mod, target, records)
    with target:
        mod = bsr.schedule(int8.schedule(mod, target), target)
        mod = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )(mod)
    # Forcing the fallback module keeps the CUDA code as source even where a CUDA runtime is
    # linked (which would otherwise JIT it for the local GPU): the blob rewrite needs source.
    with _env("TVM_COMPILE_FORCE_FALLBACK", "1"):
        ex = tvm.compile(mod, target=target)

    cuda_mods = _modules_of_kind(ex.mod, "cuda")
    sources = list(dict.fromkeys(m.inspect_source("cuda") for m in cuda_mods))
    if not sources:
        raise UserError("the model compiled to no CUDA kernels; nothing runs on the GPU")
    # Same nvcc flags TVM's own JIT path uses, so the kernels match what the device would build.
    with target:
        cubins = [bytes(tvm_nvcc.compile_cuda(s, "cubin", compiler="nvcc")) for s in sources]

    blob = _replace_cuda_payloads(_pack_imports(ex.mod), dict(zip(sources, cubins)))
    fcompile = cc.cross_compiler(cross_cc) if cross_cc else None
    ex.mod.export_library(lib_path, fcompile=fcompile, fpack_imports=_blob_packer(ex.mod, blob))

    return {
        "device_code": "cubin",
        "arch": arch,
        "kernels": sum(len(_KERNEL_RE.findall(s.encode())) for s in sources),
        "cubin_bytes": sum(len(c) for c in cubins),
        "nvcc": nvcc_version,
        **{k: v for k, v in tuning_facts(mod, tuned, records).items() if k != "kernels"},
    }


def embedded_device_code(lib_path: str) -> list[dict]:
    """List the device code inside an exported library without loading it.

    Each embedded CUDA ELF image (e_machine EM_CUDA) gives
    {"kind": "cubin", "offset", "bytes", "arch"}; CUDA C source left for the device to JIT
    gives {"kind": "cuda_source", "kernels"}.
    """
    with open(lib_path, "rb") as f:
        data = f.read()
    found: list[dict] = []
    pos = data.find(b"\x7fELF", 1)  # offset 0 is the host library itself
    while pos != -1:
        image = _cuda_elf(data, pos)
        if image:
            found.append(image)
            pos = data.find(b"\x7fELF", pos + image["bytes"])
        else:
            pos = data.find(b"\x7fELF", pos + 1)
    kernels = len(_KERNEL_RE.findall(data))
    if kernels:
        found.append({"kind": "cuda_source", "kernels": kernels})
    return found


def _check_nvcc(target: tvm.target.Target) -> str:
    """Return nvcc's version line; raise UserError if it is missing or cannot build the arch."""
    if shutil.which("nvcc") is None:
        raise UserError(
            "nvcc not found: install the CUDA toolkit and put its bin directory "
            "(e.g. /usr/local/cuda/bin) on PATH"
        )
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True)
    line = next(
        (ln for ln in version.stdout.splitlines() if ln.startswith("Cuda compilation tools")),
        version.stdout.strip().splitlines()[-1],
    )
    codes = subprocess.run(
        ["nvcc", "--list-gpu-code"], capture_output=True, text=True, check=True
    ).stdout.split()
    arch = str(target.arch)
    if arch not in codes:
        raise UserError(
            f"nvcc ({line}) cannot build {arch}; set the target's arch to one of: "
            + " ".join(codes)
        )
    return line


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _modules_of_kind(root, kind: str) -> list:
    found, stack = [], [root]
    while stack:
        m = stack.pop()
        if m.kind == kind:
            found.append(m)
        stack.extend(m.imports)
    return found


def _pack_imports(root) -> bytes:
    tensor = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(root)
    return bytes(tensor.numpy().tobytes())


def _read_u64(buf: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", buf, pos)[0], pos + 8


def _replace_cuda_payloads(blob: bytes, cubin_for_source: dict[str, bytes]) -> bytes:
    """Rewrite every serialized "cuda" module from fmt "cuda" (source) to fmt "cubin".

    Blob: [u64 size][u64-vector import row ptr][u64-vector child indices] then per module a
    key string and, unless the key is "_lib", a length-prefixed payload.
    """
    size, pos = _read_u64(blob, 0)
    if size != len(blob) - 8:
        raise RuntimeError("unexpected TVM import blob layout")
    for _ in range(2):  # import tree in CSR form
        n, pos = _read_u64(blob, pos)
        pos += 8 * n
    out = bytearray(blob[8:pos])
    replaced = 0
    while pos < len(blob):
        n, pos = _read_u64(blob, pos)
        key = blob[pos : pos + n]
        pos += n
        out += struct.pack("<Q", n) + key
        if key == b"_lib":
            continue
        n, pos = _read_u64(blob, pos)
        payload = blob[pos : pos + n]
        pos += n
        if key == b"cuda":
            payload = _cubin_payload(payload, cubin_for_source)
            replaced += 1
        out += struct.pack("<Q", len(payload)) + payload
    if not replaced:
        raise RuntimeError("no CUDA module in the import blob")
    return struct.pack("<Q", len(out)) + bytes(out)


def _cubin_payload(payload: bytes, cubin_for_source: dict[str, bytes]) -> bytes:
    # Payload: [str fmt][fmap][bytes code]. The code is the module's source, so it is found
    # from the end; fmap (whose layout varies by version) is copied untouched.
    n, pos = _read_u64(payload, 0)
    if payload[pos : pos + n] != b"cuda":
        raise RuntimeError(f"CUDA module already holds {payload[pos:pos + n]!r}, not source")
    for src, cubin in cubin_for_source.items():
        code = src.encode()
        tail = struct.pack("<Q", len(code)) + code
        if payload.endswith(tail):
            fmap = payload[pos + n : len(payload) - len(tail)]
            return (
                struct.pack("<Q", 5) + b"cubin" + fmap + struct.pack("<Q", len(cubin)) + cubin
            )
    raise RuntimeError("serialized CUDA module does not match any compiled source")


def _blob_packer(root, blob: bytes):
    """An export_library `fpack_imports` that embeds `blob` the way TVM packs its own."""
    # The host module's target picks the object format, as in export_library's own packing.
    llvm_target = _modules_of_kind(root, "llvm")[0].get_function("_get_target_string")()

    def pack(_mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        obj = tvm_ffi.get_global_func("codegen.codegen_blob")(
            blob, is_system_lib, llvm_target, prefix
        )
        path = os.path.join(workspace_dir, f"{prefix}devc.o")
        obj.write_to_file(path)
        return path

    return pack


def _cuda_elf(data: bytes, pos: int) -> dict | None:
    """Describe the ELF64 image at `pos` if it is a CUDA one, else None."""
    if len(data) < pos + 64 or data[pos + 4] != 2 or data[pos + 5] != 1:
        return None
    e_machine = struct.unpack_from("<H", data, pos + 18)[0]
    if e_machine != EM_CUDA:
        return None
    e_phoff, e_shoff, e_flags = struct.unpack_from("<QQI", data, pos + 32)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, pos + 54)
    size = max(e_shoff + e_shentsize * e_shnum, e_phoff + e_phentsize * e_phnum)
    abi = data[pos + 8]
    sm = (e_flags >> 8) & 0xFF if abi >= _ELFABIVERSION_CUDA_V2 else e_flags & 0xFF
    return {"kind": "cubin", "offset": pos, "bytes": size, "arch": f"sm_{sm}"}

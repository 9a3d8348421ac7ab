"""Hardware target descriptions: TOML files in `edgecc.targets`, or a user's own file.

Code asks a target what it has (backend, TVM target, toolchain, hardware facts, default pipeline);
it never branches on a target's name.

Two backends: `tvm` (the default; a `[tvm]` table, lowered to Relax and built by TVM) and `tflite`
(an `[edgetpu]` table: the optimized graph becomes a fully int8 TFLite flatbuffer, and the table's
supported ops and limits predict what edgetpu_compiler maps). A key that belongs to the other
backend is an error, so a file never half-describes both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from edgecc.core.edgetpu_spec import check_edgetpu_table
from edgecc.core.pass_base import unknown_message
from edgecc.core.pipeline import parse_pipeline
from edgecc.errors import UserError

_TOP_KEYS = {"name", "description", "default_pipeline", "backend", "tvm", "toolchain", "hardware", "edgetpu"}
BACKENDS = ("tvm", "tflite")
_TOOLCHAIN_KEYS = {"cc": str, "package": str, "nvcc": str, "edgetpu_compiler": str}
_HARDWARE_KEYS = {"cpu": str, "cores": int, "memory_gb": (int, float), "dram_bandwidth_gbps": (int, float),
                  "isa": list, "peak_gflops_fp32": (int, float)}
_ARCH_OF_TRIPLE = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64"}


@dataclasses.dataclass(frozen=True)
class TargetDesc:
    name: str
    description: str
    default_pipeline: str
    tvm: dict[str, Any]
    toolchain: dict[str, Any]
    hardware: dict[str, Any]
    source: str  # the file it was read from
    backend: str = "tvm"
    edgetpu: dict[str, Any] = dataclasses.field(default_factory=dict)  # backend "tflite" only

    @property
    def lowers_to_tvm(self) -> bool:
        return self.backend == "tvm"

    @property
    def is_host(self) -> bool:
        """Resolved from this machine at compile time ("mcpu = native")."""
        return self.tvm.get("kind") == "llvm" and self.tvm.get("mcpu") == "native"

    @property
    def device_kind(self) -> str:
        return self.tvm["kind"] if self.lowers_to_tvm else "edgetpu"

    @property
    def is_gpu(self) -> bool:
        """Whether the target's kernels run on a GPU: what its passes and cost models ask (a
        TVM target object answers the same with edgecc.kernels.common.is_gpu)."""
        return self.device_kind == "cuda"

    def host_arch(self) -> str:
        """The CPU architecture the compiled library's host code runs on."""
        cpu = self.tvm.get("host", self.tvm) if self.device_kind != "llvm" else self.tvm
        triple = cpu.get("mtriple")
        if self.is_host or not triple:
            return platform.machine()
        return _ARCH_OF_TRIPLE.get(triple.split("-")[0], triple.split("-")[0])

    def runs_here(self) -> bool:
        return self.device_kind == "llvm" and self.host_arch() == platform.machine()

    def tvm_target(self):
        """The TVM Target object (TVM 0.27 takes dicts, not strings)."""
        if not self.lowers_to_tvm:
            raise UserError(f"target '{self.name}' has backend '{self.backend}': it has no TVM target")
        import tvm

        if self.is_host:
            resolved = tvm.target.Target.from_device(tvm.cpu()).export()
            spec = {k: v for k, v in resolved.items() if k in ("kind", "mtriple", "mcpu", "mattr")}
            spec["num-cores"] = _physical_cores()
            return tvm.target.Target(spec)
        spec = {k: v for k, v in self.tvm.items() if k != "host"}
        if "host" in self.tvm:
            return tvm.target.Target(spec, host=dict(self.tvm["host"]))
        return tvm.target.Target(spec)

    def num_cores(self) -> int:
        return int(self.tvm.get("num-cores") or self.hardware.get("cores") or _physical_cores())

    def fingerprint(self) -> str:
        """Keys tuning records: a hash of the TVM target (or the Edge TPU table) and the toolchain."""
        if not self.lowers_to_tvm:
            blob = json.dumps({"backend": self.backend, "edgetpu": self.edgetpu, "toolchain": self.toolchain},
                              sort_keys=True, default=str)
            return hashlib.sha256(blob.encode()).hexdigest()[:16]
        tvm_spec = self.tvm_target().export() if self.is_host else self.tvm
        blob = json.dumps({"tvm": tvm_spec, "toolchain": self.toolchain}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if self.is_host:
            d["resolved_tvm"] = {k: v for k, v in self.tvm_target().export().items()
                                 if isinstance(v, (str, int, float, list, tuple))}
        return d


def _physical_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def builtin_target_files() -> dict[str, Path]:
    root = resources.files("edgecc.targets")
    return {Path(str(p)).stem: Path(str(p)) for p in root.iterdir() if str(p).endswith(".toml")}


def list_targets() -> list[TargetDesc]:
    """The built-in targets. Their TVM targets are checked by the test suite, not on every listing:
    that check imports TVM, seconds that `edgecc targets` need not cost."""
    return [load_target_file(p, check_tvm=False) for _, p in sorted(builtin_target_files().items())]


def load_target(name_or_path: str) -> TargetDesc:
    """A built-in target by name, or a user's TOML file by path."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_target_file(Path(name_or_path))
    files = builtin_target_files()
    if name_or_path not in files:
        raise UserError(unknown_message("unknown target", name_or_path, files))
    return load_target_file(files[name_or_path])


def load_target_file(path: Path, check_tvm: bool = True) -> TargetDesc:
    if not path.is_file():
        raise UserError(f"{path}: no such target file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None

    def need(table: dict, key: str, typ: type, where: str = "") -> Any:
        full = f"{where}{key}"
        if key not in table:
            raise UserError(f"{path}: missing key '{full}'")
        if not isinstance(table[key], typ):
            raise UserError(f"{path}: key '{full}' must be a {typ.__name__}, got {type(table[key]).__name__}")
        return table[key]

    extra = set(data) - _TOP_KEYS
    if extra:
        raise UserError(f"{path}: unknown key '{sorted(extra)[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
    backend = data.get("backend", "tvm")
    if backend not in BACKENDS:
        raise UserError(f"{path}: key 'backend' must be one of {', '.join(BACKENDS)}, got {backend!r}")
    own, other = ("tvm", "edgetpu") if backend == "tvm" else ("edgetpu", "tvm")
    if other in data:
        raise UserError(f"{path}: key '{other}' does not apply to backend '{backend}'")
    tvm_spec: dict = {}
    edgetpu: dict = {}
    if backend == "tvm":
        tvm_spec = need(data, "tvm", dict)
        kind = need(tvm_spec, "kind", str, "tvm.")
        if kind not in ("llvm", "cuda"):
            raise UserError(f"{path}: key 'tvm.kind' must be 'llvm' or 'cuda', got '{kind}'")
        if kind == "cuda":
            need(tvm_spec, "arch", str, "tvm.")
            need(tvm_spec, "host", dict, "tvm.")
        toolchain = need(data, "toolchain", dict)
        need(toolchain, "cc", str, "toolchain.")
    else:
        edgetpu = check_edgetpu_table(need(data, own, dict), path)
        toolchain = need(data, "toolchain", dict) if "toolchain" in data else {}
    hardware = data.get("hardware", {})
    tables = ((toolchain, "toolchain", _TOOLCHAIN_KEYS), (hardware, "hardware", _HARDWARE_KEYS))
    for table, name, known in tables:
        for key, value in table.items():
            if key not in known:
                raise UserError(f"{path}: unknown key '{name}.{key}' (known: {', '.join(known)})")
            if not isinstance(value, known[key]):
                raise UserError(f"{path}: key '{name}.{key}' has the wrong type ({type(value).__name__})")
    desc = TargetDesc(
        name=need(data, "name", str),
        description=need(data, "description", str),
        default_pipeline=need(data, "default_pipeline", str),
        tvm=tvm_spec,
        toolchain=toolchain,
        hardware=hardware,
        source=str(path),
        backend=backend,
        edgetpu=edgetpu,
    )
    try:
        parse_pipeline(desc.default_pipeline)
    except UserError as e:
        raise UserError(f"{path}: key 'default_pipeline': {str(e).splitlines()[0]}") from None
    if check_tvm and desc.lowers_to_tvm and not desc.is_host:
        try:
            desc.tvm_target()
        except Exception as e:  # TVM rejects unknown attributes or values
            raise UserError(f"{path}: key 'tvm' is not a valid TVM target: "
                            f"{str(e).splitlines()[0]}") from None
    return desc

"""Artifact directories: writing them atomically, loading them with validation, running them.

An artifact holds `manifest.json` (versions, target, resolved pipeline, I/O signatures,
per-pass reports, sha256 of every file), the compiled library, `model.opt.onnx` and a
human-readable `report.md`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgecc.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = {"format_version": int, "target": dict, "pipeline": str, "inputs": list,
             "outputs": list, "files": dict, "build": dict}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged_output(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temp dir beside `out_dir` that becomes `out_dir` only if the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir}: output directory exists (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the artifact private to its builder
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.rename(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_manifest(stage: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the staged dir into the manifest and write it."""
    manifest = dict(manifest, format_version=FORMAT_VERSION)
    manifest["files"] = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(stage.iterdir()) if p.is_file() and p.name != MANIFEST
    }
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


class Artifact:
    """A compiled model on disk. `Artifact.load(dir).run({name: array})` runs it on this host."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._vm = None
        self._weights: list = []  # the runtime tensors of weights.bin, once the VM is loaded

    @classmethod
    def load(cls, path: str | os.PathLike, check_hashes: bool = True) -> "Artifact":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise UserError(f"{path}: not an edgecc artifact (no {MANIFEST})")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{mpath}: corrupt manifest: {e}") from None
        if not isinstance(manifest, dict):
            raise UserError(f"{mpath}: corrupt manifest: not a JSON object")
        for key, typ in _REQUIRED.items():
            if not isinstance(manifest.get(key), typ):
                raise UserError(f"{mpath}: key '{key}' missing or not a {typ.__name__}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise UserError(f"{mpath}: artifact format {manifest['format_version']} is not supported "
                            f"by this edgecc (format {FORMAT_VERSION}); recompile the model")
        if check_hashes:
            for name, info in manifest["files"].items():
                f = path / name
                if not f.is_file():
                    raise UserError(f"{path}: file '{name}' listed in the manifest is missing")
                if sha256_file(f) != info.get("sha256"):
                    raise UserError(f"{path}: file '{name}' does not match its sha256 in the manifest")
        return cls(path, manifest)

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def model_bytes(self) -> int:
        """The compiled model's size: the library and the weights stored beside it."""
        build, files = self.manifest["build"], self.manifest["files"]
        names = [build["library"]] + ([build["weights"]["file"]] if "weights" in build else [])
        return sum(files[n]["bytes"] for n in names)

    def runs_here(self) -> bool:
        t = self.manifest["target"]
        return t["device_kind"] == "llvm" and t["host_arch"] == platform.machine()

    def load_vm(self, threads: int | None):
        if not self.runs_here():
            t = self.manifest["target"]
            emulable = t["device_kind"] == "llvm" and t["host_arch"] == "aarch64"
            hint = "; run it with --emulate" if emulable else ""
            raise UserError(
                f"{self.path}: built for target '{t['name']}' ({t['device_kind']}, {t['host_arch']}); "
                f"it cannot run on this {platform.machine()} host{hint}"
            )
        n = threads or self.manifest["target"]["num_cores"]
        # The TVM thread pool reads this when it first starts; it defaults to 1 thread here.
        os.environ["TVM_NUM_THREADS"] = str(n)
        import tvm
        from tvm.runtime.vm import VirtualMachine

        if self._vm is None:
            from edgecc import weights

            build = self.manifest["build"]
            lib = tvm.runtime.load_module(str(self.path / build["library"]))
            self._vm = VirtualMachine(lib, tvm.cpu())
            stored = build.get("weights")
            self._weights = weights.load(self.path / stored["file"], stored["tensors"]) if stored else []
        tvm.get_global_func("runtime.config_threadpool")(1, n)
        return self._vm

    def check_inputs(self, feeds: dict[str, Any]) -> list:
        """The feeds in the module's input order, checked against the manifest: numpy arrays
        (made contiguous), or TVM tensors a previous `run(..., as_numpy=False)` returned."""
        names = [i["name"] for i in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise UserError(f"inputs do not match the model: missing {missing}, unexpected {extra} "
                            f"(expected {names})")
        arrays = []
        for spec in self.inputs:
            a = feeds[spec["name"]]
            # A TVM tensor stays one; asarray keeps a scalar 0-d (ascontiguousarray makes it [1]).
            a = a if hasattr(a, "numpy") else np.asarray(a, order="C")
            dtype, shape = str(a.dtype), tuple(a.shape)
            if dtype != spec["dtype"]:
                raise UserError(f"input '{spec['name']}': dtype {dtype}, expected {spec['dtype']}")
            if len(shape) != len(spec["shape"]) or any(
                isinstance(d, int) and d != s for d, s in zip(spec["shape"], shape)
            ):
                raise UserError(f"input '{spec['name']}': shape {list(shape)}, expected {spec['shape']}")
            arrays.append(a)
        return arrays

    def run(self, feeds: dict[str, Any], threads: int | None = None,
            as_numpy: bool = True) -> dict[str, Any]:
        """Outputs by name, as numpy arrays; with `as_numpy=False` as the module's TVM tensors,
        which `run` takes back as inputs uncopied (a decoding loop's KV cache: copying ~60
        tensors in and out of the runtime each step cost SmolLM2 a third of its decode time)."""
        import tvm

        arrays = self.check_inputs(feeds)
        vm = self.load_vm(threads)
        out = vm["main"](*[a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a) for a in arrays],
                         *self._weights)
        values = [out] if isinstance(out, tvm.runtime.Tensor) else list(_flatten(out))
        names = [o["name"] for o in self.outputs]
        if len(values) != len(names):
            raise UserError(f"{self.path}: module returned {len(values)} outputs, "
                            f"manifest lists {len(names)}")
        return {n: v.numpy() if as_numpy else v for n, v in zip(names, values)}


def _flatten(value):
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        yield value
    else:
        for v in value:
            yield from _flatten(v)

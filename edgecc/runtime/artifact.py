"""Artifact directories: writing them atomically, loading them with validation, running them.

An artifact holds `manifest.json` (versions, target, resolved pipeline, I/O signatures,
per-pass reports, sha256 of every file), the compiled library and its weights, a human-readable
`report.md`, and with `--keep-reference` `model.opt.onnx`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgecc.core import fixed_inputs
from edgecc.core.digest import sha256_file
from edgecc.core.dtypes import stored
from edgecc.errors import UserError
from edgecc.runtime import litert, weights

FORMAT_VERSION = 2  # 2: the closed file set and manifest.sha256
MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"  # sha256 of manifest.json's bytes, checked before anything else
STAGING_MARKER = ".edgecc-staging"  # in a staging directory: the pid of the process writing it
MAX_MANIFEST_BYTES = 64 << 20
# The optimized graph ONNX Runtime runs as the reference: a second copy of every weight, so an
# artifact ships it only when compiled with --keep-reference.
REFERENCE_MODEL = "model.opt.onnx"
# TVM's allocator. "pooled" keeps every buffer it ever allocated for reuse at that exact size,
# and a causal LM asks for new sizes at every step (its KV cache grows by a token): SmolLM2
# int4 grew 2.3 MB a token, to 0.31 GB after 32. "naive" frees a buffer when its last use
# ends, and the process's malloc reuses the memory; SmolLM2 int4 decoded as fast (1.03x the
# pooled speed, interleaved rounds).
MEMORY_CFG = "naive"
_REQUIRED = {"format_version": int, "target": dict, "pipeline": str, "inputs": list,
             "outputs": list, "files": dict, "build": dict}


def runtime_only() -> None:
    """For a process that only runs artifacts, what a device has: TVM's runtime library, not its
    compiler (about 110 MB less resident), and no torch, which tvm_ffi imports whenever it is
    installed (about 200 MB). Call it before anything imports tvm; it does nothing after."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        sys.modules.setdefault("torch", None)  # `import torch` raises ImportError, as without torch

def is_artifact(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / MANIFEST_DIGEST).is_file()


def check_replaceable(out_dir: Path, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """Refuse an output directory edgecc may not write: one that exists without `force`, and with
    `force` anything but an edgecc artifact or an empty directory, or a directory holding one of
    `protect` (the source model) or the working directory. edgecc deletes only what it wrote."""
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise UserError(f"{out_dir}: output directory exists (use --force to replace it)")
        if out_dir.is_symlink() or not out_dir.is_dir():
            raise UserError(f"{out_dir}: exists and is not a directory; --force replaces only an "
                            "edgecc artifact or an empty directory")
        if not is_artifact(out_dir) and any(out_dir.iterdir()):
            raise UserError(f"{out_dir}: not an edgecc artifact and not empty; --force replaces only "
                            "an artifact or an empty directory")
    resolved = out_dir.resolve()
    for kept in (*protect, Path.cwd()):
        kept = Path(kept).resolve()
        if kept == resolved or resolved in kept.parents:
            raise UserError(f"{out_dir}: would replace a directory holding {kept}; choose another -o")
    parent = resolved.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{out_dir}: {parent} is not a directory")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(parent: Path, name: str) -> None:
    """Staging directories of `name` whose writer died (kill -9, power loss): only those that
    carry edgecc's marker with a dead pid."""
    for stale in parent.glob(f".{name}.*"):
        marker = stale / STAGING_MARKER
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out_dir: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A temp dir beside `out_dir` that becomes `out_dir` only if the block succeeds.

    A lock beside `out_dir` makes a second writer of the same place fail at once instead of
    silently replacing the first one's artifact."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, force, protect)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")
    except OSError as e:
        raise UserError(f"{out_dir}: cannot write there: {e.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A writer that finished unlinks the lock file: a lock on that old file guards nothing.
            if os.fstat(lock.fileno()).st_ino != os.stat(lock_path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise UserError(f"{out_dir}: another edgecc process is writing this output") from None
        try:
            check_replaceable(out_dir, force, protect)  # as it is now that we hold the lock
            _remove_stale_staging(out_dir.parent, out_dir.name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
            try:
                (tmp / STAGING_MARKER).write_text(f"{os.getpid()}\n")
                tmp.chmod(0o755)  # mkdtemp's 0700 would make the artifact private to its builder
                yield tmp
                (tmp / STAGING_MARKER).unlink()
                if out_dir.exists():
                    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
                    (old / STAGING_MARKER).write_text(f"{os.getpid()}\n")
                    os.rename(out_dir, old / "x")
                    os.rename(tmp, out_dir)
                    shutil.rmtree(old)
                else:
                    os.rename(tmp, out_dir)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        finally:
            lock_path.unlink(missing_ok=True)


def write_manifest(stage: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the staged dir into the manifest, write it and its digest."""
    manifest = dict(manifest, format_version=FORMAT_VERSION)
    manifest["files"] = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(stage.iterdir())
        if p.is_file() and p.name not in (MANIFEST, MANIFEST_DIGEST, STAGING_MARKER)
    }
    data = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    (stage / MANIFEST).write_bytes(data)
    (stage / MANIFEST_DIGEST).write_text(hashlib.sha256(data).hexdigest() + "\n")
    return manifest


def _plain_name(name: Any) -> bool:
    """A file name inside the artifact's own directory: no separators, no parent, no hidden file."""
    return (isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
            and not name.startswith(".") and "\\" not in name and "\0" not in name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(manifest: dict[str, Any], mpath: Path) -> None:
    """The parts of a manifest edgecc reads, typed as it reads them: a one-line error for the
    first that is not, before anything is used."""
    def bad(where: str, what: str) -> UserError:
        return UserError(f"{mpath}: {where} is not {what}")

    for side in ("inputs", "outputs"):
        for i, spec in enumerate(manifest[side]):
            where = f"{side}[{i}]"
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise bad(where, "an object with a name")
            try:
                dtype = np.dtype(spec.get("dtype"))
            except TypeError:
                raise bad(f"{where}.dtype", "a numpy dtype name") from None
            if dtype.hasobject or not isinstance(spec.get("dtype"), str):
                raise bad(f"{where}.dtype", "a numpy dtype name")
            shape = spec.get("shape")
            if not isinstance(shape, list) or not all(
                    (_is_int(d) and d >= 0) or isinstance(d, str) or d is None for d in shape):
                raise bad(f"{where}.shape", "a list of sizes, dim names or nulls")
            span = spec.get("range", [0, 1])
            if not (isinstance(span, list) and len(span) == 2 and all(map(_is_int, span))
                    and span[0] < span[1]):
                raise bad(f"{where}.range", "[low, high], two integers with low < high")
    target = manifest["target"]
    for key in ("name", "device_kind", "host_arch"):
        if not isinstance(target.get(key), str):
            raise bad(f"target.{key}", "a string")
    if not _is_int(target.get("num_cores")) or target["num_cores"] < 1:
        raise bad("target.num_cores", "a positive integer")
    build = manifest["build"]
    if "weights" in build and not (isinstance(build["weights"], dict)
                                   and isinstance(build["weights"].get("file"), str)):
        raise bad("build.weights", "an object naming its file")
    for key in ("runtime",):
        if key in build and not isinstance(build[key], str):
            raise bad(f"build.{key}", "a string")
    if "decode" in build:
        shapes = build["decode"].get("shapes") if isinstance(build["decode"], dict) else None
        names = {spec["name"] for spec in manifest["inputs"]}
        if not (isinstance(shapes, dict) and shapes and all(
                k in names and isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v) for k, v in shapes.items())):
            raise bad("build.decode.shapes", "an object of input names and static shapes")
    for key in ("lm", "edgetpu", "constants"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise bad(key, "an object")
    if "edgetpu" in manifest:
        _check_edgetpu(manifest["edgetpu"], bad)
    for name, fixed in manifest.get("constants", {}).items():
        where = f"constants.{name}"
        if not (isinstance(fixed, dict) and isinstance(fixed.get("dtype"), str)
                and isinstance(fixed.get("shape"), list) and all(_is_int(d) and d >= 0 for d in fixed["shape"])
                and isinstance(fixed.get("value"), list)
                and all(isinstance(v, (int, float)) for v in fixed["value"])):
            raise bad(where, "an object with a dtype, a static shape and a list of numbers")


def _check_edgetpu(edgetpu: dict[str, Any], bad) -> None:
    """The chain of an Edge TPU artifact: typed segments, and int8 values with a scale and zero point."""
    segments = edgetpu.get("segments")
    if not isinstance(segments, list) or not segments:
        raise bad("edgetpu.segments", "a non-empty list")
    for i, seg in enumerate(segments):
        if not (isinstance(seg, dict) and seg.get("kind") in ("edgetpu", "host")
                and isinstance(seg.get("file"), str)
                and all(isinstance(seg.get(k), list) and all(isinstance(n, str) for n in seg[k])
                        for k in ("inputs", "outputs"))):
            raise bad(f"edgetpu.segments[{i}]", "an object with a kind (edgetpu or host), a file, "
                      "and lists of input and output names")
    int8 = edgetpu.get("int8")
    if not isinstance(int8, dict) or not all(
            isinstance(q, dict) and isinstance(q.get("scale"), float) and q["scale"] > 0
            and _is_int(q.get("zero_point")) and -128 <= q["zero_point"] <= 127 for q in int8.values()):
        raise bad("edgetpu.int8", "an object of {scale > 0, zero_point in [-128, 127]} per value")


def _referenced_files(manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every file name the manifest makes edgecc open: (where it is named, the name)."""
    build, lm = manifest["build"], manifest.get("lm")
    refs = [("build.library", build.get("library"))]
    if "weights" in build:
        weights = build["weights"]
        refs.append(("build.weights.file", weights.get("file") if isinstance(weights, dict) else None))
    if isinstance(lm, dict) and "tokenizer" in lm:
        refs.append(("lm.tokenizer", lm["tokenizer"]))
    edgetpu = manifest.get("edgetpu")
    if isinstance(edgetpu, dict):
        refs += [(f"edgetpu.segments[{i}].file", seg["file"]) for i, seg in enumerate(edgetpu["segments"])]
    return refs


class Artifact:
    """A compiled model on disk. `Artifact.load(dir).run({name: array})` runs it on this host."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._vm = None
        self._checks = None  # _input_checks
        self._weights: list = []  # the runtime tensors of weights.bin, once the VM is loaded

    @classmethod
    def load(cls, path: str | os.PathLike, check_hashes: bool = True) -> "Artifact":
        """An artifact, validated before any of its files is opened: the manifest against its
        digest, every file it names a plain name inside the directory, listed and (unless
        `check_hashes` is False, for an artifact this process has just written) hashed."""
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise UserError(f"{path}: not an edgecc artifact (no {MANIFEST})")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise UserError(f"{mpath}: corrupt manifest: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        data = mpath.read_bytes()
        try:
            digest = (path / MANIFEST_DIGEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise UserError(f"{path}: no readable {MANIFEST_DIGEST}; an artifact of an older edgecc "
                            "or a damaged one: recompile the model") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise UserError(f"{mpath}: does not match {MANIFEST_DIGEST} (edited or damaged)")
        try:
            manifest = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{mpath}: corrupt manifest: {str(e) or type(e).__name__}") from None
        if not isinstance(manifest, dict):
            raise UserError(f"{mpath}: corrupt manifest: not a JSON object")
        for key, typ in _REQUIRED.items():
            if not isinstance(manifest.get(key), typ):
                raise UserError(f"{mpath}: key '{key}' missing or not a {typ.__name__}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise UserError(f"{mpath}: artifact format {manifest['format_version']} is not supported "
                            f"by this edgecc (format {FORMAT_VERSION}); recompile the model")
        _check_shape(manifest, mpath)
        files = manifest["files"]
        for name, info in files.items():
            if not _plain_name(name) or not isinstance(info, dict):
                raise UserError(f"{mpath}: files entry {name!r} is not a plain file name in the artifact")
            f = path / name
            if f.is_symlink() or not f.is_file():
                raise UserError(f"{path}: file '{name}' listed in the manifest is missing or not a "
                                "regular file")
            if check_hashes and sha256_file(f) != info.get("sha256"):
                raise UserError(f"{path}: file '{name}' does not match its sha256 in the manifest")
        for where, name in _referenced_files(manifest):
            if not isinstance(name, str) or name not in files:
                raise UserError(f"{mpath}: {where} {name!r} is not a file the manifest lists and hashes")
        if "weights" in manifest["build"]:
            stored = manifest["build"]["weights"]
            weights.check(stored.get("tensors"), (path / stored["file"]).stat().st_size, str(mpath))
        return cls(path, manifest)

    @property
    def inputs(self) -> list[dict]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict]:
        return self.manifest["outputs"]

    @property
    def reference_path(self) -> Path:
        """model.opt.onnx; a UserError naming --keep-reference where the artifact has none."""
        if REFERENCE_MODEL not in self.manifest["files"]:
            raise UserError(f"{self.path}: no {REFERENCE_MODEL} (the optimized graph ONNX Runtime runs as "
                            "the reference); compile with --keep-reference to ship it")
        return self.path / REFERENCE_MODEL

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
            build = self.manifest["build"]
            lib = tvm.runtime.load_module(str(self.path / build["library"]))
            self._vm = VirtualMachine(lib, tvm.cpu(), memory_cfg=MEMORY_CFG)
            stored = build.get("weights")
            self._weights = weights.load(self.path / stored["file"], stored["tensors"]) if stored else []
        tvm.get_global_func("runtime.config_threadpool")(1, n)
        return self._vm

    def check_inputs(self, feeds: dict[str, Any], tensors: bool = True) -> list:
        """The feeds in the module's input order, checked against the manifest: numpy arrays
        (made contiguous), or TVM tensors a previous `run(..., as_numpy=False)` returned.
        `tensors=False` passes TVM tensors on unchecked, for the module's own checks of its
        parameters (`run`: a decode step's 60 cache tensors, 0.1-0.4 ms a step to check here)."""
        names = [i["name"] for i in self.inputs]
        fixed = self.manifest.get("constants", {})
        for name in fixed.keys() & feeds.keys():  # ORT's feeds work unchanged, if they agree
            fixed_inputs.check(fixed, name, feeds[name])
        known = set(names)
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in known and n not in fixed]
        if missing or extra:
            raise UserError(f"inputs do not match the model: missing {missing}, unexpected {extra} "
                            f"(expected {names})")
        arrays = []
        for spec, held, fixed_dims in self._input_checks():
            a = feeds[spec["name"]]
            tensor = hasattr(a, "numpy")
            if tensor and not tensors:
                arrays.append(a)
                continue
            # A TVM tensor stays one; asarray keeps a scalar 0-d (ascontiguousarray makes it [1]).
            a = a if tensor else np.asarray(a, order="C")
            dtype, shape = str(a.dtype), tuple(a.shape)
            expected = held if tensor else spec["dtype"]
            if dtype != expected:
                raise UserError(f"input '{spec['name']}': dtype {dtype}, expected {expected}")
            if len(shape) != len(spec["shape"]) or any(shape[i] != d for i, d in fixed_dims):
                raise UserError(f"input '{spec['name']}': shape {list(shape)}, expected {spec['shape']}")
            arrays.append(a if tensor else a.view(stored(a.dtype)))
        return arrays

    def _input_checks(self) -> list:
        """Per input: its spec, the dtype the module holds it in, and its fixed dims (index, size).
        Worked out once: a decode step checks some 60 inputs (SmolLM2: 0.35 ms a step before)."""
        if self._checks is None:
            self._checks = [(spec, str(stored(spec["dtype"])),
                             [(i, d) for i, d in enumerate(spec["shape"]) if isinstance(d, int)])
                            for spec in self.inputs]
        return self._checks

    def run(self, feeds: dict[str, Any], threads: int | None = None,
            as_numpy: bool = True) -> dict[str, Any]:
        """Outputs by name, as numpy arrays; with `as_numpy=False` as the module's TVM tensors,
        which `run` takes back as inputs uncopied (a decoding loop's KV cache: copying ~60
        tensors in and out of the runtime each step cost SmolLM2 a third of its decode time).
        An Edge TPU artifact runs its chain of segments: the Edge TPU ones in LiteRT's interpreter on
        this CPU, the host ones in ONNX Runtime (float32 outputs)."""
        import tvm

        if self.manifest["build"].get("runtime") == "litert":
            return litert.run_artifact(self, feeds)
        arrays = self.check_inputs(feeds, tensors=False)
        vm = self.load_vm(threads)
        try:
            function = entry(self.manifest, {spec["name"]: a for spec, a in zip(self.inputs, arrays)})
            out = vm[function](*[a if isinstance(a, tvm.runtime.Tensor) else tvm.runtime.tensor(a) for a in arrays],
                               *self._weights)
        except (RuntimeError, ValueError) as e:
            self.check_inputs(feeds)  # a tensor the manifest refuses, named in its words
            refused = re.search(r"loc=param\[(\d+)\].*?(shape\[\d+\] mismatch[^.]*)", str(e), re.S)
            if refused and int(refused.group(1)) < len(self.inputs):  # a dim the other inputs fixed
                spec = self.inputs[int(refused.group(1))]
                raise UserError(f"input '{spec['name']}': shape {list(feeds[spec['name']].shape)}, expected "
                                f"{spec['shape']}: {refused.group(2)}") from None
            raise
        values = _flatten(out)
        names = [o["name"] for o in self.outputs]
        if len(values) != len(names):
            raise UserError(f"{self.path}: module returned {len(values)} outputs, "
                            f"manifest lists {len(names)}")
        if not as_numpy:
            return dict(zip(names, values))
        arrays = [v.numpy() for v in values]
        return {o["name"]: a.view(o["dtype"]) if stored(o["dtype"]) != np.dtype(o["dtype"]) else a
                for o, a in zip(self.outputs, arrays)}


def entry(manifest: dict, feeds: dict) -> str:
    """The module function for these feeds (arrays or tensors by input name): an LM's one-token
    step has one of its own, `decode` (edgecc.backends.decode_step), for feeds of the shapes
    `build.decode` gives; else `main`.
    emu_runner, which cannot import edgecc, repeats this."""
    shapes = manifest["build"].get("decode", {}).get("shapes")
    if shapes and all(tuple(feeds[name].shape) == tuple(shape) for name, shape in shapes.items()):
        return "decode"
    return "main"


def _flatten(value) -> list:
    """The tensors of a module's (nested) result in order. A slice reads an FFI array in one
    go; iterating it element by element took 65 us for a decode step's 61 outputs."""
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    return [t for v in value[:] for t in _flatten(v)]

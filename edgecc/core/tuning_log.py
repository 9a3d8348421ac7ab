"""Tuning records keyed by target: plain JSON lines, validated on read, one file per target fingerprint.

A record is one measured MetaSchedule schedule (its trace) for one workload (a PrimFunc, identified by
MetaSchedule's structural hash), stamped with what it was measured for: the target fingerprint, the device
and the TVM release. Records apply only to the target and TVM release line they were measured with.

Store layout (root is $EDGECC_TUNING_DIR or ~/.cache/edgecc/tuning):

    root/<fingerprint>.jsonl   one record per line, append-only except for merge/prune rewrites
    root/.lock                 flock'ed around every append, rewrite and read

Tuning and replay are separate: `from_ms_database` turns what MetaSchedule wrote into records,
`to_ms_database` turns chosen records back into a database that `MetaScheduleApplyDatabase` reads.
TVM is imported only inside those two functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import gzip
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from edgecc.core.target import TargetDesc
from edgecc.errors import UserError

FORMAT = "edgecc-tuning-record/1"
FAILED_RUN_SECS = 1e10  # MetaSchedule's run_secs for a candidate that failed to build or run
_FINGERPRINT = re.compile(r"^[0-9A-Za-z_-]{1,64}$")  # also a file name: no '/', no '..'
_RELEASE = re.compile(r"^(\d+)\.(\d+)")
_GZIP_MAGIC = b"\x1f\x8b"


class TuningLogWarning(UserWarning):
    """A line of a tuning-record file was skipped."""


class InvalidRecord(ValueError):
    """A record fails validation; the message starts with the bad field's name."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated tuning record; `to_json()` gives back the line it was read from."""

    task: str
    shash: str
    mod: str  # tvm.ir.save_json of the workload's IRModule
    trace: list
    args_info: list
    run_secs: tuple[float, ...]
    error: str | None
    target: dict
    target_name: str
    fingerprint: str
    device: str
    tvm_version: str
    edgecc_version: str
    trials: int
    date: str

    @property
    def ok(self) -> bool:
        """A successful measurement, so a candidate schedule."""
        return self.error is None

    @property
    def mean_secs(self) -> float:
        """MetaSchedule ranks records by mean run time; failed ones rank last."""
        return sum(self.run_secs) / len(self.run_secs) if self.ok else math.inf

    @property
    def release(self) -> str:
        """The TVM release line (major.minor) the trace belongs to."""
        return tvm_release(self.tvm_version)

    def to_json(self) -> dict:
        """The record as the JSON object of the file format."""
        return {
            "format": FORMAT, "task": self.task, "workload": {"shash": self.shash, "mod": self.mod},
            "trace": self.trace, "args_info": self.args_info, "run_secs": list(self.run_secs),
            "error": self.error, "target": self.target, "target_name": self.target_name,
            "fingerprint": self.fingerprint, "device": self.device, "tvm_version": self.tvm_version,
            "edgecc_version": self.edgecc_version, "trials": self.trials, "date": self.date,
        }

    def to_line(self) -> str:
        """One compact JSON line, newline included."""
        return json.dumps(self.to_json(), separators=(",", ":")) + "\n"

    def identity(self) -> str:
        """Equal for the same record read twice (import skips such duplicates)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


def _rank(r: Record) -> tuple[bool, float]:
    """Sort key, best first: successful before failed, then by mean run time."""
    return (not r.ok, r.mean_secs)


# ----------------------------------------------------------------------------------------------------------
# Validation


_FIELDS = ("format", "task", "workload", "trace", "args_info", "run_secs", "error", "target", "target_name",
           "fingerprint", "device", "tvm_version", "edgecc_version", "trials", "date")


def validate(obj: Any) -> Record:
    """Checks one parsed JSON line field by field, so a bad record never reaches MetaSchedule."""
    if not isinstance(obj, dict):
        raise InvalidRecord(f"record: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _FIELDS if k not in obj]
    if missing:
        raise InvalidRecord(f"{missing[0]}: missing")
    extra = sorted(set(obj) - set(_FIELDS))
    if extra:
        raise InvalidRecord(f"{extra[0]}: unknown field")
    if obj["format"] != FORMAT:
        raise InvalidRecord(f"format: expected {FORMAT!r}, got {obj['format']!r}")

    def text(key: str, value: Any = None) -> str:
        value = obj[key] if value is None else value
        if not isinstance(value, str) or not value.strip():
            raise InvalidRecord(f"{key}: expected a non-empty string, got {value!r:.60}")
        return value

    workload = obj["workload"]
    if not isinstance(workload, dict) or set(workload) != {"shash", "mod"}:
        raise InvalidRecord("workload: expected an object with exactly 'shash' and 'mod'")
    shash = text("workload.shash", workload["shash"])
    if not shash.isdigit():
        raise InvalidRecord(f"workload.shash: expected a decimal structural hash, got {shash!r:.60}")
    mod = text("workload.mod", workload["mod"])
    if not mod.startswith("{"):
        raise InvalidRecord("workload.mod: expected the JSON of an IRModule (tvm.ir.save_json)")
    trace = obj["trace"]
    if not (isinstance(trace, list) and len(trace) == 2 and all(isinstance(t, list) for t in trace)
            and trace[0]):
        raise InvalidRecord("trace: expected [instructions, decisions] with at least one instruction")
    if not isinstance(obj["args_info"], list):
        raise InvalidRecord("args_info: expected a list")
    run_secs = obj["run_secs"]
    if not isinstance(run_secs, list):
        raise InvalidRecord("run_secs: expected a list of seconds")
    for s in run_secs:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise InvalidRecord(f"run_secs: {s!r} is not a finite, non-negative number of seconds")
        if s >= FAILED_RUN_SECS:
            raise InvalidRecord("run_secs: MetaSchedule's failure marker 1e10; a failure is recorded as 'error'")
    error = obj["error"]
    if error is None:
        if not run_secs:
            raise InvalidRecord("run_secs: empty, but 'error' is null (a successful record needs a time)")
    else:
        text("error")
        if "\n" in error:
            raise InvalidRecord("error: must be one line")
        if run_secs:
            raise InvalidRecord("run_secs: must be empty when 'error' is set")
    target = obj["target"]
    if not isinstance(target, dict) or not isinstance(target.get("kind"), str):
        raise InvalidRecord("target: expected a TVM target dict with a 'kind'")
    fingerprint = text("fingerprint")
    if not _FINGERPRINT.match(fingerprint):
        raise InvalidRecord(f"fingerprint: {fingerprint!r:.60} is not a target fingerprint")
    tvm_version = text("tvm_version")
    if not _RELEASE.match(tvm_version):
        raise InvalidRecord(f"tvm_version: {tvm_version!r:.60} is not a version (major.minor...)")
    trials = obj["trials"]
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise InvalidRecord(f"trials: expected a non-negative integer, got {trials!r:.60}")
    date = text("date")
    try:
        parsed = datetime.datetime.fromisoformat(date)
    except ValueError:
        raise InvalidRecord(f"date: {date!r:.60} is not an ISO-8601 date") from None
    if parsed.tzinfo is None:
        raise InvalidRecord(f"date: {date!r:.60} has no time zone (expected UTC)")
    return Record(
        task=text("task"), shash=shash, mod=mod, trace=trace, args_info=obj["args_info"],
        run_secs=tuple(float(s) for s in run_secs), error=error, target=target,
        target_name=text("target_name"), fingerprint=fingerprint, device=text("device"),
        tvm_version=tvm_version, edgecc_version=text("edgecc_version"), trials=trials, date=date,
    )


def tvm_release(version: str) -> str:
    """'0.27.0.post1' -> '0.27': traces carry within a release line, not across."""
    m = _RELEASE.match(version)
    return f"{m[1]}.{m[2]}" if m else version


def compatible(record: Record, fingerprint: str, tvm_version: str,
               target_name: str | None = None) -> tuple[bool, str]:
    """Whether a record may be applied when compiling for `fingerprint` with `tvm_version`, and why not."""
    if record.fingerprint != fingerprint:
        here = f" ({target_name})" if target_name else ""
        return False, (f"measured for fingerprint {record.fingerprint[:8]}… ({record.target_name}), "
                       f"compiling for {fingerprint[:8]}…{here}")
    if record.release != tvm_release(tvm_version):
        return False, (f"measured with TVM {record.tvm_version}, this is TVM {tvm_version}: "
                       "schedule traces do not carry across TVM releases")
    return True, "same target fingerprint and TVM release"


# ----------------------------------------------------------------------------------------------------------
# Reading and writing files


def _open_lines(path: Path) -> Iterator[bytes]:
    """Raw lines of a .jsonl or gzip file; a file that cannot be opened at all is the user's to fix."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == _GZIP_MAGIC
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a .jsonl or .jsonl.gz file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror}") from None
    if path.name.endswith(".gz") and not gz:
        raise UserError(f"{path}: not a gzip file (the name ends in .gz)")
    opener = gzip.open if gz else open
    with opener(path, "rb") as f:
        yield from f


def iter_lines(path: str | Path) -> Iterator[tuple[int, Record | None, str | None]]:
    """(line number, record, None) for each valid line, (line number, None, reason) for each bad one."""
    path = Path(path)
    lineno = 0
    lines = _open_lines(path)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
            if lineno == 0:
                raise UserError(f"{path}: unreadable (corrupt gzip data?): {e}") from None
            yield lineno + 1, None, f"compressed data ends or is corrupt here ({e}); the rest is lost"
            return
        lineno += 1
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield lineno, None, "not UTF-8 text"
            continue
        except json.JSONDecodeError as e:
            cut = " (truncated line)" if not raw.endswith(b"\n") else ""
            yield lineno, None, f"not valid JSON{cut}: {e.msg} at column {e.colno}"
            continue
        except RecursionError:
            yield lineno, None, "JSON nested too deeply"
            continue
        try:
            record = validate(obj)
        except InvalidRecord as e:
            yield lineno, None, f"invalid record: {e}"
            continue
        yield lineno, record, None


def read_records(path: str | Path, log: Callable[[str], None] | None = None) -> list[Record]:
    """The valid records of a file; each bad line is skipped with a warning naming file and line."""
    records = []
    for lineno, record, reason in iter_lines(path):
        if record is None:
            msg = f"{path}:{lineno}: skipped: {reason}"
            if log is None:
                warnings.warn(msg, TuningLogWarning, stacklevel=2)
            else:
                log(msg)
        else:
            records.append(record)
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Writes a whole file atomically (temp file + os.replace); gzip when the name ends in .gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "wb") as raw:
            with (gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.name.endswith(".gz")
                  else contextlib.nullcontext(raw)) as f:
                for r in records:
                    f.write(r.to_line().encode())
                    n += 1
            raw.flush()
            os.fsync(raw.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; an exported file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


# ----------------------------------------------------------------------------------------------------------
# The store


def default_root() -> Path:
    """$EDGECC_TUNING_DIR, else ~/.cache/edgecc/tuning."""
    env = os.environ.get("EDGECC_TUNING_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgecc" / "tuning"


class Store:
    """A directory of per-fingerprint record files, safe for several processes at once.

    Every append and rewrite holds an exclusive flock on root/.lock, and readers a shared one, so two
    `edgecc tune` processes can write to one store without losing records and a reader never sees a
    half-written line. Rewrites (merge, prune) write a temp file and os.replace it under the same lock.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, fingerprint: str) -> Path:
        """The file holding one fingerprint's records."""
        if not _FINGERPRINT.match(fingerprint):
            raise ValueError(f"fingerprint: {fingerprint!r} is not a target fingerprint")
        return self.root / f"{fingerprint}.jsonl"

    def fingerprints(self) -> list[str]:
        """Fingerprints that have a file in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(".jsonl")] for p in self.root.glob("*.jsonl")
                      if _FINGERPRINT.match(p.name[: -len(".jsonl")]))

    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        """Holds root/.lock; exclusive for writers, shared for readers (none if the store is read-only)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(self.root / ".lock", "a")  # noqa: SIM115 (closed below)
        except PermissionError:
            if exclusive:
                raise
            yield
            return
        with f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def append(self, records: Iterable[Record | dict]) -> int:
        """Adds records (dicts are validated first) to their fingerprints' files; returns how many."""
        by_fp: dict[str, list[str]] = {}
        for r in records:
            r = r if isinstance(r, Record) else validate(r)
            by_fp.setdefault(r.fingerprint, []).append(r.to_line())
        if not by_fp:
            return 0
        with self._lock(exclusive=True):
            for fp, lines in by_fp.items():
                with open(self.path(fp), "ab+") as f:
                    # A writer killed mid-line left no newline: start on a fresh line so only that one is lost.
                    if f.seek(0, os.SEEK_END) > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
                    f.write("".join(lines).encode())
                    f.flush()
                    os.fsync(f.fileno())
        return sum(len(v) for v in by_fp.values())

    def _read(self, fingerprint: str | None, log: Callable[[str], None] | None) -> list[Record]:
        """Reads without locking (the caller holds the lock)."""
        fps = [fingerprint] if fingerprint else self.fingerprints()
        out = []
        for fp in fps:
            path = self.path(fp)
            if path.is_file():
                out += [r for r in read_records(path, log) if r.fingerprint == fp]
        return out

    def records(self, fingerprint: str | None = None, log: Callable[[str], None] | None = None) -> list[Record]:
        """All valid records, or one fingerprint's; bad lines are skipped with a warning."""
        if not self.root.is_dir():
            return []
        with self._lock(exclusive=False):
            return self._read(fingerprint, log)

    def best(self, fingerprint: str, tvm_version: str) -> dict[str, Record]:
        """Per workload shash, the fastest successful record that applies to this target and TVM."""
        best: dict[str, Record] = {}
        for r in self.records(fingerprint):
            usable = r.ok and compatible(r, fingerprint, tvm_version)[0]
            if usable and (r.shash not in best or _rank(r) < _rank(best[r.shash])):
                best[r.shash] = r
        return best

    def rewrite(self, fingerprint: str, keep: Callable[[list[Record]], list[Record]]) -> tuple[int, int]:
        """Replaces one fingerprint's file by keep(records), atomically; invalid lines are dropped."""
        with self._lock(exclusive=True):
            before = self._read(fingerprint, None)
            after = keep(before)
            write_records(self.path(fingerprint), after)
        return len(before), len(after)

    def prune(self, k: int, fingerprint: str | None = None) -> dict[str, tuple[int, int]]:
        """Keeps the k best records per workload and TVM release line (failed ones rank last)."""
        if k < 1:
            raise ValueError("prune: k must be at least 1")
        return {fp: self.rewrite(fp, lambda rs: top_k(rs, k)) for fp in ([fingerprint] if fingerprint
                                                                         else self.fingerprints())}

    def export(self, path: str | Path, fingerprint: str | None = None) -> int:
        """Writes the store (or one fingerprint) to one portable file, gzip if it ends in .gz;
        with no records nothing is written (an existing file is left as it was)."""
        records = self.records(fingerprint)
        return write_records(path, records) if records else 0


def top_k(records: Iterable[Record], k: int) -> list[Record]:
    """The k best records per (fingerprint, workload shash, TVM release line), in file order."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.fingerprint, r.shash, r.release), []).append(r)
    kept = {id(r) for rs in groups.values() for r in sorted(rs, key=_rank)[:k]}
    return [r for rs in groups.values() for r in rs if id(r) in kept]


def merge(sources: Iterable[str | Path], dest: Store, log: Callable[[str], None] | None = None) -> dict[str, int]:
    """Merges record files (or store directories) into `dest`, keeping the best record per workload."""
    records: list[Record] = []
    for src in sources:
        src = Path(src)
        records += Store(src).records(log=log) if src.is_dir() else read_records(src, log)
    return merge_records(records, dest)


def merge_records(records: Iterable[Record], dest: Store) -> dict[str, int]:
    """Adds records to `dest` and keeps the best per (workload shash, fingerprint, TVM release line).

    The TVM release line is part of the key so that a record of an older TVM never displaces one of
    the current release, however fast it was. Returns the records kept per fingerprint rewritten.
    """
    incoming: dict[str, list[Record]] = {}
    for r in records:
        incoming.setdefault(r.fingerprint, []).append(r)
    return {fp: dest.rewrite(fp, lambda old, new=rs: top_k(old + new, 1))[1]
            for fp, rs in sorted(incoming.items())}


@dataclasses.dataclass
class ImportResult:
    """What `import_file` did: records imported, how many of those for other targets, lines skipped."""

    imported: int = 0
    valid: int = 0  # lines that passed validation, imported or not
    other_targets: dict[str, int] = dataclasses.field(default_factory=dict)  # "rpi4 (ab12cd34…)" -> n
    skipped: list[str] = dataclasses.field(default_factory=list)  # "FILE:LINE: reason"


def import_file(path: str | Path, store: Store, *, fingerprint: str | None = None,
                tvm_version: str | None = None) -> ImportResult:
    """Validates every line of a file and appends the usable records to `store`.

    Skipped, each with its line and reason: invalid lines, records of another TVM release line (their
    traces cannot be replayed here), and records already in the store. Records for another fingerprint
    than `fingerprint` are imported into their own file (they are never applied to another target) and
    counted in `other_targets`. Without `fingerprint`, every target's records are simply imported.
    """
    tvm_version = tvm_version or installed_tvm_version()
    result = ImportResult()
    valid = []
    for lineno, record, reason in iter_lines(path):
        if record is None:
            result.skipped.append(f"{path}:{lineno}: {reason}")
        elif record.release != tvm_release(tvm_version):
            result.skipped.append(f"{path}:{lineno}: {compatible(record, record.fingerprint, tvm_version)[1]}")
        elif (problem := module_problem(record)) is not None:
            result.skipped.append(f"{path}:{lineno}: {problem}")
        else:
            valid.append((lineno, record))
        result.valid += record is not None
    with store._lock(exclusive=True):
        seen = {r.identity() for fp in {r.fingerprint for _, r in valid} for r in store._read(fp, None)}
    new = []
    for lineno, record in valid:
        ident = record.identity()
        if ident in seen:
            result.skipped.append(f"{path}:{lineno}: already in the store")
            continue
        seen.add(ident)
        new.append(record)
        if fingerprint and record.fingerprint != fingerprint:
            label = f"{record.target_name} ({record.fingerprint[:8]}…)"
            result.other_targets[label] = result.other_targets.get(label, 0) + 1
    result.imported = store.append(new)
    return result


# ----------------------------------------------------------------------------------------------------------
# Versions and devices


def installed_tvm_version() -> str:
    """The TVM version, read from package metadata so that TVM itself is not imported."""
    for dist in ("apache-tvm", "tvm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    import tvm

    return tvm.__version__


def edgecc_version() -> str:
    """This package's version."""
    try:
        return metadata.version("edgecc")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def cpu_model() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine() or "unknown"


def host_device() -> str:
    """'host:<cpu model>', naming the machine that measured a record."""
    return f"host:{cpu_model()}"


def utc_now() -> str:
    """ISO-8601 UTC timestamp, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------
# MetaSchedule conversions (TVM imported here only)


def to_ms_database(records: Iterable[Record], log: Callable[[str], None] | None = None):
    """A MetaSchedule MemoryDatabase holding exactly these records, for MetaScheduleApplyDatabase.

    Failed records are left out: a lone failed schedule must never be applied. The caller chooses the
    records (usually `Store.best(fingerprint, tvm_version)`); this function does not check the target.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.MemoryDatabase()
    workloads: dict[str, Any] = {}
    warn = log or (lambda m: warnings.warn(m, TuningLogWarning, stacklevel=3))
    for r in records:
        if not r.ok:
            continue
        if r.mod not in workloads:
            problem = module_problem(r)
            if problem is not None:  # a poisoned record must not break every compile for its target
                warn(f"task {r.task}: record skipped: {problem}")
                continue
            workload = db.commit_workload(tvm.ir.load_json(r.mod))
            shash = str(workload.as_json()[0])
            if shash != r.shash:
                msg = (f"task {r.task}: recorded hash {r.shash} but this TVM hashes the workload to {shash}; "
                       "MetaSchedule will match it by the module, not the recorded hash")
                warn(msg)
            workloads[r.mod] = workload
        db.commit_tuning_record(ms.database.TuningRecord.from_json(
            [r.trace, list(r.run_secs), r.target, r.args_info], workloads[r.mod]))
    return db


def module_problem(record: Record) -> str | None:
    """Why a record's workload does not deserialize to a TVM IRModule, or None when it does."""
    import tvm

    try:
        mod = tvm.ir.load_json(record.mod)
    except Exception as e:  # TVM raises its own error types for every malformed graph
        return f"workload module does not deserialize ({type(e).__name__})"
    if not isinstance(mod, tvm.IRModule):
        return f"workload is a {type(mod).__name__}, not an IRModule"
    return None


def _task_name(mod) -> str:
    """The PrimFunc's global_symbol (tuning renames the function itself 'main')."""
    for gv, func in mod.functions_items():
        attrs = getattr(func, "attrs", None)
        if attrs is not None and "global_symbol" in attrs:
            return str(attrs["global_symbol"])
        return gv.name_hint
    return "unknown"


def _canonical_target(target) -> str:
    """Comparable text of a target: str(Target) depends on attribute order, which a JSON round trip changes."""
    import tvm

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    return json.dumps(json.loads(str(target)), sort_keys=True)  # str(Target) is its JSON


def from_ms_database(db_or_workdir, *, target_name: str, fingerprint: str, device: str,
                     target: Any = None, task_names: dict[str, str] | None = None,
                     tvm_version: str | None = None) -> list[Record]:
    """Edgecc records for what MetaSchedule measured (a Database, or a JSONDatabase work dir).

    `target` (a tvm Target or dict) keeps only records measured for that target: a reused work dir can
    hold several. `task_names` maps workload shash to a display name (e.g. from extract_tasks).
    `trials` of a record is its position among its workload's records, i.e. trials so far.
    A run_secs of 1e10 (MetaSchedule's failure marker) becomes an error record with run_secs [].
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    if isinstance(db_or_workdir, (str, os.PathLike)):
        workdir = Path(db_or_workdir)
        if not (workdir / "database_workload.json").is_file():
            raise UserError(f"{workdir}: not a MetaSchedule work dir (no database_workload.json)")
        db = ms.database.JSONDatabase(work_dir=str(workdir), allow_missing=False)
    else:
        db = db_or_workdir
    want = _canonical_target(target) if target is not None else None
    tvm_version = tvm_version or tvm.__version__
    version, date = edgecc_version(), utc_now()
    trials: dict[str, int] = {}
    mods: dict[str, tuple[str, str]] = {}
    out = []
    for rec in db.get_all_tuning_records():
        trace, run_secs, _, args_info = rec.as_json()
        if want is not None and _canonical_target(rec.target) != want:
            continue
        shash = str(rec.workload.as_json()[0])
        if shash not in mods:
            mods[shash] = (tvm.ir.save_json(rec.workload.mod), _task_name(rec.workload.mod))
        mod_json, name = mods[shash]
        trials[shash] = trials.get(shash, 0) + 1
        secs = [float(s) for s in run_secs or []]
        if not secs or any(s >= FAILED_RUN_SECS for s in secs):
            secs, error = [], "build or run failed (MetaSchedule's run_secs=1e10; see its work dir logs)"
        else:
            error = None
        out.append(validate({
            "format": FORMAT, "task": (task_names or {}).get(shash, name),
            "workload": {"shash": shash, "mod": mod_json}, "trace": trace, "args_info": args_info,
            "run_secs": secs, "error": error, "target": json.loads(str(rec.target)), "target_name": target_name,
            "fingerprint": fingerprint, "device": device, "tvm_version": tvm_version,
            "edgecc_version": version, "trials": trials[shash], "date": date,
        }))
    return out


def records_for(target: TargetDesc, logs=(), store=None, log: Callable[[str], None] = lambda _m: None):
    """The best record per workload that applies to `target`, from log files and the store.

    Records for another target fingerprint or TVM release are never applied; each file says how
    many of its records were set aside and why.
    """
    fingerprint, version = target.fingerprint(), installed_tvm_version()
    best: dict[str, Record] = {}
    sources = []
    if store is not False:
        store_ = Store(store)
        sources.append((str(store_.root), list(store_.best(fingerprint, version).values())))
    for path in logs:
        sources.append((str(path), read_records(path, log=log)))
    for source, records in sources:
        skipped: dict[str, int] = {}
        for r in records:
            ok, reason = compatible(r, fingerprint, version, target.name)
            if not ok or not r.ok:
                key = reason if not ok else "failed measurement"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            if r.shash not in best or r.mean_secs < best[r.shash].mean_secs:
                best[r.shash] = r
        for reason, n in skipped.items():
            log(f"tuning records: {source}: skipped {n} ({reason})")
    return list(best.values())

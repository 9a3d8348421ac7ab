"""`edgecc logs`: list, show, merge, export, import and prune the tuning-record store."""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from edgecc.core import tuning_log as tl
from edgecc.core.target import load_target
from edgecc.errors import UserError


def _log(msg: str) -> None:
    print(f"[edgecc] {msg}", file=sys.stderr, flush=True)


def _store(a: argparse.Namespace) -> tl.Store:
    """The store named by --store, or the default one; a --store that is a file is the user's mistake."""
    store = tl.Store(a.store)
    if a.store and Path(a.store).exists() and not Path(a.store).is_dir():
        raise UserError(f"{a.store}: --store must be a directory, this is a file")
    return store


def _table(rows: list[list[str]], header: list[str], indent: str = "") -> None:
    """Prints left-aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _select(records: list[tl.Record], selector: str | None, store: tl.Store) -> list[tl.Record]:
    """Records whose fingerprint starts with `selector` or whose target name is `selector`."""
    if not selector:
        return records
    chosen = [r for r in records if r.fingerprint.startswith(selector) or r.target_name == selector]
    if not chosen:
        known = sorted({f"{r.target_name} ({r.fingerprint})" for r in records}) or ["none"]
        raise UserError(f"no tuning records for '{selector}' in {store.root} (there are: {', '.join(known)})")
    return chosen


def _fingerprint_of(selector: str | None, store: tl.Store) -> str | None:
    """A full fingerprint from a fingerprint prefix or target name found in the store."""
    if not selector:
        return None
    fps = sorted({r.fingerprint for r in _select(store.records(log=_log), selector, store)})
    if len(fps) > 1:
        raise UserError(f"'{selector}' names several fingerprints in {store.root}: {', '.join(fps)}")
    return fps[0]


def _read_user_file(path: str) -> list[tl.Record]:
    """A file the user gave: it must exist and hold at least one valid record."""
    skipped: list[str] = []
    records = tl.read_records(Path(path), log=skipped.append)
    for msg in skipped:
        _log(msg)
    if not records:
        raise UserError(f"{path}: no valid tuning records ({len(skipped)} lines skipped)")
    return records


def cmd_list(a: argparse.Namespace) -> int:
    """One row per fingerprint: records, workloads, devices, TVM versions, newest date."""
    store = _store(a)
    records = store.records(log=_log)
    if not records:
        print(f"no tuning records in {store.root}")
        return 0
    groups: dict[str, list[tl.Record]] = defaultdict(list)
    for r in records:
        groups[r.fingerprint].append(r)
    rows = []
    for fp, rs in sorted(groups.items()):
        failed = sum(not r.ok for r in rs)
        rows.append([fp, ", ".join(sorted({r.target_name for r in rs})),
                     f"{len(rs)}" + (f" ({failed} failed)" if failed else ""),
                     str(len({r.shash for r in rs})), ", ".join(sorted({r.device for r in rs})),
                     ", ".join(sorted({r.tvm_version for r in rs})), max(r.date for r in rs)])
    _table(rows, ["FINGERPRINT", "TARGET", "RECORDS", "WORKLOADS", "DEVICES", "TVM", "NEWEST"])
    print(f"store: {store.root}")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    """Per workload of each fingerprint: task, best time, trials, device and date of the best record."""
    store = _store(a)
    records = _select(store.records(log=_log), a.selector, store)
    if not records:
        print(f"no tuning records in {store.root}")
        return 0
    groups: dict[tuple[str, str], list[tl.Record]] = defaultdict(list)
    for r in records:
        groups[(r.fingerprint, r.release)].append(r)
    for (fp, release), rs in sorted(groups.items()):
        print(f"{fp}  {', '.join(sorted({r.target_name for r in rs}))}  TVM {release}")
        rows = []
        by_workload: dict[str, list[tl.Record]] = defaultdict(list)
        for r in rs:
            by_workload[r.shash].append(r)
        for shash, wrs in by_workload.items():
            best = tl.top_k(wrs, 1)[0]
            time = f"{best.mean_secs * 1e3:.4f}" if best.ok else "failed"
            rows.append([best.task, shash[:10], time, str(max(r.trials for r in wrs)), best.device,
                         best.date, best.error or ""])
        rows.sort(key=lambda row: row[0])
        _table(rows, ["TASK", "SHASH", "BEST MS", "TRIALS", "DEVICE", "DATE", "ERROR"], indent="  ")
        print()
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    """Merges record files or store directories into the store, keeping the best per workload."""
    store = _store(a)
    records = []
    for src in a.sources:  # all read and checked before anything is rewritten
        if Path(src).is_dir():
            records += tl.Store(src).records(log=_log)
        else:
            records += _read_user_file(src)
    kept = tl.merge_records(records, store)
    for fp, n in kept.items():
        print(f"{fp}: {n} records kept (best per workload)")
    print(f"merged {len(a.sources)} source(s) into {store.root}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """Writes the store (or one target's records) to one portable .jsonl or .jsonl.gz file."""
    store = _store(a)
    fingerprint = _fingerprint_of(a.target, store)
    try:
        n = store.export(a.output, fingerprint)
    except OSError as e:
        raise UserError(f"{a.output}: cannot write there: {e.strerror}") from None
    if not n:
        raise UserError(f"no tuning records to export in {store.root}")
    print(f"wrote {n} records to {a.output}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    """Imports a record file; reports records for other targets and every skipped line with its reason."""
    store = _store(a)
    fingerprint = None
    if a.target:
        fingerprint = load_target(a.target).fingerprint()
    result = tl.import_file(a.file, store, fingerprint=fingerprint)
    if not result.valid:
        raise UserError(f"{a.file}: no valid tuning records ({len(result.skipped)} lines skipped)")
    print(f"imported {result.imported} records from {a.file} into {store.root}")
    for label, n in result.other_targets.items():
        print(f"  {n} for other target {label}: kept in their own file, never applied to {a.target}")
    if result.skipped:
        print(f"skipped {len(result.skipped)}:")
        for msg in result.skipped[:20]:
            print(f"  {msg}")
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20} more")
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    """Keeps the k best records per workload."""
    if a.keep < 1:
        raise UserError(f"--keep {a.keep}: must be at least 1")
    store = _store(a)
    for fp, (before, after) in store.prune(a.keep, _fingerprint_of(a.target, store)).items():
        print(f"{fp}: {before} -> {after} records")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `logs` and its actions on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS,
                        help="tuning-record store (default $EDGECC_TUNING_DIR or ~/.cache/edgecc/tuning)")
    p = subparsers.add_parser("logs", help="inspect and move tuning records",
                              description="Tuning records, one JSONL file per target fingerprint.")
    p.add_argument("--store", metavar="DIR", default=None, help=argparse.SUPPRESS)
    actions = p.add_subparsers(dest="action", required=True)

    s = actions.add_parser("list", parents=[common], help="records per target fingerprint")
    s.set_defaults(func=cmd_list)
    s = actions.add_parser("show", parents=[common], help="best record per workload")
    s.add_argument("selector", nargs="?", help="target name or fingerprint (prefix) in the store")
    s.set_defaults(func=cmd_show)
    s = actions.add_parser("merge", parents=[common], help="merge record files or stores into the store")
    s.add_argument("sources", nargs="+", help=".jsonl / .jsonl.gz files or store directories")
    s.set_defaults(func=cmd_merge)
    s = actions.add_parser("export", parents=[common], help="write records to one portable file")
    s.add_argument("output", help="file to write (.jsonl, or .jsonl.gz for gzip)")
    s.add_argument("--target", help="only this target name or fingerprint (prefix)")
    s.set_defaults(func=cmd_export)
    s = actions.add_parser("import", parents=[common], help="import a record file into the store")
    s.add_argument("file", help=".jsonl or .jsonl.gz file")
    s.add_argument("--target", "-t", help="the target you compile for (name or .toml): records for "
                                          "other targets are reported")
    s.set_defaults(func=cmd_import)
    s = actions.add_parser("prune", parents=[common], help="keep the k best records per workload")
    s.add_argument("--keep", "-k", type=int, default=1, help="records kept per workload (default 1)")
    s.add_argument("--target", help="only this target name or fingerprint (prefix)")
    s.set_defaults(func=cmd_prune)
    return p

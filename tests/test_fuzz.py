"""Fuzzing the CLI with bad input: hostile manifests, corrupt .npz inputs, corrupt tuning logs and
mutated ONNX models, each through `edgecc.cli.main` in this process (an interpreter start per case
would cost seconds). Every case must end with exit 0, or 2 with one `edgecc: error:` line, or 1
with one `edgecc: verification failed:` line: never a traceback, never a signal (it would end the
test process), nothing written beside its input but the output it was asked for.

Seeded: a failure names its class and seed, and `EDGECC_FUZZ_SEED` replays one seed. The default
run makes FUZZ_CASES cases; `pytest -m fuzz` runs FUZZ_CASES_LONG more.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from edgecc import cli
import edgecc
from edgecc.runtime import artifact
from tests.test_artifact_safety import matmul_relu_model
from tests.test_tuning_log import record

FUZZ_CASES = 400
FUZZ_CASES_LONG = 5000
# (class, share of the cases). ONNX cases compile, so they are the fewest.
CLASSES = (("manifest", 0.4), ("npz", 0.25), ("logs", 0.28), ("onnx", 0.07))

HOSTILE_STRINGS = ["../evil.so", "/etc/passwd", "..", ".", "", "a/b", "\0", "x" * 5000, "model.so/..",
                   "/dev/zero", "manifest.json", "~/.ssh/id_rsa", "C:\\evil.dll"]
HOSTILE_NUMBERS = [-1, 0, 1 << 62, 2 ** 64, -(2 ** 63), 1e308, float("nan"), True, None, "7", [], {}]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """What the mutations start from: a model, its artifact, a good inputs .npz, a good record file."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    model = matmul_relu_model(root / "m.onnx")
    edgecc.compile(model, target="host", output=root / "art", pipeline="simplify")
    buf = io.BytesIO()
    np.savez(buf, x=np.ones((2, 32), np.float32))
    records = "".join(json.dumps(record(trials=i)) + "\n" for i in range(3))
    return {"model": model, "artifact": root / "art", "npz": buf.getvalue(), "records": records}


def _mutate_value(rng: random.Random, value):
    """A hostile replacement for a JSON value, or a mutation inside it."""
    choice = rng.random()
    if isinstance(value, dict) and value and choice < 0.5:
        value = dict(value)
        key = rng.choice(list(value))
        if rng.random() < 0.3:
            del value[key]
        else:
            value[key] = _mutate_value(rng, value[key])
        return value
    if isinstance(value, list) and value and choice < 0.5:
        value = list(value)
        i = rng.randrange(len(value))
        value[i] = _mutate_value(rng, value[i])
        return value
    if choice < 0.75:
        return rng.choice(HOSTILE_STRINGS + HOSTILE_NUMBERS)
    nested: object = 0
    for _ in range(rng.choice([10, 1000, 100000])):
        nested = [nested]
    return nested


def _manifest_case(rng: random.Random, seeds: dict, work: Path) -> list[str]:
    art = shutil.copytree(seeds["artifact"], work / "art")
    manifest = json.loads((art / artifact.MANIFEST).read_text())
    for _ in range(rng.randint(1, 3)):
        manifest = _mutate_value(rng, manifest)
    try:
        data = json.dumps(manifest).encode()
    except (RecursionError, ValueError):
        data = b"[" * 200000
    if rng.random() < 0.2:
        data = data[: rng.randrange(len(data) + 1)]
    (art / artifact.MANIFEST).write_bytes(data)
    if rng.random() < 0.8:  # re-signed, as someone who knows the format would
        (art / artifact.MANIFEST_DIGEST).write_text(hashlib.sha256(data).hexdigest())
    if rng.random() < 0.2:
        victim = rng.choice(sorted(p.name for p in art.iterdir()))
        (art / victim).unlink()
    return ["run", str(art)]


def _corrupt_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.random()
    if kind < 0.3:
        return bytes(data[: rng.randrange(len(data))])
    if kind < 0.7:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    at = rng.randrange(len(data))
    return bytes(data[:at] + os.urandom(rng.randint(1, 64)) + data[at:])


def _npz_case(rng: random.Random, seeds: dict, work: Path) -> list[str]:
    path = work / "in.npz"
    if rng.random() < 0.3:  # a well-formed file with the wrong names, dtypes or shapes
        shape = rng.choice([(2, 32), (0, 32), (2, 31), (1 << 20, 32), (2,), (2, 32, 1)])
        dtype = rng.choice([np.float32, np.float64, np.int64, np.bool_, np.float16])
        name = rng.choice(["x", "y", "", "x" * 300])
        count = int(np.prod(shape))
        array = np.zeros(shape, dtype) if count < (1 << 22) else np.zeros((2, 32), dtype)
        np.savez(path, **{name or "arr_0": array})
    else:
        path.write_bytes(_corrupt_bytes(rng, seeds["npz"]))
    args = ["run", str(seeds["artifact"]), "--inputs", str(path)]
    if rng.random() < 0.5:
        args += ["--output", str(work / rng.choice(["out.npz", "missing/out.npz", "."]))]
    return args


def _logs_case(rng: random.Random, seeds: dict, work: Path) -> list[str]:
    lines = seeds["records"].splitlines(keepends=True)
    kind = rng.random()
    if kind < 0.5:
        i = rng.randrange(len(lines))
        obj = _mutate_value(rng, json.loads(lines[i]))
        try:
            lines[i] = json.dumps(obj) + "\n"
        except (RecursionError, ValueError):
            lines[i] = "[" * 200000 + "\n"
        data = "".join(lines).encode()
    else:
        data = _corrupt_bytes(rng, "".join(lines).encode())
    name = "records.jsonl"
    if rng.random() < 0.3:
        name += ".gz"
        data = gzip.compress(data)
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
    (work / name).write_bytes(data)
    return ["logs", "import", str(work / name), "--store", str(work / "store")]


def _onnx_case(rng: random.Random, seeds: dict, work: Path) -> list[str]:
    model = onnx.load(seeds["model"])
    kind = rng.random()
    if kind < 0.4:
        data = _corrupt_bytes(rng, model.SerializeToString())
    else:
        m = copy.deepcopy(model)
        what = rng.choice(["opset", "dim", "op", "input", "attr", "dtype"])
        if what == "opset":
            m.opset_import[0].version = rng.choice([0, 1, 6, 99, 10 ** 6])
        elif what == "dim":
            dim = m.graph.input[0].type.tensor_type.shape.dim[rng.randrange(2)]
            choice = rng.choice([0, -1, 1 << 62, 2 ** 40, "N", ""])
            if isinstance(choice, int):
                dim.dim_value = choice
            else:
                dim.dim_param = choice
        elif what == "op":
            m.graph.node[rng.randrange(len(m.graph.node))].op_type = rng.choice(
                ["Div", "Gather", "Reshape", "NoSuchOp", "Loop", "Softmax"])
        elif what == "input":
            m.graph.node[rng.randrange(len(m.graph.node))].input[0] = rng.choice(["", "nowhere", "y"])
        elif what == "attr":
            m.graph.node[0].attribute.append(helper.make_attribute(rng.choice(["axis", "perm"]),
                                                                   rng.choice([5, -9, [1, 0], 1 << 40])))
        else:
            m.graph.input[0].type.tensor_type.elem_type = rng.choice([0, 8, 16, 2, 99])
        data = m.SerializeToString()
    (work / "m.onnx").write_bytes(data)
    return ["compile", str(work / "m.onnx"), "--target", "host", "-o", str(work / "out"), "--pipeline",
            rng.choice(["simplify", "simplify,fuse", "block-sparsity{sparsity=nan}"])]


MAKERS = {"manifest": _manifest_case, "npz": _npz_case, "logs": _logs_case, "onnx": _onnx_case}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_case(kind: str, seed: int, seeds: dict, root: Path) -> str | None:
    """One case; a description of what went wrong, or None."""
    work = root / f"{kind}-{seed}"
    work.mkdir()
    rng = random.Random(f"{kind}:{seed}")
    args = MAKERS[kind](rng, seeds, work)
    before = _files(work)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("edgecc: ")]
    where = f"{kind} seed {seed} ({' '.join(a[:80] for a in args)})"
    if "Traceback" in err.getvalue() or code not in (0, 1, 2):
        return f"{where}: exit {code}\n{err.getvalue()[-3000:]}"
    if code == 2 and not (len(lines) == 1 and lines[0].startswith("edgecc: error: ")):
        return f"{where}: exit 2 without one error line: {err.getvalue()[-500:]}"
    if code == 1 and not (len(lines) == 1 and lines[0].startswith("edgecc: verification failed: ")):
        return f"{where}: exit 1 that is not a verification failure: {err.getvalue()[-500:]}"
    allowed = {"out", "out.npz", "store"} if code == 0 else {"store"}
    stray = sorted(p for p in _files(work) - before if p.split(os.sep)[0] not in allowed)
    if stray:
        return f"{where}: exit {code} left {stray[:5]}"
    shutil.rmtree(work, ignore_errors=True)
    return None


def _cases(count: int, offset: int = 0) -> list[tuple[str, int]]:
    if os.environ.get("EDGECC_FUZZ_SEED"):
        kind, _, seed = os.environ["EDGECC_FUZZ_SEED"].partition(":")
        return [(kind, int(seed))]
    return [(kind, offset + i) for kind, share in CLASSES for i in range(round(count * share))]


def _fuzz(cases, seeds, root) -> None:
    failures = [f for f in (_run_case(kind, seed, seeds, root) for kind, seed in cases) if f]
    assert not failures, f"{len(failures)} of {len(cases)} cases failed; first:\n" + "\n\n".join(failures[:3])


def test_fuzz_the_cli(seeds, tmp_path):
    _fuzz(_cases(FUZZ_CASES), seeds, tmp_path)


@pytest.mark.fuzz
def test_fuzz_the_cli_long(seeds, tmp_path):
    _fuzz(_cases(FUZZ_CASES_LONG, offset=FUZZ_CASES), seeds, tmp_path)

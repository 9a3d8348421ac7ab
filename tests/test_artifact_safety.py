"""Artifacts are closed sets and edgecc deletes only what it wrote: hostile manifests, careless
-o/--force, stale staging directories, racing compiles."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc import cli
import edgecc
from edgecc.errors import UserError
from edgecc.runtime import artifact, emulator


def matmul_relu_model(path):
    """x [N, 32] @ W [32, 32] then Relu: W is 4 KiB, so the artifact stores it in weights.bin."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = matmul_relu_model(root / "m.onnx")
    edgecc.compile(model, target="host", output=root / "art", pipeline="simplify")
    return model, root / "art"


@pytest.fixture
def art(built, tmp_path):
    """A fresh copy of the built artifact to tamper with."""
    return shutil.copytree(built[1], tmp_path / "art")


def _rewrite_manifest(path, edit):
    """Edit the manifest and re-sign it, as a hostile author who knows the format would."""
    manifest = json.loads((path / artifact.MANIFEST).read_text())
    edit(manifest)
    data = json.dumps(manifest).encode()
    (path / artifact.MANIFEST).write_bytes(data)
    (path / artifact.MANIFEST_DIGEST).write_text(hashlib.sha256(data).hexdigest())


def _load_error(path) -> str:
    with pytest.raises(UserError) as e:
        artifact.Artifact.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_built_artifact_loads_and_runs(art):
    out = artifact.Artifact.load(art).run({"x": np.ones((2, 32), np.float32)})
    assert out["y"].shape == (2, 32)
    assert (art / "weights.bin").is_file() and (art / artifact.MANIFEST_DIGEST).is_file()


def test_an_edited_manifest_is_refused_before_anything_is_opened(art):
    text = (art / artifact.MANIFEST).read_text().replace('"model.so"', '"../evil.so"', 1)
    (art / artifact.MANIFEST).write_text(text)
    assert "does not match manifest.sha256" in _load_error(art)


@pytest.mark.parametrize("library", ["../evil.so", "/tmp/evil.so", ".hidden.so", "sub/model.so"])
def test_the_library_must_be_a_listed_file_inside_the_artifact(art, tmp_path, library):
    evil = tmp_path / "evil.so"
    evil.write_bytes(b"not loaded")
    _rewrite_manifest(art, lambda m: m["build"].update(library=library))
    assert "build.library" in _load_error(art)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", ".manifest"])
def test_files_entries_outside_the_artifact_are_refused(art, name):
    _rewrite_manifest(art, lambda m: m["files"].update({name: {"sha256": "0", "bytes": 0}}))
    assert f"files entry '{name}' is not a plain file name" in _load_error(art)


def test_an_unlisted_library_is_never_loaded_unhashed(art):
    _rewrite_manifest(art, lambda m: m["files"].pop("model.so"))
    assert "build.library 'model.so' is not a file the manifest lists" in _load_error(art)


def test_a_symlinked_file_is_refused(art, tmp_path):
    (art / "report.md").unlink()
    (art / "report.md").symlink_to(tmp_path / "elsewhere.md")
    assert "'report.md' listed in the manifest is missing or not a regular file" in _load_error(art)


@pytest.mark.parametrize("tensor", [{"offset": 1 << 40}, {"dtype": "object"}, {"shape": [1 << 62]},
                                    {"bytes": -1}])
def test_weight_entries_must_fit_the_file(art, tensor):
    _rewrite_manifest(art, lambda m: m["build"]["weights"]["tensors"][0].update(tensor))
    assert "weights tensor 0" in _load_error(art)


@pytest.mark.parametrize("decode", ["decode", {"shapes": {}}, {"shapes": {"nope": [1]}}, {"shapes": {"x": [1, "N"]}}])
def test_the_decode_entry_names_inputs_and_static_shapes(art, decode):
    """build.decode picks the function for feeds of those shapes: only inputs of the model and
    static shapes (the function itself is always `decode`, of the same library)."""
    _rewrite_manifest(art, lambda m: m["build"].update(decode=decode))
    assert "build.decode.shapes is not an object of input names and static shapes" in _load_error(art)


def test_tokenizer_path_must_be_a_listed_file(art):
    _rewrite_manifest(art, lambda m: m.update(lm={"tokenizer": "../../../../etc/passwd"}))
    assert "lm.tokenizer" in _load_error(art)


def test_deeply_nested_manifest_is_a_one_line_error(art):
    data = b"[" * 100000 + b"]" * 100000
    (art / artifact.MANIFEST).write_bytes(data)
    (art / artifact.MANIFEST_DIGEST).write_text(hashlib.sha256(data).hexdigest())
    assert "corrupt manifest" in _load_error(art)


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_force_replaces_only_an_artifact_or_an_empty_directory(built, tmp_path, capsys):
    model, _ = built
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    code, err = _cli(capsys, "compile", model, "--target", "host", "--pipeline", "simplify", "-o", keep, "--force")
    assert code == 2 and "not an edgecc artifact and not empty" in err
    assert (keep / "mine.txt").read_text() == "precious"


def test_force_never_replaces_the_source_models_directory(tmp_path, capsys, monkeypatch):
    proj = tmp_path / "proj"
    proj.mkdir()
    model = matmul_relu_model(proj / "m.onnx")
    # Even if the directory looks like an artifact, it holds the source model.
    (proj / artifact.MANIFEST).write_text("{}")
    (proj / artifact.MANIFEST_DIGEST).write_text("0")
    code, err = _cli(capsys, "compile", model, "--target", "host", "-o", proj, "--force")
    assert code == 2 and "holding" in err and model.is_file()
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, err = _cli(capsys, "compile", model, "--target", "host", "-o", ".", "--force")
    assert code == 2 and "holding" in err


def test_output_under_a_file_is_a_one_line_error(built, tmp_path, capsys):
    model, _ = built
    (tmp_path / "file").write_text("x")
    code, err = _cli(capsys, "compile", model, "--target", "host", "-o", tmp_path / "file" / "out")
    assert code == 2 and "is not a directory" in err


def test_a_second_writer_of_the_same_output_fails_clearly(tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another edgecc process is writing this output"):
            with artifact.staged_output(out, force=False):
                pass
    assert not out.exists()


def test_stale_staging_directories_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, foreign = tmp_path / ".out.abc", tmp_path / ".out.def", tmp_path / ".out.ghi"
    for d, pid in ((stale, dead.pid), (live, os.getpid())):
        d.mkdir()
        (d / artifact.STAGING_MARKER).write_text(f"{pid}\n")
    foreign.mkdir()  # no marker: not edgecc's
    with artifact.staged_output(tmp_path / "out", force=False) as stage:
        (stage / "f").write_text("x")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert (tmp_path / "out" / "f").is_file() and not (tmp_path / "out" / artifact.STAGING_MARKER).exists()
    assert not (tmp_path / ".out.lock").exists()


def test_run_output_into_a_directory_leaves_nothing_behind(art, tmp_path, capsys):
    target = tmp_path / "outdir"
    target.mkdir()
    code, err = _cli(capsys, "run", art, "--output", target)
    assert code == 2 and "is a directory" in err
    assert list(tmp_path.glob("*.npz")) == [] and list(target.iterdir()) == []


def test_emulator_clean_removes_only_its_own_cache(tmp_path):
    mine = tmp_path / "projects"
    mine.mkdir()
    (mine / "work.txt").write_text("x")
    with pytest.raises(UserError, match="not an edgecc emulator cache"):
        emulator.clean(mine)
    with pytest.raises(UserError, match="not an edgecc emulator cache"):
        emulator.clean(mine / "work.txt")
    assert (mine / "work.txt").is_file()
    cache = tmp_path / "emu"
    cache.mkdir()
    (cache / emulator.STAMP).write_text("{}")
    emulator.clean(cache)
    assert not cache.exists()


def test_logs_export_with_nothing_to_export_keeps_the_file(tmp_path, capsys):
    out = tmp_path / "records.jsonl"
    out.write_text("keep me\n")
    code, err = _cli(capsys, "logs", "export", out, "--store", tmp_path / "empty-store")
    assert code == 2 and "no tuning records" in err
    assert out.read_text() == "keep me\n"


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd"])
def test_a_tokenizer_named_by_metadata_must_lie_beside_the_model(tmp_path, capsys, name):
    model = onnx.load(matmul_relu_model(tmp_path / "m.onnx"))
    helper.set_model_props(model, {"edgecc.lm.tokenizer": json.dumps(name)})
    onnx.save(model, tmp_path / "m.onnx")
    code, err = _cli(capsys, "compile", tmp_path / "m.onnx", "--target", "host", "-o", tmp_path / "out")
    assert code == 2 and "not a file in the model's directory" in err
    assert not (tmp_path / "out").exists()

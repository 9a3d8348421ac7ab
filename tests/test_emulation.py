"""aarch64 artifacts run under qemu-user against ONNX Runtime on the source model.

`make test` builds the emulator cache first when it is missing (about a minute, needs root and
the package registries); later runs reuse it. Outside CI, a machine that cannot build it skips
these tests with the reason; in CI (CI=true) that is a failure, so the tier cannot silently vanish.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

import edgecc
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.errors import EdgeccError, UserError
from edgecc.runtime import emulator
from edgecc.runtime.artifact import write_manifest

pytestmark = pytest.mark.emulation


@pytest.fixture(scope="module")
def emu():
    try:
        return emulator.setup()
    except UserError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"aarch64 emulator unavailable: {e}")


@pytest.fixture(scope="module")
def rpi4_artifact(example_path, tmp_path_factory):
    """rpi4_artifact(example name) -> (model path, artifact dir), compiled once per module."""
    root = tmp_path_factory.mktemp("rpi4")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            model = example_path(name)
            cache[name] = (model, edgecc.compile(model, "rpi4", root / name).path)
        return cache[name]

    return get


def _copy_with(art, dest, section: str, **changes):
    """A copy of an artifact with manifest[section] changed, written as edgecc writes manifests."""
    shutil.copytree(art, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest[section].update(changes)
    write_manifest(dest, manifest)
    return dest


@pytest.mark.parametrize("name", ["mlp", "tiny-lm"])
def test_matches_onnxruntime(emu, rpi4_artifact, name):
    model_path, art = rpi4_artifact(name)
    model = onnx.load(model_path)
    feeds = random_inputs(model, seed=1, dim_values={"seq": 8})
    got = emulator.run_artifact(art, feeds)
    result = compare(run_ort(model, feeds), got)
    assert result.ok, result.detail


def test_quantized_pipeline_matches_onnxruntime_on_its_int8_graph(emu, example_path, tmp_path):
    art = edgecc.compile(example_path("tiny-lm"), "rpi4", tmp_path / "int8",
                         "simplify,fuse,quantize-int8{smoothquant=0.5}", keep_reference=True)
    # compile itself verified it under emulation, against the int8 graph and the fp32 bound
    assert art.manifest["verification"]["runner"] == "qemu-user emulation"
    assert art.manifest["verification"]["ok"]
    opt = onnx.load(str(art.path / "model.opt.onnx"))
    assert any(n.op_type == "MatMulInteger" for n in opt.graph.node)
    feeds = random_inputs(opt, seed=5, dim_values={"batch": 2, "seq": 6})
    reference = run_ort(opt, feeds)
    atol = max(np.abs(r).max() for r in reference.values()) / 127  # one int8 step of the range
    result = compare(reference, emulator.run_artifact(art.path, feeds), tolerance=(atol, 0.0))
    assert result.ok, result.detail


def test_an_lm_step_runs_its_decode_function(emu, example_path, tmp_path):
    """The runner in the emulated environment picks `decode` for a one-token step as
    Artifact.run does; compile verified both functions there against ORT."""
    art = edgecc.compile(example_path("tiny-llama"), "rpi4", tmp_path / "lm")
    assert "decode" in art.manifest["build"]
    for check in (art.manifest["verification"], art.manifest["verification"]["decode"]):
        assert check["ok"] and check["runner"] == "qemu-user emulation"
    assert art.manifest["verification"]["decode"]["input_shapes"]["ids"] == [1, 1]


def test_threads_do_not_change_results(emu, rpi4_artifact):
    model_path, art = rpi4_artifact("tiny-lm")
    feeds = random_inputs(onnx.load(model_path), seed=2, dim_values={"seq": 8})
    one, four = (emulator.run_artifact(art, feeds, threads=n) for n in (1, 4))
    for name in one:
        np.testing.assert_allclose(one[name], four[name], rtol=1e-5, atol=1e-6)


def test_setup_is_idempotent(emu):
    assert emulator.setup() == emu
    st = emulator.status()
    assert st["ok"], st["reason"]
    assert st["tvm"] == emulator.TVM_VERSION and "cortex-a72" in st["qemu_cpus"]


def test_corrupted_cache_is_reported(emu, tmp_path):
    fake = tmp_path / "emu"
    fake.mkdir()
    for sub in ("rootfs", "site"):  # the real tree, so only the stamp is wrong
        (fake / sub).symlink_to(emu / sub)
    stamp = json.loads((emu / emulator.STAMP).read_text())

    (fake / emulator.STAMP).write_text(json.dumps(stamp))
    assert emulator.status(fake)["ok"]

    (fake / emulator.STAMP).write_bytes(b"\x00garbage{")
    st = emulator.status(fake)
    assert not st["ok"] and "corrupt" in st["reason"]

    (fake / emulator.STAMP).write_text(json.dumps(dict(stamp, tvm="0.1.0")))
    st = emulator.status(fake)
    assert not st["ok"] and "0.1.0" in st["reason"]

    (fake / emulator.STAMP).unlink()
    st = emulator.status(fake)
    assert not st["ok"] and "missing" in st["reason"]


def test_not_set_up_is_a_user_error(rpi4_artifact, tmp_path):
    model_path, art = rpi4_artifact("mlp")
    feeds = random_inputs(onnx.load(model_path))
    with pytest.raises(UserError, match="edgecc emulator setup"):
        emulator.run_artifact(art, feeds, cache_dir=tmp_path / "nothing")


@pytest.mark.parametrize("target, message", [
    ({"device_kind": "cuda"}, "CUDA artifacts need a GPU"),
    ({"host_arch": "x86_64"}, "only aarch64 CPU artifacts"),
])
def test_refuses_other_targets(emu, rpi4_artifact, tmp_path, target, message):
    model_path, art = rpi4_artifact("mlp")
    fake = _copy_with(art, tmp_path / "fake", "target", **target)
    with pytest.raises(UserError, match=message):
        emulator.run_artifact(fake, random_inputs(onnx.load(model_path)))


def test_bad_inputs_are_a_user_error(emu, rpi4_artifact):
    _, art = rpi4_artifact("mlp")
    with pytest.raises(UserError, match="missing"):
        emulator.run_artifact(art, {"wrong": np.zeros((1, 64), np.float32)})


def test_failure_inside_emulation_reports_its_last_line(emu, rpi4_artifact, tmp_path):
    model_path, art = rpi4_artifact("mlp")
    broken = _copy_with(art, tmp_path / "broken", "build", library="report.md")  # not a library
    with pytest.raises(EdgeccError, match="emulated run failed: .+") as info:
        emulator.run_artifact(broken, random_inputs(onnx.load(model_path)))
    assert not isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_setup_without_registry_access_is_a_clear_user_error(tmp_path, monkeypatch):
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("needs root and debootstrap to reach the download step")
    monkeypatch.setattr(emulator, "MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    with pytest.raises(UserError, match="debootstrap failed.*check access to http://127.0.0.1:9/debian"):
        emulator.setup(tmp_path / "emu")
    assert not (tmp_path / "emu").exists()  # nothing half-built is left as the cache

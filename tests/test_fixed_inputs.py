"""`--const`: graph inputs fixed to values at compile time (edgecc.core.fixed_inputs)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest

import edgecc
from edgecc.errors import UserError
from tests.conftest import parse_model, run_cli

# The axes and the k arrive as graph inputs, as ONNX's own node tests feed them: TVM needs both
# at compile time.
AXES_AND_K = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[3, 5, 6] x, int64[1] axes, int64[1] k) => (float[3, 1, 6] s, float[3, 5, 2] top) {
    s = ReduceSum <keepdims = 1> (x, axes)
    top, idx = TopK <axis = -1> (x, k)
}
"""


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(parse_model(AXES_AND_K).SerializeToString())
    return path


def _feeds(axes: int = 1, k: int = 2) -> dict:
    x = np.random.default_rng(0).standard_normal((3, 5, 6)).astype(np.float32)
    return {"x": x, "axes": np.array([axes], np.int64), "k": np.array([k], np.int64)}


def test_refusal_names_the_flag(model, tmp_path):
    with pytest.raises(UserError, match=r"graph input 'axes'.*--const axes=VALUES"):
        edgecc.compile(model, "host", tmp_path / "out")


def test_fixed_inputs_compile_verify_and_run_like_ort(model, tmp_path):
    art = edgecc.compile(model, "host", tmp_path / "out", constants={"axes": [1], "k": [2]})
    assert art.manifest["verification"]["max_abs"] < 1e-4
    assert [i["name"] for i in art.inputs] == ["x"]
    assert art.manifest["constants"]["axes"] == {"dtype": "int64", "shape": [1], "value": [1]}
    feeds = _feeds()
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    for got in (art.run(feeds), art.run({"x": feeds["x"]})):  # ORT's feeds, or without the fixed ones
        np.testing.assert_allclose(got["s"], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["top"], want[1], rtol=1e-5, atol=1e-5)


def test_a_different_value_at_run_time_is_refused(model, tmp_path):
    art = edgecc.compile(model, "host", tmp_path / "out", constants={"axes": [1], "k": [2]}, verify=False)
    with pytest.raises(UserError, match=r"input 'axes' was fixed to \[1\].*got \[2\]"):
        art.run(_feeds(axes=2))
    with pytest.raises(UserError, match=r"input 'k' was fixed to \[2\].*int32"):
        art.run({**_feeds(), "k": np.array([2], np.int32)})


@pytest.mark.parametrize("const, message", [
    ("nope=1", "--const nope: "),
    ("axes=1.5", "--const axes: [1.5] are not all int64 values"),
    ("axes=1,2", "--const axes: 2 values for an input of shape [1]"),
    ("axes", "--const axes: expected NAME=VALUE"),
    ("axes=one", "--const axes=one: values must be numbers"),
])
def test_bad_const_is_one_line(model, tmp_path, const, message):
    out = tmp_path / "out"
    res = run_cli("compile", model, "-o", out, "--const", const, "--const", "k=2")
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("edgecc: error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.stderr, res.stderr
    assert not out.exists()


def test_cli_const_and_a_tampered_record(model, tmp_path):
    out = tmp_path / "out"
    res = run_cli("compile", model, "-o", out, "--const", "axes=1", "--const", "k=2", "-q")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["constants"]["k"]["value"] == [2]
    manifest["constants"]["k"]["value"] = ["2; rm -rf /"]
    data = json.dumps(manifest).encode()
    (out / "manifest.json").write_bytes(data)
    with pytest.raises(UserError, match="does not match manifest.sha256"):
        edgecc.Artifact.load(out)
    (out / "manifest.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")  # a deliberate edit
    with pytest.raises(UserError, match=r"constants.k is not an object with a dtype"):
        edgecc.Artifact.load(out)

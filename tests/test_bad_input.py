"""Every user mistake: one clear line naming the culprit, exit code 2, nothing written."""

from __future__ import annotations

import onnx
import pytest

from tests.conftest import parse_model, run_cli

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    y = Relu(x)
}
"""

NO_CONVERTER = """
<ir_version: 8, opset_import: ["" : 17, "my.ops" : 1]>
g (float[N, 4] x) => (float[N, 4] y) {
    h = Relu(x)
    y = my.ops.Frobnicate <strength = 3> (h)
}
"""


@pytest.fixture
def good_model(tmp_path):
    path = tmp_path / "good.onnx"
    path.write_bytes(parse_model(MLP_TEXT).SerializeToString())
    return path


def _assert_user_error(res, *fragments, out=None):
    assert res.returncode == 2, (res.returncode, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("edgecc: error: ")]
    assert len(errors) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, res.stderr)
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], \
            "staging directory left behind"


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", tmp_path / "nope.onnx", "-o", out), "nope.onnx: no such file",
                       out=out)


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a model\n")
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", bad, "-o", out), "notes.onnx: not", out=out)


def test_truncated_onnx_file(tmp_path, example_path):
    data = example_path("mlp").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", bad, "-o", out), "truncated.onnx:", out=out)


def test_model_failing_the_checker(tmp_path):
    model = parse_model(MLP_TEXT)
    model.graph.node[0].input[0] = "undefined_tensor"
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", bad, "-o", out), "broken.onnx: fails the ONNX checker", out=out)


def test_missing_external_data(tmp_path, example_path):
    model = onnx.load(str(example_path("mlp")))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", path, "-o", out), "missing external data file", out=out)


def test_unknown_target(good_model, tmp_path):
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", good_model, "--target", "rpi9", "-o", out),
                       "unknown target 'rpi9'", "rpi4", out=out)


def test_bad_pipeline_string_shows_the_position(good_model, tmp_path):
    out = tmp_path / "out"
    res = run_cli("compile", good_model, "--pipeline", "simplify{onnxsim=true", "-o", out)
    _assert_user_error(res, "bad pipeline at position 21", out=out)


def test_unknown_pass_suggests_closest(good_model, tmp_path):
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", good_model, "--pipeline", "simplify,fsue", "-o", out),
                       "unknown pass 'fsue'; did you mean 'fuse'?", out=out)


def test_unknown_option_suggests_closest(good_model, tmp_path):
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", good_model, "--pipeline", "simplify{onnxsimm=true}", "-o", out),
                       "has no option 'onnxsimm'; did you mean 'onnxsim'?", out=out)


def test_op_without_a_converter_fails_before_building(tmp_path):
    path = tmp_path / "custom.onnx"
    path.write_bytes(parse_model(NO_CONVERTER).SerializeToString())
    out = tmp_path / "out"
    res = run_cli("compile", path, "--pipeline", "simplify", "-o", out)
    _assert_user_error(res, "op my.ops.Frobnicate cannot be lowered", "hint:", out=out)
    assert "building for" not in res.stderr  # refused before the long work


def test_existing_output_dir_is_refused(good_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_user_error(run_cli("compile", good_model, "-o", out), "output directory exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_dim_option(good_model, tmp_path):
    out = tmp_path / "out"
    res = run_cli("compile", good_model, "--dim", "N=zero", "-o", out)
    _assert_user_error(res, "--dim 'N=zero'", out=out)


def test_run_on_a_directory_that_is_not_an_artifact(tmp_path):
    _assert_user_error(run_cli("run", tmp_path), "not an edgecc artifact")


def test_run_with_unreadable_inputs(tmp_path, good_model):
    out = tmp_path / "art"
    assert run_cli("compile", good_model, "-o", out, "--pipeline", "simplify").returncode == 0
    bad = tmp_path / "in.npz"
    bad.write_text("nope")
    _assert_user_error(run_cli("run", out, "--inputs", bad), "in.npz: not a readable .npz file")


def test_print_ir_after_a_pass_not_in_the_pipeline(good_model, tmp_path):
    out = tmp_path / "out"
    _assert_user_error(run_cli("compile", good_model, "--print-ir-after", "fsue", "-o", out),
                       "--print-ir-after: no pass 'fsue'; did you mean 'fuse'?", out=out)


@pytest.mark.parametrize("name", ["tiny-lm", "tiny-llama"])
def test_example_into_an_unwritable_place(tmp_path, name):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_cli("example", name, "-o", blocker / "sub" / "m.onnx")
    assert r.returncode == 2 and "cannot create its directory" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 2  # description + error


def _npz_variants(tmp_path):
    """A good .npz cut short, one with a flipped data byte (bad CRC), one whose header claims 4 TiB."""
    import io
    import zipfile

    import numpy as np

    good = io.BytesIO()
    np.savez(good, x=np.ones((2, 4), np.float32))
    data = good.getvalue()
    flipped = bytearray(data)
    flipped[data.find(b"\x93NUMPY") + 100] ^= 0xFF
    header = np.lib.format.header_data_from_array_1_0(np.ones(1, np.float32))
    header["shape"] = (1 << 40,)
    huge = io.BytesIO()
    with zipfile.ZipFile(huge, "w") as z, z.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 16)
    out = {}
    for name, blob in (("truncated", data[: len(data) // 2]), ("crc", bytes(flipped)), ("huge", huge.getvalue())):
        out[name] = tmp_path / f"{name}.npz"
        out[name].write_bytes(blob)
    return out


@pytest.mark.parametrize("kind", ["truncated", "crc", "huge"])
def test_corrupt_npz_is_one_line_and_allocates_nothing(tmp_path, kind):
    from edgecc.core.calibration import read_npz
    from edgecc.errors import UserError

    path = _npz_variants(tmp_path)[kind]
    with pytest.raises(UserError, match=f"{kind}.npz: not a readable .npz file") as e:
        read_npz(path)
    assert "\n" not in str(e.value)


def test_a_device_file_is_not_read_as_a_model(tmp_path):
    _assert_user_error(run_cli("compile", "/dev/zero", "--target", "host", "-o", tmp_path / "out"),
                       "/dev/zero: not a regular file")


def test_nan_option_values_are_refused(good_model, tmp_path):
    _assert_user_error(run_cli("compile", good_model, "--pipeline", "block-sparsity{sparsity=nan}",
                               "-o", tmp_path / "out"), "option 'sparsity' expects")


def _with(model_text: str, edit) -> onnx.ModelProto:
    model = parse_model(model_text)
    edit(model)
    return model


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.opset_import[0].__setattr__("version", 99), "imports ONNX opset 99"),
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 1 << 62),
     "more than 2^32 elements"),
    (lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", -4), "negative dimension"),
])
def test_models_no_engine_could_hold(tmp_path, edit, fragment):
    path = tmp_path / "m.onnx"
    path.write_bytes(_with(MLP_TEXT, edit).SerializeToString())
    _assert_user_error(run_cli("compile", path, "--target", "host", "-o", tmp_path / "out"), fragment,
                       out=tmp_path / "out")


def test_threads_must_be_positive(good_model, tmp_path):
    res = run_cli("run", tmp_path, "--threads", "-3")
    assert res.returncode == 2 and "--threads: expected a whole number of 1 or more" in res.stderr



def test_a_huge_dim_for_verification_is_one_line(good_model, tmp_path):
    _assert_user_error(run_cli("compile", good_model, "--target", "host", "-o", tmp_path / "out",
                               "--dim", f"N={1 << 62}"), "too large to draw verification data", out=tmp_path / "out")


def test_model_too_large_for_memory_is_refused_before_any_pass(tmp_path):
    """A model whose compile cannot fit fails in one line with the estimate, not by an OOM kill: its
    275 GB of weights live in a sparse external-data file, which nothing reads before the check."""
    n = 1 << 18
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[n, n])
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(4 * n * n))):
        weight.external_data.add(key=key, value=value)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, n])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])], [weight])
    path = tmp_path / "big.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with open(tmp_path / "big.onnx.data", "wb") as f:
        f.truncate(4 * n * n)  # sparse: no disk blocks
    out = tmp_path / "art"
    _assert_user_error(run_cli("compile", path, "-o", out), "big.onnx: compiling it needs about",
                       "274.88 GB of weights", "GB of memory is available", "--no-memory-check", out=out)

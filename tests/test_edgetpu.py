"""The Edge TPU target end to end: compile, the flatbuffer itself, the prediction, verification, errors."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgecc
from edgecc.backends.edgetpu import predict
from edgecc.core.target import load_target
from edgecc.errors import UserError, VerificationError
from edgecc.runtime.artifact import Artifact
from tests import edgetpu_models
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> (onnx path, calibration .npz, artifact), each compiled once per module."""
    root = tmp_path_factory.mktemp("edgetpu")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            path = edgetpu_models.BUILDERS[name](root / f"{name}.onnx")
            cal = root / f"{name}.npz"
            np.savez(cal, **edgetpu_models.calibration(name))
            art = edgecc.compile(
                str(path), target="coral-edgetpu", output=str(root / f"{name}-art"), calibration=str(cal)
            )
            cache[name] = (path, cal, art)
        return cache[name]

    return get


def _flatbuffer(art: Artifact):
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf((art.path / "model.tflite").read_bytes(), 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    return fb, model, names


# --- the target ---------------------------------------------------------------------------------


def test_target_is_a_tflite_backend_listed_with_the_others():
    t = load_target("coral-edgetpu")
    assert t.backend == "tflite" and not t.lowers_to_tvm and t.device_kind == "edgetpu"
    assert "BATCH_MATMUL" not in t.edgetpu["ops"] and t.edgetpu["ops"]["CONV_2D"] == 3
    res = run_cli("targets")
    assert res.returncode == 0 and "coral-edgetpu" in res.stdout and "edgetpu" in res.stdout


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (
            lambda s: s.replace('backend = "tflite"', 'backend = "tflite"\n[tvm]\nkind = "llvm"'),
            "key 'tvm' does not apply to backend 'tflite'",
        ),
        (
            lambda s: s.replace('backend = "tflite"', 'backend = "onnx"'),
            "key 'backend' must be one of tvm, tflite",
        ),
        (
            lambda s: s.replace("CONV_2D = 3", "CONV_2X = 3"),
            "key 'edgetpu.ops.CONV_2X' is not a TFLite builtin",
        ),
        (lambda s: s.replace("max_inner_dims = 3", ""), "missing key 'edgetpu.max_inner_dims'"),
        (
            lambda s: s.replace("min_cosine = 0.98", "min_cosine = 'high'"),
            "key 'edgetpu.verify.min_cosine' has the wrong",
        ),
    ],
)
def test_malformed_edgetpu_table_names_file_and_key(tmp_path, mutate, fragment):
    f = tmp_path / "tpu.toml"
    f.write_text(mutate(Path(load_target("coral-edgetpu").source).read_text()))
    with pytest.raises(UserError) as e:
        load_target(str(f))
    assert str(e.value).startswith(str(f)) and fragment in str(e.value)


def test_tuning_a_tflite_target_is_a_clear_error(built):
    from edgecc.autotune.tuning import tune

    path, _, _ = built("mlp")
    with pytest.raises(UserError, match="backend 'tflite': it is not lowered to TVM"):
        tune(str(path), "coral-edgetpu", shapes={"batch": 1})


# --- models that map fully, and one that does not ------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_maps_fully_and_matches_fp32(built, name):
    _, _, art = built(name)
    p = json.loads((art.path / "edgetpu_predict.json").read_text())
    assert p["mac_coverage"] == 1.0 and p["ops_on_cpu"] == 0 and p["segment_ends_at"] is None
    assert all(o["status"] == predict.MAPPED for o in p["ops"])
    v = art.manifest["verification"]
    assert (
        v["cosine_vs_fp32"] >= v["min_cosine"] == 0.98
        and v["relative_rmse_vs_fp32"] <= v["max_relative_rmse"]
    )
    assert v["relative_rmse_vs_fp32"] < 0.03  # int8 end to end on a small model: about 1%
    log = (art.path / "edgetpu_compiler.log").read_text()
    assert log.startswith(predict.LABEL) and "Operator                       Count      Status" in log


def test_transformer_block_maps_up_to_its_first_activation_matmul(built):
    _, _, art = built("transformer")
    p = art.manifest["edgetpu"]["prediction"]
    end = p["segment_ends_at"]
    assert end["op"] == "BATCH_MATMUL" and end["status"] == predict.NOT_SUPPORTED
    _, model, names = _flatbuffer(art)
    ops = [names[model.operatorCodes[o.opcodeIndex].builtinCode] for o in model.subgraphs[0].operators]
    assert ops.index("BATCH_MATMUL") == end["index"]  # the first one ends the segment
    assert ops[: end["index"]].count("CONV_2D") == 1  # the QKV projection, as a 1x1 conv, is on the TPU
    assert 0.1 < p["mac_coverage"] < 0.5
    report = (art.path / "report.md").read_text()
    assert (
        "PREDICTED — not compiled" in report
        and "the segment ends at op" in report
        and "BATCH_MATMUL" in report
    )
    assert art.manifest["verification"]["cosine_vs_fp32"] > 0.99


# --- the flatbuffer itself ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["convnet", "transformer"])
def test_flatbuffer_is_fully_int8_static_with_no_edge_conversions(built, name):
    _, _, art = built(name)
    fb, model, names = _flatbuffer(art)
    sub = model.subgraphs[0]
    codes = {names[model.operatorCodes[o.opcodeIndex].builtinCode] for o in sub.operators}
    assert not codes & {"QUANTIZE", "DEQUANTIZE"}
    for t in sub.tensors:
        assert all(d >= 1 for d in t.shape)  # static
        if t.buffer == 0 or t.type == fb.TensorType.INT8:  # activations and weights
            assert t.type == fb.TensorType.INT8 and t.quantization.scale is not None
        else:  # biases (quantized) and shape/axis operands
            assert t.type == fb.TensorType.INT32
    for i in (*sub.inputs, *sub.outputs):
        assert sub.tensors[i].type == fb.TensorType.INT8
    io = {s["name"]: s for s in art.manifest["edgetpu"]["tflite_inputs"]}
    assert io["x"]["scale"] > 0 and -128 <= io["x"]["zero_point"] <= 127
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[code.builtinCode]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            weights, bias = sub.tensors[op.inputs[1]], sub.tensors[op.inputs[2]]
            channels = weights.shape[0 if name == "CONV_2D" else 3]
            assert len(weights.quantization.scale) == channels and code.version == 3  # per channel
            in_scale = sub.tensors[op.inputs[0]].quantization.scale[0]
            np.testing.assert_allclose(
                bias.quantization.scale, in_scale * np.asarray(weights.quantization.scale), rtol=1e-6
            )
        if name == "FULLY_CONNECTED":
            assert len(sub.tensors[op.inputs[1]].quantization.scale) == 1 and code.version == 4  # per tensor


# --- running, calibration policy, host part --------------------------------------------------------


def test_run_cli_runs_the_artifact_in_litert(built, tmp_path):
    path, _, art = built("convnet")
    assert "model.opt.onnx" not in art.manifest["files"]  # the device needs model.tflite, not the graph
    x = edgetpu_models.calibration("convnet", 1, seed=5)["x"]
    np.savez(tmp_path / "in.npz", x=x)
    res = run_cli("run", art.path, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz")
    assert res.returncode == 0, res.stderr
    assert "y: float32 [1, 10]" in res.stdout and "LiteRT" in res.stderr
    with np.load(tmp_path / "out.npz") as z:
        from edgecc.core.verify import run_ort

        ref = run_ort(onnx.load(str(path)), {"x": x})["y"]
        assert np.corrcoef(z["y"].ravel(), ref.ravel())[0, 1] > 0.99
    res = run_cli("run", art.path)  # random inputs from the manifest's signatures
    assert res.returncode == 0 and "y: float32 [1, 10]" in res.stdout, res.stderr


def test_without_calibration_it_calibrates_on_synthetic_inputs_and_says_so(built, tmp_path):
    path, _, _ = built("mlp")
    res = run_cli("compile", path, "--target", "coral-edgetpu", "-o", tmp_path / "a")
    assert res.returncode == 0, res.stderr
    assert "warning: no --calibration" in res.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["edgetpu"]["calibration"] == {"source": "synthetic", "samples": 8}


def _embedding_model(path):
    """ids -> Gather(table) -> linear -> Relu: the lookup goes to the host."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((50, 16)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_embedding_lookup_is_left_to_the_host(tmp_path):
    path = _embedding_model(tmp_path / "emb.onnx")
    np.savez(tmp_path / "cal.npz", ids=np.random.default_rng(1).integers(0, 50, (12, 6)))
    art = edgecc.compile(
        str(path), target="coral-edgetpu", output=str(tmp_path / "a"), calibration=str(tmp_path / "cal.npz")
    )
    facts = art.manifest["edgetpu"]
    assert facts["host_model"] == "host.onnx" and facts["host_outputs"] == ["emb"]
    assert [s["name"] for s in facts["tflite_inputs"]] == ["emb"]
    assert "Host part" in (art.path / "report.md").read_text()
    from edgecc.runtime.litert import run_artifact

    out = run_artifact(art, {"ids": np.array([[1, 2, 3, 4, 5, 6]], np.int64)})
    assert out["y"].shape == (1, 6, 8) and art.manifest["edgetpu"]["prediction"]["mac_coverage"] == 1.0
    # Without model.opt.onnx, random ids come from the range the manifest records: rows of the table.
    assert "model.opt.onnx" not in art.manifest["files"] and art.inputs[0]["range"] == [0, 50]
    res = run_cli("run", art.path, "--seed", "3")
    assert res.returncode == 0 and "y: float32 [1, 6, 8]" in res.stdout, res.stderr


# --- bad input and limits ---------------------------------------------------------------------------


def _relu_model(path, shape, op: str = "Relu"):
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    "shape,op,fragment",
    [
        ([2, 8], "Relu", "input 'x' has batch 2 (dim 0): the Edge TPU target compiles batch 1"),
        (["batch", "seq", 8], "Relu", "input 'x': dim 1 ('seq') is symbolic"),
        ([1, 8], "Sin", "node 'Sin_0' (Sin): no int8 TFLite form"),
    ],
)
def test_bad_models_get_one_line_errors(tmp_path, shape, op, fragment):
    path = _relu_model(tmp_path / "m.onnx", shape, op)
    res = run_cli("compile", path, "--target", "coral-edgetpu", "-o", tmp_path / "a")
    assert res.returncode == 2 and fragment in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "a").exists()


def test_a_tensor_with_more_than_three_inner_dims_is_reported(tmp_path):
    path = _relu_model(tmp_path / "m.onnx", [1, 2, 3, 4, 5])
    art = edgecc.compile(str(path), target="coral-edgetpu", output=str(tmp_path / "a"))
    p = art.manifest["edgetpu"]["prediction"]
    assert p["table"] == [{"operator": "RELU", "count": 1, "status": predict.RANK}]
    assert "dim > 1 outside the 3 innermost" in p["segment_ends_at"]["why"]


def test_outside_the_verification_bounds_the_compile_fails(built, tmp_path):
    path, cal, _ = built("mlp")
    strict = tmp_path / "strict.toml"
    strict.write_text(
        Path(load_target("coral-edgetpu").source)
        .read_text()
        .replace("max_relative_rmse = 0.2", "max_relative_rmse = 0.0001")
    )
    with pytest.raises(VerificationError, match=r"relative RMS error 0.0\d+ \(at most 0.0001\)"):
        edgecc.compile(str(path), target=str(strict), output=str(tmp_path / "a"), calibration=str(cal))
    assert not (tmp_path / "a").exists()


# --- edgetpu_compiler: its log, and running it when installed ----------------------------------------

# The table format of edgetpu_compiler 16.0's output, as it prints it (stdout and the .log file).
COMPILER_LOG = """Edge TPU Compiler version 16.0.384591198
Started a compilation timeout timer of 180 seconds.

Model compiled successfully in 120 ms.

Input model: model.tflite
Input size: 74.05KiB
Output model: model_edgetpu.tflite
Output size: 120.51KiB
On-chip memory used for caching model parameters: 60.25KiB
On-chip memory remaining for caching model parameters: 7.69MiB
Off-chip memory used for streaming uncached model parameters: 0.00B
Number of Edge TPU subgraphs: 1
Total number of operations: 47
Operation log: model_edgetpu.log

Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the model will instead run on the CPU, which is slower. If possible, consider updating your model to use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.
Number of operations that will run on Edge TPU: 17
Number of operations that will run on CPU: 30

Operator                       Count      Status

MEAN                           2          Mapped to Edge TPU
BATCH_MATMUL                   2          Operation not supported
RSQRT                          1          Operation is otherwise supported, but not mapped due to some unspecified limitation
"""


def test_parse_log_reads_the_compilers_table():
    parsed = predict.parse_log(COMPILER_LOG)
    assert parsed["ops_on_edgetpu"] == 17 and parsed["ops_on_cpu"] == 30
    assert parsed["table"][1] == {"operator": "BATCH_MATMUL", "count": 2, "status": predict.NOT_SUPPORTED}
    assert parsed["table"][2]["status"] == predict.LIMITATION
    with pytest.raises(ValueError, match="no 'Operator Count Status' table"):
        predict.parse_log("Edge TPU Compiler version 16.0\nInvalid model: model.tflite\n")


def test_an_installed_compiler_is_run_and_compared(built, tmp_path):
    path, cal, _ = built("transformer")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "edgetpu_compiler"
    (tmp_path / "log.txt").write_text(COMPILER_LOG)
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'log.txt'}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    res = run_cli(
        "compile", path, "--target", "coral-edgetpu", "--calibration", cal, "-o", tmp_path / "a", env=env
    )
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    compiled = manifest["edgetpu"]["compiler"]
    assert compiled["ops_on_edgetpu"] == 17 and (tmp_path / "a" / compiled["log"]).is_file()
    diffs = {(d["operator"], d["status"]): (d["predicted"], d["compiler"]) for d in compiled["differences"]}
    assert ("MEAN", predict.MAPPED) not in diffs  # both put the two LayerNorm means on the TPU
    assert diffs[("RSQRT", predict.LIMITATION)] == (0, 1)
    assert "rows where the prediction differed" in (tmp_path / "a" / "report.md").read_text()
    assert Counter(r["status"] for r in compiled["table"])[predict.MAPPED] == 1


def test_calibration_ranges_leave_out_infinities():
    """A mask's -inf (and what it makes) has no int8 level: the range is over the finite values,
    not an infinite scale and a NaN zero point."""
    from edgecc.backends.edgetpu import tflite

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    mask = numpy_helper.from_array(np.array([[0, 0, -np.inf, 0]], np.float32), "mask")
    graph = helper.make_graph([helper.make_node("Add", ["x", "mask"], ["y"])], "g", [x], [y], [mask])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ranges = tflite.calibrate(model, [{"x": np.array([[-1, 2, 3, 0.5]], np.float32)}])
    assert ranges["y"] == (-1.0, 2.0)
    assert np.isfinite(tflite.activation_quant(*ranges["y"]).scale).all()

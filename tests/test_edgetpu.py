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


def _flatbuffer(art: Artifact, file: str = "tpu0.tflite"):
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf((art.path / file).read_bytes(), 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    return fb, model, names


def _tpu_files(art: Artifact) -> list[str]:
    return [s["file"] for s in art.manifest["edgetpu"]["segments"] if s["kind"] == "edgetpu"]


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
    assert p["mac_coverage"] == 1.0 and p["segments_on_edgetpu"] == 1 and p["segments_on_host"] == 0
    assert [s["kind"] for s in art.manifest["edgetpu"]["segments"]] == ["edgetpu"]  # one segment, whole
    assert all(r["status"] == predict.MAPPED for r in p["segments"][0]["table"])
    passes = {r["pipeline_entry"].split("{")[0]: r for r in art.manifest["passes"]}
    assert not passes["equalize-channels"]["changed"]  # its tensors quantize well: nothing to cut
    v = art.manifest["verification"]
    assert (
        v["cosine_vs_fp32"] >= v["min_cosine"] == 0.98
        and v["relative_rmse_vs_fp32"] <= v["max_relative_rmse"]
    )
    assert v["relative_rmse_vs_fp32"] < 0.03  # int8 end to end on a small model: about 1%
    log = (art.path / "edgetpu_compiler.log").read_text()
    assert log.startswith(predict.LABEL) and "Operator                       Count      Status" in log
    # The model's input and output cross to the TPU and back: the transfers are their int8 bytes.
    x, y = art.manifest["inputs"][0], art.manifest["outputs"][0]
    assert p["transfers"] == {"count": 2, "bytes": int(np.prod(x["shape"]) + np.prod(y["shape"]))}


def test_transformer_block_is_cut_around_attention(built):
    _, _, art = built("transformer")
    facts = art.manifest["edgetpu"]
    p = json.loads((art.path / "edgetpu_predict.json").read_text())
    kinds = [s["kind"] for s in facts["segments"]]
    assert "host" in kinds and "edgetpu" in kinds
    host_why = {w["why"].split(":")[0] for r in p["segments"] if r["kind"] == "host" for w in r["why"]}
    assert "BATCH_MATMUL" in host_why  # Q.K^T and attention x V: activation x activation
    # Every linear layer (a 1x1 CONV_2D after linear-to-conv) is on the TPU, every op there maps.
    convs = 0
    for file in _tpu_files(art):
        _, model, names = _flatbuffer(art, file)
        convs += sum(names[model.operatorCodes[o.opcodeIndex].builtinCode] == "CONV_2D"
                     for o in model.subgraphs[0].operators)
    assert convs == 4  # QKV, output projection, the MLP's two
    assert all(t["status"] == predict.MAPPED for r in p["segments"] if r["kind"] == "edgetpu" for t in r["table"])
    assert p["mac_coverage"] > 0.9 and p["macs_total"] == sum(r["macs"] for r in p["segments"])
    tpu = [r for r in p["segments"] if r["kind"] == "edgetpu"]
    assert p["transfers"]["count"] == sum(len(r["inputs"]) + len(r["outputs"]) for r in tpu) > 2
    report = (art.path / "report.md").read_text()
    assert "What runs where — PREDICTED — not compiled" in report and "BATCH_MATMUL" in report
    assert art.manifest["verification"]["cosine_vs_fp32"] > 0.99


def test_values_crossing_a_cut_keep_one_scale_and_zero_point(built):
    """What an Edge TPU segment writes, a host segment reads with the same scale and zero point,
    and the reverse: nothing is requantized at a seam."""
    _, _, art = built("transformer")
    facts = art.manifest["edgetpu"]
    seen = 0
    for seg in facts["segments"]:
        if seg["kind"] == "edgetpu":
            fb, model, _ = _flatbuffer(art, seg["file"])
            sub = model.subgraphs[0]
            for i in (*sub.inputs, *sub.outputs):
                t = sub.tensors[i]
                q = facts["int8"][t.name.decode()]
                assert (t.quantization.scale[0], t.quantization.zeroPoint[0]) == (
                    pytest.approx(q["scale"], rel=1e-6), q["zero_point"])
                seen += 1
        else:
            host = onnx.load(str(art.path / seg["file"]))
            inits = {t.name: numpy_helper.to_array(t) for t in host.graph.initializer}
            for n in host.graph.node:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    name = n.output[0] if n.op_type == "QuantizeLinear" else n.input[0]
                    q = facts["int8"][name]
                    assert float(inits[n.input[1]]) == pytest.approx(q["scale"], rel=1e-6)
                    assert int(inits[n.input[2]]) == q["zero_point"]
                    seen += 1
    assert seen >= 8


# --- the flatbuffer itself ------------------------------------------------------------------------


@pytest.mark.parametrize("name,file", [("convnet", "tpu0.tflite"), ("transformer", "tpu1.tflite")])
def test_flatbuffer_is_fully_int8_static_with_no_edge_conversions(built, name, file):
    _, _, art = built(name)
    fb, model, names = _flatbuffer(art, file)
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
    for i in sub.inputs:
        q = art.manifest["edgetpu"]["int8"][sub.tensors[i].name.decode()]
        assert q["scale"] > 0 and -128 <= q["zero_point"] <= 127
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
    assert "model.opt.onnx" not in art.manifest["files"]  # the device needs its segments, not the graph
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
    assert [(s["kind"], s["file"], s["inputs"], s["outputs"]) for s in facts["segments"]] == [
        ("host", "host0.onnx", ["ids"], ["emb"]),
        ("edgetpu", "tpu0.tflite", ["emb"], ["y"]),
    ]
    assert "ids" not in facts["int8"] and "emb" in facts["int8"]  # ids stay int64; emb crosses as int8
    assert "reads an integer tensor" in (art.path / "report.md").read_text()
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
    ],
)
def test_bad_models_get_one_line_errors(tmp_path, shape, op, fragment):
    path = _relu_model(tmp_path / "m.onnx", shape, op)
    res = run_cli("compile", path, "--target", "coral-edgetpu", "-o", tmp_path / "a")
    assert res.returncode == 2 and fragment in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "shape,op,why",
    [
        ([1, 2, 3, 4, 5], "Relu", "RELU: Tensor has unsupported rank (up to 3 innermost dimensions mapped) "
                                  "(tensor 'x' [1, 2, 3, 4, 5] has a dim > 1 outside the 3 innermost)"),
        ([1, 8], "Sin", "node 'Sin_0' (Sin): no int8 TFLite form"),
    ],
)
def test_what_cannot_run_on_the_tpu_runs_on_the_host_and_says_why(tmp_path, shape, op, why):
    path = _relu_model(tmp_path / "m.onnx", shape, op)
    said: list[str] = []
    art = edgecc.compile(str(path), target="coral-edgetpu", output=str(tmp_path / "a"), log=said.append)
    assert any(m.startswith("warning: no op of this model is predicted to map to the Edge TPU") for m in said)
    p = art.manifest["edgetpu"]["prediction"]
    assert p["segments_on_edgetpu"] == 0 and p["mac_coverage"] == 0.0
    assert p["segments"][0]["why"][0]["why"].startswith(why)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    from edgecc.runtime.litert import run_artifact

    np.testing.assert_allclose(run_artifact(art, {"x": x})["y"], np.maximum(x, 0) if op == "Relu" else np.sin(x),
                               rtol=1e-6)


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


def test_an_installed_compiler_co_compiles_every_segment_and_is_compared(built, tmp_path):
    path, cal, _ = built("transformer")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "edgetpu_compiler"
    (tmp_path / "log.txt").write_text(COMPILER_LOG)
    # As the real one: -s -o DIR model... ; one <stem>_edgetpu.log per model, the models in one call.
    fake.write_text(
        "#!/bin/sh\n"
        f'shift; shift; out="$1"; shift; echo "$@" > {tmp_path / "args.txt"}\n'
        f'for m in "$@"; do cp {tmp_path / "log.txt"} "$out/$(basename "$m" .tflite)_edgetpu.log"; done\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    res = run_cli(
        "compile", path, "--target", "coral-edgetpu", "--calibration", cal, "-o", tmp_path / "a", env=env
    )
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    tpu = [s["file"] for s in manifest["edgetpu"]["segments"] if s["kind"] == "edgetpu"]
    assert [Path(a).name for a in (tmp_path / "args.txt").read_text().split()] == tpu and len(tpu) > 1
    compiled = manifest["edgetpu"]["compiler"]
    assert sorted(compiled["models"]) == sorted(tpu) and (tmp_path / "a" / compiled["log"]).is_file()
    for entry in compiled["models"].values():
        assert entry["ops_on_edgetpu"] == 17
        diffs = {(d["operator"], d["status"]): (d["predicted"], d["compiler"]) for d in entry["differences"]}
        assert diffs[("BATCH_MATMUL", predict.NOT_SUPPORTED)] == (0, 2)  # the prediction kept them off the TPU
    assert "rows where the prediction differed" in (tmp_path / "a" / "report.md").read_text()


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


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda e: e["segments"][0].update(file="../evil.onnx"), "edgetpu.segments[0].file"),
        (lambda e: e["segments"][0].update(kind="python"), "edgetpu.segments[0] is not an object with a kind"),
        (lambda e: e["segments"][0].update(inputs="x"), "edgetpu.segments[0] is not an object with a kind"),
        (lambda e: e.update(segments=[]), "edgetpu.segments is not a non-empty list"),
        (lambda e: e["int8"].update(x={"scale": -1.0, "zero_point": 0}), "edgetpu.int8 is not an object"),
    ],
)
def test_a_tampered_chain_is_refused_before_anything_is_opened(built, tmp_path, edit, fragment):
    import shutil

    from tests.test_artifact_safety import _load_error, _rewrite_manifest

    _, _, art = built("mlp")
    copy = shutil.copytree(art.path, tmp_path / "art")
    _rewrite_manifest(copy, lambda m: edit(m["edgetpu"]))
    assert fragment in _load_error(copy)


def test_an_encoders_padding_positions_are_left_out_of_verification(tmp_path):
    """Per-token outputs are compared where attention_mask is 1, and the manifest says so."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
            helper.make_node("Mul", ["h", "m3"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        [w, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "enc.onnx")
    mask = np.ones((6, 4), np.int64)
    mask[:, 3:] = 0
    mask[0, 2:] = 0
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((6, 4, 8)).astype(np.float32), attention_mask=mask)
    art = edgecc.compile(str(tmp_path / "enc.onnx"), target="coral-edgetpu", output=str(tmp_path / "a"),
                         calibration=str(tmp_path / "cal.npz"))
    v = art.manifest["verification"]
    assert v["positions"].startswith(f"{mask.sum()} of {mask.size} (attention_mask = 1")
    assert v["cosine_all_positions"] > 0.99 and v["cosine_vs_fp32"] > 0.99


@pytest.mark.parametrize(
    "arch,exporter",
    [pytest.param(a, e, marks=() if (a, e) == ("bert", "dynamo") else pytest.mark.models)
     for a in ("bert", "roberta", "distilbert") for e in ("dynamo", "torchscript")],
)
def test_transformers_encoders_put_their_linear_layers_on_the_tpu(tmp_path, arch, exporter):
    """Encoders as users export them: the mask arithmetic and attention run on the host, every linear
    layer on the TPU, and the chain verifies against ONNX Runtime on padded inputs."""
    from tests import hf_models

    path = hf_models.export_encoder(arch, exporter, tmp_path / "enc.onnx")
    rng = np.random.default_rng(0)
    mask = np.ones((8, 16), np.int64)
    mask[::2, 8:] = 0
    np.savez(tmp_path / "cal.npz", input_ids=rng.integers(0, 256, (8, 16)), attention_mask=mask)
    art = edgecc.compile(str(path), target="coral-edgetpu", output=str(tmp_path / "a"),
                         calibration=str(tmp_path / "cal.npz"))
    p = json.loads((art.path / "edgetpu_predict.json").read_text())
    assert p["mac_coverage"] > 0.9 and p["segments_on_host"] >= 1
    convs = sum(t["count"] for r in p["segments"] if r["kind"] == "edgetpu" for t in r["table"]
                if t["operator"] == "CONV_2D")
    assert convs == 2 * 6  # q, k, v, output, and the MLP's two per layer
    assert art.manifest["verification"]["positions"].startswith(f"{mask.sum()} of {mask.size}")


def test_a_model_fixed_at_batch_1_takes_stacked_calibration_samples(tmp_path, capsys):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32))
    art = edgecc.compile(str(tmp_path / "m.onnx"), target="coral-edgetpu", output=str(tmp_path / "a"),
                         calibration=str(tmp_path / "cal.npz"))
    assert art.manifest["edgetpu"]["calibration"] == {"source": "calibration data", "samples": 5}
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 9), np.float32))
    from edgecc import cli

    assert cli.main(["compile", str(tmp_path / "m.onnx"), "--target", "coral-edgetpu", "--calibration",
                     str(tmp_path / "bad.npz"), "-o", str(tmp_path / "b")]) == 2
    assert "'x' has shape [5, 9], the model expects [1, 8]" in capsys.readouterr().err

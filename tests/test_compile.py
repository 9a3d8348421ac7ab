"""Compile-and-run: example models on host (vs ORT), cross builds for rpi4 and Jetson."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import edgecc
from edgecc.core.digest import sha256_file
from edgecc.core.optimize import CompileOptions
from edgecc.core.pipeline import parse_pipeline
from edgecc.core.target import load_target
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.errors import UserError
from edgecc.runtime import emulator
from edgecc.runtime.artifact import Artifact, write_manifest
from tests.conftest import run_cli

EM_AARCH64 = 183
GOLDEN_PIPELINES = Path(__file__).parent / "golden" / "default_pipelines.json"


def elf_machine(path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(head[18:20], "little")


@pytest.fixture(scope="module")
def host_artifacts(example_path, tmp_path_factory):
    """Each example compiled once for host with the default pipeline."""
    root = tmp_path_factory.mktemp("host")
    cache = {}

    def get(name: str, exporter: str = "dynamo") -> Artifact:
        key = (name, exporter)
        if key not in cache:
            cache[key] = edgecc.compile(example_path(name, exporter), "host", root / f"{name}-{exporter}")
        return cache[key]

    return get


@pytest.mark.parametrize("name,exporter,dims", [
    ("tiny-lm", "dynamo", [{"batch": 1, "seq": 5}, {"batch": 2, "seq": 33}]),
    ("tiny-lm", "torchscript", [{"batch": 1, "seq": 7}, {"batch": 3, "seq": 16}]),
    ("mlp", "dynamo", [{"batch": 1}, {"batch": 5}]),
    ("convnet", "dynamo", [{"batch": 1}, {"batch": 3}]),
])
def test_host_artifact_matches_ort_at_several_shapes(host_artifacts, example_path, name, exporter, dims):
    art = host_artifacts(name, exporter)
    assert art.manifest["verification"]["ok"]
    assert art.manifest["verification"]["max_abs"] < 1e-4
    source = onnx.load(str(example_path(name, exporter)))
    for seed, dim_values in enumerate(dims, start=10):
        feeds = random_inputs(source, seed=seed, dim_values=dim_values)
        result = compare(run_ort(source, feeds), art.run(feeds))
        assert result.ok, (dim_values, result.detail)


def test_compile_options_are_one_value_the_manifest_records(example_path, tmp_path):
    art = edgecc.compile(example_path("mlp"), "host", tmp_path / "a", seed=3, dim_values={"batch": 2})
    options = art.manifest["options"]
    assert options == CompileOptions(seed=3, dim_values={"batch": 2}).to_json()
    assert options["seed"] == 3 and options["dim_values"] == {"batch": 2} and options["pipeline"] is None
    assert art.manifest["verification"]["input_shapes"]["x"][0] == 2  # the options reached verification
    with pytest.raises(TypeError, match="no_such_option"):
        edgecc.compile(example_path("mlp"), "host", tmp_path / "b", no_such_option=1)


def test_manifest_records_what_reproduces_the_build(host_artifacts):
    art = host_artifacts("tiny-lm")
    m = art.manifest
    # What ran is the host's default pipeline with every option spelled out: the string the golden
    # pins (tests/test_default_pipelines.py), which parses back to the same pipeline.
    assert m["pipeline_given"] == load_target("host").default_pipeline
    assert m["pipeline"] == json.loads(GOLDEN_PIPELINES.read_text())["host"]
    ran = parse_pipeline(m["pipeline"])
    assert str(ran.resolved()) == m["pipeline"]
    assert [p["name"] for p in m["passes"]] == [spec.name for spec in ran.passes]
    assert all(p["seconds"] >= 0 and "stats" in p for p in m["passes"])
    assert m["versions"]["apache-tvm"] == "0.27.0.post1"
    assert m["target"]["name"] == "host" and len(m["target"]["fingerprint"]) == 16
    # ids index a 512-row embedding: the range random inputs are drawn from without the graph
    assert m["inputs"] == [{"name": "ids", "dtype": "int64", "shape": ["batch", "seq"], "range": [0, 512]}]
    assert m["outputs"][0]["name"] == "logits"
    for name, info in m["files"].items():
        assert sha256_file(art.path / name) == info["sha256"]
    assert set(m["files"]) == {"model.so", "weights.bin", "report.md"}  # model.opt.onnx only if kept
    # The weights live beside the library, each tensor 64-byte aligned for a zero-copy mapping.
    stored = m["build"]["weights"]["tensors"]
    assert all(t["offset"] % 64 == 0 for t in stored)
    assert sum(t["bytes"] for t in stored) > 3 * m["files"]["model.so"]["bytes"]
    report = (art.path / "report.md").read_text()
    assert "simplify" in report and "max abs error" in report


def test_an_artifact_holds_its_weights_once(host_artifacts, example_path):
    art = host_artifacts("tiny-lm")
    files = art.manifest["files"]
    weights = {name: f["bytes"] for name, f in files.items() if name not in ("model.so", "report.md")}
    assert list(weights) == ["weights.bin"]
    source = onnx.load(str(example_path("tiny-lm")))
    initializers = sum(numpy_helper.to_array(t).nbytes for t in source.graph.initializer)
    assert 0.9 * initializers < weights["weights.bin"] < 1.1 * initializers  # once; twice would be 2x
    with pytest.raises(UserError, match="no model.opt.onnx .*--keep-reference"):
        art.reference_path


def test_a_manifest_range_that_holds_no_value_is_refused(host_artifacts, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(host_artifacts("tiny-lm").path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["inputs"][0]["range"] = [5, 5]
    write_manifest(copy, manifest)
    with pytest.raises(UserError, match=r"inputs\[0\]\.range is not \[low, high\]"):
        Artifact.load(copy)


def test_keep_reference_ships_the_graph_onnxruntime_runs_as_the_artifact(example_path, tmp_path):
    res = run_cli("compile", example_path("tiny-lm"), "-o", tmp_path / "a", "--keep-reference", "-q")
    assert res.returncode == 0, res.stderr
    art = Artifact.load(tmp_path / "a")
    assert art.manifest["options"]["keep_reference"] is True
    assert art.reference_path.name in art.manifest["files"]  # listed, so hashed and checked on load
    opt = onnx.load(str(art.reference_path))
    feeds = random_inputs(opt, seed=3, dim_values={"seq": 4})
    result = compare(run_ort(opt, feeds), art.run(feeds))
    assert result.ok, result.detail


def test_threads_option_gives_the_same_numbers(host_artifacts):
    art = host_artifacts("mlp")
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    one, two = art.run(feeds, threads=1)["y"], art.run(feeds, threads=2)["y"]
    np.testing.assert_allclose(one, two, rtol=1e-6, atol=1e-6)


def test_cli_run_with_npz_and_without(host_artifacts, example_path, tmp_path):
    art = host_artifacts("mlp")
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    assert "model.opt.onnx" not in art.manifest["files"]
    res = run_cli("run", art.path, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz",
                  "--threads", "2")
    assert res.returncode == 0, res.stderr
    assert "y: float32 [3, 10]" in res.stdout
    got = dict(np.load(tmp_path / "out.npz"))
    ref = run_ort(onnx.load(str(example_path("mlp"))), {"x": x})
    assert compare(ref, got).ok
    res = run_cli("run", art.path, "--dim", "batch=3")  # seeded random inputs from the manifest
    assert res.returncode == 0, res.stderr
    assert "y: float32 [3, 10]" in res.stdout and "{'x': [3, 64]}" in res.stderr


def test_run_rejects_wrong_inputs(host_artifacts):
    art = host_artifacts("mlp")
    with pytest.raises(UserError, match="missing \\['x'\\]"):
        art.run({"z": np.zeros((1, 64), np.float32)})
    with pytest.raises(UserError, match="dtype float64, expected float32"):
        art.run({"x": np.zeros((1, 64))})
    with pytest.raises(UserError, match=r"shape \[1, 63\], expected \['batch', 64\]"):
        art.run({"x": np.zeros((1, 63), np.float32)})


def test_tampered_artifact_is_refused(host_artifacts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(host_artifacts("mlp").path, copy)
    with open(copy / "model.so", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="'model.so' does not match its sha256"):
        Artifact.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="does not match manifest.sha256"):
        Artifact.load(copy)


def test_force_replaces_an_existing_artifact(example_path, tmp_path):
    out = tmp_path / "art"
    edgecc.compile(example_path("mlp"), "host", out, verify=False)
    (out / "stale.txt").write_text("old")  # a file the artifact does not list goes with it
    art = edgecc.compile(example_path("mlp"), "host", out, force=True, verify=False)
    assert not (out / "stale.txt").exists() and (out / "model.so").exists()
    assert "skipped" in art.manifest["verification"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging dirs left behind


def test_rpi4_cross_compile_is_an_aarch64_library(example_path, tmp_path):
    res = run_cli("compile", example_path("tiny-lm"), "--target", "rpi4", "-o", tmp_path / "rpi4")
    assert res.returncode == 0, res.stderr
    art = Artifact.load(tmp_path / "rpi4")
    assert elf_machine(art.path / "model.so") == EM_AARCH64
    assert "cortex-a72" in art.manifest["build"]["tvm_target"]
    assert art.manifest["target"]["host_arch"] == "aarch64"
    verification = art.manifest["verification"]
    if emulator.status()["ok"]:  # checked under qemu, exactly like a host artifact
        assert verification["ok"] and verification["runner"] == "qemu-user emulation"
    else:
        assert "edgecc emulator setup" in verification["skipped"]
    with pytest.raises(UserError, match="built for target 'rpi4'.*cannot run on this"):
        art.run(random_inputs(onnx.load(str(example_path("tiny-lm"))), dim_values={"seq": 4}))


def test_jetson_artifact_embeds_compiled_device_code(example_path, tmp_path):
    pytest.importorskip("edgecc.backends.tvm_cuda")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the Jetson backend needs it to build device code")
    from edgecc.backends.tvm_cuda import embedded_device_code

    art = edgecc.compile(example_path("tiny-lm"), "jetson-orin-nano", tmp_path / "jetson")
    lib = art.path / "model.so"
    assert elf_machine(lib) == EM_AARCH64  # the Jetson's host side is aarch64 too
    images = embedded_device_code(str(lib))
    cubins = [i for i in images if i["kind"] == "cubin"]
    assert cubins and all(i["arch"] == "sm_87" for i in cubins)
    assert not [i for i in images if i["kind"] == "cuda_source"]
    build = art.manifest["build"]
    assert build["device_code"] == "cubin" and build["kernels"] > 0
    assert json.loads((art.path / "manifest.json").read_text())["target"]["device_kind"] == "cuda"


@pytest.mark.parametrize("op, domain, opset, attrs, bias", [
    ("Gelu", "", 20, {}, False),
    ("Gelu", "", 20, {"approximate": "tanh"}, False),
    ("Gelu", "com.microsoft", 17, {}, False),
    ("FastGelu", "com.microsoft", 17, {}, True),
])
def test_gelu_forms_compile_to_fast_math_within_fp32_tolerance(tmp_path, op, domain, opset, attrs, bias):
    """GELU is lowered to erf/tanh that FastMathTransform approximates: still within 1e-4 of ORT,
    over a range where the approximations matter (|x| up to 6)."""
    from onnx import TensorProto, helper, numpy_helper

    inputs = ["x", "b"] if bias else ["x"]
    inits = [numpy_helper.from_array(np.linspace(-1, 1, 64).astype(np.float32), "b")] if bias else []
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], domain=domain, **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    path = tmp_path / "gelu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), path)
    art = edgecc.compile(path, "host", tmp_path / "a", "simplify")
    x = {"x": np.linspace(-6, 6, 256, dtype=np.float32).reshape(4, 64)}
    assert compare(run_ort(onnx.load(str(path)), x), art.run(x)).ok


def test_sigmoid_compiles_to_fast_exp_within_fp32_tolerance(tmp_path):
    """Sigmoid runs on fast_exp, which clamps its argument: exact enough at both ends (|x| to 100)
    and in between, as SiLU (x * sigmoid(x)) reads it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [4, 64])])
    path = tmp_path / "silu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    art = edgecc.compile(path, "host", tmp_path / "a", "simplify")
    x = {"x": np.concatenate([np.linspace(-100, 100, 128), np.linspace(-8, 8, 128)]).astype(np.float32).reshape(4, 64)}
    assert compare(run_ort(onnx.load(str(path)), x), art.run(x)).ok


def test_positions_from_range_of_shape_keep_their_length(tmp_path):
    """`torch.arange(ids.shape[1])` exports as Range(0, Gather(Shape(ids), 1), 1). TVM's importer
    gives its result a fresh length, and the sum with the token embeddings loses its shape;
    edgecc's Range converter keeps the length `seq`, so the model compiles with symbolic seq and
    matches ORT at several lengths."""
    torch = pytest.importorskip("torch")

    class Positions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(64, 16), torch.nn.Embedding(32, 16)

        def forward(self, ids):
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            return h @ h.transpose(1, 2) + torch.triu(torch.ones(ids.shape[1], ids.shape[1]), 1)

    torch.manual_seed(0)
    path = tmp_path / "positions.onnx"
    torch.onnx.export(Positions().eval(), (torch.randint(0, 64, (1, 5)),), str(path), input_names=["ids"],
                      output_names=["y"], dynamic_axes={"ids": {0: "b", 1: "s"}, "y": {0: "b", 1: "s", 2: "s"}},
                      dynamo=False, opset_version=17)
    assert "Range" in {n.op_type for n in onnx.load(str(path)).graph.node}
    art = edgecc.compile(path, "host", tmp_path / "art", "simplify")
    model = onnx.load(str(path))
    for s in (3, 11):
        feeds = random_inputs(model, seed=s, dim_values={"s": s})
        assert compare(run_ort(model, feeds), art.run(feeds), across_engines=True).ok, s


def test_a_compile_says_what_it_is_doing(example_path, tmp_path):
    # Each stage announces itself before it starts, with the seconds since the command began, so a
    # long compile is never silent.
    res = run_cli("compile", example_path("mlp"), "-o", tmp_path / "a", "--pipeline", "simplify,fuse")
    assert res.returncode == 0, res.stderr
    stages = ["loading", "running simplify", "running fuse", "lowering to TVM Relax", "building for host",
              "verifying the artifact", "verified against ONNX Runtime"]
    lines = [line for line in res.stderr.splitlines() if line.startswith("[edgecc ")]
    found = [next((i for i, line in enumerate(lines) if stage in line), None) for stage in stages]
    assert None not in found and found == sorted(found), res.stderr
    assert all(re.match(r"\[edgecc +\d+\.\ds\] ", line) for line in lines), res.stderr


@pytest.mark.parametrize("pipeline", [None, "simplify,fuse-siblings,quantize-int8{smoothquant=0.5}"])  # calibrates
def test_model_with_external_data_compiles_and_matches_ort(example_path, tmp_path, pipeline):
    """Every model over protobuf's 2 GB keeps its weights in an external-data file: passes read them
    there, and the lowering and ONNX Runtime take them without a copy (light_proto)."""
    model = onnx.load(str(example_path("tiny-llama")))
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), str(path), save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # saving so rewrites the proto it is given
    shutil.copy(example_path("tiny-llama").with_name("tokenizer.json"), path.parent)
    art = edgecc.compile(path, "host", tmp_path / "art", pipeline, keep_reference=True)
    assert art.manifest["verification"]["ok"]
    feeds = random_inputs(model, seed=3, dim_values={"batch": 1, "seq": 4, "past": 2})
    want, got = run_ort(model, feeds), art.run(feeds)
    # the reference holds its weights beside it, not as references into the source's file
    reference = run_ort(onnx.load(str(art.reference_path)), feeds)
    assert {k: v.shape for k, v in reference.items()} == {k: v.shape for k, v in want.items()}
    if pipeline is None:
        assert compare(want, reference).ok
        assert compare(want, got, across_engines=True).ok
    else:  # int8: near the fp32 model, as verification bounded it
        assert art.manifest["verification"]["relative_rmse_vs_fp32"] < 0.1


def test_weights_inside_the_model_are_spilled_to_a_file_for_the_compile(example_path, tmp_path, monkeypatch):
    """A model with its weights inside its protobuf is compiled from an external-data copy in a
    temporary directory (ir.spill_weights; here at any size), which is gone afterwards."""
    from edgecc.core import ir as core_ir

    monkeypatch.setattr(core_ir, "SPILL_BYTES", 0)
    monkeypatch.setattr(core_ir.tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    seen = []
    original = core_ir.spill_weights
    monkeypatch.setattr("edgecc.core.optimize.spill_weights",
                        lambda m: seen.append(original(m)) or seen[-1])
    art = edgecc.compile(example_path("tiny-llama"), "host", tmp_path / "art",
                         "simplify,fuse-siblings,quantize-int4{block=32}")
    assert seen and seen[0][1] is not None  # spilled
    assert art.manifest["verification"]["ok"]  # within the bounds its lossy passes declare
    del seen
    import gc

    gc.collect()
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_run_only_process_loads_tvms_runtime_library_alone(host_artifacts):
    """`edgecc run`, `generate` and the bench worker load TVM's runtime library, not its compiler,
    and neither onnx nor torch."""
    import subprocess
    import sys

    art = host_artifacts("mlp")
    code = ("import sys\n"
            "import numpy as np\n"
            "from edgecc.runtime.artifact import Artifact, runtime_only\n"
            "runtime_only()\n"
            "import edgecc.lm.generate\n"
            f"art = Artifact.load({str(art.path)!r})\n"
            "out = art.run({i['name']: np.ones([d if isinstance(d, int) else 1 for d in i['shape']], i['dtype'])\n"
            "               for i in art.inputs})\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(len(out), 'libtvm_runtime.so' in maps, '/libtvm.so' in maps, 'onnx' in sys.modules,\n"
            "      sys.modules.get('torch') is not None)\n")
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.stdout.split() == ["1", "True", "False", "False", "False"], res.stderr[-2000:]

"""The pass manager: ordering, reports, instruments, verify-after-each-pass, plugins."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecc.core import pass_manager
from edgecc.core.pass_base import Pass, PassContext, PassResult, registered
from edgecc.core.pass_manager import PassManager, PrintIRAfter, VerifyEachPass
from edgecc.errors import EdgeccError, VerificationError
from tests.conftest import parse_model, run_cli

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    one = Constant <value = float {1.0}> ()
    a = Mul(x, one)
    b = Identity(a)
    y = Relu(b)
}
"""


class _Perturb(Pass):
    """Deliberately wrong: scales every Relu output by 1.01."""

    name = "test-perturb"
    description = "test pass that changes the model's numbers"

    def run(self, model, ctx):
        out = model.graph.outputs[0]
        relu = out.producer()
        scale = ir.Value(name="scale", const_value=ir.tensor(np.array(1.01, np.float32)))
        model.graph.initializers["scale"] = scale
        mul = ir.node("Mul", [relu.outputs[0], scale], num_outputs=1)
        model.graph.append(mul)
        relu.outputs[0].name = "unscaled"
        mul.outputs[0].name = "y"  # same output name, different numbers
        model.graph.outputs[0] = mul.outputs[0]
        mul.outputs[0].shape, mul.outputs[0].type = out.shape, out.type
        return PassResult(model, True, {"scaled": 1})


class _Crash(Pass):
    name = "test-crash"
    description = "test pass with a bug"

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


class _ReadsShapes(Pass):
    """Records the shape of the Identity's output as the pass sees it."""

    name = "test-reads-shapes"
    description = "test pass that reads shapes"
    needs_shapes = True
    seen: list = []

    def run(self, model, ctx):
        self.seen.append(next(n for n in model.graph if n.op_type == "Identity").outputs[0].shape)
        return PassResult(model, False)


class _Warns(Pass):
    name = "test-warns"
    description = "test pass that finds nothing to do and says why"

    def run(self, model, ctx):
        return PassResult(model, False, warnings=["found nothing: no Relu"])


@pytest.fixture
def test_passes():
    with registered(_Perturb, _Crash, _ReadsShapes, _Warns):
        yield


def _model() -> ir.Model:
    return ir.from_proto(parse_model(MODEL))


def test_reports_have_timing_stats_and_node_counts():
    model, reports = PassManager("simplify").run(_model(), PassContext())
    (r,) = reports
    assert r.name == "simplify" and r.pipeline_entry == "simplify{onnxsim=true}"
    assert r.seconds > 0 and r.changed
    assert r.nodes_before == 4 and r.nodes_after < r.nodes_before
    assert r.stats["nodes_removed"] == r.nodes_before - r.nodes_after


@pytest.mark.usefixtures("test_passes")
def test_a_pass_warning_is_logged_after_its_summary():
    lines = []
    PassManager("test-warns", log=lines.append).run(_model(), PassContext())
    assert lines[-1] == "warning: test-warns: found nothing: no Relu"
    assert lines[-2].startswith("test-warns: no change")


def test_quiet_compile_still_prints_warnings(example_path, tmp_path):
    r = run_cli("compile", example_path("mlp"), "-o", tmp_path / "a", "-q", "--pipeline", "prune-heads{ratio=0.5}")
    assert r.returncode == 0, r.stderr
    (warning,) = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert "prune-heads" in warning and "removed no head" in warning
    assert r.stderr.strip() == warning  # progress and the summary stay quiet


@pytest.mark.usefixtures("test_passes")
def test_verify_each_pass_names_the_first_pass_that_drifts():
    pm = PassManager("simplify,test-perturb,simplify", instruments=(VerifyEachPass(),))
    with pytest.raises(VerificationError) as e:
        pm.run(_model(), PassContext(dim_values={"N": 3}))
    assert str(e.value).startswith("pass 'test-perturb' changed the model's outputs")
    assert "max abs error" in str(e.value)


def test_verify_each_pass_records_the_error_of_passes_that_keep_numbers():
    _, reports = PassManager("simplify", instruments=(VerifyEachPass(),)).run(_model(), PassContext())
    assert reports[0].verify["ok"] and reports[0].verify["max_abs"] <= 1e-6


@pytest.mark.usefixtures("test_passes")
def test_print_ir_after_selected_passes():
    stream = io.StringIO()
    PassManager("simplify,test-perturb", instruments=(PrintIRAfter({"test-perturb"}, stream),)).run(
        _model(), PassContext())
    text = stream.getvalue()
    assert text.count("IR after") == 1 and "IR after test-perturb" in text and "Mul" in text


@pytest.mark.usefixtures("test_passes")
def test_print_ir_after_shows_weights_by_type_not_value():
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("ReduceSum", ["h", "axes"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, axes])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    stream = io.StringIO()
    PassManager("test-perturb", instruments=(PrintIRAfter({"all"}, stream),)).run(model, PassContext())
    text = stream.getvalue()
    assert "float[8,8] w" in text and "63" not in text  # the weight's type, none of its values
    assert "int64[1] axes =  {1}" in text  # small constants stay readable


@pytest.mark.usefixtures("test_passes")
def test_a_crashing_pass_is_named():
    with pytest.raises(EdgeccError, match="pass 'test-crash' failed: ZeroDivisionError: boom"):
        PassManager("test-crash").run(_model(), PassContext())


@pytest.mark.usefixtures("test_passes")
def test_shapes_are_inferred_for_a_pass_that_needs_them_and_only_after_a_change(monkeypatch):
    real, calls = pass_manager.infer_shapes, []
    monkeypatch.setattr(pass_manager, "infer_shapes", lambda model: calls.append(1) or real(model))
    monkeypatch.setattr(_ReadsShapes, "seen", [])
    pipeline = "test-reads-shapes,test-reads-shapes,test-perturb,test-reads-shapes"
    PassManager(pipeline).run(_model(), PassContext())
    assert len(calls) == 2  # nothing changed the model between the first two
    assert len(_ReadsShapes.seen) == 3 and all(s is not None and s[1] == 4 for s in _ReadsShapes.seen)


PLUGIN = '''
import onnx_ir as ir
from edgecc import Option, Pass, PassResult


class DropIdentity(Pass):
    name = "drop-identity"
    description = "third-party pass: removes Identity nodes"
    options = (Option("keep_outputs", bool, True, "never remove a graph output"),)

    def run(self, model, ctx):
        removed = 0
        for node in list(model.graph):
            if node.op_type == "Identity" and node.outputs[0] not in model.graph.outputs:
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node, safe=True)
                removed += 1
        return PassResult(model, removed > 0, {"identity_removed": removed})
'''


@pytest.fixture
def plugin_env(tmp_path):
    """A third-party package exposing a pass through the edgecc.passes entry-point group."""
    (tmp_path / "edgecc_demo_plugin.py").write_text(PLUGIN)
    info = tmp_path / "edgecc_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgecc-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[edgecc.passes]\ndrop-identity = edgecc_demo_plugin:DropIdentity\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return env


def test_plugin_pass_is_listed_and_runs_like_a_builtin(plugin_env, tmp_path):
    listing = run_cli("passes", env=plugin_env)
    assert listing.returncode == 0
    assert "drop-identity: third-party pass: removes Identity nodes" in listing.stdout
    assert "keep_outputs=true (bool)" in listing.stdout

    model_path = tmp_path / "m.onnx"
    model_path.write_bytes(parse_model(MODEL).SerializeToString())
    out = tmp_path / "art"
    res = run_cli("compile", model_path, "--pipeline", "drop-identity{keep_outputs=true}", "-o", out,
                  "--verify", env=plugin_env)
    assert res.returncode == 0, res.stderr
    assert "identity_removed=1" in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == "drop-identity{keep_outputs=true}"
    assert manifest["passes"][0]["stats"] == {"identity_removed": 1}
    assert manifest["verification"]["ok"]


def test_unknown_pass_without_the_plugin(tmp_path):
    res = run_cli("compile", tmp_path / "x.onnx", "--pipeline", "drop-identity")
    assert res.returncode == 2 and "unknown pass 'drop-identity'" in res.stderr


"""The front end: shape arithmetic on symbolic dims (edgecc.frontend.shape_values), LM dims made one, and the
models users bring: transformers LMs of eight architectures from both torch exporters.

Tiny hand-written graphs hold each form of shape arithmetic torch exports emit; each is lowered
(its output shape must stay symbolic), compiled, and run against ONNX Runtime (its optimizations
off) at two sets of dim values. The model matrix compiles every architecture x exporter and runs
a prefill longer than the sliding window and decode steps against ONNX Runtime.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import edgecc
from edgecc.benchmark import bench
from edgecc.core import lm_signature
from edgecc.core.verify import ort_session
from edgecc.errors import UserError
from edgecc.frontend import lower
from edgecc.lm import generate
from edgecc.models import examples
from tests import hf_models
from tests.conftest import parse_model

HEAD = '<ir_version: 10, opset_import: ["" : 18]>'


def _lowered_shape(model: onnx.ModelProto) -> str:
    """The output shape of the lowered main function, as Relax states it."""
    return str(lower.to_relax(model)["main"].ret_ty.shape)


def _check_against_ort(model: onnx.ModelProto, tmp_path, feeds: list[dict]) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    artifact = edgecc.compile(path, target="host", output=tmp_path / "out", verify=False)
    session = ort_session(model, optimize=False)
    names = [o.name for o in session.get_outputs()]
    for f in feeds:
        expected = dict(zip(names, session.run(names, f)))
        got = artifact.run(f)
        for name in names:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=0)


# Reshape to [batch, seq, heads, head_dim] from Shape/Gather/Unsqueeze/Concat: dynamo's view().
VIEW = HEAD + """
g (float[B, S, 64] x) => (float[B, S, 4, 16] y) {
   zero = Constant <value = int64 {0}> ()
   one = Constant <value = int64 {1}> ()
   axes = Constant <value = int64[1] {0}> ()
   tail = Constant <value = int64[2] {4, 16}> ()
   shape = Shape (x)
   b = Gather <axis = 0> (shape, zero)
   s = Gather <axis = 0> (shape, one)
   b1 = Unsqueeze (b, axes)
   s1 = Unsqueeze (s, axes)
   target = Concat <axis = 0> (b1, s1, tail)
   y = Reshape (x, target)
}
"""

# Positions past .. past + seq over past + seq, from Range and Add on dims then tensor arithmetic
# with a dim: a kernel that reads `past` as a value, fused, crashed FuseTIR (RenewDefs).
POSITIONS = HEAD + """
g (int64[1, S] ids, float[1, 2, P, 4] cache) => (float[1, S] pos) {
   zero = Constant <value = int64 {0}> ()
   one = Constant <value = int64 {1}> ()
   two = Constant <value = int64 {2}> ()
   axes = Constant <value = int64[1] {0}> ()
   ids_shape = Shape (ids)
   cache_shape = Shape (cache)
   seq = Gather <axis = 0> (ids_shape, one)
   past = Gather <axis = 0> (cache_shape, two)
   total = Add (past, seq)
   r = Range (zero, seq, one)
   shifted = Add (r, past)
   f = Cast <to = 1> (shifted)
   last = Cast <to = 1> (total)
   ratio = Div (f, last)
   pos = Unsqueeze (ratio, axes)
}
"""

# TorchScript's expand(): -1 entries replaced through Equal/Where with ConstantOfShape's ones,
# times a shape holding Max(total, 8), a window length that becomes a dim of the result.
EXPAND = HEAD + """
g (float[1, 1, S] x, int64[1, L] mask) => (float[1, W, S] y) {
   one = Constant <value = int64 {1}> ()
   eight = Constant <value = int64 {8}> ()
   axes = Constant <value = int64[1] {0}> ()
   two1 = Constant <value = int64[1] {2}> ()
   three1 = Constant <value = int64[1] {3}> ()
   one1 = Constant <value = int64[1] {1}> ()
   sizes = Constant <value = int64[3] {1, -1, -1}> ()
   free_mark = Constant <value = int64[3] {-1, -1, -1}> ()
   mask_shape = Shape (mask)
   total = Gather <axis = 0> (mask_shape, one)
   window = Max (total, eight)
   window1 = Unsqueeze (window, axes)
   x_shape = Shape (x)
   seq1 = Slice (x_shape, two1, three1)
   wanted = Concat <axis = 0> (one1, window1, seq1)
   rank = Shape (sizes)
   ones = ConstantOfShape <value = int64[1] {1}> (rank)
   is_free = Equal (sizes, free_mark)
   free = Where (is_free, ones, sizes)
   shape = Mul (free, wanted)
   y = Expand (x, shape)
}
"""


def test_reshape_to_computed_shape_keeps_symbolic_dims(tmp_path):
    model = parse_model(VIEW)
    assert _lowered_shape(model) == "R.shape([B, S, 4, 16])"
    rng = np.random.default_rng(0)
    _check_against_ort(model, tmp_path, [{"x": rng.standard_normal((b, s, 64)).astype(np.float32)}
                                         for b, s in ((1, 5), (2, 1))])


def test_positions_from_dims(tmp_path):
    model = parse_model(POSITIONS)
    assert _lowered_shape(model) == "R.shape([1, S])"
    _check_against_ort(model, tmp_path, [{"ids": np.zeros((1, s), np.int64),
                                          "cache": np.zeros((1, 2, p, 4), np.float32)}
                                         for p, s in ((0, 6), (7, 1))])


def test_expand_to_window_from_equal_where_max(tmp_path):
    model = parse_model(EXPAND)
    assert _lowered_shape(model) == "R.shape([1, T.max(L, 8), S])"
    rng = np.random.default_rng(1)
    _check_against_ort(model, tmp_path, [{"x": rng.standard_normal((1, 1, s)).astype(np.float32),
                                          "mask": np.ones((1, t), np.int64)} for t, s in ((3, 2), (12, 5))])


def test_shape_from_tensor_data_is_refused_naming_the_node():
    model = parse_model(HEAD + """
g (float[N] x, int64[2] dims) => (float[A, B] y) {
   y = Reshape (x, dims)
}
""")
    model.graph.node[0].name = "view_from_data"
    with pytest.raises(UserError, match="node 'view_from_data': Reshape input 1 .* depends on tensor data"):
        lower.to_relax(model)


# -- the models users bring -------------------------------------------------------------------

DEFAULT_TIER = {("qwen2", "dynamo")}
# (past, seq): a prefill longer than the sliding window, one-token decode after a long cache, a
# short cache with several tokens, and several tokens that reach past the window.
STEPS = ((0, 12), (12, 1), (3, 5), (7, 5))


def _matrix(default_tier=DEFAULT_TIER):
    for arch in hf_models.ARCHITECTURES:
        for exporter in hf_models.EXPORTERS:
            marks = () if (arch, exporter) in default_tier else (pytest.mark.models,)
            yield pytest.param(arch, exporter, marks=marks, id=f"{arch}-{exporter}")


def _sliding(arch: str) -> tuple[set[int], int | None]:
    """The sliding-window layers and the window: their caches hold the last window - 1 tokens."""
    cfg = hf_models.config(arch)
    types = getattr(cfg, "layer_types", None) or []
    return {i for i, t in enumerate(types) if t == "sliding_attention"}, getattr(cfg, "sliding_window", None)


def _step_feeds(model: onnx.ModelProto, arch: str, past: int, seq: int, rng) -> dict:
    sliding, window = _sliding(arch)
    feeds = {"input_ids": rng.integers(0, 256, (1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, past + seq), np.int64)}
    for vi in model.graph.input:
        if vi.name.startswith("past_key_values."):
            _, heads, _, head_dim = (d.dim_value for d in vi.type.tensor_type.shape.dim)
            length = min(past, window - 1) if int(vi.name.split(".")[1]) in sliding else past
            feeds[vi.name] = rng.standard_normal((1, heads, length, head_dim)).astype(np.float32)
    return feeds


def _dims_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each input dim named apart: TorchScript's export names every cache's length
    alike, though a sliding-window layer's cache is shorter than a full layer's, and ONNX Runtime
    holds it to the name."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, vi in enumerate(model.graph.input):
        for axis, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param:
                dim.dim_param = f"input{i}_dim{axis}"
    return model


def _reference(model: onnx.ModelProto):
    return ort_session(_dims_apart(model), optimize=False)


@pytest.mark.parametrize("arch, exporter", list(_matrix()))
def test_hf_model_matches_onnx_runtime(hf_model, arch, exporter, tmp_path):
    path = hf_model(arch, exporter)
    model = onnx.load(path)
    artifact = edgecc.compile(path, target="host", output=tmp_path / "out", verify=False)
    session = _reference(model)
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)
    for past, seq in STEPS:
        feeds = _step_feeds(model, arch, past, seq, rng)
        expected = dict(zip(names, session.run(names, feeds)))
        got = artifact.run(feeds)
        for name in names:
            assert got[name].shape == expected[name].shape, (name, past, seq)
            error = np.abs(got[name] - expected[name]).max() / np.abs(expected[name]).max()
            assert error <= 1e-3, f"{name} at past {past}, seq {seq}: relative error {error:.2e}"


TEXT = "A user's model, benched on a byte tokenizer: perplexity needs text, any text will do. " * 6


@pytest.mark.parametrize("arch, exporter", list(_matrix(default_tier=())))
def test_hf_model_generates_and_benches(hf_model, arch, exporter, tmp_path):
    """What a user does next, with no hints: compile (verification on: LM-aware inputs), generate
    the same greedy tokens as ONNX Runtime on the export past the sliding window, and bench fp32
    against int4 (every configuration measured)."""
    path = shutil.copy(hf_model(arch, exporter), tmp_path / "model.onnx")
    examples._byte_tokenizer().save(str(tmp_path / "tokenizer.json"))  # the vocab is 256 bytes
    artifact = edgecc.compile(path, target="host", output=tmp_path / "art")
    prompt = list(range(40, 52))  # 12 tokens: longer than the sliding window of 8
    onnx.save(_dims_apart(onnx.load(path)), tmp_path / "reference.onnx")
    want = generate.greedy(generate.ort_step(str(tmp_path / "reference.onnx")), lm_signature.of_file(path),
                           prompt, 8).tokens
    sig = lm_signature.of_manifest(artifact.manifest, str(artifact.path))
    got = generate.greedy(lambda feeds: artifact.run(feeds, as_numpy=False), sig, prompt, 8).tokens
    assert got == want
    (tmp_path / "text.txt").write_text(TEXT)
    settings = bench.Settings(pipelines="fp32;int4", prompt_lengths=(8,), past=8, decode_steps=2, repeats=1,
                              windows=1, window_tokens=32, text=str(tmp_path / "text.txt"))
    # The copy ORT can run past the window (the same computation; compiled, the export itself ran above).
    result = bench.run(tmp_path / "reference.onnx", settings, tmp_path / "bench")
    names = [c["name"] for c in result["configs"]]
    assert {"ort fp32", "edgecc fp32", "edgecc int4"} <= set(names)
    for config in result["configs"]:
        assert "error" not in config, config
        assert config["decode"]["tokens_per_s"] > 0 and config["accuracy"]["perplexity"] > 1


@pytest.mark.models
@pytest.mark.parametrize("arch, exporter", [p.values for p in _matrix()])
@pytest.mark.parametrize("preset", ["int8", "int4"])
def test_hf_model_presets_pass_verification_calibrated_on_text(hf_model, arch, exporter, preset, tmp_path):
    """bench's quantized presets, calibrated on text through the byte tokenizer (the vocabulary is
    the 256 bytes), pass compile's own verification against ONNX Runtime fp32."""
    path = shutil.copy(hf_model(arch, exporter), tmp_path / "model.onnx")
    examples._byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "text.txt").write_text(TEXT * 4)
    artifact = edgecc.compile(path, target="host", output=tmp_path / "art", pipeline=bench.PRESETS[preset],
                              calibration_text=tmp_path / "text.txt")
    assert artifact.manifest["verification"]["ok"]
    assert artifact.manifest["calibration"]["source"] == "text"


def test_lowering_does_not_run_the_checker_again(monkeypatch):
    """The model was checked when loaded; the importer's own check serializes every weight."""
    model, checked = parse_model(HEAD + "g (float[N] x) => (float[N] y) { y = Relu (x) }"), []
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, *_args, **_kwargs: checked.append(model))
    ours = onnx.checker.check_model
    lower.to_relax(model)
    assert checked == [] and onnx.checker.check_model is ours  # and put back afterwards

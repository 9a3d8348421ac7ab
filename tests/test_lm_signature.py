"""LM signatures recognized from the graph: transformers exports of eight architectures with both
torch exporters, edgecc's own export, ONNX Runtime GenAI's attention op, and hand-written graphs
with a fused K/V cache, arbitrary and misleading names, and models that are not LMs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgecc.benchmark.bench_worker import main as bench_worker
from edgecc.core import lm_signature
from edgecc.core.verify import graph_inputs, graph_outputs, random_inputs, run_ort
from edgecc.lm import generate
from tests.conftest import run_cli
from tests.hf_models import ARCHITECTURES

PROMPT = [5, 17, 99, 3, 250, 42, 7]
# Every architecture with the TorchScript exporter (fast); the dynamo exporter (10 s an export) on
# one: a dim symbol per input (s17, s43, s59, s0 ...).
EXPORTS = [(arch, "torchscript") for arch in ARCHITECTURES] + [("llama", "dynamo")]


def _graph(text: str, renames: dict[str, str] | None = None, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text with seeded random weights as initializers; `renames` gives I/O
    names the text format cannot spell (dots)."""
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                                   for name, shape in weights.items())
    for old, new in (renames or {}).items():
        for vi in [*model.graph.input, *model.graph.output]:
            vi.name = new if vi.name == old else vi.name
        for node in model.graph.node:
            node.input[:] = [new if i == old else i for i in node.input]
            node.output[:] = [new if o == old else o for o in node.output]
    onnx.checker.check_model(model, full_check=True)
    return model


# A fused K/V cache per layer, [2, batch, kv_heads, past, head_dim], no position input, no name
# an exporter would use. The scores depend on the mask times the cache, so ONNX Runtime refuses a
# mask whose length is not past + seq.
FUSED = """
<ir_version: 8, opset_import: ["" : 17]>
lm (int64[batch, seq] tokens, int64[batch, total] m, float[2, batch, 2, past, 4] cache_in)
   => (float[batch, seq, 16] scores, float[2, batch, 2, total, 4] cache_out) {
  heads = Constant<value = int64[4] {0, 0, 2, 4}>()
  zero = Constant<value = int64[1] {0}>()
  one = Constant<value = int64[1] {1}>()
  two = Constant<value = int64[1] {2}>()
  per_token = Constant<value = int64[3] {0, 2, 4}>()
  x = Gather(embed, tokens)
  h = Reshape(x, heads)
  k = Transpose<perm = [0, 2, 1, 3]>(h)
  v = Neg(k)
  k1 = Unsqueeze(k, zero)
  v1 = Unsqueeze(v, zero)
  kv = Concat<axis = 0>(k1, v1)
  cache_out = Concat<axis = 3>(cache_in, kv)
  c = ReduceSum<keepdims = 0>(cache_out, per_token)
  mf = Cast<to = 1>(m)
  masked = Mul(c, mf)
  s = ReduceSum<keepdims = 1>(masked, one)
  bias = Unsqueeze(s, two)
  y = MatMul(x, head)
  scores = Add(y, bias)
}
"""


def fused_model() -> onnx.ModelProto:
    return _graph(FUSED, embed=(16, 8), head=(8, 16))


# Split K/V with names that lie: the output called present.0.value is the key cache grown (and the
# other way round), learned positions index a table of their own, and neither positions nor mask
# says what it is: positions share the ids' sequence dim, the mask does not.
MISLEADING = """
<ir_version: 8, opset_import: ["" : 17]>
lm (int64[B, S] tok, int64[B, S] where, int64[B, T] keep, float[B, 2, P, 4] pk, float[B, 2, P, 4] pv)
   => (float[B, S, 16] out, float[B, 2, T, 4] nv, float[B, 2, T, 4] nk) {
  heads = Constant<value = int64[4] {0, 0, 2, 4}>()
  one = Constant<value = int64[1] {1}>()
  two = Constant<value = int64[1] {2}>()
  per_token = Constant<value = int64[2] {1, 3}>()
  x = Gather(embed, tok)
  p = Gather(positions, where)
  y = Add(x, p)
  h = Reshape(y, heads)
  k = Transpose<perm = [0, 2, 1, 3]>(h)
  v = Neg(k)
  nv = Concat<axis = 2>(pk, k)
  nk = Concat<axis = 2>(pv, v)
  c = ReduceSum<keepdims = 0>(nv, per_token)
  mf = Cast<to = 1>(keep)
  masked = Mul(c, mf)
  s = ReduceSum<keepdims = 1>(masked, one)
  bias = Unsqueeze(s, two)
  z = MatMul(y, head)
  out = Add(z, bias)
}
"""


def misleading_model() -> onnx.ModelProto:
    return _graph(MISLEADING, {"pk": "past.0.key", "pv": "past.0.value", "nv": "present.0.value",
                               "nk": "present.0.key"}, embed=(16, 8), positions=(12, 8), head=(8, 16))


# ONNX Runtime GenAI's form: its GroupQueryAttention (4 query heads on 2 KV heads) takes the past
# cache and returns the present one; no Concat in the graph.
GENAI = """
<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
lm (int64[batch, sequence_length] input_ids, int64[batch, total_sequence_length] attention_mask,
    float[batch, 2, past_sequence_length, 8] k0, float[batch, 2, past_sequence_length, 8] v0)
   => (float[batch, sequence_length, 32] logits, float[batch, 2, total_sequence_length, 8] pk0,
       float[batch, 2, total_sequence_length, 8] pv0) {
  axis = Constant<value = int64[1] {1}>()
  minus_one = Constant<value = int64 {1}>()
  x = Gather(embed, input_ids)
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  tokens = ReduceSum<keepdims = 0>(attention_mask, axis)
  last = Sub(tokens, minus_one)
  seqlens_k = Cast<to = 6>(last)
  shape = Shape(attention_mask)
  total64 = Gather<axis = 0>(shape, minus_one)
  total = Cast<to = 6>(total64)
  attn, pk0, pv0 = com.microsoft.GroupQueryAttention<num_heads = 4, kv_num_heads = 2>(q, k, v, k0, v0, seqlens_k, total)
  logits = MatMul(attn, head)
}
"""


def genai_model() -> onnx.ModelProto:
    names = {"k0": "past_key_values.0.key", "v0": "past_key_values.0.value", "pk0": "present.0.key",
             "pv0": "present.0.value"}
    return _graph(GENAI, names, embed=(32, 16), wq=(16, 32), wk=(16, 16), wv=(16, 16), head=(32, 32))


def _decode_matches_full_sequence(model, sig, path) -> None:
    """Prefill all but the last token, decode the last through the cache: the logits of running
    the whole prompt at once (mask, positions and cache pairs all consistent)."""
    onnx.save(model, str(path))
    step = generate.ort_step(str(path))
    ids = np.array([PROMPT], np.int64) % sig.vocab
    full = step(generate.step_feeds(sig, ids, sig.empty_cache(), 0))
    head = step(generate.step_feeds(sig, ids[:, :-1], sig.empty_cache(), 0))
    last = step(generate.step_feeds(sig, ids[:, -1:], sig.presents(head), ids.shape[1] - 1))
    np.testing.assert_allclose(last[sig.logits][0, -1], full[sig.logits][0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,exporter", EXPORTS)
def test_transformers_exports(hf_model, arch, exporter, tmp_path):
    """Optimum's names; pairs found in the graph (a sliding-window layer's present is a Slice of
    the Concat); GQA's 2 KV heads on 4; the cache per token is what a prefill returns per token."""
    path = hf_model(arch, exporter)
    model = onnx.load(str(path))
    sig = lm_signature.of_model(model, str(path))
    assert (sig.ids.name, sig.mask.name, sig.positions, sig.logits) == ("input_ids", "attention_mask", None, "logits")
    assert sig.paired_by == "graph" and sig.vocab == 256
    assert [(e.past, e.present) for e in sig.cache] == [
        (f"past_key_values.{i}.{t}", f"present.{i}.{t}") for i in range(2) for t in ("key", "value")]
    assert all(e.seq_axis == 2 and e.batch_axis == 0 and e.shape[1] == (4 if arch == "gpt2" else 2)
               for e in sig.cache)
    step = generate.ort_step(str(path))
    out = step(generate.step_feeds(sig, np.array([PROMPT[:5]]), sig.empty_cache(), 0))
    assert sum(out[e.present].nbytes for e in sig.cache) == 5 * sig.kv_bytes_per_token()
    feeds = random_inputs(model)  # no --dim: mask over past 3 + seq 5, whatever the dims are called
    assert feeds["attention_mask"].shape == (1, 8) and feeds["past_key_values.1.value"].shape[2] == 3
    assert run_ort(model, feeds)["logits"].shape == (1, 5, 256)
    _decode_matches_full_sequence(model, sig, tmp_path / "m.onnx")


def test_both_exporters_decode_alike(hf_model):
    """Dynamo's and TorchScript's graphs of one model: the same greedy tokens through the cache."""
    tokens = []
    for exporter in ("dynamo", "torchscript"):
        path = hf_model("llama", exporter)
        tokens.append(generate.greedy(generate.ort_step(str(path)), lm_signature.of_file(path), PROMPT, 8).tokens)
    assert tokens[0] == tokens[1] and len(set(tokens[0])) > 1


def test_edgecc_export(example_path):
    sig = lm_signature.of_file(example_path("tiny-llama"))
    assert (sig.ids.name, sig.mask.name, sig.positions.name) == ("ids", "attention_mask", "position_ids")
    assert sig.cache[1] == lm_signature.CacheEntry("past.0.value", "present.0.value", ("batch", 2, "past", 32),
                                                   "float32", 2, 0)
    assert len(sig.cache) == 4 and sig.paired_by == "graph" and sig.vocab == 512


def test_fused_cache_without_positions(tmp_path):
    model = fused_model()
    sig = lm_signature.of_model(model, "fused")
    assert (sig.ids.name, sig.mask.name, sig.positions, sig.logits) == ("tokens", "m", None, "scores")
    assert sig.cache == (lm_signature.CacheEntry("cache_in", "cache_out", (2, "batch", 2, "past", 4),
                                                 "float32", 3, 1),)
    assert sig.empty_cache()["cache_in"].shape == (2, 1, 2, 0, 4) and sig.kv_bytes_per_token() == 2 * 2 * 4 * 4
    feeds = random_inputs(model)
    assert feeds["m"].shape == (1, 8) and feeds["cache_in"].shape == (2, 1, 2, 3, 4)
    run_ort(model, feeds)  # refuses a mask whose length is not past + seq
    onnx.save(model, str(tmp_path / "fused.onnx"))
    gen = generate.greedy(generate.ort_step(str(tmp_path / "fused.onnx")), sig, [1, 2, 3], 4)
    assert len(gen.tokens) == 4


def test_the_graph_decides_over_misleading_names(tmp_path):
    model = misleading_model()
    sig = lm_signature.of_model(model, "misleading")
    assert (sig.ids.name, sig.mask.name, sig.positions.name, sig.logits) == ("tok", "keep", "where", "out")
    assert [(e.past, e.present) for e in sig.cache] == [("past.0.key", "present.0.value"),
                                                        ("past.0.value", "present.0.key")]
    assert sig.paired_by == "graph" and sig.vocab == 16  # not the 12 learned positions
    feeds = random_inputs(model, dim_values={"P": 4})
    np.testing.assert_array_equal(feeds["where"], [[4, 5, 6, 7, 8]])
    assert feeds["keep"].shape == (1, 9)
    run_ort(model, feeds)
    _decode_matches_full_sequence(model, sig, tmp_path / "m.onnx")


def test_names_pair_where_the_graph_is_not_given():
    """An artifact manifest's I/O specs (no graph): `past…` pairs with `present…` by name."""
    model = misleading_model()
    specs = ([s.to_json() for s in graph_inputs(model)], [s.to_json() for s in graph_outputs(model)])
    sig = lm_signature.recognize(*specs, "manifest")
    assert [(e.past, e.present) for e in sig.cache] == [("past.0.key", "present.0.key"),
                                                        ("past.0.value", "present.0.value")]
    assert sig.paired_by == "names"
    manifest = {"inputs": specs[0], "outputs": specs[1], "lm": {"signature": sig.to_json()}}
    assert lm_signature.of_manifest(manifest, "art") == sig


def test_onnxruntime_genai_attention_op(tmp_path):
    model = genai_model()
    sig = lm_signature.of_model(model, "genai")
    assert [(e.past, e.present) for e in sig.cache] == [("past_key_values.0.key", "present.0.key"),
                                                        ("past_key_values.0.value", "present.0.value")]
    assert sig.paired_by == "graph" and sig.positions is None
    _decode_matches_full_sequence(model, sig, tmp_path / "m.onnx")


@pytest.mark.parametrize("text,missing", [
    ("<ir_version: 8, opset_import: [\"\" : 17]> g (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }",
     "not a causal LM with a KV cache: no token-ids input (an integer [batch, seq] input indexing "
     "an embedding table) (its inputs: x)"),
    ("<ir_version: 8, opset_import: [\"\" : 17]> g (int64[1, 4] input_ids, int64[1, 4] attention_mask) "
     "=> (float[1, 4, 8] y) { y = Gather(embed, input_ids) }",
     "no KV-cache inputs"),
    ("<ir_version: 8, opset_import: [\"\" : 17]> g (int64[1, 4] input_ids, float[1, 2, n, 4] state) "
     "=> (float[1, 4, 8] logits, float[1, 2, n, 4] y) { logits = Gather(embed, input_ids)\n y = Relu(state) }",
     "cache input 'state' has no present output"),
])
def test_a_model_that_is_not_an_lm_is_refused_in_one_line(text, missing):
    model = _graph(text, embed=(16, 8))
    with pytest.raises(lm_signature.NotAnLM) as e:
        lm_signature.of_model(model, "m.onnx")
    assert missing in str(e.value) and str(e.value).startswith("m.onnx: ") and "\n" not in str(e.value)
    assert lm_signature.find(model) is None


def test_generate_runs_an_export_in_onnxruntime(hf_model, tmp_path):
    """`edgecc generate MODEL.onnx`: no compile, no tokenizer (ids in, ids out), Optimum's names."""
    path = hf_model("qwen2", "torchscript")
    r = run_cli("generate", path, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6",
                "--print-ids")
    assert r.returncode == 0, r.stderr
    want = generate.greedy(generate.ort_step(str(path)), lm_signature.of_file(path), PROMPT, 6).tokens
    assert r.stdout.split() == [str(t) for t in want]
    r = run_cli("generate", path, "--prompt", "hello")
    assert r.returncode == 2 and "no tokenizer" in r.stderr and "--prompt-ids" in r.stderr
    r = run_cli("generate", path, "--prompt-ids", "1,300")
    assert r.returncode == 2 and "[0, 256)" in r.stderr


def test_bench_worker_measures_an_export(hf_model, tmp_path):
    """A bench configuration (its own process in `edgecc bench`) on Optimum's names, no positions."""
    import json

    path = hf_model("gemma3", "torchscript")
    sig = lm_signature.of_file(path)
    spec = {"kind": "ort", "path": str(path), "threads": 1, "vocab": sig.vocab, "signature": sig.to_json(),
            "prompt_lengths": [4], "past": 4, "decode_steps": 2, "repeats": 1, "seed": 0,
            "windows": [[1, 2, 3, 4, 5, 6]]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert bench_worker([str(tmp_path / "spec.json"), str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["decode"]["tokens_per_s"] > 0 and out["accuracy"]["tokens"] == 5
    assert 1 < out["accuracy"]["perplexity"] < 10 * sig.vocab

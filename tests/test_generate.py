"""KV-cache LMs: the export module, one artifact for prefill and decode, greedy decoding vs ORT."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

import edgecc
from edgecc.core import lm_signature
from edgecc.core.verify import compare, dim_expr, graph_inputs, random_inputs
from edgecc.errors import UserError
from edgecc.lm import generate
from edgecc.models import llama
from edgecc.models.examples import TINY_LLAMA
from edgecc.runtime.artifact import entry as artifact_entry
from tests.conftest import run_cli

PROMPT = [5, 17, 99, 3, 250, 42, 7]


@pytest.fixture(scope="module")
def tiny_llama(example_path):
    return example_path("tiny-llama")


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    return edgecc.compile(tiny_llama, "host", tmp_path_factory.mktemp("art") / "tl", keep_reference=True)


def test_cache_decode_equals_full_sequence(tiny_llama):
    """Prefill then one decode step through the cache gives the logits of running the whole
    sequence at once: the cache, positions and mask are consistent (ORT on the export)."""
    step, sig = generate.ort_step(str(tiny_llama)), lm_signature.of_file(tiny_llama)
    ids = np.array([PROMPT], np.int64)
    n = ids.shape[1]
    full = step(generate.step_feeds(sig, ids, sig.empty_cache(), 0))
    head = step(generate.step_feeds(sig, ids[:, :-1], sig.empty_cache(), 0))
    last = step(generate.step_feeds(sig, ids[:, -1:], sig.presents(head), n - 1))
    np.testing.assert_allclose(last["logits"][0, -1], full["logits"][0, -1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(last["present.1.value"], full["present.1.value"], rtol=1e-5, atol=1e-5)


def test_left_padding_is_masked(tiny_llama):
    """Padded (mask 0) positions before the prompt do not change its logits."""
    step, empty = generate.ort_step(str(tiny_llama)), lm_signature.of_file(tiny_llama).empty_cache()
    ids = np.array([PROMPT], np.int64)
    plain = step({"ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(7)[None], **empty})
    padded_ids = np.concatenate([[[0, 0, 0]], ids], axis=1)
    mask = np.concatenate([[[0, 0, 0]], np.ones_like(ids)], axis=1)
    positions = np.concatenate([[[0, 0, 0]], np.arange(7)[None]], axis=1)
    padded = step({"ids": padded_ids, "attention_mask": mask, "position_ids": positions, **empty})
    np.testing.assert_allclose(padded["logits"][:, 3:], plain["logits"], rtol=1e-4, atol=1e-4)


def test_export_matches_torch_module(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = llama.LlamaConfig(vocab=64, hidden=48, intermediate=96, layers=1, heads=6, kv_heads=2)
    model = llama.build(cfg, seed=3)
    path = llama.export(model, cfg, tmp_path / "m.onnx")
    step = generate.ort_step(str(path))
    ids = torch.randint(0, 64, (1, 5))
    past = [torch.randn(1, 2, 4, 8) for _ in range(2)]
    mask, positions = torch.ones(1, 9, dtype=torch.int64), torch.arange(4, 9)[None]
    with torch.no_grad():
        want = model(ids, mask, positions, *past)
    got = step({"ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
                "past.0.key": past[0].numpy(), "past.0.value": past[1].numpy()})
    np.testing.assert_allclose(got["logits"], want[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["present.0.key"], want[1].numpy(), rtol=1e-5, atol=1e-6)


def test_one_artifact_serves_prefill_and_decode(artifact):
    """Symbolic seq and past: the compiled module keeps them, and its greedy tokens equal ORT's."""
    shapes = {i["name"]: i["shape"] for i in artifact.manifest["inputs"]}
    assert shapes["ids"] == ["batch", "seq"] and shapes["past.0.key"][2] == "past"
    assert shapes["attention_mask"][1] == "past + seq"
    assert artifact.manifest["lm"]["tokenizer"] == "tokenizer.json"
    assert (artifact.path / "tokenizer.json").is_file()
    sig = lm_signature.of_manifest(artifact.manifest, "art")
    assert sig == lm_signature.of_file(artifact.path / "model.opt.onnx") and sig.paired_by == "graph"
    want = generate.greedy(generate.ort_step(str(artifact.path / "model.opt.onnx")), sig, PROMPT, 32)
    got = generate.greedy(artifact.run, sig, PROMPT, 32)
    assert len(got.tokens) == 32
    assert got.tokens == want.tokens
    assert len(set(got.tokens)) > 1  # a constant stream would make the comparison weak


def test_one_token_step_with_static_shapes(tiny_llama, tmp_path):
    """--shape batch=1 --shape seq=1: a decode-only module whose kernels are all static, the
    int8 LM head's activation quantization included (the importer's kernels for it once kept the
    batch variable while Relax's types were bound, and FuseTIR refused the module). Its steps
    through a cache of the prompt give ORT's logits on the same graph."""
    art = edgecc.compile(tiny_llama, "host", tmp_path / "a", pipeline="quantize-int8",
                         shapes={"batch": 1, "seq": 1}, keep_reference=True)
    shapes = {i["name"]: i["shape"] for i in art.manifest["inputs"]}
    assert shapes["ids"] == [1, 1] and shapes["past.0.key"][:3] == [1, 2, "past"]
    sig = lm_signature.of_manifest(art.manifest, "art")
    ort = generate.ort_step(str(art.path / "model.opt.onnx"))
    past = sig.empty_cache()
    for i, token in enumerate(PROMPT):
        feeds = generate.step_feeds(sig, np.array([[token]], np.int64), past, i)
        want, got = ort(feeds), art.run(feeds)
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
        past = sig.presents(want)


def test_the_one_token_step_has_a_function_of_its_own(artifact):
    """A [1, 1] step runs `decode`, main with batch and seq bound to 1: it gives main's outputs
    for the same step, in fewer VM instructions (its shapes are mostly constants), and compile
    verified it against ORT on a step's inputs."""
    import tvm

    assert artifact.manifest["build"]["decode"] == {"shapes": {"ids": [1, 1]}}
    assert artifact.manifest["verification"]["decode"]["input_shapes"]["ids"] == [1, 1]
    sig = lm_signature.of_manifest(artifact.manifest, "art")
    out = artifact.run(generate.step_feeds(sig, np.array([PROMPT]), sig.empty_cache(), 0))
    vm = artifact.load_vm(None)
    for past, cached in [(sig.empty_cache(), 0), (sig.presents(out), len(PROMPT))]:  # a 1-token prompt too
        step = generate.step_feeds(sig, np.array([[7]]), past, cached)
        assert artifact_entry(artifact.manifest, step) == "decode"
        args = [tvm.runtime.tensor(a) for a in artifact.check_inputs(step)] + list(artifact._weights)
        calls, outputs = {}, {}
        for name in ("main", "decode"):
            counted = []
            vm.set_instrument(lambda func, fname, before, ret, *a: counted.append(fname) if before else None)
            outputs[name] = [v.numpy() for v in vm[name](*args)]
            vm.set_instrument(None)
            calls[name] = len(counted)
        for want, got in zip(outputs["main"], outputs["decode"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert calls["decode"] < 0.8 * calls["main"], calls


def test_run_draws_from_the_manifest_the_inputs_random_inputs_draws_from_the_graph(artifact, tmp_path):
    """`edgecc run` needs no model.opt.onnx: the manifest's signatures, ranges and LM signature give
    the feeds random_inputs gives, the cache made of the same random tokens by the artifact itself."""
    res = run_cli("run", artifact.path, "--dim", "seq=3", "--seed", "4", "--output", tmp_path / "out.npz")
    assert res.returncode == 0, res.stderr
    feeds = random_inputs(onnx.load(str(artifact.reference_path)), seed=4, dim_values={"seq": 3})
    assert str({k: list(v.shape) for k, v in feeds.items()}) in res.stderr
    with np.load(tmp_path / "out.npz") as got:
        result = compare(artifact.run(feeds), dict(got), across_engines=True)  # ORT made the cache here
    assert result.ok, result.detail


def test_run_refuses_bad_runtime_tensors_by_name(artifact):
    """A decode step's cache comes back as the module's own tensors, which `run` leaves to the
    module's parameter checks; what they refuse is still a one-line error naming the input."""
    import tvm

    sig = lm_signature.of_manifest(artifact.manifest, "art")
    out = artifact.run(generate.step_feeds(sig, np.array([PROMPT]), sig.empty_cache(), 0), as_numpy=False)
    past = sig.presents(out)
    step = generate.step_feeds(sig, np.array([[7]]), past, len(PROMPT))
    assert artifact.run(step, as_numpy=False)["logits"].shape == (1, 1, 512)
    key = past["past.1.key"].numpy()
    for bad, says in [(key.astype(np.float16), "dtype float16, expected float32"),
                      (key[:, :1], "shape [1, 1, 7, 32], expected"),
                      (key[:, :, :3], "shape [1, 2, 3, 32], expected ['batch', 2, 'past', 32]: shape[2] mismatch")]:
        with pytest.raises(UserError, match=re.escape(f"input 'past.1.key': {says}")):
            artifact.run({**step, "past.1.key": tvm.runtime.tensor(np.ascontiguousarray(bad))}, as_numpy=False)


def test_greedy_stops_at_eos(artifact):
    sig = lm_signature.of_manifest(artifact.manifest, "art")
    first = generate.greedy(artifact.run, sig, PROMPT, 5).tokens
    stopped = generate.greedy(artifact.run, sig, PROMPT, 5, eos_ids=(first[2],)).tokens
    assert stopped == first[:first.index(first[2]) + 1]


def test_generate_cli(artifact):
    r = run_cli("generate", artifact.path, "--prompt", "Hello there", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stderr and "tok/s" in r.stderr and "8 tokens generated" in r.stderr
    r = run_cli("generate", artifact.path, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6",
                "--print-ids")
    assert r.returncode == 0, r.stderr
    sig = lm_signature.of_manifest(artifact.manifest, "art")
    assert r.stdout.split() == [str(t) for t in generate.greedy(artifact.run, sig, PROMPT, 6).tokens]


def test_generate_rejects_bad_input(artifact, example_path, tmp_path):
    long_prompt = ",".join(["1"] * TINY_LLAMA["context"])
    r = run_cli("generate", artifact.path, "--prompt-ids", long_prompt)
    assert r.returncode == 2 and "context is 256" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("generate", artifact.path, "--prompt-ids", "1,x")
    assert r.returncode == 2 and "--prompt-ids" in r.stderr
    r = run_cli("generate", artifact.path, "--prompt-ids", "1,9999")
    assert r.returncode == 2 and "[0, 512)" in r.stderr
    # In a process of its own: this one has run TVM's thread pool, and compile verifies in a fork.
    assert run_cli("compile", example_path("mlp"), "-o", tmp_path / "mlp").returncode == 0
    for model in (tmp_path / "mlp", example_path("mlp")):  # an artifact's manifest; an .onnx in ORT
        r = run_cli("generate", model, "--prompt-ids", "1,2")
        assert r.returncode == 2 and "not a causal LM with a KV cache: no token-ids input" in r.stderr
        assert "(its inputs: x)" in r.stderr and "Traceback" not in r.stderr


def test_compile_refuses_missing_tokenizer(tiny_llama, tmp_path):
    model = onnx.load(str(tiny_llama))
    onnx.save(model, str(tmp_path / "alone.onnx"))  # metadata names tokenizer.json; none beside it
    r = run_cli("compile", tmp_path / "alone.onnx", "-o", tmp_path / "out")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "alone.onnx" in r.stderr
    assert not (tmp_path / "out").exists()


def test_lm_metadata_is_json(tiny_llama):
    props = {p.key: p.value for p in onnx.load(str(tiny_llama)).metadata_props}
    assert json.loads(props["edgecc.lm.context"]) == TINY_LLAMA["context"]
    assert json.loads(props["edgecc.lm.config"])["kv_heads"] == TINY_LLAMA["kv_heads"]


def test_dim_expressions_in_random_inputs(tiny_llama):
    assert dim_expr("past + seq", {"past": 5, "seq": 3}) == 8
    assert dim_expr("2*n-1", {"n": 4}) == 7
    model = onnx.load(str(tiny_llama))
    feeds = random_inputs(model, dim_values={"past": 5, "seq": 3})
    assert feeds["attention_mask"].shape == (1, 8) and feeds["past.0.key"].shape[2] == 5
    np.testing.assert_array_equal(feeds["position_ids"], [[5, 6, 7]])
    assert [s.name for s in graph_inputs(model)][:3] == ["ids", "attention_mask", "position_ids"]


def test_fast_math_leaves_unknown_shapes_exact():
    """TVM's FastMathTransform asserts on a tensor of unknown shape; edgecc's keeps the exact op."""
    import tvm
    from tvm.script import relax as R

    from edgecc.backends.tvm_common import fast_math

    @R.function
    def main(x: R.Tensor(ndim=2, dtype="float32"), y: R.Tensor((4, 8), "float32")):
        with R.dataflow():
            a = R.exp(x)
            b = R.exp(y)
            R.output(a, b)
        return (a, b)

    mod = fast_math(tvm.IRModule({"main": main}))
    text = mod.script()
    assert "R.exp(x)" in text and "R.exp(y)" not in text and "fast_exp" in text

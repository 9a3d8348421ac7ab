"""Calibration from real text (--calibration-text): windows, sentences, streaming, the manifest, mistakes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgecc
from edgecc.core import calibration, lm_signature
from edgecc.core.ir import load_model
from edgecc.core.pass_base import PassContext
from edgecc.errors import UserError
from edgecc.models.examples import _byte_tokenizer
from tests.conftest import parse_model, run_cli

# A text whose end differs from its beginning: calibration reads the end.
TEXT = "Alpha beginning words come first here. " * 20 + "Omega ending words come last of all. " * 200

ENCODER = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, 16] input_ids, int64[B, 16] attention_mask, int64[B, 16] token_type_ids) => (float[B, 16, 4] h) {
    table = Constant <value = float[256, 4] {%s}> ()
    e = Gather (table, input_ids)
    m = Cast <to = 1> (attention_mask)
    axes = Constant <value = int64[1] {-1}> ()
    m3 = Unsqueeze (m, axes)
    h = Mul (e, m3)
}
""" % ", ".join(["0.5"] * 1024)


@pytest.fixture(scope="module")
def lm(example_path):
    return example_path("tiny-llama")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def test_lm_windows_come_from_the_text_end(lm, text_file):
    proto = onnx.load(str(lm), load_external_data=False)
    feeds, source = calibration.text_calibration(text_file, lm, proto)
    sig = lm_signature.of_model(proto, str(lm))
    ids = feeds[sig.ids.name]
    count, length = ids.shape
    tokens = _byte_tokenizer().encode(TEXT).ids
    assert (count, length) == (source["windows"], source["tokens"])
    assert count * length <= len(tokens) < (count + 1) * length or count == calibration.TEXT_WINDOWS
    assert ids.ravel().tolist() == tokens[len(tokens) - count * length:]
    assert np.array_equal(feeds[sig.positions.name], np.tile(np.arange(length), (count, 1)))
    assert feeds[sig.mask.name].shape == (count, length) and feeds[sig.mask.name].all()
    for entry in sig.cache:  # every window is a prefill with an empty cache
        assert feeds[entry.past].shape[entry.seq_axis] == 0
        assert feeds[entry.past].shape[entry.batch_axis] == count
    assert source["source"] == "text" and len(source["sha256"]) == 64


def test_lm_activations_stream_one_window_at_a_time(lm, text_file):
    proto = onnx.load(str(lm), load_external_data=False)
    feeds, _ = calibration.text_calibration(text_file, lm, proto)
    model = load_model(lm)
    name = next(n.inputs[0].name for n in model.graph if n.op_type == "MatMul")
    ctx = PassContext(calibration=feeds)
    batches = list(calibration.activation_batches(model, ctx, [name]))
    count, length = feeds["ids"].shape if "ids" in feeds else next(iter(feeds.values())).shape
    assert len(batches) == count and all(b[name].shape[0] == length for b in batches)
    whole = calibration.activation_samples(model, ctx, [name])[name]
    assert np.array_equal(whole, np.concatenate([b[name] for b in batches]))
    assert np.array_equal(calibration.activation_ranges(model, ctx, [name])[name], np.abs(whole).max(axis=0))


def test_encoder_sentences_are_padded_to_its_length(tmp_path, text_file):
    path = tmp_path / "enc.onnx"
    path.write_bytes(parse_model(ENCODER).SerializeToString())
    _byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    feeds, source = calibration.text_calibration(text_file, path, onnx.load(str(path)))
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["input_ids"].shape == (source["sentences"], 16) and feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"].all()  # every sentence fills the 16 tokens: cut, not padded
    assert not feeds["token_type_ids"].any()
    first = _byte_tokenizer().encode("Omega ending words come last of all.").ids[:16]
    assert feeds["input_ids"][0].tolist() == first


def test_a_tokenizer_beyond_the_vocabulary_is_refused(lm, text_file, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(TEXT.replace(".", " . ").split()))
    wide = Tokenizer(models.WordLevel({w: 1000 + i for i, w in enumerate(words)}, unk_token="."))
    wide.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wide.save(str(tmp_path / "wide.json"))  # ids from 1000 on
    with pytest.raises(UserError, match="outside the model's vocabulary of 512"):
        calibration.text_calibration(text_file, lm, onnx.load(str(lm), load_external_data=False),
                                     tmp_path / "wide.json")


def test_a_missing_text_is_one_line_exit_2_and_writes_nothing(lm, tmp_path):
    r = run_cli("compile", lm, "-o", tmp_path / "out", "--no-verify", "--calibration-text", tmp_path / "none.txt")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("edgecc: error: ")]
    assert "none.txt: no such text file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, fragment", [
    ({"calibration_text": "{text}", "calibration": "{text}"}, "give one source of calibration data"),
    ({"tokenizer": "{text}"}, "--tokenizer: it reads --calibration-text"),
    ({"calibration_text": "{text}", "tokenizer": "{text}"}, "not a readable tokenizer.json"),
])
def test_mistakes_name_the_option(lm, text_file, tmp_path, options, fragment):
    options = {k: v.format(text=text_file) for k, v in options.items()}
    with pytest.raises(UserError, match=fragment):
        edgecc.compile(lm, target="host", output=tmp_path / "out", verify=False, **options)
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_neither_lm_nor_encoder_is_refused(example_path, text_file, tmp_path):
    _byte_tokenizer().save(str(tmp_path / "tok.json"))
    with pytest.raises(UserError, match="needs a causal LM with a KV cache or an encoder"):
        edgecc.compile(example_path("mlp"), target="host", output=tmp_path / "out", calibration_text=text_file,
                       tokenizer=tmp_path / "tok.json")


def test_a_pass_after_a_pruned_cache_calibrates_on_the_heads_kept(lm, text_file, tmp_path):
    """prune-heads narrows the KV-cache inputs; SmoothQuant after it reads the calibration
    windows' caches at the heads kept, the artifact verifies, and its manifest records the text."""
    art = edgecc.compile(lm, target="host", output=tmp_path / "a", calibration_text=text_file,
                         pipeline='simplify,fuse,prune-heads{heads="0:0"},quantize-int8{smoothquant=0.5}')
    assert art.manifest["verification"]["ok"]
    quantize = next(p for p in art.manifest["passes"] if p["name"] == "quantize-int8")
    assert quantize["stats"]["calibration"] == "given"
    assert art.manifest["calibration"]["source"] == "text"  # the manifest records the text
    assert art.manifest["calibration"]["file"] == str(text_file)
    assert art.manifest["options"]["calibration_text"] == str(text_file)

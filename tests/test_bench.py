"""edgecc bench on the tiny KV-cache LM: every configuration measured, accuracy consistent."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edgecc.benchmark import bench
from tests.conftest import run_cli

TEXT = ("The devil's dictionary defines a bore as a person who talks when you wish him to listen. "
        "Patience, n. A minor form of despair, disguised as a virtue. ") * 8


@pytest.fixture(scope="module")
def result(example_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    (work / "text.txt").write_text(TEXT)
    settings = bench.Settings(pipelines="fp32;int8;int4", prompt_lengths=(8, 16), past=16, decode_steps=4,
                              repeats=2, windows=2, window_tokens=48, text=str(work / "text.txt"), rounds=2)
    return bench.run(example_path("tiny-llama"), settings, work / "out")


def _config(result, name):
    return next(c for c in result["configs"] if c["name"] == name)


def test_every_configuration_is_measured(result):
    names = [c["name"] for c in result["configs"]]
    assert names == ["ort fp32", "ort int4 (own quantizer)", "ort int8 (own quantizer)", "edgecc fp32",
                     "edgecc int8", "ort int8", "edgecc int4", "ort int4"]
    for c in result["configs"]:
        assert "error" not in c, c
        assert set(c["prefill_ms"]) == {"8", "16"} and c["prefill_ms"]["16"]["p50"] > 0
        assert c["decode"]["tokens_per_s"] > 0 and c["peak_rss_mb"] > 50 and c["roofline_fraction"] > 0
        runs = c["decode"]["runs"]  # rounds=2: two processes timed it, the median reported
        assert len(runs) == 2 and c["decode"]["tokens_per_s"] == np.median(runs)
        assert len(c["prefill_ms"]["16"]["p50_runs"]) == 2
    assert result["machine"]["bandwidth_gbs"] > 0.5


def test_accuracy_agrees_across_engines(result):
    """The same fp32 function in ORT and edgecc: the same perplexity; int8 close to it, and the
    int8 artifact close to ORT running the same int8 graph."""
    ppl = {c["name"]: c["accuracy"]["perplexity"] for c in result["configs"]}
    assert ppl["edgecc fp32"] == pytest.approx(ppl["ort fp32"], rel=1e-4)
    assert ppl["edgecc int8"] == pytest.approx(ppl["ort fp32"], rel=0.05)
    assert ppl["edgecc int8"] == pytest.approx(ppl["ort int8"], rel=0.01)
    assert _config(result, "edgecc int8")["accuracy"]["tokens"] == 2 * 47
    assert ppl["edgecc int4"] == pytest.approx(ppl["ort fp32"], rel=0.1)
    assert ppl["ort int4 (own quantizer)"] == pytest.approx(ppl["ort fp32"], rel=0.1)


def test_sizes_and_bytes_per_token(result, example_path):
    fp32, int8 = _config(result, "edgecc fp32"), _config(result, "edgecc int8")
    assert int8["model_bytes"] < 0.7 * fp32["model_bytes"]
    assert _config(result, "edgecc int4")["model_bytes"] < int8["model_bytes"]
    assert _config(result, "ort int4 (own quantizer)")["weight_bytes_per_token"] < int8["weight_bytes_per_token"]
    assert int8["weight_bytes_per_token"] < 0.4 * fp32["weight_bytes_per_token"]


def _lm_head_model(vocab: int) -> onnx.ModelProto:
    """ids -> an embedding of `vocab` rows of 8 float32, a float32 linear layer (8x16 and a bias
    of 16), an int8 16x16 weight with a float32 scale, and a 50x16 float32 table tied between a
    second embedding and the output head."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones(shape, dtype), name) for name, shape, dtype in (
        ("emb", (vocab, 8), np.float32), ("w", (8, 16), np.float32), ("b", (16,), np.float32),
        ("w8", (16, 16), np.int8), ("scale", (), np.float32), ("tied", (50, 16), np.float32))]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["hw"]),
        helper.make_node("Add", ["hw", "b"], ["lin"]),
        helper.make_node("DequantizeLinear", ["w8", "scale"], ["w8f"]),
        helper.make_node("MatMul", ["lin", "w8f"], ["q"]),
        helper.make_node("Gather", ["tied", "ids"], ["e2"]),
        helper.make_node("Add", ["q", "e2"], ["x"]),
        helper.make_node("Transpose", ["tied"], ["head"]),
        helper.make_node("MatMul", ["x", "head"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["seq", 50])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


# What _lm_head_model's decoded token reads, counted tensor by tensor: one 8-float32 row of the
# embedding, all of w (8*16 float32), b (16 float32), w8 (16*16 int8) and scale (one float32),
# and all of the tied table (50*16 float32), which the head reads whole.
TOKEN_BYTES = 8 * 4 + 8 * 16 * 4 + 16 * 4 + 16 * 16 * 1 + 4 + 50 * 16 * 4


def test_a_token_reads_one_row_of_the_embedding_and_every_other_weight_whole(tmp_path):
    assert bench.weight_bytes_per_token(_lm_head_model(vocab=100)) == TOKEN_BYTES
    assert bench.weight_bytes_per_token(_lm_head_model(vocab=5000)) == TOKEN_BYTES  # vocabulary is free
    # Weights stored outside the model, not loaded, count the same.
    onnx.save_model(_lm_head_model(vocab=100), tmp_path / "m.onnx", save_as_external_data=True,
                    location="m.bin", size_threshold=0)
    external = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in external.graph.initializer)
    assert bench.weight_bytes_per_token(external) == TOKEN_BYTES


def test_kv_bytes_are_what_the_cache_holds(result, example_path):
    """The KV bytes of the roofline are what the model returns as its cache after `past` tokens."""
    from edgecc.core import lm_signature
    from edgecc.lm import generate

    path = example_path("tiny-llama")
    sig = lm_signature.of_file(path)
    out = generate.ort_step(str(path))(generate.step_feeds(sig, np.zeros((1, 16), np.int64), sig.empty_cache(), 0))
    assert result["kv_bytes_per_token_at_past"] == sum(out[e.present].nbytes for e in sig.cache)


def test_a_pruned_cache_is_fed_at_its_own_size(example_path, tmp_path):
    """prune-heads takes K/V heads out of the cache: the artifact and ORT on its graph are fed and
    charged the smaller cache, not the source's."""
    settings = bench.Settings(pipelines='pruned=simplify,fuse,prune-heads{heads="0:0"}', prompt_lengths=(8,),
                              past=8, decode_steps=2, repeats=1, windows=0, rounds=1)
    result = bench.run(example_path("tiny-llama"), settings, tmp_path / "out")
    configs = {c["name"]: c for c in result["configs"]}
    for name in ("edgecc pruned", "ort pruned"):
        assert "error" not in configs[name], configs[name]
        assert configs[name]["decode"]["tokens_per_s"] > 0
        assert configs[name]["kv_bytes_at_past"] == result["kv_bytes_per_token_at_past"] * 3 // 4


def test_cli_table_json_and_plot(example_path, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    r = run_cli("bench", example_path("tiny-llama"), "--pipelines", "fp32", "--prompt-lengths", "8",
                "--past", "8", "--decode-steps", "2", "--repeats", "1", "--windows", "1",
                "--window-tokens", "32", "--text", tmp_path / "t.txt", "--json", tmp_path / "r.json",
                "--plot", tmp_path / "r.png")
    assert r.returncode == 0, r.stderr
    assert "edgecc fp32" in r.stdout and "decode tok/s" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["configs"][1]["name"] == "edgecc fp32"
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc for the Jetson build")
def test_a_target_that_cannot_run_here_is_measured_through_the_reference(example_path, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    settings = bench.Settings(target="jetson-orin-nano", pipelines="fp32", windows=1, window_tokens=32,
                              text=str(tmp_path / "t.txt"))
    result = bench.run(example_path("tiny-llama"), settings, tmp_path / "out")
    art = _config(result, "edgecc fp32")
    assert "decode" not in art and art["accuracy_via"] == "onnxruntime on model.opt.onnx"
    assert art["accuracy"]["perplexity"] == pytest.approx(
        _config(result, "ort fp32")["accuracy"]["perplexity"], rel=1e-4)
    assert any("cannot run on this host" in s for s in result["skipped"])


def _cli(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (its start-up is most of a one-line error's cost): code and stderr."""
    from edgecc import cli

    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_bad_input(example_path, tmp_path, capsys):
    code, err = _cli(capsys, "bench", example_path("tiny-llama"), "--pipelines", "fp33")
    assert code == 2 and "'fp33' is not a preset" in err
    code, err = _cli(capsys, "bench", example_path("tiny-llama"), "--text", tmp_path / "none.txt")
    assert code == 2 and "none.txt: no such text file" in err
    code, err = _cli(capsys, "bench", example_path("mlp"), "--windows", "0")
    assert code == 2 and "not a causal LM with a KV cache" in err
    code, err = _cli(capsys, "bench", tmp_path / "missing.onnx", "--windows", "0")
    assert code == 2 and "missing.onnx: no such file" in err and "Traceback" not in err
    code, err = _cli(capsys, "bench", example_path("tiny-llama"), "--prompt-lengths", "8,x")
    assert code == 2 and "--prompt-lengths" in err


FAKE_LLAMA_BENCH = """#!{python}
import json, sys
a = sys.argv[1:]
arg = lambda flag: a[a.index(flag) + 1]
assert arg("-t") == "2" and arg("-o") == "json" and arg("-m").endswith(".gguf")
reps = int(arg("-r"))
if arg("-n") == "0":  # prefill per prompt length
    out = [{{"n_prompt": int(n), "n_gen": 0, "n_depth": 0, "samples_ns": [n * 1e6 * (1 + i) for i in range(reps)]}}
           for n in map(int, arg("-p").split(","))]
else:  # decode after a context of -d tokens
    out = [{{"n_prompt": 0, "n_gen": int(arg("-n")), "n_depth": int(arg("-d")),
            "samples_ts": [100.0 + i for i in range(reps)]}}]
print(json.dumps(out))
"""


def test_llama_cpp_and_ort_int8_are_timed_beside_the_others(example_path, tmp_path, capsys):
    """--gguf adds llama.cpp (its llama-bench, same threads, lengths and context), timed in the same
    rounds; an int8-only pipeline adds ONNX Runtime's own int8 model."""
    import sys

    from edgecc import cli

    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    code = cli.main(["bench", str(example_path("tiny-llama")), "--pipelines", "int8", "--prompt-lengths", "8,16",
                     "--past", "8", "--decode-steps", "2", "--repeats", "3", "--windows", "0", "--rounds", "2",
                     "--gguf", str(tmp_path / "m.gguf"), "--llama-bench", str(fake),
                     "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    configs = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["configs"]}
    assert list(configs) == ["ort fp32", "llama.cpp", "ort int8 (own quantizer)", "edgecc int8", "ort int8"]
    llama = configs["llama.cpp"]
    assert llama["prefill_ms"]["16"]["p50"] == 32.0  # samples 16, 32, 48 ms: the median
    assert llama["decode"]["tokens_per_s"] == 101.0 and len(llama["decode"]["runs"]) == 2
    assert configs["ort int8 (own quantizer)"]["decode"]["tokens_per_s"] > 0
    assert "llama.cpp" in capsys.readouterr().out


def test_bad_llama_cpp_options_are_one_line_errors(example_path, tmp_path, capsys):
    code, err = _cli(capsys, "bench", example_path("tiny-llama"), "--gguf", tmp_path / "none.gguf")
    assert code == 2 and "--gguf" in err and "no such file" in err
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    code, err = _cli(capsys, "bench", example_path("tiny-llama"), "--gguf", tmp_path / "m.gguf",
                     "--llama-bench", tmp_path / "nope")
    assert code == 2 and "--llama-bench" in err and err.count("\n") == 1


def _tiny_encoder(path):
    """A one-layer BERT-style encoder over the byte tokenizer's ids: input_ids, attention_mask
    [batch, 16] -> last_hidden_state, with the padding mask applied to the attention scores."""
    import torch

    from edgecc.models.examples import _byte_tokenizer

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, 64)
            self.qkv, self.out = torch.nn.Linear(64, 192), torch.nn.Linear(64, 64)
            self.ffn = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
            self.norm = torch.nn.LayerNorm(64)

        def forward(self, input_ids, attention_mask):
            x = self.embed(input_ids)
            q, k, v = self.qkv(x).split(64, dim=-1)
            bias = (1.0 - attention_mask[:, None, :].float()) * -1e4
            x = x + self.out(torch.softmax(q @ k.transpose(1, 2) / 8 + bias, -1) @ v)
            return self.norm(x + self.ffn(x))

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch"} for n in ("input_ids", "attention_mask", "last_hidden_state")})
    _byte_tokenizer().save(str(path.with_name("tokenizer.json")))
    return path


def test_an_encoder_is_measured_by_latency_and_embedding_cosine(tmp_path):
    model = _tiny_encoder(tmp_path / "encoder.onnx")
    (tmp_path / "t.txt").write_text(TEXT)
    settings = bench.Settings(pipelines="fp32;int8", prompt_lengths=(16,), repeats=2, sentences=2,
                              text=str(tmp_path / "t.txt"))
    result = bench.run(model, settings, tmp_path / "out")
    assert result["kind"] == "encoder"
    names = [c["name"] for c in result["configs"]]
    assert names == ["ort fp32", "ort int8 (own quantizer)", "edgecc fp32", "edgecc int8", "ort int8"]
    acc = {c["name"]: c["accuracy"]["mean_cosine_vs_ort_fp32"] for c in result["configs"]}
    assert acc["ort fp32"] == pytest.approx(1.0) and acc["edgecc fp32"] > 0.99999
    assert 0.9 < acc["ort int8 (own quantizer)"] < 1
    assert 0.9 < acc["edgecc int8"] < 1 and acc["edgecc int8"] == pytest.approx(acc["ort int8"], abs=0.01)
    for c in result["configs"]:
        assert c["prefill_ms"]["16"]["p50"] > 0 and "decode" not in c and c["accuracy"]["sentences"] == 2
    table = bench.table(result)
    assert "latency16 p50/p90 ms" in table and "cos vs ORT" in table and "decode tok/s" not in table

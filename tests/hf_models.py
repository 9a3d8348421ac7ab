"""Causal LMs as users bring them: random-weight transformers models of current architectures,
exported with both torch exporters the standard way (Optimum's input and output names, the KV
cache as `past_key_values.<layer>.key/value` in, `present.<layer>.key/value` out, batch, sequence
and cache length symbolic). Nothing here is edgecc's: the graphs are what transformers and
torch.onnx emit.
"""

from __future__ import annotations

from pathlib import Path

from edgecc.models.examples import import_transformers

# Small enough to export in seconds; large enough for GQA (4 query heads on 2 KV heads), q/k norms
# and a sliding window shorter than the prompts the tests use.
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
SLIDING_WINDOW = 8

# architecture -> (transformers model_type, config overrides)
ARCHITECTURES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),  # q/k RMSNorm per head
    "mistral": ("mistral", {"sliding_window": None}),
    "phi3": ("phi3", {"pad_token_id": 0}),  # fused qkv and gate_up projections
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": SLIDING_WINDOW}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": SLIDING_WINDOW}),  # local + global layers
    "gpt2": ("gpt2", {}),  # learned positions, fused c_attn, MHA
}
EXPORTERS = ("dynamo", "torchscript")
# Encoders (sentence embedding, classification backbones): model_type -> config overrides
ENCODERS = {"bert": {}, "roberta": {"pad_token_id": 1}, "distilbert": {}}


def config(arch: str):
    import_transformers()
    from transformers import AutoConfig

    model_type, overrides = ARCHITECTURES[arch]
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return AutoConfig.for_model(model_type, **COMMON, **overrides)


def export(arch: str, exporter: str, path: str | Path, seed: int = 0) -> Path:
    """Export a random-weight `arch` model with `exporter` ("dynamo" or "torchscript") to `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = config(arch)
    torch.manual_seed(seed)
    return export_model(AutoModelForCausalLM.from_config(cfg).eval(), exporter, path)


def export_model(model, exporter: str, path: str | Path) -> Path:
    """Export a transformers causal LM with its KV cache, as Optimum names it, with `exporter`."""
    import torch
    from transformers.cache_utils import DynamicCache

    cfg = model.config
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, seq, past = 1, 5, 3
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    cache = [(torch.randn(batch, kv_heads, past, head_dim), torch.randn(batch, kv_heads, past, head_dim))
             for _ in range(layers)]

    class WithCache(torch.nn.Module):
        """input_ids, attention_mask, past key/values -> logits, present key/values."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, past_key_values):
            kv = DynamicCache(config=cfg)
            for i, (k, v) in enumerate(past_key_values):
                kv.update(k, v, i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=kv,
                             use_cache=True)
            presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *presents)

    kv_names = [f"{p}.{i}.{t}" for p in ("past_key_values",) for i in range(layers) for t in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *kv_names]
    outputs = ["logits", *(n.replace("past_key_values", "present") for n in kv_names)]
    path = Path(path)
    if exporter == "dynamo":
        dyn = torch.export.Dim.DYNAMIC
        shapes = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn},
                  "past_key_values": [({0: dyn, 2: dyn}, {0: dyn, 2: dyn}) for _ in range(layers)]}
        torch.onnx.export(WithCache().eval(), (ids, mask, cache), str(path), dynamo=True, dynamic_shapes=shapes,
                          input_names=inputs, output_names=outputs, external_data=False, verbose=False)
    elif exporter == "torchscript":
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                **{n: {0: "batch_size", 2: "past_sequence_length"} for n in kv_names}}
        torch.onnx.export(WithCache().eval(), (ids, mask, cache), str(path), dynamo=False, input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=17)
    else:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    return path


def export_encoder(arch: str, exporter: str, path: str | Path, seq: int = 16, seed: int = 0) -> Path:
    """A random-weight transformers encoder as users export it: input_ids and attention_mask
    [batch, seq] -> last_hidden_state, dynamic batch; the dynamo exporter's weights in its default
    external-data file beside the model."""
    import warnings

    import torch

    import_transformers()
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(arch, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, **ENCODERS[arch])
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids, mask = torch.randint(0, 256, (1, seq)), torch.ones(1, seq, dtype=torch.int64)
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", max=64)
            torch.onnx.export(Encoder(), (ids, mask), str(path), dynamo=True, input_names=names,
                              output_names=["last_hidden_state"], dynamic_shapes=({0: batch}, {0: batch}))
        else:
            torch.onnx.export(Encoder(), (ids, mask), str(path), dynamo=False, input_names=names,
                              output_names=["last_hidden_state"], opset_version=17,
                              dynamic_axes={n: {0: "batch"} for n in (*names, "last_hidden_state")})
    return Path(path)

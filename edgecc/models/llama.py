"""A Llama-architecture causal LM written for export: KV cache, positions and mask as model inputs.

Hugging Face's modeling code builds positions and the causal mask from `Range(Shape(x))` and keeps
its cache in Python objects; neither exports to a graph TVM 0.27 imports with symbolic shapes. This
module computes the same function from explicit inputs instead:

    ids [batch, seq] int64, attention_mask [batch, past+seq] int64, position_ids [batch, seq] int64,
    past.{i}.key / past.{i}.value [batch, kv_heads, past, head_dim]  (one pair per layer)
 -> logits [batch, seq, vocab], present.{i}.key / present.{i}.value [batch, kv_heads, past+seq, head_dim]

Key positions are the running count of attended tokens (cumsum of the mask), so the causal mask
needs no Range either; one graph serves prefill (past 0) and decode (seq 1). torch is needed only
here, at export time.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    context: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def to_json(self) -> dict:
        return asdict(self)


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of an exported model with `layers` layers, in graph order."""
    kv = [f"{i}.{t}" for i in range(layers) for t in ("key", "value")]
    return ["ids", "attention_mask", "position_ids", *(f"past.{n}" for n in kv)], \
        ["logits", *(f"present.{n}" for n in kv)]


def _module(cfg: LlamaConfig):
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(cfg.hidden))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * self.weight

    def rotate_half(x):  # constant slice bounds: chunk() exports bounds computed from Shape
        half = cfg.head_dim // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            hd = cfg.head_dim
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()
            self.q_proj = nn.Linear(cfg.hidden, cfg.heads * hd, bias=False)
            self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=False)
            self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * hd, bias=False)
            self.o_proj = nn.Linear(cfg.heads * hd, cfg.hidden, bias=False)
            self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
            self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
            self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

        def forward(self, x, cos, sin, bias, past_k, past_v):
            b, t, _ = x.shape
            hd, groups = cfg.head_dim, cfg.heads // cfg.kv_heads
            h = self.input_layernorm(x)
            q = self.q_proj(h).view(b, t, cfg.heads, hd).transpose(1, 2)
            k = self.k_proj(h).view(b, t, cfg.kv_heads, hd).transpose(1, 2)
            v = self.v_proj(h).view(b, t, cfg.kv_heads, hd).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            # Grouped-query attention: query heads [kv, g] share key/value head kv. Broadcasting a
            # 5-d matmul over g avoids an Expand whose shape TVM's importer cannot infer.
            q5 = q.reshape(b, cfg.kv_heads, groups, t, hd)
            att = (q5 @ k.unsqueeze(2).transpose(-1, -2)) * (hd ** -0.5) + bias
            out = att.softmax(-1) @ v.unsqueeze(2)
            out = out.reshape(b, cfg.heads, t, hd).transpose(1, 2).reshape(b, t, cfg.heads * hd)
            x = x + self.o_proj(out)
            h = self.post_attention_layernorm(x)
            x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
            return x, k, v

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
            self.layers = nn.ModuleList([Layer() for _ in range(cfg.layers)])
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def forward(self, ids, attention_mask, position_ids, *past):
            x = self.embed_tokens(ids)
            freqs = position_ids.unsqueeze(-1).float() * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
            cos, sin = emb.cos(), emb.sin()
            # Query at position p sees the attended keys whose running count is <= p.
            key_pos = attention_mask.cumsum(-1) - 1
            allowed = (key_pos.unsqueeze(1) <= position_ids.unsqueeze(-1)) & (attention_mask.unsqueeze(1) > 0)
            bias = torch.where(allowed, 0.0, -1e9)[:, None, None]
            present = []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, cos, sin, bias, past[2 * i], past[2 * i + 1])
                present += [k, v]
            return (self.lm_head(self.norm(x)), *present)

    return Llama()


def build(cfg: LlamaConfig, state_dict: dict | None = None, seed: int = 0):
    """The module for `cfg` with `state_dict` (Hugging Face Llama names) or seeded random weights."""
    import torch

    torch.manual_seed(seed)
    model = _module(cfg).eval()
    if state_dict is None:
        with torch.no_grad():  # random weights at a scale that keeps logits well spread
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02 if "embed" in name else p.shape[1] ** -0.5)
        return model
    renamed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        for sub in ("gate_proj", "up_proj", "down_proj"):
            key = key.replace(f"mlp.{sub}", sub)
        renamed[key.replace("self_attn.", "")] = value
    renamed.setdefault("lm_head.weight", renamed["embed_tokens.weight"])  # tied embeddings
    model.load_state_dict(renamed, strict=True)
    return model


def export(model, cfg: LlamaConfig, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export with symbolic batch, seq and past dims (TorchScript exporter), atomically."""
    import torch

    inputs, outputs = io_names(cfg.layers)
    b, t, past = 1, 3, 2
    args = (torch.randint(0, cfg.vocab, (b, t)), torch.ones(b, past + t, dtype=torch.int64),
            torch.arange(past, past + t).unsqueeze(0),
            *[torch.zeros(b, cfg.kv_heads, past, cfg.head_dim) for _ in range(2 * cfg.layers)])
    # "past + seq", not a new name: TVM's importer parses the expression, so the mask and the
    # concatenated keys share one symbolic length and their shapes broadcast.
    axes = {"ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past + seq"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in inputs[3:]})
    axes.update({n: {0: "batch", 2: "past + seq"} for n in outputs[1:]})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        tmp = Path(d) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(tmp), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
        if len(list(Path(d).iterdir())) > 1:
            # Over protobuf's 2 GB the exporter writes one file per weight; the model ships with
            # one data file beside it instead, streamed tensor by tensor from the mapped ones.
            import onnx_ir as ir

            ir.save(ir.load(str(tmp)), str(tmp.with_name(path.name)), external_data=path.name + ".data")
            tmp = tmp.with_name(path.name)
            os.replace(tmp.with_name(path.name + ".data"), path.with_name(path.name + ".data"))
        os.replace(tmp, path)
    return path

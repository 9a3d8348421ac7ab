"""Example models edgecc builds itself from a fixed seed and exports with torch.

`tiny-lm` is a small causal transformer LM (token + position embeddings, causal multi-head
attention, LayerNorm, GELU MLP) with dynamic batch and sequence. Positions and the causal
mask are slices of fixed tables rather than `Range(Shape(x))`, which TVM 0.27's importer
cannot give a shape. torch is needed only here, at export time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from pathlib import Path

from edgecc.errors import UserError

EXAMPLES = {
    "tiny-lm": "causal transformer LM: vocab 512, d 128, 4 heads, 2 layers, context 128",
    "mlp": "3-layer MLP 64-256-256-10 with GELU, dynamic batch",
    "convnet": "small conv net: 3x32x32 -> 3 conv+BN+ReLU stages -> pool -> linear, dynamic batch",
}
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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

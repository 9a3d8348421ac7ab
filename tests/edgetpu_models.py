"""Small seeded models for the Edge TPU tests and benchmark: an MLP, a conv net, a transformer block.

Each is exported from torch (TorchScript exporter, opset 17) with a symbolic batch, so calibration
data can stack many batch-1 samples.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

SEQ, DIM, HEADS = 16, 64, 4


def _export(module, example, path: Path, names: tuple[str, ...] = ("x",)) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=list(names),
            output_names=["y"],
            dynamic_axes={n: {0: "batch"} for n in (*names, "y")},
            opset_version=17,
            dynamo=False,
        )
    return path


def mlp(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    return _export(net, torch.randn(1, 32), path)


def convnet(path: Path) -> Path:
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.ReLU6(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return _export(net, torch.randn(1, 3, 16, 16), path)


def transformer_block(path: Path) -> Path:
    """Pre-LN encoder block: LayerNorm, multi-head attention, LayerNorm, GELU MLP, two residuals."""
    import torch

    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
            self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.up, self.down = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

        def forward(self, x):
            b, s, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(DIM, dim=-1)
            heads = [t.reshape(b, s, HEADS, d // HEADS).transpose(1, 2) for t in (q, k, v)]
            att = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / (d // HEADS) ** 0.5, dim=-1)
            x = x + self.out((att @ heads[2]).transpose(1, 2).reshape(b, s, d))
            return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))

    torch.manual_seed(0)
    return _export(Block(), torch.randn(1, SEQ, DIM), path)


def calibration(model: str, samples: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """`samples` batch-1 inputs stacked along the batch dim, N(0, 1)."""
    shape = {"mlp": (32,), "convnet": (3, 16, 16), "transformer": (SEQ, DIM)}[model]
    return {"x": np.random.default_rng(seed).standard_normal((samples, *shape)).astype(np.float32)}


BUILDERS = {"mlp": mlp, "convnet": convnet, "transformer": transformer_block}

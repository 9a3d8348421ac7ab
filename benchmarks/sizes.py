"""Artifact size per pipeline vs fp32, for the example LM and a weight-dominated MLP.

    .venv/bin/python benchmarks/sizes.py [--out benchmarks/results/sizes.json]

Each model is compiled for host with every pipeline below; the table gives the model's bytes (model.so and weights.bin) and
the ratio to the fp32 pipeline, plus the error against fp32 that compile's verification measured.
The tiny LM keeps its embeddings (a third of its weights) and the code in float/so, which bounds
its ratio; the 4 x 1024x1024 MLP shows the weight-dominated case.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import edgecc
from edgecc.models.examples import build_example

PIPELINES = {
    "fp32": "simplify,fuse",
    "int8": "simplify,fuse,quantize-int8",
    "int4-b32": "simplify,fuse,quantize-int4{block=32}",
    "int4-b128": "simplify,fuse,quantize-int4{block=128}",
    "bsr-0.9": "simplify,fuse,block-sparsity{block=1x16,sparsity=0.9,min_weights=1024}",
}


def weight_dominated_mlp(path: Path, width: int = 1024, layers: int = 4) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]),
                  helper.make_node("Relu", [f"h{i}"], [f"a{i}"])]
        prev = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", 1, ["batch", width])],
                              [helper.make_tensor_value_info(prev, 1, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sizes.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-lm": build_example("tiny-lm", Path(tmp) / "lm.onnx"),
                  "mlp-4x1024": weight_dominated_mlp(Path(tmp) / "mlp.onnx")}
        for model_name, path in models.items():
            base = None
            for name, pipeline in PIPELINES.items():
                art = edgecc.compile(path, "host", Path(tmp) / f"{model_name}-{name}", pipeline)
                size = art.model_bytes
                base = base or size
                v = art.manifest["verification"]
                rows.append({"model": model_name, "pipeline": name, "pipeline_text": pipeline,
                             "model_bytes": size, "ratio_vs_fp32": round(size / base, 3),
                             "cosine_vs_fp32": v.get("cosine_vs_fp32"),
                             "relative_error_vs_fp32": v.get("relative_error_vs_fp32")})
    print(f"{'model':12} {'pipeline':10} {'model':>10} {'x fp32':>7} {'cos vs fp32':>12}")
    for r in rows:
        cos = f"{r['cosine_vs_fp32']:.5f}" if r["cosine_vs_fp32"] is not None else "-"
        print(f"{r['model']:12} {r['pipeline']:10} {r['model_bytes'] / 1e6:9.2f}M "
              f"{r['ratio_vs_fp32']:7.3f} {cos:>12}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

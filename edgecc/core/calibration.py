"""Calibration data: loading and checking it, and activation ranges measured with it.

Data comes from `--calibration data.npz` (one array per model input, named as the input), or from
`--calibration-text FILE` for language models and BERT-style encoders: the text tokenized with the
model's tokenizer (the one its metadata names or the tokenizer.json beside it, or `--tokenizer`)
into up to TEXT_WINDOWS windows of TEXT_TOKENS tokens (fewer where the model's context is shorter) for an LM, each a prefill with an empty cache, or
up to TEXT_SENTENCES sentences padded to the sequence length for an encoder. Windows and sentences are
taken from the text's end, so that a perplexity measured on its beginning (`edgecc bench`) is on
text calibration never saw. Without either, passes that need ranges draw seeded synthetic batches
(random token ids for LMs, N(0,1) floats otherwise): enough to find scales, though real data gives
better ones, and a language model's activations on random ids are not those on text.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgecc.core import lm_signature
from edgecc.core import text as corpus
from edgecc.core.digest import sha256_file
from edgecc.core.ir import graph_proto
from edgecc.core.verify import graph_inputs, integer_ranges, narrow, narrowed_io, ort_session, random_inputs
from edgecc.errors import UserError

SYNTHETIC_BATCHES = 8
TEXT_WINDOWS, TEXT_TOKENS = 8, 256  # an LM's calibration text: 2,048 tokens
TEXT_SENTENCES, ENCODER_TOKENS = 64, 128  # an encoder's (ENCODER_TOKENS where its length is symbolic)
MAX_NPZ_BYTES = 16 << 30  # inputs beyond this are a mistake on a device-sized workflow


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Named arrays from an .npz file (never pickles), with one-line errors naming the file.

    Every member's header is checked against the bytes the member holds before any array is
    allocated: a corrupt or hostile header could otherwise ask for terabytes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        total = 0
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f, max_header_size=10000)
                need = math.prod(shape) * dtype.itemsize
                if dtype.hasobject or need > info.file_size:
                    raise ValueError(f"member '{info.filename}' declares {dtype} {list(shape)} "
                                     f"({need} bytes) but holds {info.file_size} bytes")
                total += need
        if total > MAX_NPZ_BYTES:
            raise ValueError(f"arrays of {total} bytes exceed edgecc's limit of {MAX_NPZ_BYTES}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as e:  # RuntimeError: an encrypted member
        raise UserError(f"{path}: not a readable .npz file: {e}") from None


def load_calibration(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read an .npz of model inputs and check names, dtypes and shapes against the model (a batch
    fixed at 1 may hold several samples stacked along it)."""
    path = Path(path)
    data = read_npz(path)
    specs = {s.name: s for s in graph_inputs(model)}
    missing, extra = sorted(set(specs) - set(data)), sorted(set(data) - set(specs))
    if missing or extra:
        raise UserError(f"{path}: calibration inputs do not match the model: missing {missing}, "
                        f"unexpected {extra} (model inputs: {sorted(specs)})")
    for name, spec in specs.items():
        a = data[name]
        if a.dtype != spec.dtype:
            raise UserError(f"{path}: '{name}' has dtype {a.dtype}, the model expects {spec.dtype}")
        # A batch fixed at 1 takes samples stacked along it, as a symbolic batch does.
        dims = list(zip(spec.shape, a.shape))[1 if spec.shape and spec.shape[0] == 1 else 0:]
        fixed_dims_differ = any(isinstance(d, int) and d != s for d, s in dims)
        if a.ndim != len(spec.shape) or fixed_dims_differ:
            raise UserError(f"{path}: '{name}' has shape {list(a.shape)}, "
                            f"the model expects {list(spec.shape)}")
    return data


def text_calibration(text_path: str | Path, model_path: str | Path, model: onnx.ModelProto,
                     tokenizer: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Calibration inputs from real text, and a description of them for the manifest."""
    model_path = Path(model_path)
    tokenizer = Path(tokenizer) if tokenizer else lm_signature.tokenizer_file(model_path, model)
    if tokenizer is None:
        raise UserError(f"{model_path}: no tokenizer to read --calibration-text with: its metadata names "
                        "none and there is no tokenizer.json beside it; give --tokenizer FILE")
    if not tokenizer.is_file():
        raise UserError(f"{tokenizer}: no such tokenizer file")
    specs = {s.name: s for s in graph_inputs(model)}
    sig = lm_signature.find(model)
    if sig is not None:
        ids, path = corpus.token_ids(tokenizer, text_path)
        length = min(TEXT_TOKENS, *_positions_taken(model, sig, str(model_path)))
        count = min(TEXT_WINDOWS, len(ids) // length)
        if count == 0:
            raise UserError(f"{path}: {len(ids)} tokens, fewer than one calibration window of {length}")
        ids = np.array(ids[len(ids) - count * length:], np.int64).reshape(count, length)
        if sig.vocab is not None and ids.max() >= sig.vocab:
            raise UserError(f"{tokenizer}: token id {ids.max()} is outside the model's vocabulary of "
                            f"{sig.vocab}: not this model's tokenizer")
        feeds = {sig.ids.name: ids.astype(sig.ids.dtype)}
        if sig.mask:
            feeds[sig.mask.name] = np.ones(ids.shape, sig.mask.dtype)
        if sig.positions:
            feeds[sig.positions.name] = np.tile(np.arange(length, dtype=sig.positions.dtype), (count, 1))
        feeds.update({e.past: e.empty(count) for e in sig.cache})
        shape = {"windows": count, "tokens": length}
    elif {"input_ids", "attention_mask"} <= set(specs) <= {"input_ids", "attention_mask", "token_type_ids"}:
        raw, path = corpus.read_text(text_path)
        sentences = corpus.sentences(raw, TEXT_SENTENCES, from_end=True)
        if not sentences:
            raise UserError(f"{path}: no sentence of 6 to 40 words to calibrate with")
        seq = specs["input_ids"].shape[1]
        feeds = corpus.padded(tokenizer, sentences, seq if isinstance(seq, int) else ENCODER_TOKENS)
        if "token_type_ids" in specs:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        feeds = {k: v.astype(specs[k].dtype) for k, v in feeds.items()}
        shape = {"sentences": len(sentences), "tokens": feeds["input_ids"].shape[1]}
    else:
        raise UserError(f"{model_path}: --calibration-text needs a causal LM with a KV cache or an encoder "
                        f"(inputs input_ids, attention_mask[, token_type_ids]); its inputs are {sorted(specs)}. "
                        "Give --calibration DATA.npz instead")
    source = {"source": "text", "file": str(path), "sha256": sha256_file(Path(path)),
              "tokenizer": str(tokenizer), **shape}
    return feeds, source


def _positions_taken(model: onnx.ModelProto, sig: lm_signature.LMSignature, where: str) -> list[int]:
    """Bounds on the positions an LM takes: its metadata's context, the range of its positions
    input, and the rows of every learned position table (a constant float table of 16 rows or more
    that a Gather reads with indices other than the token ids: GPT-2's wpe)."""
    bounds = [lm_signature.metadata(model, where).get("context", TEXT_TOKENS)]
    ranges = integer_ranges(model)
    if sig.positions and sig.positions.name in ranges:
        bounds.append(ranges[sig.positions.name][1])
    tables = {t.name: t.dims for t in model.graph.initializer
              if len(t.dims) == 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in tables and node.input[1] != sig.ids.name:
            rows = tables[node.input[0]][0]
            if 16 <= rows < (sig.vocab or rows + 1):
                bounds.append(rows)
    return bounds


def activation_ranges(model: ir.Model, ctx, names: list[str]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) absolute maxima of the named activations over the calibration data."""
    ranges: dict[str, np.ndarray] = {}
    for batch in activation_batches(model, ctx, names):
        for name, rows in batch.items():
            peak = np.abs(rows).max(axis=0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def activation_samples(model: ir.Model, ctx, names: list[str]) -> dict[str, np.ndarray]:
    """The named activations over the calibration data, as rows [tokens, channels]."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in activation_batches(model, ctx, names):
        for name, rows in batch.items():
            parts[name].append(rows)
    return {name: np.concatenate(rows) for name, rows in parts.items()}


def one_at_a_time(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Samples stacked along dim 0, as batch-1 feeds."""
    return [{k: v[i : i + 1] for k, v in data.items()} for i in range(len(next(iter(data.values()))))]


def activation_batches(model: ir.Model, ctx, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The named activations as rows [tokens, channels], one calibration batch at a time: an LM's
    calibration runs a window at a time, so what a consumer keeps decides the memory, not the
    activations of every window at once (SmolLM2's matmul inputs are 0.4 MB a token)."""
    session = ort_session(model, outputs=names)  # weights in an external-data file stay there
    for feeds in calibration_feeds(model, ctx):
        yield {name: value.reshape(-1, value.shape[-1]) for name, value in zip(names, session.run(names, feeds))}


def calibration_feeds(model: ir.Model, ctx) -> Iterator[dict[str, np.ndarray]]:
    """The model's inputs for calibration, a batch at a time: the calibration data (an LM's a
    window at a time, a batch-1 model's a sample at a time), or seeded random batches without it."""
    if ctx.calibration is None:
        for i in range(SYNTHETIC_BATCHES):
            yield random_inputs(model, seed=ctx.seed + i, dim_values=ctx.dim_values)
        return
    narrowed = narrowed_io(model)  # the source's inputs as a pass that pruned a KV cache left them
    for feeds in _source_batches(model, ctx):
        yield narrow(feeds, narrowed)


def _source_batches(model: ir.Model, ctx) -> Iterator[dict[str, np.ndarray]]:
    graph = graph_proto(model)
    sig = lm_signature.find(graph)
    batch_dim = sig and next(s.shape[0] for s in graph_inputs(graph) if s.name == sig.ids.name)
    if not isinstance(batch_dim, str):  # not an LM, or one whose batch is fixed
        specs = graph_inputs(graph)
        if all(s.shape and s.shape[0] == 1 for s in specs):  # batch-1 samples stacked: one at a time
            yield from one_at_a_time(ctx.calibration)
        else:
            yield ctx.calibration
        return
    axes = {sig.ids.name: 0, **({sig.mask.name: 0} if sig.mask else {}),
            **({sig.positions.name: 0} if sig.positions else {}), **{e.past: e.batch_axis for e in sig.cache}}
    for i in range(len(ctx.calibration[sig.ids.name])):
        yield {k: v if axes.get(k) is None else np.take(v, [i], axis=axes[k]) for k, v in ctx.calibration.items()}

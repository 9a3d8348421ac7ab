"""The signature of a causal LM with a KV cache, recognized from its ONNX graph, not from its names.

Exporters name the same things differently: Optimum and ONNX Runtime GenAI take `input_ids`,
`attention_mask`, `position_ids`, `past_key_values.N.key/value` and return `logits`,
`present.N.key/value`; edgecc's own export takes `ids` and `past.N.key/value`; a plain torch export
takes whatever names its author gave, and its dims are named independently (`total_sequence_length`,
or the dynamo exporter's `s43`, one symbol per input). So the roles are read from the graph:

- token ids: the integer [batch, seq] input that indexes an embedding table (the largest one, when
  learned positions index another);
- attention mask and positions (both optional): the other [batch, *] integer inputs, by name where
  it says "mask" or "position", else positions share the ids' sequence dim and the mask does not;
- the KV cache: float inputs of rank >= 3, each paired with the output computed from it through a
  Concat (or an attention op with a past input) and data movement only; split K/V and fused
  ([2, batch, heads, past, head_dim]) caches alike. Where the graph does not decide (a graph from
  a manifest, or an output reached from several caches), the names do: `past…` -> `present…`;
- the logits: the output named so, else the only other rank-3 float output.

Of each cache input the signature keeps its shape with the batch and length axes marked, which is
all `generate`, `bench` and verification need: an empty cache, the bytes one token adds, and
sizes for symbolic dims that keep mask length = past + seq.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgecc.errors import UserError

if TYPE_CHECKING:  # a process that only runs an artifact reads its signature from the manifest, without onnx
    import onnx

# Sizes for symbolic dims of verification inputs: prefill of `SEQ` tokens after `PAST` cached ones.
BATCH, SEQ, PAST = 1, 5, 3

TOKENIZER = "tokenizer.json"
IDS_NAMES = ("input_ids", "ids", "token_ids", "tokens")
# Ops that move a tensor's values without computing new ones: input indices that carry the data.
_MOVES = {"Identity": (0,), "Cast": (0,), "Slice": (0,), "Gather": (0,), "Split": (0,), "Squeeze": (0,),
          "Unsqueeze": (0,), "Reshape": (0,), "Transpose": (0,), "Expand": (0,), "Flatten": (0,)}
# ONNX Runtime's attention ops that append to a past cache: output index -> its past input index.
_ATTENTION_PAST = {"GroupQueryAttention": {1: 3, 2: 4}, "MultiHeadAttention": {1: 6, 2: 7},
                   "Attention": {1: 4}}
_CACHE_WORDS = re.compile(r"past_key_values|present|past")


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    dtype: str


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One cache input and the output that returns it grown by the step's tokens."""
    past: str
    present: str
    shape: tuple  # the past input's dims: ints, names, None
    dtype: str
    seq_axis: int
    batch_axis: int | None  # None: a static batch

    def empty(self, batch: int = 1) -> np.ndarray:
        shape = [0 if a == self.seq_axis else batch if a == self.batch_axis else d
                 for a, d in enumerate(self.shape)]
        return np.zeros(shape, self.dtype)

    def bytes_per_token(self) -> int:
        """Bytes one cached token adds to this entry (batch 1)."""
        fixed = [d for a, d in enumerate(self.shape) if a not in (self.seq_axis, self.batch_axis)]
        return int(np.prod(fixed)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LMSignature:
    ids: Port
    logits: str
    mask: Port | None
    positions: Port | None
    cache: tuple[CacheEntry, ...]
    vocab: int | None
    paired_by: str  # "graph", "names" or "graph+names": how past inputs found their present outputs

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {e.past: e.empty() for e in self.cache}

    def presents(self, outputs: Mapping) -> dict:
        """The cache a step returned, as the next step's past inputs."""
        return {e.past: outputs[e.present] for e in self.cache}

    def kv_bytes_per_token(self) -> int:
        return sum(e.bytes_per_token() for e in self.cache)

    def verify_dims(self, shapes: Mapping[str, Sequence], pinned: Mapping[str, int]) -> dict[str, int]:
        """Sizes for the symbolic dims of the LM's inputs (`shapes`: name -> dims) that agree with
        each other: batch, seq and past as `pinned` gives them or BATCH, SEQ, PAST; the mask
        [batch, past + seq], positions [batch, seq], every cache entry [.. batch .. past ..],
        whatever each dim is called. `pinned` wins over them."""
        def size(dim, default: int) -> int:
            return dim if isinstance(dim, int) else pinned.get(dim, default)

        ids, first = shapes[self.ids.name], self.cache[0]
        batch, seq = size(ids[0], BATCH), size(ids[1], SEQ)
        past = size(first.shape[first.seq_axis], PAST)
        wanted = list(zip(ids, (batch, seq)))
        if self.mask:
            wanted += zip(shapes[self.mask.name], (batch, past + seq))
        if self.positions:
            wanted += zip(shapes[self.positions.name], (batch, seq))
        for e in self.cache:
            wanted.append((e.shape[e.seq_axis], past))
            if e.batch_axis is not None:
                wanted.append((e.shape[e.batch_axis], batch))
        dims: dict[str, int] = {}
        for dim, value in wanted:
            if isinstance(dim, str):
                dims.setdefault(dim, value)
        return {**dims, **pinned}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LMSignature":
        def port(p):
            return Port(**p) if p else None

        return cls(port(data["ids"]), data["logits"], port(data["mask"]), port(data["positions"]),
                   tuple(CacheEntry(**dict(e, shape=tuple(e["shape"]))) for e in data["cache"]),
                   data["vocab"], data["paired_by"])


class NotAnLM(UserError):
    """The model lacks a role of the signature; the message names what is missing."""


def of_model(model: onnx.ModelProto, where: str) -> LMSignature:
    """The signature of an ONNX model, its graph deciding what names cannot; else NotAnLM."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(vi) for vi in model.graph.input if vi.name not in inits]
    # calibration adds untyped outputs for activations it reads: neither logits nor a cache
    outputs = [_spec(vi) for vi in model.graph.output if vi.type.tensor_type.elem_type]
    return recognize(inputs, outputs, where, model.graph)


def read_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """An .onnx file without its external weights (they stay on disk); a one-line error if unreadable."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable ONNX model: {str(e).splitlines()[0]}") from None


def of_file(path: str | os.PathLike) -> LMSignature:
    return of_model(read_graph(path), str(path))


def metadata(model: onnx.ModelProto, where: str) -> dict:
    """The generation facts an export records as `edgecc.lm.*` metadata (JSON values: context,
    end-of-text ids, tokenizer file, config)."""
    try:
        return {p.key.removeprefix("edgecc.lm."): json.loads(p.value) for p in model.metadata_props
                if p.key.startswith("edgecc.lm.")}
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{where}: metadata edgecc.lm.* is not JSON: {str(e) or type(e).__name__}") from None


def tokenizer_file(model_path: Path, model: onnx.ModelProto) -> Path | None:
    """The tokenizer of the model at `model_path`: the file its metadata names, else a
    tokenizer.json beside it; None when there is neither."""
    named = metadata(model, str(model_path)).get("tokenizer")
    if named is None:
        beside = model_path.parent / TOKENIZER
        return beside if beside.is_file() else None
    tokenizer = model_path.parent / named if isinstance(named, str) else None
    # Metadata is data from the model's author: it may name a file beside the model, no other.
    if tokenizer is None or tokenizer.resolve().parent != model_path.resolve().parent:
        raise UserError(f"{model_path}: its metadata names tokenizer {named!r}, which is not "
                        "a file in the model's directory")
    if not tokenizer.is_file():
        raise UserError(f"{model_path}: its metadata names tokenizer '{named}', which is not beside it ({tokenizer})")
    return tokenizer


def find(model: onnx.ModelProto) -> LMSignature | None:
    """The signature, or None for a model that is not a causal LM with a KV cache."""
    try:
        return of_model(model, "")
    except NotAnLM:
        return None


def of_manifest(manifest: dict, where: str) -> LMSignature:
    """An artifact's signature: recorded at compile time, else (an older artifact) read from its
    I/O specs by names and dims alone."""
    recorded = manifest.get("lm", {}).get("signature")
    if recorded:
        return LMSignature.from_json(recorded)
    return recognize(manifest["inputs"], manifest["outputs"], where)


def recognize(inputs: list[dict], outputs: list[dict], where: str,
              graph: onnx.GraphProto | None = None) -> LMSignature:
    """The signature from I/O specs ({"name", "dtype", "shape"}) and, where given, the graph."""
    def refuse(missing: str) -> NotAnLM:
        names = ", ".join(i["name"] for i in inputs) or "none"
        return NotAnLM(f"{where}: not a causal LM with a KV cache: {missing} (its inputs: {names})")

    tables = _embedding_tables(graph) if graph is not None else {}
    by_name = {i["name"]: i for i in inputs}
    matrices = [i for i in inputs if len(i["shape"]) == 2 and np.dtype(i["dtype"]).kind in "iub"]
    vocabs = {o["shape"][-1] for o in outputs if len(o["shape"]) == 3 and isinstance(o["shape"][-1], int)}
    ids = _token_ids(matrices, tables, vocabs)
    if ids is None:
        raise refuse("no token-ids input (an integer [batch, seq] input indexing an embedding table)")
    mask, positions = _mask_and_positions([i for i in matrices if i is not ids], ids, refuse)
    cache_inputs = [i for i in inputs if len(i["shape"]) >= 3 and np.dtype(i["dtype"]).kind == "f"]
    if not cache_inputs:
        raise refuse("no KV-cache inputs (float inputs of rank 3 or more, returned grown as outputs)")
    known = {ids["name"], *(p["name"] for p in (mask, positions) if p)} | {i["name"] for i in cache_inputs}
    other = [i["name"] for i in inputs if i["name"] not in known]
    if other:
        raise refuse(f"input '{other[0]}' is none of token ids, attention mask, positions or KV cache")
    pairs, paired_by = _pair(cache_inputs, outputs, graph, refuse)
    rest = [o for o in outputs if o["name"] not in pairs.values()]
    logits = next((o for o in rest if o["name"] == "logits"), None)
    if logits is None:
        ranked = [o for o in rest if len(o["shape"]) == 3 and np.dtype(o["dtype"]).kind == "f"]
        if len(ranked) != 1:
            raise refuse("no logits output (an output named 'logits', or one float [batch, seq, vocab])")
        logits = ranked[0]
    vocab = logits["shape"][-1] if isinstance(logits["shape"][-1], int) else tables.get(ids["name"])
    cache = tuple(_entry(by_name[past], present, ids, refuse) for past, present in pairs.items())
    return LMSignature(_port(ids), logits["name"], _port(mask), _port(positions), cache, vocab, paired_by)


def _port(spec: dict | None) -> Port | None:
    return Port(spec["name"], str(np.dtype(spec["dtype"]))) if spec else None


def _spec(vi: onnx.ValueInfoProto) -> dict:
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tt.shape.dim]
    from onnx import helper

    return {"name": vi.name, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name,
            "shape": dims}


def _embedding_tables(graph: onnx.GraphProto) -> dict[str, int]:
    """Graph tensors used as Gather indices into a constant table: name -> the table's rows."""
    rows = {i.name: i.dims[0] for i in graph.initializer if i.dims}
    rows.update({n.output[0]: n.attribute[0].t.dims[0] for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims})
    tables: dict[str, int] = {}
    for n in graph.node:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type == "Gather" and axis == 0 and len(n.input) == 2 and n.input[0] in rows:
            tables[n.input[1]] = max(tables.get(n.input[1], 0), rows[n.input[0]])
    return tables


def _token_ids(matrices: list[dict], tables: dict[str, int], vocabs: set[int]) -> dict | None:
    """The token-ids input: named so, else the one indexing an embedding table of as many rows as
    an output has scores per token (the vocabulary), else the one indexing the largest table
    (learned positions index a table too), else (no graph to tell) the first."""
    named = [i for i in matrices if i["name"] in IDS_NAMES]
    if named:
        return named[0]
    candidates = [i for i in matrices if np.dtype(i["dtype"]).kind in "iu" and not re.search("mask|pos", i["name"], re.I)]

    def rank(k: int) -> tuple:
        rows = tables.get(candidates[k]["name"], 0)
        return rows in vocabs, rows, -k

    return candidates[max(range(len(candidates)), key=rank)] if candidates else None


def _mask_and_positions(rest: list[dict], ids: dict, refuse) -> tuple[dict | None, dict | None]:
    """By name where it says; else positions are [batch, seq] like the ids, the mask is longer."""
    roles: dict[str, list[dict]] = {"mask": [], "positions": []}
    for i in rest:
        if re.search("mask", i["name"], re.I):
            roles["mask"].append(i)
        elif re.search("pos", i["name"], re.I) or (ids["shape"][1] is not None and i["shape"][1] == ids["shape"][1]):
            roles["positions"].append(i)
        else:
            roles["mask"].append(i)
    for role, found in roles.items():
        if len(found) > 1:
            raise refuse(f"inputs {' and '.join(i['name'] for i in found)} could each be the {role}")
    return (roles["mask"] or [None])[0], (roles["positions"] or [None])[0]


def _pair(cache_inputs: list[dict], outputs: list[dict], graph: onnx.GraphProto | None,
          refuse) -> tuple[dict[str, str], str]:
    """past input -> present output: by the graph (the output is the input grown by a Concat),
    then by names (`past…` -> `present…`) for what the graph leaves open."""
    past_names = [i["name"] for i in cache_inputs]
    sources = _cache_sources(graph, set(past_names), [o["name"] for o in outputs]) if graph is not None else {}
    claims: dict[str, list[str]] = {}
    for out, found in sources.items():
        for past in found:
            claims.setdefault(past, []).append(out)
    pairs = {p: claims[p][0] for p in past_names
             if len(claims.get(p, ())) == 1 and len(sources[claims[p][0]]) == 1}
    by_graph = len(pairs)
    free = [o["name"] for o in outputs if o["name"] not in pairs.values()]
    for past in past_names:
        if past in pairs:
            continue
        key = _CACHE_WORDS.sub("", past)
        match = [o for o in free if o != past and _CACHE_WORDS.sub("", o) == key]
        if len(match) != 1:
            raise refuse(f"cache input '{past}' has no present output (none computed from it "
                         "by a Concat, and no output named after it)")
        pairs[past] = match[0]
        free.remove(match[0])
    return pairs, ("graph" if by_graph == len(pairs) else "names" if not by_graph else "graph+names")


def _cache_sources(graph: onnx.GraphProto, pasts: set[str], outputs: list[str]) -> dict[str, set[str]]:
    """For each output, the cache inputs it is made of by moving data, with at least one Concat
    (or an attention op's past input) on the way: the cache grown by the step's tokens."""
    producer = {o: (n, k) for n in graph.node for k, o in enumerate(n.output)}
    result = {}
    for out in outputs:
        found, seen, todo = set(), set(), [(out, False)]
        while todo:
            name, grown = todo.pop()
            if (name, grown) in seen:
                continue
            seen.add((name, grown))
            if name in pasts:
                if grown:
                    found.add(name)
                continue
            node, k = producer.get(name, (None, 0))
            if node is None:
                continue
            if node.op_type == "Concat":
                todo += [(i, True) for i in node.input]
            elif node.op_type in _MOVES and node.domain in ("", "ai.onnx"):
                todo += [(node.input[i], grown) for i in _MOVES[node.op_type] if i < len(node.input)]
            elif node.domain == "com.microsoft" and k in _ATTENTION_PAST.get(node.op_type, {}):
                past = _ATTENTION_PAST[node.op_type][k]
                if past < len(node.input):
                    todo.append((node.input[past], True))
        if found:
            result[out] = found
    return result


def _entry(past: dict, present: str, ids: dict, refuse) -> CacheEntry:
    """The cache input's length axis and batch axis: of its symbolic dims, the one named like the
    ids' batch (else the first of two) is the batch, the other the length."""
    shape = tuple(past["shape"])
    symbolic = [a for a, d in enumerate(shape) if not isinstance(d, int)]
    if not 1 <= len(symbolic) <= 2:
        raise refuse(f"cache input '{past['name']}' has shape {list(shape)}; expected a symbolic "
                     "length (and batch) beside static heads and head size")
    batch = None
    if len(symbolic) == 2:
        batch = next((a for a in symbolic if shape[a] is not None and shape[a] == ids["shape"][0]), symbolic[0])
    seq = next(a for a in symbolic if a != batch)
    return CacheEntry(past["name"], present, shape, past["dtype"], seq, batch)

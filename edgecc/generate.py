"""Greedy decoding with a causal LM that takes its KV cache as inputs (see edgecc.llama).

One step function serves prefill (the whole prompt, empty cache) and decode (one token, the cache
the previous step returned); it can be a compiled artifact or ONNX Runtime on the exported model,
and both decode through `greedy`, so their tokens can be compared one for one.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable

import numpy as np

from edgecc.errors import UserError

# Outputs may stay in the engine's own tensors (Artifact.run(as_numpy=False)); `logits` reads one.
Step = Callable[[dict[str, Any]], dict[str, Any]]
_PAST = re.compile(r"past\.(\d+)\.(key|value)")
EXPECTED = "ids, attention_mask, position_ids, past.<layer>.key, past.<layer>.value"


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The KV inputs of a model: past.{i}.key/value of shape [batch, kv_heads, past, head_dim]."""
    names: tuple[str, ...]
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, inputs: list[dict], where: str) -> "CacheLayout":
        """From I/O specs ({"name", "shape"}); a one-line error naming the expected inputs."""
        names = [i["name"] for i in inputs]
        past = [i for i in inputs if _PAST.fullmatch(i["name"])]
        shapes = {tuple(i["shape"][1::2]) for i in past}
        if (names[:3] != ["ids", "attention_mask", "position_ids"] or not past
                or len(past) != len(names) - 3 or len(shapes) != 1
                or not all(isinstance(d, int) for d in next(iter(shapes)))):
            raise UserError(f"{where}: not a causal LM with a KV cache: expected inputs {EXPECTED} "
                            f"(past as [batch, kv_heads, past, head_dim]); it has {', '.join(names)}")
        kv_heads, head_dim = next(iter(shapes))
        return cls(tuple(i["name"] for i in past), kv_heads, head_dim)

    def empty(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for n in self.names}

    def presents(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The cache a step returned (present.*), as the next step's past.* inputs."""
        return {n: outputs[n.replace("past.", "present.", 1)] for n in self.names}


def logits(outputs: dict[str, Any]) -> np.ndarray:
    """A step's logits as numpy, whichever engine's tensor holds them."""
    value = outputs["logits"]
    return value if isinstance(value, np.ndarray) else value.numpy()


def step_feeds(ids: np.ndarray, past: dict[str, Any], cached: int) -> dict[str, Any]:
    """Inputs of one step: `ids` [1, n] after `cached` tokens whose keys and values are `past`."""
    total = cached + ids.shape[1]
    return {"ids": ids, "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(cached, total, dtype=np.int64)[None], **past}


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    tokens: list[int]
    prefill_s: float
    decode_s: float  # all decode steps together (every token after the first)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def greedy(step: Step, cache: CacheLayout, prompt_ids: list[int], max_new_tokens: int,
           eos_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy tokens after `prompt_ids` (batch 1): prefill once, then one token per step."""
    ids, cached, past = np.asarray([prompt_ids], np.int64), 0, cache.empty()
    tokens: list[int] = []
    prefill_s = decode_s = 0.0
    while len(tokens) < max_new_tokens:
        t = time.perf_counter()
        out = step(step_feeds(ids, past, cached))
        token = int(np.argmax(logits(out)[0, -1]))
        if tokens:
            decode_s += time.perf_counter() - t
        else:
            prefill_s = time.perf_counter() - t
        tokens.append(token)
        if on_token:
            on_token(token)
        if token in eos_ids:
            break
        past = cache.presents(out)
        ids, cached = np.asarray([[token]], np.int64), cached + ids.shape[1]
    return Generation(list(prompt_ids), tokens, prefill_s, decode_s)


def ort_step(model_path: str, threads: int = 0) -> tuple[Step, list[dict]]:
    """ONNX Runtime (all optimizations) on an exported model, and its input specs. The session
    reads the file itself: no copy of the weights stays in this process."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types, one per failure kind
        raise UserError(f"{model_path}: ONNX Runtime cannot load it: {str(e).strip().splitlines()[0]}") from None
    names = [o.name for o in session.get_outputs()]
    specs = [{"name": i.name, "shape": list(i.shape)} for i in session.get_inputs()]
    return (lambda feeds: dict(zip(names, session.run(None, feeds)))), specs

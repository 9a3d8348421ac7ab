"""Greedy decoding with a causal LM that takes its KV cache as inputs (edgecc.core.lm_signature says which).

One step function serves prefill (the whole prompt, empty cache) and decode (one token, the cache
the previous step returned); it can be a compiled artifact or ONNX Runtime on the exported model,
and both decode through `greedy`, so their tokens can be compared one for one.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np

from edgecc.core.lm_signature import LMSignature
from edgecc.errors import UserError

# Outputs may stay in the engine's own tensors (Artifact.run(as_numpy=False)); `logits` reads one.
Step = Callable[[dict[str, Any]], dict[str, Any]]


def logits(sig: LMSignature, outputs: dict[str, Any]) -> np.ndarray:
    """A step's logits as numpy, whichever engine's tensor holds them. A tensor in host memory
    is viewed, not copied: after a prefill the logits of every prompt position are a tensor of
    [1, n, vocab] (25 MB for SmolLM2 at 128 tokens), of which decoding reads one row."""
    value = outputs[sig.logits]
    if isinstance(value, np.ndarray):
        return value
    if value.device.dlpack_device_type() == 1:  # kDLCPU
        return np.from_dlpack(value)
    return value.numpy()


def step_feeds(sig: LMSignature, ids: np.ndarray, past: dict[str, Any], cached: int) -> dict[str, Any]:
    """Inputs of one step: `ids` [1, n] after `cached` tokens whose keys and values are `past`;
    the mask covers all cached + n tokens, the positions run on from `cached`."""
    total = cached + ids.shape[1]
    feeds = {sig.ids.name: np.asarray(ids, sig.ids.dtype), **past}
    if sig.mask:
        feeds[sig.mask.name] = np.ones((1, total), sig.mask.dtype)
    if sig.positions:
        feeds[sig.positions.name] = np.arange(cached, total, dtype=sig.positions.dtype)[None]
    return feeds


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


def greedy(step: Step, sig: LMSignature, prompt_ids: list[int], max_new_tokens: int,
           eos_ids: tuple[int, ...] = (), on_token: Callable[[int], None] | None = None) -> Generation:
    """Greedy tokens after `prompt_ids` (batch 1): prefill once, then one token per step."""
    ids, cached, past = np.asarray([prompt_ids], np.int64), 0, sig.empty_cache()
    tokens: list[int] = []
    prefill_s = decode_s = 0.0
    while len(tokens) < max_new_tokens:
        t = time.perf_counter()
        out = step(step_feeds(sig, ids, past, cached))
        token = int(np.argmax(logits(sig, out)[0, -1]))
        if tokens:
            decode_s += time.perf_counter() - t
        else:
            prefill_s = time.perf_counter() - t
        tokens.append(token)
        if on_token:
            on_token(token)
        if token in eos_ids:
            break
        past = sig.presents(out)
        ids, cached = np.asarray([[token]], np.int64), cached + ids.shape[1]
    return Generation(list(prompt_ids), tokens, prefill_s, decode_s)


def ort_step(model_path: str, threads: int = 0) -> Step:
    """ONNX Runtime (all optimizations) on an exported model. The session reads the file itself:
    no copy of the weights stays in this process."""
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
    return lambda feeds: dict(zip(names, session.run(None, feeds)))

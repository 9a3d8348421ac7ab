"""Running an Edge TPU artifact here: its chain of segments, Edge TPU ones in LiteRT, host ones in
ONNX Runtime.

LiteRT's interpreter runs each int8 `tpuN.tflite` with its CPU kernels (the reference for what the
Edge TPU computes, minus the TPU); `hostN.onnx` runs in ONNX Runtime. Values pass between segments
as the manifest types them: int8 where an Edge TPU segment writes or reads them, float elsewhere.
The model's own inputs are quantized with the scale and zero point the manifest records where a
TPU segment reads them, and int8 outputs dequantized. This is what `edgecc run` and the
compile-time verification use.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

INT8_MIN, INT8_MAX = -128, 127


@dataclasses.dataclass(frozen=True)
class Quant:
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    def to_json(self) -> dict:
        return {"scale": self.scale[0], "zero_point": self.zero_point[0]}


def quantize(x: np.ndarray, q: Quant) -> np.ndarray:
    return np.clip(np.round(x / q.scale[0]) + q.zero_point[0], INT8_MIN, INT8_MAX).astype(np.int8)


def dequantize(x: np.ndarray, q: Quant) -> np.ndarray:
    return ((x.astype(np.float32) - q.zero_point[0]) * q.scale[0]).astype(np.float32)


def _quant(spec: dict) -> Quant:
    return Quant((spec["scale"],), (spec["zero_point"],))


def runner(artifact) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A function from the model's own inputs to an Edge TPU artifact's outputs (float32). Every
    segment's ONNX Runtime session or LiteRT interpreter is made once, for every call."""
    int8 = {name: _quant(spec) for name, spec in artifact.manifest["edgetpu"]["int8"].items()}
    steps = [step for _, step in segment_steps(artifact)]
    outputs = [o["name"] for o in artifact.outputs]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        artifact.check_inputs(feeds)
        values = {
            name: quantize(np.asarray(v, np.float32), int8[name]) if name in int8 else v
            for name, v in feeds.items()
        }
        for step in steps:
            values.update(step(values))
        return {name: dequantize(values[name], int8[name]) if name in int8 else values[name] for name in outputs}

    return run


def segment_steps(artifact) -> list[tuple[dict, Callable[[dict], dict]]]:
    """Each segment of the chain (its manifest entry) with a function from the values computed so
    far to the values it adds; values of the model's inputs that a TPU segment reads are int8."""
    return [(seg, _step(artifact.path / seg["file"], seg)) for seg in artifact.manifest["edgetpu"]["segments"]]


def _step(path, seg: dict) -> Callable[[dict], dict]:
    if seg["kind"] == "host":
        import onnx  # here: a TVM artifact runs without onnx

        from edgecc.core.verify import ort_session

        session = ort_session(onnx.load(str(path)))
        return lambda values: dict(
            zip(seg["outputs"], session.run(seg["outputs"], {n: values[n] for n in seg["inputs"]}))
        )
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    ins = {d["name"]: d for d in interpreter.get_input_details()}
    outs = {d["name"]: d for d in interpreter.get_output_details()}

    def run(values: dict) -> dict:
        for name in seg["inputs"]:
            interpreter.set_tensor(ins[name]["index"], np.asarray(values[name]).reshape(ins[name]["shape"]))
        interpreter.invoke()
        return {name: interpreter.get_tensor(outs[name]["index"]) for name in seg["outputs"]}

    return run


def run_artifact(artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs (float32) of an Edge TPU artifact for the model's own inputs."""
    return runner(artifact)(feeds)

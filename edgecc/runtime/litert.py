"""Running an Edge TPU artifact here: the host part in ONNX Runtime, model.tflite in LiteRT.

LiteRT's interpreter runs the int8 model with its CPU kernels (the reference for what the Edge TPU
computes, minus the TPU); inputs are quantized with the scale and zero point the manifest records,
outputs dequantized. This is what `edgecc run` and the compile-time verification use.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

TFLITE = "model.tflite"
HOST_MODEL = "host.onnx"
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
    """A function from the model's own inputs to an Edge TPU artifact's outputs (float32). The host
    part's ONNX Runtime session and the LiteRT interpreter are made once, for every call."""
    import onnx  # here: a TVM artifact runs without onnx
    from ai_edge_litert.interpreter import Interpreter

    from edgecc.core.verify import ort_session

    facts = artifact.manifest["edgetpu"]
    host = ort_session(onnx.load(str(artifact.path / facts["host_model"]))) if facts["host_model"] else None
    interpreter = Interpreter(model_path=str(artifact.path / TFLITE))
    interpreter.allocate_tensors()
    index = {
        d["name"]: d["index"] for d in (*interpreter.get_input_details(), *interpreter.get_output_details())
    }

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        artifact.check_inputs(feeds)
        values = dict(feeds)
        if host is not None:
            names = [o.name for o in host.get_outputs()]
            values.update(zip(names, host.run(names, feeds)))
        for spec in facts["tflite_inputs"]:
            value = np.asarray(values[spec["name"]], np.float32).reshape(spec["shape"])
            interpreter.set_tensor(index[spec["name"]], quantize(value, _quant(spec)))
        interpreter.invoke()
        return {
            spec["name"]: dequantize(interpreter.get_tensor(index[spec["name"]]), _quant(spec))
            for spec in facts["tflite_outputs"]
        }

    return run


def run_artifact(artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs (float32) of an Edge TPU artifact for the model's own inputs."""
    return runner(artifact)(feeds)

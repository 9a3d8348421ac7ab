"""Running an Edge TPU artifact here: the host part in ONNX Runtime, model.tflite in LiteRT.

LiteRT's interpreter runs the int8 model with its CPU kernels (the reference for what the Edge TPU
computes, minus the TPU); inputs are quantized with the scale and zero point the manifest records,
outputs dequantized. This is what `edgecc run` and the compile-time verification use.
"""

from __future__ import annotations

import numpy as np
import onnx

from edgecc.edgetpu.tflite import Quant, dequantize, quantize
from edgecc.verify import run_ort

TFLITE = "model.tflite"
HOST_MODEL = "host.onnx"


def _quant(spec: dict) -> Quant:
    return Quant((spec["scale"],), (spec["zero_point"],))


def run_artifact(artifact, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs (float32) of an Edge TPU artifact for the model's own inputs."""
    from ai_edge_litert.interpreter import Interpreter

    artifact.check_inputs(feeds)
    facts = artifact.manifest["edgetpu"]
    values = dict(feeds)
    if facts["host_model"]:
        values.update(run_ort(onnx.load(str(artifact.path / facts["host_model"])), feeds))
    interpreter = Interpreter(model_path=str(artifact.path / TFLITE))
    interpreter.allocate_tensors()
    index = {
        d["name"]: d["index"] for d in (*interpreter.get_input_details(), *interpreter.get_output_details())
    }
    for spec in facts["tflite_inputs"]:
        value = np.asarray(values[spec["name"]], np.float32).reshape(spec["shape"])
        interpreter.set_tensor(index[spec["name"]], quantize(value, _quant(spec)))
    interpreter.invoke()
    return {
        spec["name"]: dequantize(interpreter.get_tensor(index[spec["name"]]), _quant(spec))
        for spec in facts["tflite_outputs"]
    }

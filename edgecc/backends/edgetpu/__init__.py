"""The Edge TPU backend: a fully int8 TFLite flatbuffer and an honest prediction of its mapping.

`tflite` writes the flatbuffer from the optimized ONNX graph and calibrated ranges (with
ai-edge-litert's schema classes, no TensorFlow); `predict` walks the flatbuffer against the target's
`[edgetpu]` table (checked by edgecc.core.edgetpu_spec), and runs and parses edgetpu_compiler when it
is installed; `backend` is the Backend that writes the artifact. edgecc.runtime.litert runs one.
"""

"""The Edge TPU backend: a fully int8 TFLite flatbuffer and an honest prediction of its mapping.

`spec` checks a target's `[edgetpu]` table; `tflite` writes the flatbuffer from the optimized ONNX
graph and calibrated ranges (with ai-edge-litert's schema classes, no TensorFlow); `predict` walks the
flatbuffer against the table, and runs and parses edgetpu_compiler when it is installed; `backend` is
the compile flow that writes the artifact; `runtime` runs an artifact in LiteRT's interpreter.
"""

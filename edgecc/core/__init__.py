"""The core every layer builds on: ONNX IR loading, passes as declared objects, the pass manager,
pipelines, target descriptions, the ONNX Runtime reference, the tuning-record format."""

"""ONNX to TVM Relax: TVM's importer, edgecc's converters and shape arithmetic on symbolic dims."""

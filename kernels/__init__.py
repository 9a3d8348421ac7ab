"""Hand-written TVM kernels that the lowering calls."""

"""quantize-int4: weight-only int4 with per-block scales along K, as com.microsoft.MatMulNBits.

Each constant weight W [K, N] of a MatMul (or of a Gemm as `fuse` emits it) is split into blocks
of `block` rows along K; each block of each output column gets a float32 scale (and a zero point
when asymmetric: a uint8 level, or a float32 that puts the block's min and max exactly on levels
0 and 15). The ONNX form is ONNX Runtime's MatMulNBits (bits=4), so ORT runs the optimized
model as the reference; edgecc lowers it to its fused dequantize-matmul kernel, and the module
stores the packed nibbles: 5 bits a weight at block 32 (4, plus a 32-bit scale per 32 weights).

`accuracy_level=4` is MatMulNBits' own switch for int8 activations, which ONNX Runtime honours
too: each block of `block` activations is quantized with its own scale, and on CPUs with int8
dot products the weights multiply them without being widened to float (edgecc.kernels.int4_dot).

Methods:
- `rtn`: round to nearest, per block.
- `awq`: activation-aware scaling. Input channels that carry large activations matter more, so
  W's row k is multiplied by s_k = mean|X_k|^a before rounding and X divided by s_k (a Mul before
  the matmul), which leaves X @ W unchanged before rounding. The exponent a is searched on a grid
  per matmul to minimize the output error on calibration activations (`--calibration`, or seeded
  synthetic batches).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from edgecc.core.calibration import activation_samples
from edgecc.core.pass_base import Option, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_matrix, gemm_refusal, matmul_activations
from edgecc.core.rewrite_pass import RewritePass
from edgecc.kernels.int4 import dequantize_blockwise, pack_int4, quantize_blockwise

MS_DOMAIN = "com.microsoft"
AWQ_GRID = np.linspace(0.0, 1.0, 11)
AWQ_ROWS = 512  # calibration rows used to score each exponent


def _pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """uint8 [K/block, N] nibbles -> MatMulNBits' zero_points: uint8 [N * ceil(blocks / 2)]."""
    blocks, n = zeros.shape
    rows = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
    rows[:, :blocks] = zeros.T
    return (rows[:, 0::2] | (rows[:, 1::2] << 4)).ravel()


class _Int4Rule(pattern.RewriteRuleClassBase):
    def __init__(self, opts: dict, samples: dict[str, np.ndarray]):
        super().__init__()
        self.opts = opts
        self.samples = samples  # activation name -> calibration rows [tokens, K]
        self.fired = 0
        self._float_zeros = not opts["symmetric"] and opts["zero_points"] == "float"

    def check(self, context, x, w, y=None, transposed: bool = False, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if self.opts["skip_outputs"] and y is not None and y.is_graph_output():
            return result.fail("its result is a graph output (skip_outputs=true)", y)
        if x.dtype != ir.DataType.FLOAT:
            return result.fail("activation is not float32", x)
        weight = constant_matrix(w)
        if weight is None:
            return result.fail("weight is not a constant 2-D float32 initializer", w)
        if transposed:
            weight = np.ascontiguousarray(weight.T)
        if weight.size < self.opts["min_weights"]:
            return result.fail(f"{weight.size} weights < min_weights={self.opts['min_weights']}", w)
        if weight.shape[0] % self.opts["block"]:
            return result.fail(f"block {self.opts['block']} does not divide K = {weight.shape[0]} "
                               "(left in float; padding K would change the graph's shapes)", w)
        if self.opts["method"] == "awq" and x.name not in self.samples:
            return result.fail(f"no calibration activations for '{x.name}'", x)
        self._weight = weight
        return result

    def _awq_scales(self, x_rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The per-input-channel scales with the smallest output error on calibration rows."""
        block, symmetric, float_zeros = self.opts["block"], self.opts["symmetric"], self._float_zeros
        importance = np.maximum(np.abs(x_rows).mean(axis=0), 1e-8)
        reference = x_rows @ w
        best, best_err = np.ones(w.shape[0], np.float32), np.inf
        for a in AWQ_GRID:
            s = importance**a
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # keep the scales centred on 1
            q, scales, zeros = quantize_blockwise(w * s[:, None], block, symmetric, float_zeros)
            approx = (x_rows / s) @ dequantize_blockwise(q, scales, zeros, block)
            err = float(np.square(approx - reference).mean())
            if err < best_err:
                best, best_err = s, err
        return best

    def _matmul_nbits(self, op, x: ir.Value, w_value: ir.Value, w: np.ndarray) -> ir.Value:
        self.fired += 1
        prefix = f"{w_value.name}_q4_{type(self).__name__}{self.fired}"
        K, N = w.shape
        block = self.opts["block"]
        if self.opts["method"] == "awq":
            s = self._awq_scales(self.samples[x.name][:AWQ_ROWS].astype(np.float32), w)
            x = op.Mul(x, op.initializer(ir.tensor(1.0 / s), f"{prefix}_awq"))
            w = w * s[:, None]
        q, scales, zeros = quantize_blockwise(w, block, self.opts["symmetric"], self._float_zeros)
        packed = pack_int4(q).reshape(N, K // block, block // 2)
        inputs = [x, op.initializer(ir.tensor(packed), f"{prefix}_b"),
                  op.initializer(ir.tensor(np.ascontiguousarray(scales.T).ravel()), f"{prefix}_scales")]
        if zeros is not None:  # MatMulNBits: uint8 nibbles, or float32 like the scales, N-major
            zp = np.ascontiguousarray(zeros.T).ravel() if self._float_zeros else _pack_zero_points(zeros)
            inputs.append(op.initializer(ir.tensor(zp), f"{prefix}_zp"))
        return op.MatMulNBits(*inputs, K=K, N=N, bits=4, block_size=block,
                              accuracy_level=self.opts["accuracy_level"], _domain=MS_DOMAIN)


class Int4MatMul(_Int4Rule):
    def pattern(self, op, x, w):
        return op.MatMul(x, w, _outputs=["y"])

    def rewrite(self, op, x, w, **_):
        return self._matmul_nbits(op, x, w, self._weight)


class Int4Gemm(_Int4Rule):
    """Gemm(x, W, b) as `fuse` emits it (alpha = beta = 1, transA = 0); transB is folded in."""

    def pattern(self, op, x, w, b):
        return op.Gemm(x, w, b, _outputs=["y"])

    def check(self, context, x, w, b, y, **_) -> pattern.MatchResult:
        if refusal := gemm_refusal(y.producer()):
            return pattern.MatchResult().fail(refusal, y)
        transposed = bool(y.producer().attributes.get_int("transB", 0))
        return super().check(context, x, w, y, transposed=transposed)

    def rewrite(self, op, x, w, b, **_):
        return op.Add(self._matmul_nbits(op, x, w, self._weight), b)


@register_pass
class QuantizeInt4(RewritePass):
    name = "quantize-int4"
    description = ("weight-only int4 with per-block scales along K (MatMulNBits), round-to-nearest "
                   "or activation-aware (AWQ-style) scaling from calibration data")
    options = (
        Option("block", int, 32, "weights per scale along K", choices=(16, 32, 64, 128, 256)),
        Option("symmetric", bool, True, "symmetric blocks (false: a zero point per block)"),
        Option("zero_points", str, "uint8", "asymmetric zero points: uint8 levels, or float (each "
               "block's min and max land exactly on levels 0 and 15, GGUF Q4_1's grid)",
               choices=("uint8", "float")),
        Option("method", str, "rtn", "rtn: round to nearest; awq: activation-aware channel scaling",
               choices=("rtn", "awq")),
        Option("min_weights", int, 1024, "leave matmuls with fewer weights in float", low=0),
        Option("skip_outputs", bool, False, "leave matmuls whose result is a graph output (an LM "
               "head) in float, for quantize-int8 after it or fp32"),
        Option("accuracy_level", int, 0, "MatMulNBits' accuracy_level: 4 lets activations be "
               "quantized to int8 per block (pack-weights then picks the int4 x int8 dot-product kernel "
               "where the target has it); 0 keeps them float", choices=(0, 4)),
    )
    provides = ("quantized", "compressed-weights")
    # Relative RMS output error --verify accepts from this pass. Measured on MiniLM (6 layers),
    # random inputs, block 32: 0.38 (rtn), 0.31 (awq); real text keeps mean cosine 0.953 / 0.967.
    # The bound stops a wreck (1.0 is an output as large as the signal), not the method's loss.
    drift = 0.5
    needs_shapes = True  # the dtype check needs the types of values earlier passes made

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        samples = activation_samples(model, ctx, matmul_activations(model)) if self.opts["method"] == "awq" else {}
        rules = [Int4MatMul.rule(self.opts, samples), Int4Gemm.rule(self.opts, samples)]
        result = self.apply(model, ctx, [("matmuls", pattern.RewriteRuleSet(rules))])
        if result.changed:
            result.model.opset_imports.setdefault(MS_DOMAIN, 1)
        nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
        packed = sum(v.const_value.nbytes for n in nbits for v in n.inputs[1:4] if v is not None)
        weights = sum(n.attributes.get_int("K") * n.attributes.get_int("N") for n in nbits)
        result.stats.update({
            "int4_bytes": packed, "bits_per_weight": round(8 * packed / weights, 3) if weights else 0.0,
            "calibration": ("given" if ctx.calibration is not None else "synthetic") if samples else "none"})
        return result

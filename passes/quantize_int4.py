"""quantize-int4: weight-only int4 with per-block scales along K, as com.microsoft.MatMulNBits.

Each constant weight W [K, N] of a MatMul (or of a Gemm as `fuse` emits it) is split into blocks
of `block` rows along K; each block of each output column gets a float32 scale (and a zero point
when asymmetric: a uint8 level, or a float32 that puts the block's min and max on levels 0 and
15). The ONNX form is ONNX Runtime's MatMulNBits (bits=4), so ORT runs the optimized model as
the reference; edgecc lowers it to its fused dequantize-matmul kernel, and the module stores the
packed nibbles: 5 bits a weight at block 32 (4, plus a 32-bit scale per 32 weights). Symmetric
scales, and float zero points' scale and min, are float16 values (kernels.int4.quantize_blockwise),
which the int4 x int8 kernel stores in 2 bytes each.

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
- `gptq`: GPTQ (Frantar et al., 2022). Rows of W (input channels) are rounded one at a time, and
  each row's rounding error is spread over the rows not yet rounded so as to minimize the output
  error on calibration activations X: the update is weighted by the inverse of H = X^T X / n
  (damped by `damp` x its mean diagonal), through the upper Cholesky factor of H^-1, in lazy
  batches of 128 rows. With `act_order` the rows with the largest activations go first; their
  blocks' scales and zero points are still those of the original weights in natural order
  (static groups), so the stored layout is rtn's. The pass reports each matmul's relative output
  error ||X W_q - X W||^2 / ||X W||^2 on the calibration rows for gptq and for rtn (stats
  `gptq_vs_rtn`, by weight name) and their means over matmuls (`gptq_error`, `rtn_error`).
"""

from __future__ import annotations

from typing import NamedTuple

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
GPTQ_LAZY_ROWS = 128  # rows whose error updates reach the rest of W as one matmul (GPTQ's lazy batch)


def _pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """uint8 [K/block, N] nibbles -> MatMulNBits' zero_points: uint8 [N * ceil(blocks / 2)]."""
    blocks, n = zeros.shape
    rows = np.zeros((n, -(-blocks // 2) * 2), np.uint8)
    rows[:, :blocks] = zeros.T
    return (rows[:, 0::2] | (rows[:, 1::2] << 4)).ravel()


class HessianFactor(NamedTuple):
    """What GPTQ needs from the Hessian H = X^T X / n of a matmul's input X; the matmuls that read
    one input (q, k and v; gate and up) share it."""

    h: np.ndarray  # float32 [K, K], undamped: the output error of any weights on the calibration rows
    dead: np.ndarray  # bool [K]: inputs that were 0 on every row
    order: np.ndarray  # the order rows are rounded in
    u: np.ndarray  # float32 [K, K]: upper Cholesky factor of the damped H^-1, rows and columns in `order`


def hessian_factor(x_rows: np.ndarray, damp: float, act_order: bool) -> HessianFactor:
    x = x_rows.astype(np.float64)
    h = x.T @ x / len(x)
    # An input that is 0 on every row has no curvature: as GPTQ's reference does, H_kk = 1 keeps H
    # invertible and gptq_quantize sets its weights to 0 (nothing says how they should round).
    dead = np.diag(h) == 0
    damped = h.copy()
    damped[dead, dead] = 1
    order = np.argsort(-np.diag(damped), kind="stable") if act_order else np.arange(len(h))
    damped = damped[np.ix_(order, order)]
    damped[np.diag_indices(len(h))] += damp * np.mean(np.diag(damped))
    # H^-1 = U^T U for U = R^-1, where H = R R^T: H's Cholesky factor with rows and columns reversed
    r = np.linalg.cholesky(damped[::-1, ::-1])[::-1, ::-1]
    return HessianFactor(h.astype(np.float32), dead, order, _upper_inverse(r).astype(np.float32))


def _upper_inverse(r: np.ndarray) -> np.ndarray:
    """The inverse of an upper triangular matrix, by halves: numpy has no triangular solve, and
    inverting r as a general matrix costs 6x the flops."""
    n = len(r)
    if n <= 128:
        return np.linalg.inv(r)
    m = n // 2
    a, c = _upper_inverse(r[:m, :m]), _upper_inverse(r[m:, m:])
    out = np.zeros_like(r)
    out[:m, :m], out[m:, m:], out[:m, m:] = a, c, -a @ r[:m, m:] @ c
    return out


def gptq_quantize(w: np.ndarray, factor: HessianFactor, block: int, symmetric: bool, float_zeros: bool):
    """w float32 [K, N] -> (q, scales, zeros) as quantize_blockwise returns them, rounded by GPTQ
    (module doc) against its input's Hessian."""
    K, N = w.shape
    w = np.where(factor.dead[:, None], 0, w).astype(np.float32)
    _, scales, zeros = quantize_blockwise(w, block, symmetric, float_zeros)  # static groups
    zero = np.zeros_like(scales) if zeros is None else zeros.astype(np.float32)
    lo, hi = (-8, 7) if zeros is None else (0, 15)
    order, u = factor.order, factor.u
    w = w[order]
    q = np.empty((K, N), np.float32)
    for i1 in range(0, K, GPTQ_LAZY_ROWS):
        i2 = min(i1 + GPTQ_LAZY_ROWS, K)
        err = np.empty((i2 - i1, N), np.float32)
        for i in range(i1, i2):
            g = order[i] // block  # the row's block in natural order
            q[i] = np.clip(np.round(w[i] / scales[g] + zero[g]), lo, hi)
            err[i - i1] = (w[i] - (q[i] - zero[g]) * scales[g]) / u[i, i]
            w[i + 1:i2] -= np.outer(u[i, i + 1:i2], err[i - i1])
        w[i2:] -= u[i1:i2, i2:].T @ err
    q = q[np.argsort(order)]
    return q.astype(np.int8 if zeros is None else np.uint8), scales, zeros


class _Int4Rule(pattern.RewriteRuleClassBase):
    def __init__(self, opts: dict, samples: dict[str, np.ndarray], errors: dict[str, dict]):
        super().__init__()
        self.opts = opts
        self.samples = samples  # activation name -> calibration rows [tokens, K]
        self.errors = errors  # weight name -> {"gptq": e, "rtn": e}, filled by method=gptq
        self.fired = 0
        self._float_zeros = not opts["symmetric"] and opts["zero_points"] == "float"
        self._last_factor: tuple[np.ndarray, HessianFactor] | None = None  # q, k and v share it

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
        if self.opts["method"] != "rtn" and x.name not in self.samples:
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

    def _factor(self, x_name: str) -> HessianFactor:
        # Compared by value: an exporter may give q, k and v each its own Reshape of one input.
        rows = self.samples[x_name]
        if self._last_factor is None or not np.array_equal(self._last_factor[0], rows):
            self._last_factor = rows, hessian_factor(rows, self.opts["damp"], self.opts["act_order"])
        return self._last_factor[1]

    def _gptq(self, w_name: str, x_name: str, w: np.ndarray):
        """GPTQ's (q, scales, zeros) for w; records its output error and rtn's under w_name."""
        block, symmetric = self.opts["block"], self.opts["symmetric"]
        factor = self._factor(x_name)
        q, scales, zeros = gptq_quantize(w, factor, block, symmetric, self._float_zeros)
        # ||X D||^2 = n * sum(D * (H D)): the output error over all calibration rows, from H alone
        signal = float(np.sum(w * (factor.h @ w), dtype=np.float64))
        rtn = dequantize_blockwise(*quantize_blockwise(w, block, symmetric, self._float_zeros), block)
        self.errors[w_name] = {
            method: float(f"{np.sum(d * (factor.h @ d), dtype=np.float64) / max(signal, 1e-30):.4g}")
            for method, d in (("gptq", dequantize_blockwise(q, scales, zeros, block) - w), ("rtn", rtn - w))}
        return q, scales, zeros

    def _matmul_nbits(self, op, x: ir.Value, w_value: ir.Value, w: np.ndarray) -> ir.Value:
        self.fired += 1
        prefix = f"{w_value.name}_q4_{type(self).__name__}{self.fired}"
        K, N = w.shape
        block = self.opts["block"]
        if self.opts["method"] == "awq":
            s = self._awq_scales(self.samples[x.name][:AWQ_ROWS].astype(np.float32), w)
            x = op.Mul(x, op.initializer(ir.tensor(1.0 / s), f"{prefix}_awq"))
            w = w * s[:, None]
        if self.opts["method"] == "gptq":
            q, scales, zeros = self._gptq(w_value.name, x.name, w)
        else:
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
    description = ("weight-only int4 with per-block scales along K (MatMulNBits), round-to-nearest, "
                   "activation-aware (AWQ-style) scaling or GPTQ from calibration data")
    options = (
        Option("block", int, 32, "weights per scale along K", choices=(16, 32, 64, 128, 256)),
        Option("symmetric", bool, True, "symmetric blocks (false: a zero point per block)"),
        Option("zero_points", str, "uint8", "asymmetric zero points: uint8 levels, or float (each "
               "block's min and max land exactly on levels 0 and 15, GGUF Q4_1's grid)",
               choices=("uint8", "float")),
        Option("method", str, "rtn", "rtn: round to nearest; awq: activation-aware channel scaling; "
               "gptq: rounding errors compensated through the calibration Hessian",
               choices=("rtn", "awq", "gptq")),
        # GPTQ's reference damps by 0.01 with ~260k calibration tokens; with --calibration-text's
        # 2,048, SmolLM2's perplexity at damp 0.003 / 0.01 / 0.1 / 0.3 / 1 was 62.9 / 61.3 / 59.3 /
        # 58.9 / 59.6 (benchmarks/compression_smollm2.py; fp32 54.7, RTN 63.8).
        Option("damp", float, 0.1, "gptq: added to H's diagonal, as a fraction of its mean", low=1e-6),
        Option("act_order", bool, True, "gptq: round the inputs with the largest activations first "
               "(scales stay per block in natural order, the layout rtn stores)"),
        Option("min_weights", int, 1024, "leave matmuls with fewer weights in float", low=0),
        Option("skip_outputs", bool, False, "leave matmuls whose result is a graph output (an LM "
               "head) in float, for quantize-int8 after it or fp32"),
        Option("accuracy_level", int, 0, "MatMulNBits' accuracy_level: 4 lets activations be "
               "quantized to int8 per block (pack-weights then picks the int4 x int8 dot-product kernel "
               "where the target has it); 0 keeps them float", choices=(0, 4)),
    )
    provides = ("quantized", "compressed-weights")
    # Relative RMS output error --verify accepts from this pass. Measured on MiniLM (6 layers),
    # random inputs, block 32: 0.38 (rtn), 0.31 (awq), 0.30 (gptq); on real text the mean cosine
    # is 0.953 / 0.967 / 0.984 (benchmarks/minilm_accuracy.py).
    # The bound stops a wreck (1.0 is an output as large as the signal), not the method's loss.
    drift = 0.5
    needs_shapes = True  # the dtype check needs the types of values earlier passes made

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        calibrated = self.opts["method"] != "rtn"
        samples = activation_samples(model, ctx, matmul_activations(model)) if calibrated else {}
        errors: dict[str, dict] = {}
        rules = [Int4MatMul.rule(self.opts, samples, errors), Int4Gemm.rule(self.opts, samples, errors)]
        result = self.apply(model, ctx, [("matmuls", pattern.RewriteRuleSet(rules))])
        if result.changed:
            result.model.opset_imports.setdefault(MS_DOMAIN, 1)
        nbits = [n for n in result.model.graph if n.op_type == "MatMulNBits"]
        packed = sum(v.const_value.nbytes for n in nbits for v in n.inputs[1:4] if v is not None)
        weights = sum(n.attributes.get_int("K") * n.attributes.get_int("N") for n in nbits)
        result.stats.update({
            "int4_bytes": packed, "bits_per_weight": round(8 * packed / weights, 3) if weights else 0.0,
            "calibration": ("given" if ctx.calibration is not None else "synthetic") if samples else "none"})
        if self.opts["method"] == "gptq" and samples:
            rows, widest = min(len(v) for v in samples.values()), max(v.shape[1] for v in samples.values())
            if rows < widest:
                result.warnings.append(
                    f"GPTQ's Hessians come from {rows} calibration rows, fewer than the {widest} inputs of the "
                    "widest matmul: they are rank-deficient and the rounding fits those rows, not the model's "
                    "inputs; give --calibration-text or more --calibration data")
        if errors:  # relative output error on the calibration rows, mean over matmuls, and each
            for method in ("gptq", "rtn"):
                result.stats[f"{method}_error"] = float(f"{np.mean([e[method] for e in errors.values()]):.4g}")
            result.stats["gptq_vs_rtn"] = errors
        return result

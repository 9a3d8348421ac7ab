"""block-sparsity: magnitude pruning in RxC blocks, computed by a BSR kernel where that is faster.

For each constant weight W [K, N] of a MatMul (or of a Gemm as `fuse` emits it), the blocks of
R rows (along K) by C columns (along N) with the smallest L2 norms are zeroed until `sparsity`
of them are. The graph stays standard ONNX with the pruned dense weight, so ONNX Runtime runs it
as the reference (exactly the dense model with those blocks zeroed). Where the target's cost
model (`edgecc.kernels.bsr.choose_kernel`, calibrated by benchmarks/bsr_vs_dense.py) predicts
the block-sparse kernel beats dense, the node gets a `bsr` KernelMark; the lowering then
stores only the nonzero blocks and calls the BSR kernel. The decision and its reason are
reported per weight.

Recover (recover=true). Each pruned weight's surviving blocks are refit by least squares, so that
X @ W' matches the unpruned X @ W on calibration activations as closely as the surviving rows
allow: per block column, W'[kept, cols] = argmin ||X[:, kept] V - X W[:, cols]||^2, ridge-damped,
with X^T X accumulated over the calibration batches (`--calibration`, `--calibration-text`, else
seeded synthetic ones) of the unpruned model. Pruned blocks stay zero, so storage and kernel
choice are unchanged. The stats give the relative output error on the calibration data before
and after the refit.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecc.core.calibration import activation_batches
from edgecc.core.kernel_mark import KernelMark, parse_block
from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass
from edgecc.core.pass_helpers import constant_array, constant_matrix, gemm_refusal, output_error, ridge_refit
from edgecc.errors import UserError
from edgecc.kernels.bsr import choose_kernel, magnitude_block_prune


def _candidate(node: ir.Node) -> tuple[ir.Value, np.ndarray, str] | tuple[None, None, str]:
    """(weight value, W [K, N], "") for a prunable node, or (None, None, why not)."""
    if node.op_type == "Gemm":
        if refusal := gemm_refusal(node):
            return None, None, refusal
        if node.attributes.get_int("transB", 0):
            return None, None, "Gemm with transB"
    elif node.op_type != "MatMul":
        return None, None, "not a matmul"
    value = node.inputs[1]
    if constant_array(value) is None or value.const_value is None:  # pruned in place: an initializer
        return None, None, "weight is not a constant initializer"
    w = constant_matrix(value)
    if w is None:
        return None, None, "weight is not 2-D float32"
    return value, w, ""


@register_pass
class BlockSparsity(Pass):
    name = "block-sparsity"
    description = ("magnitude pruning in RxC blocks; block-sparse (BSR) storage and kernel where the "
                   "target's cost model says it beats dense")
    options = (
        Option("block", str, "16x16", "block shape RxC: R rows along K, C columns along N",
               kind="RxC (e.g. 16x16)"),
        Option("sparsity", float, 0.5, "fraction of blocks set to zero", low=0.0, high=0.99),
        Option("min_weights", int, 4096, "leave matmuls with fewer weights dense and unpruned", low=0),
        Option("recover", bool, False, "refit the surviving blocks by least squares on calibration "
               "activations, so each matmul's output stays as close to the unpruned one as they allow"),
    )
    provides = ("sparse", "compressed-weights")
    # Pruning changes what the model computes; how much accuracy that costs depends on the model
    # (measure it, fine-tune after pruning). Verification holds the rest of the pipeline to it.
    drift = 1.0

    def __init__(self, **opts):
        super().__init__(**opts)
        try:
            self.block = parse_block(self.opts["block"])
        except ValueError:
            raise UserError(f"pass 'block-sparsity': option 'block' expects RxC (e.g. 16x16), "
                            f"got '{self.opts['block']}'") from None

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        gpu = ctx.target is not None and ctx.target.is_gpu
        decisions, skipped = {}, []
        R, C = self.block
        chosen = []
        for node in list(model.graph):
            value, w, why = _candidate(node)
            if value is None:
                if node.op_type in ("MatMul", "Gemm"):
                    skipped.append(f"{node.name}: {why}")
                continue
            K, N = w.shape
            if w.size < self.opts["min_weights"]:
                skipped.append(f"{node.name}: {w.size} weights < min_weights")
                continue
            if K % R or N % C:
                skipped.append(f"{node.name}: block {R}x{C} does not divide weight {K}x{N}")
                continue
            if len(value.uses()) != 1:
                skipped.append(f"{node.name}: weight '{value.name}' is shared by other nodes")
                continue
            chosen.append((node, value, w))
        # Grams of the unpruned model's activations, taken before any weight changes.
        grams = _grams(model, ctx, sorted({n.inputs[0].name for n, _, _ in chosen})) if self.opts["recover"] else {}
        errors = {}
        for node, value, w in chosen:
            K, N = w.shape
            pruned = magnitude_block_prune(w, self.block, self.opts["sparsity"])
            if grams:
                gram = grams[node.inputs[0].name]
                refit = _refit(pruned, w, gram, self.block)
                errors[node.name] = [round(output_error(gram, pruned, w), 4), round(output_error(gram, refit, w), 4)]
                pruned = refit
            value.const_value = ir.tensor(pruned, name=value.name)
            kind, reason = choose_kernel(K, N, self.block, self.opts["sparsity"], gpu)
            if kind == "bsr":
                KernelMark("bsr", block=self.block).write(node)
            decisions[node.name] = f"{kind}: {reason}"
        stats = {"pruned": len(decisions),
                 "bsr": sum(d.startswith("bsr") for d in decisions.values()),
                 "dense": sum(d.startswith("dense") for d in decisions.values()),
                 "decisions": decisions, "skipped": skipped}
        if errors:
            stats["recover"] = {"error_before": float(np.mean([e[0] for e in errors.values()])),
                                "error_after": float(np.mean([e[1] for e in errors.values()])),
                                "output_error": errors}
        return PassResult(model, bool(decisions), stats)


def _grams(model: ir.Model, ctx: PassContext, names: list[str]) -> dict[str, np.ndarray]:
    """X^T X (float64) of each named activation over the calibration data, batch by batch."""
    grams: dict[str, np.ndarray] = {}
    for batch in activation_batches(model, ctx, names):
        for name, rows in batch.items():
            rows = rows.astype(np.float64)
            grams[name] = grams[name] + rows.T @ rows if name in grams else rows.T @ rows
    return grams


def _refit(pruned: np.ndarray, w: np.ndarray, gram: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """The pruned weight with each block column's surviving rows refit to X @ W (ridge_refit)."""
    R, C = block
    K, N = w.shape
    target = gram @ w.astype(np.float64)
    out = pruned.copy()
    alive = np.abs(pruned).reshape(K // R, R, N // C, C).max(axis=(1, 3)) > 0  # [K/R, N/C] blocks
    for j in range(N // C):
        kept = np.flatnonzero(np.repeat(alive[:, j], R))
        if kept.size:
            out[kept, j * C:(j + 1) * C] = ridge_refit(gram, kept, target[:, j * C:(j + 1) * C])
    return out

"""simplify: onnxsim, then shape inference, constant folding and dead-node removal.

onnxsim (constant folding through ONNX Runtime, shape propagation, redundancy removal) does
the heavy lifting; the onnx-ir passes after it clean what it leaves and keep the IR's shapes
current. Models too large for one protobuf skip onnxsim and use onnxscript's optimizer,
which folds constants on the IR without serializing it.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from edgecc.core.ir import PROTO_LIMIT, infer_shapes
from edgecc.core.pass_base import Option, Pass, PassContext, PassResult, register_pass


_FUSIONS_LEFT_TO_FUSE = ("fuse_matmul_add_bias_into_gemm", "fuse_matmul_add_bias_into_gemm_batched")


def _signature(model: ir.Model) -> tuple[list, list]:
    """Enough of the graph's structure to tell whether anything was rewritten."""
    nodes = [(n.domain, n.op_type, tuple(v.name if v else "" for v in n.inputs), len(n.outputs))
             for n in model.graph]
    return nodes, sorted(model.graph.initializers)


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@register_pass
class Simplify(Pass):
    name = "simplify"
    description = "onnxsim + shape inference + constant folding + dead-node removal"
    options = (
        Option("onnxsim", bool, True, "run onnxsim (off: onnxscript's constant folder only)"),
    )
    provides = ("simplified",)

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        before = _signature(model)
        used_onnxsim = self.opts["onnxsim"] and _weight_bytes(model) < PROTO_LIMIT
        engine, onnxsim_failure = "onnxscript.optimizer", None
        if used_onnxsim:
            try:
                model, engine = _onnxsim(model), "onnxsim"
            except Exception as e:  # onnxsim rejects some valid graphs; the folder below still works
                onnxsim_failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        if engine != "onnxsim":
            onnxscript.optimizer.optimize(model, num_iterations=2)
        # Folded weights come back as Constant nodes; weights belong in initializers.
        for p in (LiftConstantsToInitializersPass(size_limit=16), IdentityEliminationPass(),
                  RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), TopologicalSortPass()):
            model = p(model).model
        model = infer_shapes(model)
        after = _signature(model)
        return PassResult(
            model,
            changed=after != before,
            stats={
                "nodes_removed": len(before[0]) - len(after[0]),
                "initializers": len(after[1]),
                "engine": engine,
                **({"onnxsim_failed": onnxsim_failure} if onnxsim_failure else {}),
            },
        )


def _onnxsim(model: ir.Model) -> ir.Model:
    import onnxsim

    # onnxsim needs the nodes in order; ONNX Runtime sorts an unsorted graph itself.
    proto = ir.to_proto(TopologicalSortPass()(model).model)
    # check_n=0: the pass manager's --verify is the one numeric check, on edgecc's own inputs.
    # Operator fusion is the 'fuse' pass's job, so onnxsim's MatMul+Add->Gemm rewrites stay off.
    simplified, _ = onnxsim.simplify(proto, check_n=0, perform_optimization=True,
                                     skipped_optimizers=list(_FUSIONS_LEFT_TO_FUSE))
    return ir.from_proto(simplified)

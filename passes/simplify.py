"""simplify: onnxsim, then shape inference, constant folding and dead-node removal.

onnxsim (constant folding through ONNX Runtime, shape propagation, redundancy removal) does
the heavy lifting; the onnx-ir passes after it clean what it leaves and keep the IR's shapes
current. Models too large for one protobuf skip onnxsim and use onnxscript's optimizer,
which folds constants on the IR without serializing it. Large weights nothing could fold reach
onnxsim as graph inputs, without their data (see APART_BYTES).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from edgecc.core.ir import PROTO_LIMIT, infer_shapes, proto_with
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
            # Its folder cannot evaluate an Identity of an external-data weight and logs a warning
            # for each; IdentityEliminationPass below removes those Identities anyway.
            folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
            level = folding_log.level
            folding_log.setLevel(logging.ERROR)
            try:
                onnxscript.optimizer.optimize(model, num_iterations=2)
            finally:
                folding_log.setLevel(level)
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
    # onnxsim needs the nodes in order; ONNX Runtime sorts an unsorted graph itself.
    model = TopologicalSortPass()(model).model
    weights = _weights_kept_apart(model)
    simplified = _simplified(model, weights)
    if _folds_a_weight(simplified, weights):  # onnxsim would have folded it: give it the weights
        weights, simplified = {}, _simplified(model, {})
    if not weights:
        return simplified
    for name, tensor in weights.items():  # they come back as graph inputs; make them weights again
        value = next((v for v in simplified.graph.inputs if v.name == name), None)
        if value is not None:
            simplified.graph.inputs.remove(value)
            value.const_value = tensor
            simplified.graph.register_initializer(value)
    # In onnxsim's order: the constants it folded first, then the model's own in their order.
    position = {name: i for i, name in enumerate(model.graph.initializers)}
    values = sorted(simplified.graph.initializers.values(),
                    key=lambda v: (v.name in position, position.get(v.name, 0)))
    simplified.graph.initializers.clear()
    for value in values:
        simplified.graph.register_initializer(value)
    return simplified


# onnxsim round-trips the model through protobuf several times; weights this large only read by
# MatMul, Gemm or Gather (nothing onnxsim rewrites or folds while an operand varies) go to it as
# graph inputs instead, without their data.
APART_BYTES = 1 << 16
_READERS = {"MatMul", "Gemm", "Gather"}


def _weights_kept_apart(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    inputs = {v.name for v in model.graph.inputs}
    return {name: v.const_value for name, v in model.graph.initializers.items()
            if name not in inputs and v.const_value is not None and v.const_value.nbytes >= APART_BYTES
            and v.uses() and all(node.op_type in _READERS and node.domain in ("", "ai.onnx")
                                 for node, _ in v.uses())}


def _simplified(model: ir.Model, weights: dict[str, ir.TensorProtocol]) -> ir.Model:
    """onnxsim's result with `weights` given to it as graph inputs; `model` is left as it was."""
    import onnxsim

    order = list(model.graph.initializers.values())
    apart = [model.graph.initializers.pop(name) for name in weights]
    model.graph.inputs.extend(apart)
    try:
        proto = proto_with(model)  # the weights left in it as data, even those of an external-data file
    finally:
        for value in apart:
            model.graph.inputs.remove(value)
        model.graph.initializers.clear()
        for value in order:
            model.graph.register_initializer(value)
    # check_n=0: the pass manager's --verify is the one numeric check, on edgecc's own inputs.
    # Operator fusion is the 'fuse' pass's job, so onnxsim's MatMul+Add->Gemm rewrites stay off.
    simplified, _ = onnxsim.simplify(proto, check_n=0, perform_optimization=True,
                                     skipped_optimizers=list(_FUSIONS_LEFT_TO_FUSE))
    return ir.from_proto(simplified)


def _folds_a_weight(model: ir.Model, weights: dict) -> bool:
    """Whether a node reading a weight kept apart has only constant operands otherwise."""
    def constant(v: ir.Value | None) -> bool:
        producer = v.producer() if v is not None else None
        return v is None or v.is_initializer() or (producer is not None and producer.op_type == "Constant")

    return any(all(constant(v) for v in node.inputs if v is None or v.name not in weights)
               for node in model.graph if any(v is not None and v.name in weights for v in node.inputs))

"""A causal LM's one-token step as a function of its own, `decode`: the module's `main` with the
token ids' batch and sequence dims bound to 1, beside `main` in the same library and taking the
same weights. `Artifact.run` calls it for a [1, 1] step (manifest `build.decode`).

Compiled for any batch and length, every activation's shape is computed at run time: each
kernel call is preceded by builtins that make its shape, allocate its output and release both,
4,629 VM instructions in a SmolLM2-135M decode step. With the step's shapes static except the
cache length, most shapes are constants, memory is planned ahead and the elementwise kernels
are compiled for their sizes: 2,596 instructions, and the step 7-13% faster on 1 and 2 threads.

`add` runs on the module edgecc's kernels were routed in (the dense, int4, int8 and attention
kernels, which take any shape: the two functions call the same ones) and before legalization,
which then makes static kernels of decode's own operators. Kernels the ONNX importer emitted
already (Clip's maximum and minimum, ...) are generic in the dims; called from decode, each
gets a copy specialized to the dims its operands pin, or FuseTIR would fuse a static kernel
with a generic one and refuse the mismatch; one whose dims still differ in form from its
operands' (Gemma's sliding-window lengths) is kept out of fusion.
"""

from __future__ import annotations

import dataclasses

import onnx

from edgecc.core import lm_signature

FUNCTION = "decode"
OPAQUE = 8  # relax.OpPatternKind.kOpaque: edgecc's kernels, never fused


@dataclasses.dataclass(frozen=True)
class Step:
    dims: dict[str, int]  # the token ids' symbolic dims, by name, at 1
    ids: str  # the token ids input
    ids_shape: list[int]  # its shape in the step


def of_model(model: onnx.ModelProto) -> Step | None:
    """The one-token step of an LM graph; None for a model that is not an LM, or whose ids have
    no symbolic dim (`main` is the step already)."""
    sig = lm_signature.find(model)
    if sig is None:
        return None
    ids = next(vi for vi in model.graph.input if vi.name == sig.ids.name).type.tensor_type.shape.dim
    named = {d.dim_param: 1 for d in ids if d.HasField("dim_param")}
    return Step(named, sig.ids.name, [d.dim_value if d.HasField("dim_value") else 1 for d in ids]) if named else None


def add(mod, bound: dict[str, int]):
    """`mod` with `decode`: a copy of `main` (its own variables) with the symbolic vars named in
    `bound` bound, calling specialized copies of the importer's generic kernels; `mod` as it is
    where `main` has none of those vars left."""
    from tvm import relax

    main = mod["main"]
    left = {str(v) for v in relax.analysis.defined_symbolic_vars(main)}
    bound = {k: v for k, v in bound.items() if k in left}  # --shape may have bound some already
    if not bound:
        return mod
    decode = relax.utils.copy_with_new_vars(main).bind_symbolic_vars(bound).with_attr("global_symbol", FUNCTION)
    out = mod.clone()
    gv = relax.GlobalVar(FUNCTION)
    out[gv] = decode
    return _specialize_callees(out, gv)


def _specialize_callees(mod, gv):
    """`mod` with the generic kernels that function `gv` calls replaced, in its calls, by copies
    specialized to the dims the call pins (BlockBuilder.add_func keeps one copy of each)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class Specialize(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(call_tir):
                return call
            callee = mod[call.args[0]]
            if not isinstance(callee, tvm.tirx.PrimFunc) or _opaque(callee):
                return call
            operands = list(call.args[1].fields)
            outs = list(call.ty.fields) if isinstance(call.ty, relax.TupleType) else [call.ty]
            pinned, constants = _pinned(callee, operands, outs)
            if pinned is None:
                return call
            spec = callee.specialize(pinned) if pinned else callee
            kept = [x for i, x in enumerate(operands) if i not in constants]
            if not _matches(spec, [getattr(x, "ty", None) for x in kept] + outs):
                spec = spec.with_attr("op_pattern", OPAQUE)
            elif not pinned:
                return call
            new = self.builder_.add_func(spec, f"{call.args[0].name_hint}_{FUNCTION}")
            return relax.call_tir(new, relax.Tuple(kept), outs if len(outs) > 1 else outs[0])

    gen = Specialize(mod)
    gen.builder_.update_func(gv, gen.visit_expr(mod[gv]))
    return gen.builder_.get()


def _opaque(func) -> bool:
    return func.attrs is not None and int(func.attrs.get("op_pattern", -1)) == OPAQUE


def _pinned(func, operands: list, outs: list) -> tuple[dict | None, set[int]]:
    """What a call pins of the PrimFunc `func` (parameters: the operands, then the outputs):
    scalar parameters given a constant, which leave the call (their operand indices, second),
    and buffers with variable dims that the call's tensor has constant (a buffer with them
    constant); TIR's Specialize substitutes the variables throughout. None where the
    parameters are not the call's operands and outputs."""
    from tvm import relax, tirx

    types = [getattr(x, "ty", None) for x in operands] + outs
    if len(func.params) != len(types):
        return None, set()
    pinned, constants = {}, set()
    for i, (param, ty) in enumerate(zip(func.params, types)):
        buf = param.ty
        if isinstance(buf, tirx.BufferType):
            shape = getattr(ty, "shape", None)
            if not isinstance(shape, relax.ShapeExpr) or len(shape.values) != len(buf.shape):
                continue
            dims = [v if isinstance(d, tirx.Var) and isinstance(v, tirx.IntImm) else d
                    for d, v in zip(buf.shape, shape.values)]
            if any(not a.same_as(b) for a, b in zip(dims, buf.shape)):
                pinned[param] = tirx.decl_buffer(dims, buf.dtype, param.name)
        elif i < len(operands) and isinstance(operands[i], tirx.IntImm):
            pinned[param] = operands[i]
            constants.add(i)
    return pinned, constants


def _matches(func, types: list) -> bool:
    """Whether every buffer of `func` has the dims of the call's tensor, as FuseTIR requires of
    kernels it fuses: not so where a dim is an expression the binding rewrote in another form
    (Gemma's sliding-window lengths)."""
    import tvm_ffi
    from tvm import relax, tirx

    for param, ty in zip(func.params, types):
        if isinstance(param.ty, tirx.BufferType):
            shape = getattr(ty, "shape", None)
            if not isinstance(shape, relax.ShapeExpr) or not all(
                    tvm_ffi.structural_equal(d, v, map_free_vars=True) for d, v in zip(param.ty.shape, shape.values)):
                return False
    return True

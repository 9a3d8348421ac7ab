"""What the kernels' routing and schedules share."""

from __future__ import annotations


def is_gpu(target) -> bool:
    """Whether a TVM target compiles for a GPU (dlight's rules apply, not the CPU schedules)."""
    return "gpu" in target.keys


def rewrite_functions(mod, mutator):
    """`mod` with every Relax function rewritten by `mutator` (a relax.PyExprMutator class)."""
    from tvm import relax

    gen = mutator(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            gen.builder_.update_func(gv, gen.visit_expr(func))
    return gen.builder_.get()


def hsum(v, lanes: int):
    """The sum of a float vector's `lanes` lanes (a TIR expression), halves added in a tree: a
    few shuffles and adds. An ordered sum is `lanes` dependent adds, and TVM's LLVM code allows
    no reassociation."""
    from tvm import tirx

    while lanes > 1:
        lanes //= 2
        lo = tirx.Shuffle([v], [tirx.IntImm("int32", i) for i in range(lanes)])
        v = lo + tirx.Shuffle([v], [tirx.IntImm("int32", lanes + i) for i in range(lanes)])
    return v


def producer(mutator, expr, *ops):
    """The call of one of `ops` that `expr` (a variable) is bound to in `mutator`'s builder, if it
    is: the routers' pattern matching. A PyExprMutator class takes it as its method."""
    from tvm import relax

    call = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
    return call if isinstance(call, relax.Call) and getattr(call.op, "name", None) in ops else None


def scalar(x) -> float | None:
    """The value of a one-element float32 constant."""
    import tvm

    if isinstance(x, tvm.ir.Constant) and x.value.numpy().size == 1 and str(x.value.dtype) == "float32":
        return float(x.value.numpy().reshape(()))
    return None

"""RMSNorm, and the residual add before it, as one kernel: y = x / sqrt(mean(x^2) + eps) * gamma.

Exported LMs spell RMSNorm out (Pow or Mul, ReduceMean, Add, Sqrt, Div, Mul, Mul), after a
residual add whose sum the next residual add reads again. TVM fuses the chain from the mean on,
but neither the squares (FuseOps does not fuse an elementwise producer into a reduction) nor the
add (two consumers): three kernels, each a call with its own output to allocate and release.
Here one pass over each row adds the residual (when there is one), sums the squares in vector
lanes, and writes the sum and the normalized row: SmolLM2 runs 61 norms a decode step, which
made 121 fewer kernel calls (528 -> 407; the first norm has no add before it) and ran 1.08x as
fast at 1 and 2 threads (AMD EPYC, decode step after 128 tokens, interleaved).

Operands [d0, d1, H] (batch, sequence, hidden; any d0 and d1) and gamma [H] (a constant or a
lifted weight), float32, H a multiple of the vector width. With a residual: (a, b, gamma) ->
(a + b, y); without: (x, gamma) -> y. The mean is the sum over H divided by H, and the rest TVM's ops in the graph's
order (1 / sqrt, then the two products), so results differ from TVM's kernels only in the order
of the squares' summation.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

import functools

import numpy as np

from edgecc.kernels.common import hsum, producer, scalar

KERNEL_ATTR = "edgecc.rms_norm"


@functools.cache
def primfunc(H: int, eps: float, lanes: int, residual: bool):
    """The kernel for rows of H, `lanes` float32 lanes a vector (lanes | H). Cached: a model
    repeats one shape per norm."""
    from tvm import tirx
    from tvm.script import tirx as T

    Hc, V = tirx.IntImm("int64", H), tirx.IntImm("int64", lanes)
    eps_c, inv_h = T.float32(eps), T.float32(1.0 / H)

    @T.macro
    def normalize(x, gamma, y, r0, r1):
        """Row (r0, r1) of x, normalized into y."""
        acc = T.alloc_buffer((lanes,), "float32")  # on the stack: in a register
        acc[T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
        for c in range(Hc // V):
            acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + x[r0, r1, T.ramp(c * V, 1, lanes)] * x[
                r0, r1, T.ramp(c * V, 1, lanes)]
        inv = T.float32(1) / T.sqrt(hsum(acc[T.ramp(0, 1, lanes)], lanes) * inv_h + eps_c)
        for c in range(Hc // V):
            y[r0, r1, T.ramp(c * V, 1, lanes)] = x[r0, r1, T.ramp(c * V, 1, lanes)] * T.broadcast(inv, lanes) \
                * gamma[T.ramp(c * V, 1, lanes)]

    if residual:
        @T.prim_func(private=True)
        def rms_norm(var_a: T.handle, var_b: T.handle, gamma: T.Buffer((Hc,), "float32"), var_x: T.handle,
                     var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            d0, d1 = T.int64(), T.int64()
            a = T.match_buffer(var_a, (d0, d1, Hc), "float32")
            b = T.match_buffer(var_b, (d0, d1, Hc), "float32")
            x = T.match_buffer(var_x, (d0, d1, Hc), "float32")
            y = T.match_buffer(var_y, (d0, d1, Hc), "float32")
            for row in T.parallel(d0 * d1):
                for c in range(Hc // V):
                    x[row // d1, row % d1, T.ramp(c * V, 1, lanes)] = a[row // d1, row % d1, T.ramp(c * V, 1, lanes)] \
                        + b[row // d1, row % d1, T.ramp(c * V, 1, lanes)]
                normalize(x, gamma, y, row // d1, row % d1)
    else:
        @T.prim_func(private=True)
        def rms_norm(var_x: T.handle, gamma: T.Buffer((Hc,), "float32"), var_y: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            d0, d1 = T.int64(), T.int64()
            x = T.match_buffer(var_x, (d0, d1, Hc), "float32")
            y = T.match_buffer(var_y, (d0, d1, Hc), "float32")
            for row in T.parallel(d0 * d1):
                normalize(x, gamma, y, row // d1, row % d1)

    # Scheduled by hand; opaque, so FuseOps leaves it whole.
    return rms_norm.with_attr("op_pattern", 8).with_attr(KERNEL_ATTR, H)


def reference(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """numpy, float64."""
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma


def route(mod, target):
    """Every float32 RMSNorm over the last axis of a rank-3 tensor, `x * (1 / sqrt(mean(x^2) +
    eps)) * gamma` as exporters write it (x^2 as power(x, 2) or x * x; gamma a constant vector),
    becomes the kernel on a CPU target, taking in the residual add that makes x where there is
    one. `mod` before legalization. Returns the module and how many it routed."""
    from tvm import relax, tirx

    from edgecc.kernels.common import rewrite_functions
    from edgecc.kernels.dense import vector_bits

    lanes = vector_bits(target) // 32
    routed = 0

    @relax.expr_functor.mutator
    class Route(relax.PyExprMutator):
        producer = producer

        def visit_call_(self, call):
            nonlocal routed
            call = super().visit_call_(call)
            found = self.match(call)
            if found is None:
                return call
            x, gamma, eps = found
            add = self.producer(x, "relax.add")
            # the sum is a dataflow value that later readers (the next residual add) can read
            # from the kernel instead; a function's output keeps its own add
            residual = (add is not None and isinstance(x, relax.DataflowVar)
                        and all(_same_shape(t, x) for t in add.args))
            gv = self.builder_.add_func(primfunc(int(x.ty.shape.values[-1]), eps, lanes, residual), "rms_norm")
            ty = relax.TensorType(x.ty.shape, "float32")
            routed += 1
            if not residual:
                return relax.call_tir(gv, [x, gamma], ty)
            both = self.builder_.emit(relax.call_tir(gv, [*add.args, gamma], [ty, ty]))
            self.set_var_remap(x, self.builder_.emit(relax.TupleGetItem(both, 0)))
            return relax.TupleGetItem(both, 1)

        def match(self, call):
            """(x, gamma, eps) of the RMSNorm whose last product `call` is, or None."""
            if getattr(call.op, "name", None) != "relax.multiply":
                return None
            for normed, gamma in (call.args, call.args[::-1]):
                scaled = self.producer(normed, "relax.multiply")
                for x, inv in (scaled.args, scaled.args[::-1]) if scaled is not None else ():
                    eps = self.norm_of(x, inv)
                    if eps is not None and _is_vector(gamma, x.ty.shape.values[-1]):
                        return x, gamma, eps
            return None

        def norm_of(self, x, inv) -> float | None:
            """eps, where `inv` is 1 / sqrt(mean(x^2, last axis) + eps) of a routable x."""
            shape = getattr(x.ty, "shape", None)
            if (str(getattr(x.ty, "dtype", "")) != "float32" or not isinstance(shape, relax.ShapeExpr)
                    or len(shape.values) != 3 or not isinstance(shape.values[-1], tirx.IntImm)
                    or int(shape.values[-1]) % lanes):
                return None
            div = self.producer(inv, "relax.divide")
            root = self.producer(div.args[1], "relax.sqrt") if div is not None and scalar(div.args[0]) == 1.0 else None
            plus = self.producer(root.args[0], "relax.add") if root is not None else None
            if plus is None:
                return None
            mean, eps = plus.args if scalar(plus.args[1]) is not None else plus.args[::-1]
            mean = self.producer(mean, "relax.mean")
            if (mean is None or scalar(eps) is None or not bool(mean.attrs.keepdims)
                    or [int(a) % 3 for a in mean.attrs.axis] != [2]):
                return None
            square = self.producer(mean.args[0], "relax.power", "relax.multiply")
            if square is None or not square.args[0].same_as(x):
                return None
            if square.op.name == "relax.power" and scalar(square.args[1]) != 2.0:
                return None
            if square.op.name == "relax.multiply" and not square.args[1].same_as(x):
                return None
            return scalar(eps)

    routed_mod = rewrite_functions(mod, Route)
    return relax.transform.DeadCodeElimination()(routed_mod), routed


def _is_vector(x, size) -> bool:
    """Whether x is a float32 tensor of shape [size] (gamma: a constant, or a lifted weight)."""
    from tvm import tirx

    shape = getattr(getattr(x, "ty", None), "shape", None)
    return (str(getattr(x.ty, "dtype", "")) == "float32" and hasattr(shape, "values") and len(shape.values) == 1
            and isinstance(shape.values[0], tirx.IntImm) and int(shape.values[0]) == int(size))


def _same_shape(a, b) -> bool:
    import tvm_ffi

    sa, sb = getattr(a.ty, "shape", None), getattr(b.ty, "shape", None)
    return (str(getattr(a.ty, "dtype", "")) == "float32" and sa is not None and sb is not None
            and tvm_ffi.structural_equal(sa, sb))

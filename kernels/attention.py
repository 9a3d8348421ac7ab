"""fp32 attention for symbolic sequence lengths: softmax(Q K^T * scale + mask) V as one kernel.

A causal LM compiled once for prefill and decode, or an encoder exported with a dynamic length,
computes attention as two matmuls between activations with a scale, a mask and a softmax between
them. TVM compiles those as separate kernels over a whole [.., S, L] score tensor: the scores
written, read back by the softmax, its exponentials written again and read by the second matmul,
each matmul a loop nest with no register blocking. Here, for a prompt, K^T and V are first copied
into contiguous panels (pack), then a task (parallel over batch, heads and blocks of R query rows)
computes its rows' scores into an R x L buffer, blocked like kernels.dense (R rows by two vectors
of keys in registers across the head dimension), applies the scale and the mask as they leave
registers, takes each row's softmax in place, and multiplies by V the same way, dividing by the
row's sum at the end: no [.., S, L] tensor is written. A decode step's row reads K^T and V as
they are, once. The softmax is TVM's (max subtracted, fast_exp), so results match its separate
kernels to rounding.

SmolLM2-135M (9 query heads on 3 KV heads, head dim 64), 2 threads, AMD EPYC: one layer's
attention at 128 tokens 256 us against 600 for TVM's three kernels; 30 layers in the 128-token
prefill 8.3 ms against 15.9; a decode step after 128 tokens 15.1-15.8 ms against 16.9-17.2.

Operands are as the graph has them: Q [.., S, D], K^T [.., D, L], V [.., L, Dv], an additive
mask broadcastable to [.., S, L], all with up to three batch dims, each either the output's or 1
(grouped-query attention reads one K and V for several query heads). Where K^T is the graph's
transpose of K [.., L, D] (a KV cache's keys, as every exporter writes it), the kernel reads K
itself: the transpose copied the whole cache at every decode step. A decode row then takes each
key's dot product over the head dimension, `width` lanes at a time, summed across lanes in a
tree of shuffles; a prompt transposes K as it packs it. SmolLM2 int4, one decode step, AMD EPYC:
after 128 tokens 1.07x as fast at 2 threads and 1.14x at 1; after 512 tokens 1.6x.
Shapes that are all static keep TVM's path, where tuning records apply.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

import functools

import numpy as np

from edgecc.kernels.common import hsum, producer, scalar

KERNEL_ATTR = "edgecc.attention"
BATCH_DIMS = 3  # operands are given 3 batch dims (leading 1s where they have fewer)


def _fast_exp(x):
    """TVM's topi.fast_exp on a float32 PrimExpr (the polynomial FastMathTransform uses)."""
    from tvm import tirx

    f = functools.partial(tirx.const, dtype="float32")
    clamped = tirx.max(tirx.min(x, f(88.3762626647950)), f(-88.3762626647949))
    n = tirx.floor(clamped * f(1.44269504088896341) + f(0.5))
    r = clamped - n * f(0.693147180559945)
    p = f(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + f(c)
    p = p * r * r + r + f(1)
    two_n = tirx.reinterpret("float32", tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return tirx.max(two_n * p, x)


@functools.cache
def primfunc(D: int, Dv: int, broadcast: tuple, mask: bool, scale: float, rows: int, width: int,
             zero_masked_rows: bool = False, keys: bool = False):
    """The kernel for head dims D (Q, K) and Dv (V), `rows` query rows and `width` keys per
    register block (width | Dv). `broadcast`: for Q, K^T, V and the mask, a 0/1 per batch dim (0:
    that dim is 1, broadcast), then the mask's 0/1 for its query and key dims. `mask`: whether
    there is one (without, the function takes no mask). A row whose scores are all -inf is NaN,
    as softmax makes it, or 0 with `zero_masked_rows` (the graph replaced softmax's NaNs by 0).
    `keys`: the second operand is K [.., L, D] itself, not K^T (width | D).
    Cached: a model repeats one shape per layer."""
    from tvm import tirx
    from tvm.script import tirx as T

    R, W, Dc, Dvc = (tirx.IntImm("int64", v) for v in (rows, width, D, Dv))
    fq, fk, fv, fm = (broadcast[3 * i:3 * i + 3] for i in range(4))
    fr, fc = broadcast[12:14]
    scale_c = T.float32(scale)
    ninf = T.float32(-np.inf)
    masked_row = T.float32(0) if zero_masked_rows else T.float32(np.nan)

    def klen(kt):
        """The number of keys."""
        return kt.shape[3] if keys else kt.shape[4]

    def kat(kt, b0, b1, b2, d, j):
        """Element d of key j."""
        return kt[b0, b1, b2, j, d] if keys else kt[b0, b1, b2, d, j]

    def key_dot(q, kt, qi: tuple, ki: tuple):
        """A query row's dot product with a key as they lie, `width` lanes at a time (keys)."""
        lanes = [(tirx.Ramp(tirx.IntImm("int64", c), tirx.IntImm("int64", 1), width))
                 for c in range(0, D, width)]
        terms = [q[(*qi, r)] * kt[(*ki, r)] for r in lanes]
        return hsum(functools.reduce(lambda a, b: a + b, terms), width)

    def mask_at(m, b0, b1, b2, i, j):
        """The mask's term for query row i and key j (0 without a mask)."""
        if not mask:
            return T.float32(0)
        return m[b0 * fm[0], b1 * fm[1], b2 * fm[2], i * fr, j * fc]

    @T.macro
    def block(q, kt, v, m, out, kp, vp, sc, acc, part, top, stat, b0, b1, b2, i0, count, packed):
        """Query rows i0 .. i0 + count - 1 of batch (b0, b1, b2); with `packed`, K^T's and V's
        whole blocks are read from their panels kp and vp (pack)."""
        L = klen(kt)
        if keys and not packed:  # scores key by key: a dot product over the head dim each
            for j in range(L):
                for r in T.unroll(count):
                    sc[r, j] = key_dot(q, kt, (b0 * fq[0], b1 * fq[1], b2 * fq[2], i0 + r),
                                       (b0 * fk[0], b1 * fk[1], b2 * fk[2], j)) * scale_c \
                        + mask_at(m, b0, b1, b2, i0 + r, j)
        # scores, W keys at a time (packed: the last, partial block too, its panel zero padded)
        for jb in range((L + W - 1) // W if packed else (0 if keys else L // W)):
            for r in T.unroll(count):
                for j in T.vectorized(W):
                    acc[r, j] = T.float32(0)
            for d in range(Dc):
                for r in T.unroll(count):
                    for j in T.vectorized(W):
                        if packed:
                            acc[r, j] = acc[r, j] + q[b0 * fq[0], b1 * fq[1], b2 * fq[2], i0 + r, d] * kp[
                                ((b0 * fk[0]) * kt.shape[1] + b1 * fk[1]) * kt.shape[2] + b2 * fk[2], jb, d, j]
                        else:
                            acc[r, j] = acc[r, j] + q[b0 * fq[0], b1 * fq[1], b2 * fq[2], i0 + r, d] * kt[
                                b0 * fk[0], b1 * fk[1], b2 * fk[2], d, jb * W + j]
            for r in T.unroll(count):
                if jb * W + W <= L:
                    for j in T.vectorized(W):
                        sc[r, jb * W + j] = acc[r, j] * scale_c + mask_at(m, b0, b1, b2, i0 + r, jb * W + j)
                else:  # through `part`: an element of acc picked at run time would put acc in memory
                    for j in T.vectorized(W):
                        part[j] = acc[r, j]
                    for j in range(L - jb * W):
                        sc[r, jb * W + j] = part[j] * scale_c + mask_at(m, b0, b1, b2, i0 + r, jb * W + j)
        if not packed and not keys:
            for j in range(L // W * W, L):  # the keys past the last whole block
                for r in T.unroll(count):
                    acc[r, 0] = T.float32(0)
                    for d in range(Dc):
                        acc[r, 0] = acc[r, 0] + q[b0 * fq[0], b1 * fq[1], b2 * fq[2], i0 + r, d] * kt[
                            b0 * fk[0], b1 * fk[1], b2 * fk[2], d, j]
                    sc[r, j] = acc[r, 0] * scale_c + mask_at(m, b0, b1, b2, i0 + r, j)
        for r in range(count):  # softmax in place, W lanes at a time; top[r]: max; stat[r]: 1 / sum
            for j in T.vectorized(W):
                part[j] = ninf
            for jb in range(L // W):
                for j in T.vectorized(W):
                    part[j] = T.max(part[j], sc[r, jb * W + j])
            top[r] = ninf
            for j in range(W):
                top[r] = T.max(top[r], part[j])
            for j in range(L // W * W, L):
                top[r] = T.max(top[r], sc[r, j])
            # every key masked with -inf: softmax's 0 / 0, or the 0 an isnan guard puts there;
            # the row's exponentials are then exp(-inf) = 0, not NaN
            stat[r] = T.if_then_else(top[r] == ninf, masked_row, T.float32(1))
            top[r] = T.if_then_else(top[r] == ninf, T.float32(0), top[r])
            for j in T.vectorized(W):
                part[j] = T.float32(0)
            for jb in range(L // W):
                for j in T.vectorized(W):
                    sc[r, jb * W + j] = _fast_exp(sc[r, jb * W + j] - top[r])
                    part[j] = part[j] + sc[r, jb * W + j]
            for j in range(L // W * W, L):
                sc[r, j] = _fast_exp(sc[r, j] - top[r])
                part[0] = part[0] + sc[r, j]
            for j in range(1, W):
                part[0] = part[0] + part[j]
            stat[r] = T.if_then_else(stat[r] == T.float32(1), T.float32(1) / part[0], stat[r])
        for c in range(Dvc // W):  # probabilities @ V, W columns at a time
            for r in T.unroll(count):
                for j in T.vectorized(W):
                    acc[r, j] = T.float32(0)
            for k in range(L):
                for r in T.unroll(count):
                    for j in T.vectorized(W):
                        if packed:
                            acc[r, j] = acc[r, j] + sc[r, k] * vp[
                                ((b0 * fv[0]) * v.shape[1] + b1 * fv[1]) * v.shape[2] + b2 * fv[2], c, k, j]
                        else:
                            acc[r, j] = acc[r, j] + sc[r, k] * v[b0 * fv[0], b1 * fv[1], b2 * fv[2], k, c * W + j]
            for r in T.unroll(count):
                for j in T.vectorized(W):
                    out[b0, b1, b2, i0 + r, c * W + j] = acc[r, j] * stat[r]

    @T.macro
    def pack(kt, v, kp, vp):
        """K^T in contiguous [D, W] panels of W keys (the last zero padded), V in [L, W] panels of
        W columns. As the graph has them, the rows of a block are a power of two apart (L = 128:
        512 bytes), fall into a few cache sets and evict each other: the scores ran at half the
        speed, or a quarter, by where the pages happened to land."""
        kz, blocks, vz, cols = kt.shape[0] * kt.shape[1] * kt.shape[2], (klen(kt) + W - 1) // W, \
            v.shape[0] * v.shape[1] * v.shape[2], Dvc // W
        for t in T.parallel(kz * blocks):
            for d in range(Dc):
                if t % blocks * W + W <= klen(kt):
                    for j in T.vectorized(W):
                        kp[t // blocks, t % blocks, d, j] = kat(kt, t // blocks // (kt.shape[1] * kt.shape[2]),
                                                                t // blocks // kt.shape[2] % kt.shape[1],
                                                                t // blocks % kt.shape[2], d, t % blocks * W + j)
                else:  # the last keys, zero padded
                    for j in range(W):
                        kp[t // blocks, t % blocks, d, j] = T.if_then_else(
                            t % blocks * W + j < klen(kt),
                            kat(kt, t // blocks // (kt.shape[1] * kt.shape[2]), t // blocks // kt.shape[2] % kt.shape[1],
                                t // blocks % kt.shape[2], d, T.min(t % blocks * W + j, klen(kt) - 1)),
                            T.float32(0))
        for t in T.parallel(vz * cols):
            for k in range(v.shape[3]):
                for j in T.vectorized(W):
                    vp[t // cols, t % cols, k, j] = v[t // cols // (v.shape[1] * v.shape[2]),
                                                      t // cols // v.shape[2] % v.shape[1],
                                                      t // cols % v.shape[2], k, t % cols * W + j]

    @T.macro
    def body(q, kt, v, m, out):
        o0, o1, o2, S = out.shape[0], out.shape[1], out.shape[2], out.shape[3]
        L = klen(kt)
        if S >= R:  # a prompt: blocks of R rows, on packed K^T and V
            kp = T.alloc_buffer((kt.shape[0] * kt.shape[1] * kt.shape[2], (L + W - 1) // W, Dc, W), "float32")
            vp = T.alloc_buffer((v.shape[0] * v.shape[1] * v.shape[2], Dvc // W, L, W), "float32")
            pack(kt, v, kp, vp)
            blocks = (S + R - 1) // R
            for task in T.parallel(o0 * o1 * o2 * blocks):
                sc = T.alloc_buffer((R, L), "float32")  # the rows' scores, then probabilities
                acc = T.alloc_buffer((R, W), "float32")  # under 1 KB: on the stack, in registers
                part = T.alloc_buffer((W,), "float32")  # a row's max and sum, lane by lane
                top = T.alloc_buffer((R,), "float32")
                stat = T.alloc_buffer((R,), "float32")
                # the last block ends at row S: it redoes rows of the one before
                block(q, kt, v, m, out, kp, vp, sc, acc, part, top, stat, task // blocks // (o1 * o2),
                      task // blocks // o2 % o1, task // blocks % o2, T.min(task % blocks * R, S - R), R, True)
        else:  # a decode step's row or a few: each row reads K^T and V once, as they are
            for task in T.parallel(o0 * o1 * o2):
                sc = T.alloc_buffer((1, L), "float32")
                acc = T.alloc_buffer((1, W), "float32")
                part = T.alloc_buffer((W,), "float32")
                top = T.alloc_buffer((1,), "float32")
                stat = T.alloc_buffer((1,), "float32")
                for i in range(S):
                    block(q, kt, v, m, out, None, None, sc, acc, part, top, stat, task // (o1 * o2), task // o2 % o1,
                          task % o2, i, 1, False)

    if mask:
        @T.prim_func(private=True)
        def attention(var_q: T.handle, var_kt: T.handle, var_v: T.handle, var_m: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            qa, qb, qc, ka, kb, kc, va, vb, vc = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), \
                T.int64(), T.int64(), T.int64(), T.int64()
            ma, mb, mc, ms, ml = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            o0, o1, o2, S, L = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(var_q, (qa, qb, qc, S, Dc), "float32")
            kt = T.match_buffer(var_kt, (ka, kb, kc, L, Dc) if keys else (ka, kb, kc, Dc, L), "float32")
            v = T.match_buffer(var_v, (va, vb, vc, L, Dvc), "float32")
            m = T.match_buffer(var_m, (ma, mb, mc, ms, ml), "float32")
            out = T.match_buffer(var_out, (o0, o1, o2, S, Dvc), "float32")
            body(q, kt, v, m, out)
    else:
        @T.prim_func(private=True)
        def attention(var_q: T.handle, var_kt: T.handle, var_v: T.handle, var_out: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            qa, qb, qc, ka, kb, kc, va, vb, vc = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), \
                T.int64(), T.int64(), T.int64(), T.int64()
            o0, o1, o2, S, L = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            q = T.match_buffer(var_q, (qa, qb, qc, S, Dc), "float32")
            kt = T.match_buffer(var_kt, (ka, kb, kc, L, Dc) if keys else (ka, kb, kc, Dc, L), "float32")
            v = T.match_buffer(var_v, (va, vb, vc, L, Dvc), "float32")
            out = T.match_buffer(var_out, (o0, o1, o2, S, Dvc), "float32")
            body(q, kt, v, None, out)

    # Scheduled by hand; opaque, so FuseOps leaves it whole.
    return attention.with_attr("op_pattern", 8).with_attr(KERNEL_ATTR, rows)


def route(mod, target):
    """Every fp32 `matmul(softmax(matmul(Q, K^T) [* or / a scalar constant] [+ mask]), V)` with a
    symbolic dim becomes the kernel (CPU targets; `mod` before FastMathTransform, which rewrites
    the softmax, and before legalization). Returns the module and how many it routed."""
    from tvm import relax, tirx

    from edgecc.kernels.common import rewrite_functions
    from edgecc.kernels.dense import block_rows, vector_bits

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
            q, kt, v, mask, scale, zero_masked_rows = found
            out_shape = list(call.ty.shape.values)
            Dv = int(out_shape[-1])
            width = 2 * lanes if Dv % (2 * lanes) == 0 else lanes
            flags = _broadcast_flags(q, kt, v, mask, out_shape)
            if flags is None or Dv % width:
                return call
            routed += 1
            D = int(q.ty.shape[-1])
            keys = self.untransposed(kt) if D % width == 0 else None
            kt = kt if keys is None else keys
            gv = self.builder_.add_func(
                primfunc(D, Dv, flags, mask is not None, scale, block_rows(target, width), width,
                         zero_masked_rows, keys is not None), "attention")
            operands = [_five_dims(self.builder_, x) for x in (q, kt, v, mask) if x is not None]
            out5 = [1] * (5 - len(out_shape)) + out_shape
            out = self.builder_.emit(relax.call_tir(gv, operands, relax.TensorType(out5, "float32")))
            return relax.op.reshape(out, out_shape) if len(out_shape) < 5 else out

        def untransposed(self, kt):
            """K where K^T is K with its last two axes swapped (the graph's transpose of the
            cache): the kernel reads it as it lies, sparing a decode step the transposed copy of
            the whole cache (and a prompt a pass over it), or None."""
            swap = self.producer(kt, "relax.permute_dims")
            if swap is None or swap.attrs.axes is None:
                return None
            rank = len(kt.ty.shape.values)
            axes = [int(a) % rank for a in swap.attrs.axes]
            return swap.args[0] if axes == [*range(rank - 2), rank - 1, rank - 2] else None

        def match(self, call):
            """(Q, K^T, V, mask or None, scale, zero_masked_rows) of the attention `call`
            computes, or None. The probabilities may be guarded, where(isnan(p), 0, p), as
            torch's exporter writes them."""
            if getattr(call.op, "name", None) != "relax.matmul" or not _routable(call):
                return None
            probs, guarded = call.args[0], self.producer(call.args[0], "relax.where")
            if guarded is not None:
                isnan = self.producer(guarded.args[0], "relax.isnan")
                if isnan is None or scalar(guarded.args[1]) != 0.0 or not isnan.args[0].same_as(guarded.args[2]):
                    return None
                probs = guarded.args[2]
            probs = self.producer(probs, "relax.nn.softmax")
            if probs is None or int(probs.attrs.axis) not in (-1, len(probs.ty.shape) - 1):
                return None
            scores, mask = probs.args[0], None
            add = self.producer(scores, "relax.add")
            if add is not None:
                a, b = add.args
                if self.producer(a, "relax.matmul", "relax.multiply", "relax.divide") is None:
                    a, b = b, a
                scores, mask = a, b
            scale = 1.0
            scaled = self.producer(scores, "relax.multiply", "relax.divide")
            if scaled is not None:
                a, b = scaled.args
                if scalar(a) is not None and scaled.op.name == "relax.multiply":
                    a, b = b, a
                if scalar(b) is None:
                    return None
                scores = a
                scale = scalar(b) if scaled.op.name == "relax.multiply" else 1.0 / scalar(b)
            qk = self.producer(scores, "relax.matmul")
            if qk is None or not _routable(qk) or (mask is not None and not _routable_tensor(mask)):
                return None
            q, kt, v = qk.args[0], qk.args[1], call.args[1]
            if not all(isinstance(x.ty.shape.values[-1], tirx.IntImm) for x in (q, v)):
                return None  # the head dims
            return q, kt, v, mask, scale, guarded is not None

    routed_mod = rewrite_functions(mod, Route)
    return relax.transform.DeadCodeElimination()(routed_mod), routed


def _routable_tensor(x) -> bool:
    from tvm import relax

    shape = getattr(x.ty, "shape", None)
    return (str(getattr(x.ty, "dtype", "")) == "float32" and isinstance(shape, relax.ShapeExpr)
            and len(shape.values) <= 2 + BATCH_DIMS)


def _routable(matmul) -> bool:
    """A float32 matmul of tensors with known shapes of rank 2 to 5 and a symbolic dim somewhere
    (all static: TVM's tunable path)."""
    from tvm import tirx

    if not all(_routable_tensor(x) for x in (*matmul.args, matmul)):
        return False
    shapes = [list(x.ty.shape.values) for x in (*matmul.args, matmul)]
    return all(len(s) >= 2 for s in shapes) and any(not isinstance(d, tirx.IntImm) for s in shapes for d in s)


def _broadcast_flags(q, kt, v, mask, out_shape) -> tuple | None:
    """primfunc's `broadcast` for these operands and the output shape, or None where an operand
    does not line up with the output (its batch dims, rows or keys)."""
    import tvm
    from tvm import tirx

    analyzer = tvm.sym.Analyzer()
    out = [1] * (5 - len(out_shape)) + out_shape
    S, L = out[3], kt.ty.shape.values[-1]

    def same(a, b) -> bool:
        return analyzer.can_prove_equal(a, b)

    def flag(dim, want):
        """1: the operand has the output's dim; 0: it broadcasts a 1; None: neither."""
        if same(dim, want):
            return 1
        return 0 if isinstance(dim, tirx.IntImm) and int(dim) == 1 else None

    flags = []
    for x in (q, kt, v, mask):
        if x is None:
            flags += [1, 1, 1]
            continue
        shape = [1] * (5 - len(x.ty.shape.values)) + list(x.ty.shape.values)
        flags += [flag(shape[i], out[i]) for i in range(BATCH_DIMS)]
    rows_keys = [1, 1]
    if mask is not None:
        shape = [1] * (5 - len(mask.ty.shape.values)) + list(mask.ty.shape.values)
        rows_keys = [flag(shape[3], S), flag(shape[4], L)]
    lined_up = (same(q.ty.shape.values[-2], S) and same(v.ty.shape.values[-2], L)
                and same(q.ty.shape.values[-1], kt.ty.shape.values[-2]))
    flags += rows_keys
    return tuple(flags) if lined_up and None not in flags else None


def _five_dims(bb, x):
    """`x` with leading dims of 1 up to 2 + BATCH_DIMS."""
    from tvm import relax

    rank = len(x.ty.shape.values)
    return x if rank == 5 else bb.emit(relax.op.expand_dims(x, list(range(5 - rank))))


def reference(q, kt, v, mask, scale: float) -> np.ndarray:
    """numpy, float64: softmax(q @ kt * scale + mask) @ v with numpy broadcasting."""
    s = q.astype(np.float64) @ kt.astype(np.float64) * scale
    if mask is not None:
        s = s + mask
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v.astype(np.float64)

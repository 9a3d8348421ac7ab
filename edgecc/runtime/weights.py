"""Weights stored beside the compiled library, mapped at load instead of copied.

A Relax module built with its weights as constants embeds them in the library, and loading it
holds them three times: the library's mapped file, the executable's deserialized constants and
the VM's own copy (SmolLM2 fp32: 652 MB of weights, 3.6 GB peak resident after loading). So CPU builds lift
every large constant of `main` into a trailing parameter (`lift`), the artifact keeps them in
one raw file (`write`: 64-byte aligned, described in the manifest), and loading maps that file
copy-on-write and hands the pages to the runtime without a copy (`load`). The module's other
functions keep their constants.

tvm is imported inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgecc.errors import UserError

FILE = "weights.bin"
MIN_BYTES = 4096  # smaller constants (shapes, scalars, small tables) stay in the library
ALIGN = 64  # what DLPack wants of a tensor's data pointer


def lift(mod, min_bytes: int = MIN_BYTES):
    """`mod` with every constant of `main` of at least `min_bytes` bytes made a parameter after
    its inputs, and those constants' values in parameter order."""
    import tvm
    from tvm import relax

    main = mod["main"]
    params: dict = {}  # constant (by identity) -> (its parameter, its value)

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def visit_generic_const_(self, const):
            if not isinstance(const, tvm.ir.Constant):
                return const
            if const not in params:
                # A view of the constant's memory, not a copy, where numpy's DLPack knows the dtype
                # (not bfloat16 and the other ml_dtypes types: those are copied).
                native = np.dtype(str(const.value.dtype)).kind in "iuf"
                value = np.from_dlpack(const.value) if native else const.value.numpy()
                if value.nbytes < min_bytes and value.size:  # TVM cannot load back an empty one it saved
                    return const
                var = relax.Var(f"weight{len(params)}", relax.TensorType(value.shape, str(value.dtype)))
                params[const] = (var, value)
            return params[const][0]

    body = Lift(mod).visit_expr(main.body)
    if not params:
        return mod, []
    lifted = list(params.values())
    params.clear()  # TVM keeps the mutator class, and so this dict, alive past this call
    func = relax.Function(list(main.params) + [v for v, _ in lifted], body, main.ret_ty, main.is_pure,
                          main.attrs, main.span)
    out = mod.clone()
    out["main"] = func
    return out, [value for _, value in lifted]


def write(path: Path, arrays: list) -> list[dict]:
    """The arrays back to back in one file, each at a 64-byte aligned offset; their manifest entries.

    An entry may be a function that makes the array (a layout packed from the original). Entries
    are taken out of `arrays` as they are written, so each is let go once it is on disk."""
    entries, offset = [], 0
    arrays.reverse()
    with open(path, "wb") as f:
        while arrays:
            a = arrays.pop()
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(a() if callable(a) else a)
            del a
            f.write(memoryview(data.reshape(-1)).cast("B"))  # the array's own bytes, not a copy
            entries.append({"dtype": str(data.dtype), "shape": list(data.shape), "offset": offset,
                            "bytes": data.nbytes})
            offset += data.nbytes
    return entries


# What write() stores; a manifest naming anything else (object, void) is refused.
DTYPES = {"float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
          "uint32", "int64", "uint64", "bool"}


def check(entries: Any, size: int, where: str) -> None:
    """Manifest entries that stay inside a file of `size` bytes, with stored dtypes and shapes
    that match their byte counts; a one-line UserError otherwise."""
    if not isinstance(entries, list):
        raise UserError(f"{where}: weights.tensors is not a list")
    for i, e in enumerate(entries):
        ok = (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"])
              and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) and e[k] >= 0
                      for k in ("offset", "bytes")))
        if not ok:
            raise UserError(f"{where}: weights tensor {i} has no valid dtype, shape, offset and bytes")
        if int(np.prod(e["shape"], dtype=object)) * np.dtype(e["dtype"]).itemsize != e["bytes"] or e["offset"] + e["bytes"] > size:
            raise UserError(f"{where}: weights tensor {i} ({e['dtype']} {e['shape']} at offset "
                            f"{e['offset']}) does not fit its bytes or the {size}-byte file")


def load(path: Path, entries: list[dict]) -> list:
    """The weights as runtime tensors over a copy-on-write mapping of the file: pages are read on
    first use and shared with the page cache; nothing writes to them."""
    import tvm

    # An empty file (every weight empty) cannot be mapped, and an empty view has no aligned address.
    mapped = np.memmap(path, dtype=np.uint8, mode="c") if path.stat().st_size else None
    tensors = []
    for e in entries:
        if not e["bytes"]:
            tensors.append(tvm.runtime.tensor(np.zeros(e["shape"], e["dtype"])))
            continue
        view = mapped[e["offset"]:e["offset"] + e["bytes"]].view(e["dtype"]).reshape(e["shape"])
        tensors.append(tvm.runtime.from_dlpack(view))
    return tensors

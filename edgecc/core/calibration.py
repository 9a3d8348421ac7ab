"""Calibration data: loading and checking it, and activation ranges measured with it.

Data comes from `--calibration data.npz` (one array per model input, named as the input). Without
it, passes that need ranges draw seeded synthetic batches (random token ids for LMs, N(0,1)
floats otherwise): enough to find scales, though real data gives better ones.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgecc.core.verify import graph_inputs, ort_session, random_inputs
from edgecc.errors import UserError

SYNTHETIC_BATCHES = 8
MAX_NPZ_BYTES = 16 << 30  # inputs beyond this are a mistake on a device-sized workflow


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Named arrays from an .npz file (never pickles), with one-line errors naming the file.

    Every member's header is checked against the bytes the member holds before any array is
    allocated: a corrupt or hostile header could otherwise ask for terabytes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        total = 0
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f, max_header_size=10000)
                need = math.prod(shape) * dtype.itemsize
                if dtype.hasobject or need > info.file_size:
                    raise ValueError(f"member '{info.filename}' declares {dtype} {list(shape)} "
                                     f"({need} bytes) but holds {info.file_size} bytes")
                total += need
        if total > MAX_NPZ_BYTES:
            raise ValueError(f"arrays of {total} bytes exceed edgecc's limit of {MAX_NPZ_BYTES}")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as e:  # RuntimeError: an encrypted member
        raise UserError(f"{path}: not a readable .npz file: {e}") from None


def load_calibration(path: str | Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Read an .npz of model inputs and check names, dtypes and ranks against the model."""
    path = Path(path)
    data = read_npz(path)
    specs = {s.name: s for s in graph_inputs(model)}
    missing, extra = sorted(set(specs) - set(data)), sorted(set(data) - set(specs))
    if missing or extra:
        raise UserError(f"{path}: calibration inputs do not match the model: missing {missing}, "
                        f"unexpected {extra} (model inputs: {sorted(specs)})")
    for name, spec in specs.items():
        a = data[name]
        if a.dtype != spec.dtype:
            raise UserError(f"{path}: '{name}' has dtype {a.dtype}, the model expects {spec.dtype}")
        fixed_dims_differ = any(isinstance(d, int) and d != s for d, s in zip(spec.shape, a.shape))
        if a.ndim != len(spec.shape) or fixed_dims_differ:
            raise UserError(f"{path}: '{name}' has shape {list(a.shape)}, "
                            f"the model expects {list(spec.shape)}")
    return data


def activation_ranges(model: ir.Model, ctx, names: list[str]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) absolute maxima of the named activations over the calibration data."""
    return {name: np.abs(rows).max(axis=0) for name, rows in activation_samples(model, ctx, names).items()}


def activation_samples(model: ir.Model, ctx, names: list[str]) -> dict[str, np.ndarray]:
    """The named activations over the calibration data, as rows [tokens, channels]."""
    session = ort_session(model, outputs=names)  # weights in an external-data file stay there
    if ctx.calibration is not None:
        batches = [ctx.calibration]
    else:
        batches = [random_inputs(model, seed=ctx.seed + i, dim_values=ctx.dim_values)
                   for i in range(SYNTHETIC_BATCHES)]
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feeds in batches:
        for name, value in zip(names, session.run(names, feeds)):
            rows[name].append(value.reshape(-1, value.shape[-1]))
    return {name: np.concatenate(parts) for name, parts in rows.items()}

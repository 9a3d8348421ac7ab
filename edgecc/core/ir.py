"""Loading and validating ONNX models into the in-memory IR (onnx-ir) and back.

Every failure a user can cause (missing, truncated or non-ONNX file, checker failure)
raises a UserError that names the file.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from edgecc.errors import UserError

# Above this, protobuf cannot hold the model in one message: work through files.
PROTO_LIMIT = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load, check and shape-infer an ONNX file (external data supported)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected an .onnx file")
    if not path.is_file():  # a device or a pipe (/dev/zero) would be read without end
        raise UserError(f"{path}: not a regular file, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not a readable ONNX model (truncated or not ONNX): "
                        f"{_first_line(e)}") from None
    if proto.ir_version == 0 or not proto.HasField("graph"):
        raise UserError(f"{path}: not an ONNX model (no IR version or graph)")
    _check_external_data(proto, path)
    _check_opsets(proto, path)
    _check_dims(proto, path)
    del proto  # a model with its weights inside: each parse below holds them once more
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as e:
        raise UserError(f"{path}: fails the ONNX checker: {_first_line(e)}") from None
    try:
        model = ir.load(str(path))
    except Exception as e:
        raise UserError(f"{path}: cannot be loaded: {_first_line(e)}") from None
    return infer_shapes(model)


# The largest tensor a graph's fixed dims may describe: 2^32 elements (16 GiB of float32).
MAX_ELEMENTS = 1 << 32


def _check_opsets(proto: onnx.ModelProto, path: Path) -> None:
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise UserError(f"{path}: imports ONNX opset {opset.version}; this edgecc's ONNX knows "
                            f"opsets 1 to {newest}")


def _check_dims(proto: onnx.ModelProto, path: Path) -> None:
    """Graph inputs and outputs without a valid element type, with negative dims, or with fixed
    dims too large to allocate."""
    for vi in (*proto.graph.input, *proto.graph.output):
        kind = vi.type.WhichOneof("value")
        if kind == "tensor_type" and vi.type.tensor_type.elem_type not in onnx.helper.get_all_tensor_dtypes():
            raise UserError(f"{path}: '{vi.name}' has no valid element type "
                            f"({vi.type.tensor_type.elem_type})")
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise UserError(f"{path}: '{vi.name}' has a negative dimension {dims}")
        if math.prod(dims) > MAX_ELEMENTS:
            raise UserError(f"{path}: '{vi.name}' has fixed dims {dims}: more than 2^32 elements")


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = base / info.get("location", "")
        if not loc.is_file():
            raise UserError(f"{path}: tensor '{tensor.name}' refers to missing external data file {loc}")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > loc.stat().st_size:
            raise UserError(f"{path}: external data file {loc} is truncated (tensor '{tensor.name}')")


def infer_shapes(model: ir.Model) -> ir.Model:
    """ONNX shape inference, merged into the IR (initializers are kept out of protobuf)."""
    from onnx_ir.passes.common import ShapeInferencePass

    try:
        return ShapeInferencePass(strict_mode=False, data_prop=True)(model).model
    except Exception as e:
        raise UserError(f"shape inference failed: {_first_line(e)}") from None


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.to_proto(model)


ALIGN = 64  # bytes: what TVM's kernels assume of a buffer's start, and so of a weight it takes as is
# Weights inside a model's protobuf beyond this are moved to a file for the compile (spill_weights).
SPILL_BYTES = 64 << 20


def spill_weights(model: ir.Model) -> tuple[ir.Model, tempfile.TemporaryDirectory | None]:
    """A model whose weights sit inside its protobuf, with them written to an external-data file
    in a temporary directory and loaded back lazily, as a model over 2 GB is: a weight is then read
    from a mapping when something reads it, instead of the parsed protobuf holding every weight for
    the whole compile and ONNX Runtime copying them. Returns the model and the directory, which
    must outlive every tensor read from it; the model itself and None where its weights are small
    or already external, or where temporary files are in memory (tmpfs) anyway."""
    inside = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                 if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))
    if inside < SPILL_BYTES or _in_memory(tempfile.gettempdir()):
        return model, None
    directory = tempfile.TemporaryDirectory(prefix="edgecc-weights-")
    path = os.path.join(directory.name, "model.onnx")
    ir.save(model, path, external_data="model.onnx.data", alignment=ALIGN)
    return ir.load(path), directory


def _in_memory(directory: str) -> bool:
    """Whether `directory` is on a RAM-backed file system, where a file takes memory all the same."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                inside = directory == mount or directory.startswith(mount.rstrip("/") + "/")
                if len(fields) > 2 and inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        return False
    return kind in ("tmpfs", "ramfs")


# Initializers at least this large travel beside a graph's proto, not inside it (light_proto).
WEIGHT_BYTES = 1 << 16
# Element types whose values numpy holds natively: ONNX Runtime and TVM take these arrays as they are.
_NATIVE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
           ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
           ir.DataType.UINT64, ir.DataType.BOOL}


def large_initializers(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """The main graph's initializers of WEIGHT_BYTES or more of a native element type, by name."""
    return {name: v.const_value for name, v in model.graph.initializers.items()
            if v.const_value is not None and v.const_value.dtype in _NATIVE
            and v.const_value.nbytes >= WEIGHT_BYTES}


def light_proto(model: ir.Model, keep: Collection[str] = ()) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model as a ModelProto whose large initializers are data-less stubs (external data at
    location "in-memory"), and their values by name. Those named in `keep` (external-data
    tensors) stay references into their file instead, for a reader given the file's folder.

    The values are the IR's own arrays: views of a mapped external-data file or of the loaded
    proto's bytes, not copies. So a graph reaches ONNX Runtime (add_external_initializers) and
    TVM's importer without a second copy of its weights, and a model over protobuf's 2 GB limit
    has a proto at all."""
    large = {name: t for name, t in large_initializers(model).items() if name not in keep}
    return _stubbed(model, large, keep), {name: _array(t) for name, t in large.items()}


def graph_proto(model: ir.Model) -> onnx.ModelProto:
    """light_proto's ModelProto alone: for reading a graph's signature, nodes and metadata."""
    return _stubbed(model, large_initializers(model))


def _stubbed(model: ir.Model, large: dict[str, ir.TensorProtocol], keep: Collection[str] = ()) -> onnx.ModelProto:
    stubs = {name: ir.ExternalTensor("in-memory", 0, t.nbytes, t.dtype, shape=t.shape, name=name)
             for name, t in large.items()}
    return proto_with(model, stubs, keep)


def proto_with(model: ir.Model, stand_ins: dict[str, ir.TensorProtocol] | None = None,
               external: Collection[str] = ()) -> onnx.ModelProto:
    """ir.to_proto, with the initializers named in `stand_ins` written as those tensors, and the
    external-data tensors not named in `external` written as data: their readers have no path."""
    values = model.graph.initializers
    stand_ins = dict(stand_ins or {})
    stand_ins.update({name: ir.Tensor(v.const_value.numpy(), dtype=v.const_value.dtype, name=name)
                      for name, v in values.items() if isinstance(v.const_value, ir.ExternalTensor)
                      and name not in stand_ins and name not in external})
    originals = {name: values[name].const_value for name in stand_ins}
    for name, t in stand_ins.items():
        values[name].const_value = t
    try:
        return ir.to_proto(model)
    finally:
        for name, t in originals.items():
            values[name].const_value = t


def _array(t: ir.TensorProtocol) -> np.ndarray:
    """The tensor's values without a copy. An external-data tensor is mapped again, privately and
    copy-on-write: writable, so TVM and ONNX Runtime take the array as their own memory instead of
    copying it, while its pages stay the file's (nothing writes to them)."""
    if isinstance(t, ir.ExternalTensor) and t.nbytes and sys.byteorder == "little":
        return np.memmap(t.path, dtype=t.dtype.numpy(), mode="c", offset=t.offset or 0, shape=t.shape.numpy())
    return t.numpy()


def release_mappings(*models: ir.Model) -> None:
    """Unmap the external-data file from the models' tensors. A pass that read a weight left its
    pages resident in the tensor's mapping, and the source model keeps that tensor until
    verification; whoever needs the values again maps them again (light_proto, numpy())."""
    for model in models:
        for v in model.graph.initializers.values():
            if isinstance(v.const_value, ir.ExternalTensor):
                try:
                    v.const_value.release()
                except BufferError:  # a view of its array is still in use: that mapping stays
                    pass


def forget_removed_inputs(model: ir.Model) -> None:
    """Let go of the values once in the graph's inputs and since removed. onnx-ir counts each
    input's occurrences and keeps a zero count, and so the value, after its removal; its shape
    inference lists every initializer as an input for a moment, so without this every weight a
    pass replaces stays in memory (onnx-ir 0.1.x, GraphInputs._ref_counter)."""
    counter = getattr(model.graph.inputs, "_ref_counter", None)
    if counter is not None:
        for value in [v for v, n in counter.items() if n <= 0]:
            del counter[value]


def shared_copy(model: ir.Model) -> ir.Model:
    """A copy of the model's graph that shares its large initializers' tensors (read-only data)
    with the original: what a pipeline changes in place leaves the copy as it was."""
    large = large_initializers(model)
    copy = ir.from_proto(_stubbed(model, large))
    for name, t in large.items():
        copy.graph.initializers[name].const_value = t
    return copy


def save_model(model: ir.Model, path: str | os.PathLike) -> None:
    """Save, with weights in an external data file beside it once the model is large or some of
    its weights are read from one (the source's, or the compile's spilled file): a reference
    to another directory's file would not travel with the model."""
    path = Path(path)
    values = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    if sum(v.nbytes for v in values) > PROTO_LIMIT or any(isinstance(v, ir.ExternalTensor) for v in values):
        ir.save(model, str(path), external_data=path.name + ".data")
    else:
        ir.save(model, str(path))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

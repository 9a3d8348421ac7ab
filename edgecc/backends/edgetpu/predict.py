"""What edgetpu_compiler would map: a prediction from the target's table, and the real compiler's log.

edgetpu_compiler puts one contiguous segment of supported ops on the TPU: it walks the ops in
order, and from the first op it cannot map on, everything runs on the CPU. `predict` does the same
walk against the target's `[edgetpu]` table (supported ops and their highest version, the
3-innermost-dims rule, the limitations column) and reports per op the status string the compiler
prints, plus the multiply-accumulates (MACs) inside the segment. It is a prediction, labelled so:
the compiler's own rules are closed and partly unwritten.

When `edgetpu_compiler` is on PATH, `run_compiler` runs it and `parse_log` reads its table, so the
artifact shows both and where they differ. edgecc itself never writes Edge TPU custom ops.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np

MAPPED = "Mapped to Edge TPU"
NOT_SUPPORTED = "Operation not supported"
VERSION = "Operation version not supported"
DTYPE = "Operation is working on an unsupported data type"
RANK = "Tensor has unsupported rank (up to 3 innermost dimensions mapped)"
LIMITATION = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
AFTER_SEGMENT = "More than one subgraph is not supported"
LABEL = "PREDICTED — not compiled"
COMPILER_TIMEOUT_S = 600

_ROW = re.compile(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$")
_COUNT = re.compile(r"^Number of operations that will run on (Edge TPU|CPU):\s*(\d+)")


def _names():
    from ai_edge_litert import schema_py_generated as fb

    return fb, {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}


def _macs(op_name: str, ins: list, outs: list) -> int:
    out = math.prod(int(d) for d in outs[0].shape)
    if op_name == "CONV_2D":
        _, kh, kw, cin = ins[1].shape
        return out * kh * kw * cin
    if op_name == "DEPTHWISE_CONV_2D":
        return out * ins[1].shape[1] * ins[1].shape[2]
    if op_name == "FULLY_CONNECTED":
        return out * ins[1].shape[1]
    if op_name == "BATCH_MATMUL":
        return out * ins[0].shape[-1]
    return 0


def _status(
    op_name: str, version: int, op, ins: list, outs: list, table: dict, buffers: list
) -> tuple[str, str]:
    """(status, why) for one op considered on its own."""
    fb, _ = _names()
    ops, limits = table["ops"], table["limits"]
    if op_name not in ops:
        return NOT_SUPPORTED, f"{op_name} is not in the Edge TPU's supported-ops table"
    if version > ops[op_name]:
        return VERSION, f"{op_name} version {version} > {ops[op_name]}, the highest the table maps"
    activations = [t for t in (*ins, *outs) if t.buffer == 0]
    int8 = (fb.TensorType.INT8, fb.TensorType.UINT8)
    if any(t.type not in int8 for t in activations):
        return DTYPE, "a non-constant tensor is not int8/uint8"
    inner = table["max_inner_dims"]
    for t in activations:
        if any(d > 1 for d in list(t.shape)[:-inner]):
            return RANK, f"tensor '{t.name}' {list(t.shape)} has a dim > 1 outside the {inner} innermost"
    options = op.builtinOptions
    if op_name in limits["no_fused_activation"] and getattr(options, "fusedActivationFunction", 0):
        return LIMITATION, f"{op_name} with a fused activation"
    if op_name == "FULLY_CONNECTED":
        dims = sum(d > 1 for d in outs[0].shape)
        if dims > limits["fully_connected_max_output_dims"]:
            return LIMITATION, f"FULLY_CONNECTED output {list(outs[0].shape)} is not one-dimensional"
    if op_name == "MEAN":
        axes = [
            int(a) % len(ins[0].shape) for a in np.frombuffer(bytes(buffers[ins[1].buffer].data), np.int32)
        ]
        channels = ins[0].shape[-1]
        if len(ins[0].shape) - 1 in axes and channels % limits["mean_channel_multiple"]:
            return (
                LIMITATION,
                f"MEAN over the innermost dim of {channels}, not a multiple of "
                f"{limits['mean_channel_multiple']}",
            )
    if op_name == "SOFTMAX":
        shape = list(ins[0].shape)
        if (
            math.prod(shape) > limits["softmax_max_elements"]
            or sum(d > 1 for d in shape) > limits["softmax_max_dims"]
        ):
            return (
                LIMITATION,
                f"SOFTMAX input {shape}: at most {limits['softmax_max_dims']} dim(s) > 1 and "
                f"{limits['softmax_max_elements']} elements",
            )
    return MAPPED, ""


def predict(flatbuffer: bytes, table: dict) -> dict:
    """Per-op statuses, the compiler-style table and MAC coverage of the single TPU segment."""
    fb, names = _names()
    model = fb.ModelT.InitFromPackedBuf(flatbuffer, 0)
    sub = model.subgraphs[0]
    ops, segment_open, first = [], True, None
    for i, op in enumerate(sub.operators):
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        ins = [sub.tensors[j] for j in op.inputs if j >= 0]
        outs = [sub.tensors[j] for j in op.outputs]
        status, why = _status(name, code.version, op, ins, outs, table, model.buffers)
        if segment_open and status != MAPPED:
            segment_open = False
            first = {
                "index": i,
                "op": name,
                "status": status,
                "why": why,
                "output": outs[0].name.decode() if isinstance(outs[0].name, bytes) else outs[0].name,
            }
        elif not segment_open and status == MAPPED:
            status, why = AFTER_SEGMENT, "after the first op that is not mapped"
        ops.append(
            {
                "index": i,
                "op": name,
                "version": code.version,
                "status": status,
                "why": why,
                "macs": int(_macs(name, ins, outs)),
            }
        )
    total = sum(o["macs"] for o in ops)
    on_tpu = sum(o["macs"] for o in ops if o["status"] == MAPPED)
    return {
        "label": LABEL,
        "compiler_version": table["compiler_version"],
        "ops_total": len(ops),
        "ops_on_edgetpu": sum(o["status"] == MAPPED for o in ops),
        "ops_on_cpu": sum(o["status"] != MAPPED for o in ops),
        "macs_total": total,
        "macs_on_edgetpu": on_tpu,
        "mac_coverage": on_tpu / total if total else 1.0,
        "segment_ends_at": first,
        "table": table_rows(ops),
        "ops": ops,
    }


def table_rows(ops: list[dict]) -> list[dict]:
    """(operator, status) -> count, in order of first appearance, as the compiler's log lists them."""
    counts = Counter((o["op"], o["status"]) for o in ops)
    seen = dict.fromkeys((o["op"], o["status"]) for o in ops)
    return [{"operator": op, "count": counts[(op, status)], "status": status} for op, status in seen]


def render_log(prediction: dict, model_name: str) -> str:
    """The prediction in edgetpu_compiler's log format, labelled as a prediction."""
    lines = [
        f"{LABEL}: edgecc's reading of the Edge TPU supported-ops table (edgetpu_compiler "
        f"{prediction['compiler_version']}); run edgetpu_compiler for the real mapping.",
        f"Input: {model_name}",
        "",
    ]
    if prediction["ops_on_cpu"]:
        lines += [
            f"Number of operations that will run on Edge TPU: {prediction['ops_on_edgetpu']}",
            f"Number of operations that will run on CPU: {prediction['ops_on_cpu']}",
            "",
        ]
    lines += [_row("Operator", "Count", "Status"), ""]
    lines += [_row(r["operator"], r["count"], r["status"]) for r in prediction["table"]]
    end = prediction["segment_ends_at"]
    lines += [
        "",
        f"MAC coverage of the Edge TPU segment: {prediction['mac_coverage']:.1%} "
        f"({prediction['macs_on_edgetpu']:,} of {prediction['macs_total']:,} MACs)",
    ]
    if end:
        lines.append(
            f"The segment ends at op {end['index']} ({end['op']}, output '{end['output']}'): {end['why']}."
        )
    return "\n".join(lines) + "\n"


def _row(op, count, status) -> str:
    return f"{op:<30} {count!s:<10} {status}"


def parse_log(text: str) -> dict:
    """The operator table and op counts of an edgetpu_compiler log (its stdout or its .log file)."""
    rows, counts, in_table = [], {}, False
    for line in text.splitlines():
        m = _COUNT.match(line.strip())
        if m:
            counts["ops_on_edgetpu" if m.group(1) == "Edge TPU" else "ops_on_cpu"] = int(m.group(2))
            continue
        if line.split()[:3] == ["Operator", "Count", "Status"]:
            in_table = True
            continue
        m = _ROW.match(line.strip()) if in_table else None
        if m:
            rows.append({"operator": m.group(1), "count": int(m.group(2)), "status": m.group(3)})
    if not rows:
        raise ValueError("no 'Operator Count Status' table in the log")
    mapped = sum(r["count"] for r in rows if r["status"] == MAPPED)
    counts.setdefault("ops_on_edgetpu", mapped)
    counts.setdefault("ops_on_cpu", sum(r["count"] for r in rows) - mapped)
    return {"table": rows, **counts}


def differences(predicted: list[dict], actual: list[dict]) -> list[dict]:
    """(operator, status) counts that the prediction and the compiler disagree on."""
    p = Counter({(r["operator"], r["status"]): r["count"] for r in predicted})
    a = Counter({(r["operator"], r["status"]): r["count"] for r in actual})
    return [
        {"operator": op, "status": status, "predicted": p[(op, status)], "compiler": a[(op, status)]}
        for op, status in sorted(set(p) | set(a))
        if p[(op, status)] != a[(op, status)]
    ]


def run_compiler(executable: str, tflite: Path, out_dir: Path) -> dict | None:
    """Run edgetpu_compiler on the model when it is installed; None when it is not on PATH."""
    exe = shutil.which(executable)
    if exe is None:
        return None
    proc = subprocess.run(
        [exe, "-s", "-o", str(out_dir), str(tflite)],
        capture_output=True,
        text=True,
        timeout=COMPILER_TIMEOUT_S,
    )
    log_file = out_dir / f"{tflite.stem}_edgetpu.log"
    text = proc.stdout + (
        log_file.read_text() if log_file.is_file() and "Operator" not in proc.stdout else ""
    )
    result = {"executable": exe, "returncode": proc.returncode, "log": text + proc.stderr}
    try:
        result.update(parse_log(text))
    except ValueError as e:
        result["error"] = f"{e}; exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
    compiled = out_dir / f"{tflite.stem}_edgetpu.tflite"
    result["compiled_model"] = compiled.name if compiled.is_file() else None
    return result

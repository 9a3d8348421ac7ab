"""What edgetpu_compiler would map: a prediction from the target's table, and the real compiler's log.

`op_statuses` reads each op of a TFLite model against the target's `[edgetpu]` table (supported ops
and their highest version, the 3-innermost-dims rule, the limitations column) and gives the status
string the compiler prints, plus the op's multiply-accumulates (MACs). The segmentation
(`segment.py`) uses it to place nodes; `summarize` is the whole model's prediction: per segment its
ops or host nodes, the MAC coverage of the Edge TPU segments, and the int8 bytes each inference
moves between host and TPU. It is a prediction, labelled so: the compiler's own rules are closed
and partly unwritten.

When `edgetpu_compiler` is on PATH, `run_compiler` co-compiles every Edge TPU segment (one call,
so they share the on-chip parameter cache) and `parse_log` reads each one's table, so the artifact
shows both and where they differ. edgecc itself never writes Edge TPU custom ops.
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
            name = t.name.decode() if isinstance(t.name, bytes) else t.name
            return RANK, f"tensor '{name}' {[int(d) for d in t.shape]} has a dim > 1 outside the {inner} innermost"
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
        shape = [int(d) for d in ins[0].shape]
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


def op_statuses(flatbuffer: bytes, table: dict) -> list[dict]:
    """Per op of a TFLite model: its name, version, predicted status (and why) and MACs."""
    fb, names = _names()
    model = fb.ModelT.InitFromPackedBuf(flatbuffer, 0)
    sub = model.subgraphs[0]
    ops = []
    for i, op in enumerate(sub.operators):
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        ins = [sub.tensors[j] for j in op.inputs if j >= 0]
        outs = [sub.tensors[j] for j in op.outputs]
        status, why = _status(name, code.version, op, ins, outs, table, model.buffers)
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
    return ops


def table_rows(ops: list[dict]) -> list[dict]:
    """(operator, status) -> count, in order of first appearance, as the compiler's log lists them."""
    counts = Counter((o["op"], o["status"]) for o in ops)
    seen = dict.fromkeys((o["op"], o["status"]) for o in ops)
    return [{"operator": op, "count": counts[(op, status)], "status": status} for op, status in seen]


def summarize(plan, files: list[str], compiler_version: str) -> dict:
    """The whole model's prediction from a segmentation plan and the segments' file names."""
    segments = []
    for i, (s, file) in enumerate(zip(plan.segments, files)):
        row = {
            "index": i,
            "kind": s.kind,
            "file": file,
            "nodes": len(s.nodes),
            "macs": sum(plan.macs[n.name] for n in s.nodes),
            "inputs": s.inputs,
            "outputs": s.outputs,
        }
        if s.ops is not None:
            moved = [*s.inputs, *s.outputs]
            row.update(
                ops=len(s.ops),
                table=table_rows(s.ops),
                transfer_bytes=sum(math.prod(plan.shapes[name]) for name in moved),
            )
        else:
            why = Counter(plan.host[n.name] for n in s.nodes)
            row["why"] = [{"why": w, "nodes": c} for w, c in why.most_common()]
        segments.append(row)
    tpu = [r for r in segments if r["kind"] == "edgetpu"]
    total = sum(r["macs"] for r in segments)
    on_tpu = sum(r["macs"] for r in tpu)
    return {
        "label": LABEL,
        "compiler_version": compiler_version,
        "segments_on_edgetpu": len(tpu),
        "segments_on_host": len(segments) - len(tpu),
        "ops_on_edgetpu": sum(r["ops"] for r in tpu),
        "nodes_on_host": sum(r["nodes"] for r in segments if r["kind"] == "host"),
        "macs_total": total,
        "macs_on_edgetpu": on_tpu,
        "mac_coverage": on_tpu / total if total else (1.0 if tpu else 0.0),
        "transfers": {
            "count": sum(len(r["inputs"]) + len(r["outputs"]) for r in tpu),
            "bytes": sum(r["transfer_bytes"] for r in tpu),
        },
        "segments": segments,
    }


def render_log(prediction: dict) -> str:
    """The prediction in edgetpu_compiler's log format, one table per Edge TPU segment, labelled."""
    lines = [
        f"{LABEL}: edgecc's reading of the Edge TPU supported-ops table (edgetpu_compiler "
        f"{prediction['compiler_version']}); run edgetpu_compiler for the real mapping.",
        "",
    ]
    for r in prediction["segments"]:
        if r["kind"] != "edgetpu":
            continue
        lines += [f"Input: {r['file']}", "", _row("Operator", "Count", "Status"), ""]
        lines += [_row(t["operator"], t["count"], t["status"]) for t in r["table"]]
        lines.append("")
    host = [r for r in prediction["segments"] if r["kind"] == "host"]
    if host:
        lines.append(f"On the host (CPU), {prediction['nodes_on_host']} ONNX nodes in {len(host)} segments:")
        for r in host:
            lines.append(f"  {r['file']}: " + "; ".join(f"{w['nodes']} x {w['why']}" for w in r["why"]))
        lines.append("")
    t = prediction["transfers"]
    lines += [
        f"MAC coverage of the Edge TPU segments: {prediction['mac_coverage']:.1%} "
        f"({prediction['macs_on_edgetpu']:,} of {prediction['macs_total']:,} MACs)",
        f"Host <-> Edge TPU transfers per inference: {t['count']} tensors, {t['bytes']:,} bytes (int8)",
    ]
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


def run_compiler(executable: str, models: list[Path], out_dir: Path) -> dict | None:
    """Co-compile the Edge TPU segments when edgetpu_compiler is installed; None when it is not.
    Per model: its parsed table (or the error), and the compiled model's name when one was written."""
    exe = shutil.which(executable)
    if exe is None or not models:
        return None
    proc = subprocess.run(
        [exe, "-s", "-o", str(out_dir), *map(str, models)],
        capture_output=True,
        text=True,
        timeout=COMPILER_TIMEOUT_S,
    )
    result = {"executable": exe, "returncode": proc.returncode, "log": proc.stdout + proc.stderr, "models": {}}
    for model in models:
        log_file = out_dir / f"{model.stem}_edgetpu.log"
        text = log_file.read_text() if log_file.is_file() else (proc.stdout if len(models) == 1 else "")
        entry: dict = {}
        try:
            entry.update(parse_log(text))
        except ValueError as e:
            entry["error"] = f"{e}; exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"
        compiled = out_dir / f"{model.stem}_edgetpu.tflite"
        entry["compiled_model"] = compiled.name if compiled.is_file() else None
        result["models"][model.name] = entry
    return result

"""report.md of an Edge TPU artifact: the predicted mapping first, then what edgecc did."""

from __future__ import annotations

from edgecc.backends.edgetpu.predict import LABEL


def render(m: dict) -> str:
    e, p, t = m["edgetpu"], m["edgetpu"]["prediction"], m["target"]
    lines = [
        f"# edgecc artifact: {m['source']['path']} for {t['name']}",
        "",
        f"- target: **{t['name']}** — {t['description']}",
        f"- pipeline: `{m['pipeline']}`",
        f"- {p['segments_on_edgetpu']} Edge TPU segment(s) (`tpuN.tflite`: fully int8, int32 biases, static "
        f"shapes, batch 1; {m['build']['tflite_bytes']:,} bytes, {p['ops_on_edgetpu']} ops) and "
        f"{p['segments_on_host']} host segment(s) (`hostN.onnx`, float, ONNX Runtime)",
        f"- calibration: {e['calibration']['samples']} {e['calibration']['source']} samples",
        "",
        f"## What runs where — {LABEL}",
        "",
        f"edgecc's reading of the supported-ops table for edgetpu_compiler {p['compiler_version']} "
        f"(`targets/{t['name']}.toml`); the compiler itself was "
        f"{'run: see below' if e['compiler'] else 'not installed'}. The segments run in this order; "
        "values crossing between a host and an Edge TPU segment are int8 with one scale and zero point.",
        "",
        f"- MAC coverage of the Edge TPU segments: **{p['mac_coverage']:.1%}** "
        f"({p['macs_on_edgetpu']:,} of {p['macs_total']:,})",
        f"- host <-> Edge TPU transfers per inference: {p['transfers']['count']} tensors, "
        f"{p['transfers']['bytes']:,} bytes",
        "",
        "| # | runs on | file | ops / nodes | MACs | inputs | outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for seg, r in zip(e["segments"], p["segments"]):
        size = f"{r['ops']} ops" if seg["kind"] == "edgetpu" else f"{r['nodes']} nodes"
        lines.append(
            f"| {r['index']} | {'Edge TPU' if seg['kind'] == 'edgetpu' else 'host'} | `{seg['file']}` | {size} | "
            f"{r['macs']:,} | {len(seg['inputs'])} | {len(seg['outputs'])} |"
        )
    host = [r for r in p["segments"] if r["kind"] == "host"]
    if host:
        lines += ["", "Why nodes run on the host:", ""]
        lines += [f"- `{r['file']}`: " + "; ".join(f"{w['nodes']} × {w['why']}" for w in r["why"]) for r in host]
    compiled = e["compiler"]
    if compiled:
        lines += ["", "## edgetpu_compiler (co-compiled)", "", f"- log `{compiled['log']}`"]
        for file, entry in compiled["models"].items():
            if "error" in entry:
                lines.append(f"- `{file}`: failed: {entry['error']}")
                continue
            diffs = entry["differences"]
            lines.append(
                f"- `{file}`: {entry['ops_on_edgetpu']} ops on the Edge TPU, {entry['ops_on_cpu']} on the CPU; "
                f"rows where the prediction differed: {len(diffs) or 'none'}"
            )
            lines += [
                f"  - {d['operator']} / {d['status']}: predicted {d['predicted']}, compiler {d['compiler']}"
                for d in diffs
            ]
    lines += [
        "",
        "## int8 values at the seams and the model's int8 inputs and outputs (q = round(x / scale) + zero_point)",
        "",
        "| name | scale | zero point |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {q['scale']:.6g} | {q['zero_point']} |" for name, q in e["int8"].items()]
    lines += ["", "## Passes", "", "| pass | changed | nodes | stats |", "|---|---|---|---|"]
    for r in m["passes"]:
        stats = ", ".join(
            f"{k}={v}" for k, v in r["stats"].items() if isinstance(v, (int, float, str)) and v != ""
        )
        lines.append(
            f"| `{r['pipeline_entry']}` | {'yes' if r['changed'] else 'no'} | "
            f"{r['nodes_before']} → {r['nodes_after']} | {stats} |"
        )
    v = m.get("verification") or {}
    lines += ["", "## Verification", ""]
    if "skipped" in v:
        lines.append(f"- skipped: {v['skipped']}")
    else:
        lines.append(
            f"- {v['runner']} vs {v['reference']} on {v['inputs']}: cosine {v['cosine_vs_fp32']:.5f} "
            f"(≥ {v['min_cosine']}), relative RMS error {v['relative_rmse_vs_fp32']:.4f} "
            f"(≤ {v['max_relative_rmse']})"
        )
        if "positions" in v:
            lines.append(f"- positions compared: {v['positions']}; cosine over every position "
                         f"{v['cosine_all_positions']:.5f}")
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {name} | {info['bytes']:,} |" for name, info in m["files"].items()]
    return "\n".join(lines) + "\n"

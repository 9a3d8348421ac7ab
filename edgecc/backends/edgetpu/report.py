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
        f"- `model.tflite`: {m['build']['tflite_bytes']:,} bytes, {m['build']['ops']} ops, fully int8 "
        f"(int32 biases), static shapes, batch 1",
        f"- calibration: {e['calibration']['samples']} {e['calibration']['source']} samples",
        "",
    ]
    if e["host_model"]:
        lines += [
            "## Host part",
            "",
            f"Embedding lookups and integer index arithmetic run on the host (`{e['host_model']}`, ONNX "
            f"Runtime): the Edge TPU model's inputs are {', '.join(f'`{n}`' for n in e['host_outputs'])}.",
            "",
        ]
    lines += [
        f"## Edge TPU mapping — {LABEL}",
        "",
        f"edgecc's reading of the supported-ops table for edgetpu_compiler {p['compiler_version']} "
        f"(`targets/{t['name']}.toml`); the compiler itself was "
        f"{'run: see below' if e['compiler'] else 'not installed'}.",
        "",
        f"- ops on the Edge TPU: {p['ops_on_edgetpu']} of {p['ops_total']}",
        f"- MAC coverage of the single Edge TPU segment: **{p['mac_coverage']:.1%}** "
        f"({p['macs_on_edgetpu']:,} of {p['macs_total']:,})",
    ]
    end = p["segment_ends_at"]
    if end:
        lines.append(
            f"- the segment ends at op {end['index']}, {end['op']} (output `{end['output']}`): "
            f"{end['status']} — {end['why']}; every op after it runs on the CPU"
        )
    lines += ["", "| Operator | Count | Status |", "|---|---|---|"]
    lines += [f"| {r['operator']} | {r['count']} | {r['status']} |" for r in p["table"]]
    compiled = e["compiler"]
    if compiled:
        lines += ["", "## edgetpu_compiler (compiled)", ""]
        if "error" in compiled:
            lines.append(f"- failed: {compiled['error']}")
        else:
            lines.append(
                f"- {compiled['ops_on_edgetpu']} ops on the Edge TPU, {compiled['ops_on_cpu']} on the CPU; "
                f"log `{compiled['log']}`"
            )
            diffs = compiled["differences"]
            lines.append(f"- rows where the prediction differed: {len(diffs) or 'none'}")
            lines += [
                f"  - {d['operator']} / {d['status']}: predicted {d['predicted']}, compiler {d['compiler']}"
                for d in diffs
            ]
    lines += [
        "",
        "## Inputs and outputs of model.tflite (int8: q = round(x / scale) + zero_point)",
        "",
        "| | name | shape | scale | zero point |",
        "|---|---|---|---|---|",
    ]
    for kind in ("tflite_inputs", "tflite_outputs"):
        for s in e[kind]:
            lines.append(
                f"| {kind[7:-1]} | `{s['name']}` | {s['shape']} | {s['scale']:.6g} | {s['zero_point']} |"
            )
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
    lines += ["", "## Files", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {name} | {info['bytes']:,} |" for name, info in m["files"].items()]
    return "\n".join(lines) + "\n"

"""report.md: the artifact's manifest, for people."""

from __future__ import annotations


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(m: dict) -> str:
    t = m["target"]
    lines = [
        f"# edgecc artifact: {m['source']['path']} for {t['name']}",
        "",
        f"- target: **{t['name']}** — {t['description']} (fingerprint `{t['fingerprint']}`)",
        f"- pipeline: `{m['pipeline']}`",
        f"- built: {m['created']} with edgecc {m['versions']['edgecc']}, "
        f"TVM {m['versions']['apache-tvm']}, ONNX {m['versions']['onnx']}",
        "",
        "## Inputs and outputs",
        "",
        "| | name | dtype | shape |",
        "|---|---|---|---|",
    ]
    for kind in ("inputs", "outputs"):
        for s in m[kind]:
            lines.append(f"| {kind[:-1]} | `{s['name']}` | {s['dtype']} | {s['shape']} |")
    lines += ["", "## Passes", "", "| pass | changed | nodes | ms | stats | verify error |",
              "|---|---|---|---|---|---|"]
    for p in m["passes"]:
        stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items() if isinstance(v, (int, float, str)))
        v = p.get("verify") or {}
        ver = (f"{v['max_abs']:.2g}" if "max_abs" in v else
               f"relative RMS {v['relative_rmse']:.2g} (≤ {v['allowed']:g})" if v else "—")
        lines.append(f"| `{p['pipeline_entry']}` | {'yes' if p['changed'] else 'no (0 matches)'} | "
                     f"{p['nodes_before']} → {p['nodes_after']} | {p['seconds'] * 1000:.0f} | "
                     f"{stats} | {ver} |")
    lines += ["", "## Build", ""]
    lines += [f"- {k}: {v}" for k, v in m["build"].items()]
    v = m.get("verification") or {}
    lines += ["", "## Verification against ONNX Runtime", ""]
    if "skipped" in v:
        lines.append(f"- skipped: {v['skipped']}")
    else:
        lines.append(f"- reference: {v['reference']}, run {v['runner']}")
        lines.append(f"- max abs error {v['max_abs']:.3g}, max rel error {v['max_rel']:.3g} on "
                     f"seeded inputs {v['input_shapes']} (seed {v['seed']})")
        if "relative_rmse_vs_reference" in v:
            lines.append(f"- relative RMS error vs the reference {v['relative_rmse_vs_reference']:.3g} "
                         f"(tolerance {v['tolerance']})")
        lines.append(f"- vs the fp32 model: relative RMS error {v['relative_rmse_vs_fp32']:.3g}, largest error "
                     f"{v['relative_error_vs_fp32']:.3g} of the output range, cosine {v['cosine_vs_fp32']:.6f}")
    lines += ["", "## Files", "", "| file | size | sha256 |", "|---|---|---|"]
    for name, info in m["files"].items():
        lines.append(f"| {name} | {_size(info['bytes'])} | `{info['sha256'][:16]}…` |")
    lines += ["", "## Timings (s)", ""]
    lines += [f"- {k}: {v}" for k, v in m.get("timings_s", {}).items()]
    return "\n".join(lines) + "\n"

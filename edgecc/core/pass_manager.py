"""The ordered pass manager and its instruments.

The manager checks the pipeline's contract before any pass runs, then runs passes in order.
Observation is done by instruments, not by the passes: timing and stats (always on),
printing the IR after chosen passes, and verification against ONNX Runtime after every pass.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, TextIO

import numpy as np
import onnx
import onnx_ir as ir

from edgecc.core.ir import infer_shapes
from edgecc.core.pass_base import Pass, PassContext, PassResult
from edgecc.core.pipeline import Pipeline, parse_pipeline
from edgecc.core.verify import compare, random_inputs, relative_rmse, run_ort
from edgecc.errors import EdgeccError, VerificationError


@dataclasses.dataclass
class PassReport:
    name: str
    pipeline_entry: str  # the resolved text form of this pass, options included
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    stats: dict[str, Any]
    verify: dict[str, Any] | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Instrument:
    """Hooks around the pipeline and every pass. Subclasses override what they need."""

    def before_pipeline(self, model: ir.Model, ctx: PassContext) -> None:
        pass

    def after_pass(self, p: Pass, model: ir.Model, report: PassReport) -> None:
        pass


class PrintIRAfter(Instrument):
    """Prints the model as ONNX text after the named passes (or all)."""

    def __init__(self, names: set[str], stream: TextIO = sys.stderr):
        self.names = names
        self.stream = stream

    def after_pass(self, p: Pass, model: ir.Model, report: PassReport) -> None:
        if "all" in self.names or p.name in self.names:
            text = onnx.printer.to_text(_without_weights(ir.to_proto(model).graph))
            print(f"// ----- IR after {report.pipeline_entry} -----\n{text}", file=self.stream)


# Initializers up to this many elements (shapes, axes, scalars) are printed; larger ones elided.
PRINTED_ELEMENTS = 16


def _without_weights(graph: onnx.GraphProto) -> onnx.GraphProto:
    """The graph with its large initializers shown as typed graph inputs: the text gives each
    weight's type and shape, not megabytes of numbers (a 2 MB model printed 6.5 MB a pass)."""
    elided = [t for t in graph.initializer if math.prod(t.dims) > PRINTED_ELEMENTS]
    if not elided:
        return graph
    listed = {i.name for i in graph.input}
    out = onnx.GraphProto(name=graph.name, doc_string=graph.doc_string)
    out.node.extend(graph.node)
    out.input.extend(graph.input)
    out.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                     for t in elided if t.name not in listed)
    out.output.extend(graph.output)
    out.value_info.extend(graph.value_info)
    out.initializer.extend(t for t in graph.initializer if math.prod(t.dims) <= PRINTED_ELEMENTS)
    return out


class VerifyEachPass(Instrument):
    """Runs the model in ONNX Runtime after every pass; the first pass to drift raises."""

    def __init__(self, tolerance: tuple[float, float] | None = None):
        self.tolerance = tolerance
        self.feeds: dict[str, np.ndarray] = {}
        self.reference: dict[str, np.ndarray] = {}

    def before_pipeline(self, model: ir.Model, ctx: PassContext) -> None:
        self.feeds = random_inputs(model, ctx.seed, ctx.dim_values)
        self.reference = run_ort(model, self.feeds)

    def after_pass(self, p: Pass, model: ir.Model, report: PassReport) -> None:
        got = run_ort(model, self.feeds)
        if p.drift is None:
            result = compare(self.reference, got, self.tolerance)
            report.verify = {"max_abs": result.max_abs, "max_rel": result.max_rel, "ok": result.ok}
            if not result.ok:
                raise VerificationError(
                    f"pass '{report.pipeline_entry}' changed the model's outputs: {result.detail}")
            return
        drift = relative_rmse(self.reference, got)
        report.verify = {"relative_rmse": drift, "allowed": p.drift, "ok": drift <= p.drift}
        if drift > p.drift:
            raise VerificationError(
                f"pass '{report.pipeline_entry}' moved the outputs by a relative RMS error of {drift:.3g}, "
                f"more than the {p.drift:g} it declares")
        self.reference = got  # later passes must keep the numbers this lossy pass produced


def run_pass(p: Pass, model: ir.Model, ctx: PassContext, shapes_current: bool = False) -> PassResult:
    """Run one pass, inferring shapes first when it needs them and they may be stale. The manager
    runs every pass through here, and so does a test that runs a pass alone."""
    if p.needs_shapes and not shapes_current:
        model = infer_shapes(model)
    return p.run(model, ctx)


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


class PassManager:
    def __init__(
        self,
        pipeline: Pipeline | str,
        instruments: tuple[Instrument, ...] = (),
        log: Callable[[str], None] | None = None,
    ):
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        self.pipeline.check_contract()
        self.instruments = instruments
        self.log = log or (lambda _msg: None)

    def run(self, model: ir.Model, ctx: PassContext | None = None) -> tuple[ir.Model, list[PassReport]]:
        ctx = ctx or PassContext()
        for inst in self.instruments:
            inst.before_pipeline(model, ctx)
        reports = []
        shapes_current = False  # shapes were inferred and no pass has changed the model since
        for spec, resolved in zip(self.pipeline.passes, self.pipeline.resolved().passes):
            p = spec.instantiate()
            self.log(f"running {resolved}")  # a pass on a large model can take minutes
            before = _count_nodes(model)
            start = time.perf_counter()
            try:
                result = run_pass(p, model, ctx, shapes_current)
            except EdgeccError:
                raise
            except Exception as e:
                raise EdgeccError(f"pass '{resolved}' failed: {type(e).__name__}: {e}") from e
            model = result.model
            shapes_current = (shapes_current or p.needs_shapes) and not result.changed
            report = PassReport(
                name=p.name,
                pipeline_entry=str(resolved),
                changed=result.changed,
                seconds=time.perf_counter() - start,
                nodes_before=before,
                nodes_after=_count_nodes(model),
                stats=result.stats,
            )
            for inst in self.instruments:
                inst.after_pass(p, model, report)
            self.log(_summary(report))
            for warning in result.warnings:
                self.log(f"warning: {resolved}: {warning}")
            reports.append(report)
        return model, reports


def _summary(r: PassReport) -> str:
    what = "changed" if r.changed else "no change (0 matches)"
    counts = ", ".join(f"{k}={v}" for k, v in r.stats.items() if isinstance(v, (int, float, str)))
    return f"{r.name}: {what}, {r.nodes_before}->{r.nodes_after} nodes, {r.seconds * 1000:.0f} ms" + (
        f" [{counts}]" if counts else ""
    )

"""Passes built from onnxscript rewrite rules (pattern -> check -> rewrite).

A `RewritePass` says which rule sets to apply, in order, each under the stats key that counts its
matches; the base applies them, removes the nodes the rewrites left unused and, with
`ctx.explain` (the CLI's --explain), reports near misses: candidates whose pattern matched but
were rejected, with the reason their check gave.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern

from edgecc.core.ir import infer_shapes
from edgecc.core.pass_base import Pass, PassContext, PassResult
from edgecc.core.pass_helpers import node_name

RuleGroups = list[tuple[str, pattern.RewriteRuleSet | None]]


class RewritePass(Pass):
    """Subclasses implement rules(), or override run() to work around apply() (conversions
    before it, stats after it)."""

    # Infer shapes again after a rewrite: the values it made have none, and the passes and the
    # exporter after this one read them.
    shapes_after: ClassVar[bool] = False

    def rules(self, model: ir.Model, ctx: PassContext) -> RuleGroups:
        """(stats key, rule set) pairs, applied in this order; a key given twice sums its matches,
        and a rule set of None (turned off by an option) counts 0."""
        raise NotImplementedError

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:
        return self.apply(model, ctx, self.rules(model, ctx))

    def apply(self, model: ir.Model, ctx: PassContext, groups: RuleGroups,
              near_misses: tuple[str, ...] = ()) -> PassResult:
        """Apply `groups` to the model; `near_misses` are ones the subclass found itself."""
        stats: dict = {}
        misses = list(near_misses)
        for key, rules in groups:
            stats[key] = stats.get(key, 0) + (rules.apply_to_model(model) if rules is not None else 0)
            if ctx.explain and rules is not None:
                misses += _near_misses(model, rules)
        changed = any(stats.values())
        if changed:
            RemoveUnusedNodesPass()(model)  # the matched nodes and their constants
            if self.shapes_after:
                model = infer_shapes(model)
        if ctx.explain:
            stats["near_misses"] = misses
        return PassResult(model, changed, stats)


def trace(model: ir.Model, rules: pattern.RewriteRuleSet) -> list[tuple[str, pattern.MatchInfo]]:
    """Each rule's best matches as (rule name, match), found without changing the model."""
    tracer = pattern.MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    return [(rule.name, info) for rule, infos in tracer.best_matches_map.items() for info in infos]


def would_fire(model: ir.Model, rules: pattern.RewriteRuleSet) -> bool:
    return any(info.status == pattern.MatchStatus.SUCCESS for _, info in trace(model, rules))


def _near_misses(model: ir.Model, rules: pattern.RewriteRuleSet) -> list[str]:
    """Candidates whose whole structure matched but were rejected: by a check, or because an
    intermediate result has a consumer outside the pattern (the matcher's "other uses"). Partial
    structural matches are left out: every Mul is the start of a GELU."""
    lines: list[str] = []
    for rule, info in trace(model, rules):
        reason = info.match_result.reason
        rejected = info.status == pattern.MatchStatus.CONDITION_FAILED or (
            info.status == pattern.MatchStatus.NO_MATCH and "other uses" in reason
        )
        line = f"{rule}: {info.root_node.op_type} '{node_name(info.root_node)}': {reason}"
        if rejected and line not in lines:
            lines.append(line)
    return lines

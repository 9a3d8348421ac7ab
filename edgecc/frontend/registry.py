"""edgecc's converters for ops TVM's ONNX importer lacks, by (domain, op type).

Converters register here with `@converter` (edgecc.frontend.converters holds edgecc's own; a
user's module can add more), and lowering reads the table (edgecc.frontend.lower).
"""

from __future__ import annotations

from typing import Callable

# (domain, op_type) -> OnnxOpConverter subclass
CONVERTERS: dict[tuple[str, str], type] = {}


def registered(op_type: str, domain: str = "") -> type:
    """The converter edgecc has registered for an op, for a converter that builds on it."""
    return CONVERTERS[(domain, op_type)]


def converter(op_type: str, domain: str = "") -> Callable[[type], type]:
    """Register an edgecc converter for an op TVM's importer lacks."""

    def wrap(cls: type) -> type:
        CONVERTERS[(domain, op_type)] = cls
        return cls

    return wrap

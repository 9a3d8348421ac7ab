"""Passes as declared objects: name, typed options, contract, and a registry.

A pass subclasses `Pass`, declares its options and contract as class attributes,
and registers itself with `@register_pass` in the file that defines it. Built-in
passes live in `edgecc.passes` (one per file); third-party passes register through
the `edgecc.passes` entry-point group and are indistinguishable from built-ins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import importlib.metadata
import math
import pkgutil
from collections.abc import Iterator
from typing import Any, ClassVar

import onnx_ir as ir

from edgecc.errors import UserError

ENTRY_POINT_GROUP = "edgecc.passes"


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed pass option. `choices` restricts it to a set of values; `low`/`high` bound numbers."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    kind: str | None = None  # how to name the type in help and errors, when type's name won't do

    def parse(self, text: str, where: str) -> Any:
        """Convert the text form of a value, with an error naming `where` on failure."""
        try:
            if self.type is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                value: Any = text.lower() in ("true", "1")
            else:
                value = self.type(text)
            if isinstance(value, float) and not math.isfinite(value):  # nan slips past any range
                raise ValueError
        except ValueError:
            raise UserError(
                f"{where}: option '{self.name}' expects {self.kind or self.type.__name__}, got '{text}'"
            ) from None
        self.check(value, where)
        return value

    def check(self, value: Any, where: str) -> None:
        if self.choices is not None and value not in self.choices:
            raise UserError(
                f"{where}: option '{self.name}' must be one of {', '.join(map(str, self.choices))}; "
                f"got '{value}'"
            )
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise UserError(
                f"{where}: option '{self.name}' must be in [{self.low}, {self.high}]; got {value}"
            )

    def format(self, value: Any) -> str:
        """The canonical text form; `parse(format(v)) == v`."""
        if self.type is bool:
            return "true" if value else "false"
        return str(value)

    def describe(self) -> str:
        kind = "|".join(map(str, self.choices)) if self.choices else (self.kind or self.type.__name__)
        return f"{self.name}={self.format(self.default)} ({kind}) {self.help}"


@dataclasses.dataclass
class PassResult:
    model: ir.Model
    changed: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    # What the user should hear even when nothing failed (a requested rewrite that found nothing
    # to do, and why); the pass manager logs each one.
    warnings: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PassContext:
    """What a pass may consult besides the model: the target, seeded inputs, calibration data."""

    target: Any = None  # edgecc.core.target.TargetDesc, or None for target-independent runs
    seed: int = 0
    calibration: dict[str, Any] | None = None
    explain: bool = False
    # Concrete sizes for symbolic dims, used wherever a pass must evaluate the model.
    dim_values: dict[str, int] = dataclasses.field(default_factory=dict)


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement run()."""

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    # Properties of the IR: a pass may only run after earlier passes `provides` all of its
    # `requires`; `invalidates` withdraws properties established before it.
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()
    # None: the pass must keep the model's numbers (fp32 tolerance). A lossy pass (quantization,
    # pruning) declares the relative RMS output error (||y' - y|| / ||y||) it may introduce;
    # verification checks that bound and then re-bases on the pass's output.
    drift: ClassVar[float | None] = None
    # True: the pass reads value shapes or dtypes; the manager infers them before it runs, unless
    # no pass changed the model since they were last inferred.
    needs_shapes: ClassVar[bool] = False

    def __init__(self, **opts: Any):
        known = {o.name: o for o in self.options}
        for key in opts:
            if key not in known:
                raise UserError(unknown_message(f"pass '{self.name}' has no option", key, known))
        self.opts = {o.name: opts.get(o.name, o.default) for o in self.options}
        for o in self.options:
            o.check(self.opts[o.name], f"pass '{self.name}'")

    def run(self, model: ir.Model, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError


_REGISTRY: dict[str, type[Pass]] = {}
_LOADED = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass known by its name."""
    for attr in ("name", "description"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"pass class {cls.__qualname__} must declare a str '{attr}'")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls:
        raise ValueError(
            f"pass name '{cls.name}' is registered twice: {other.__module__} and {cls.__module__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


@contextlib.contextmanager
def registered(*classes: type[Pass]) -> Iterator[None]:
    """Make passes known by name only inside a with-block (test passes, which must not stay in
    the registry for every later test)."""
    _load_all()  # loaded inside the block, built-ins would go with the block's passes
    saved = dict(_REGISTRY)
    try:
        for cls in classes:
            register_pass(cls)
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import edgecc.passes as builtin

    for info in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"edgecc.passes.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the tool down
            raise UserError(f"plugin entry point '{ep.name}' ({ep.value}) failed to load: {e}") from e
        if isinstance(obj, type) and issubclass(obj, Pass):
            register_pass(obj)


def registered_passes() -> dict[str, type[Pass]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise UserError(unknown_message("unknown pass", name, passes))
    return passes[name]


def unknown_message(prefix: str, name: str, known: dict | list) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{prefix} '{name}'{hint} (known: {', '.join(sorted(known))})"


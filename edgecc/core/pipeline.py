"""Pipelines as data: the text form `a,b{k=v,k2=v2}` parses to a Pipeline and prints back.

A value holding `,{}=`, spaces or quotes is written in double quotes, `heads="0:1,1:3"`
(single quotes work too; a value cannot hold the quote that encloses it). Printing is
canonical (options in the order given, values in their option's text form, quoted only when
they must be), so `str(parse(s)) == s` for any canonical `s`; `resolved()` adds every
defaulted option, and that string is what artifacts record.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from edgecc.core.pass_base import Pass, get_pass, registered_passes, unknown_message
from edgecc.errors import UserError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_VALUE = re.compile(r"[^,{}=\s\"']+")
_QUOTED = {'"': re.compile(r'"([^"]*)"'), "'": re.compile(r"'([^']*)'")}


def _quote(text: str) -> str:
    """A value as the pipeline text writes it: bare where it can be, else quoted."""
    if _VALUE.fullmatch(text):
        return text
    if '"' in text and "'" in text:
        raise UserError(f"option value {text!r} holds both quote characters; the pipeline text cannot")
    return f"'{text}'" if '"' in text else f'"{text}"'


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def pass_class(self) -> type[Pass]:
        return get_pass(self.name)

    def instantiate(self) -> Pass:
        return self.pass_class()(**dict(self.options))

    def __str__(self) -> str:
        if not self.options:
            return self.name
        decl = {o.name: o for o in self.pass_class().options}
        body = ",".join(f"{k}={_quote(decl[k].format(v))}" for k, v in self.options)
        return f"{self.name}{{{body}}}"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    passes: tuple[PassSpec, ...]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def resolved(self) -> "Pipeline":
        """The same pipeline with every option spelled out, defaults included."""
        out = []
        for spec in self.passes:
            given = dict(spec.options)
            opts = tuple((o.name, given.get(o.name, o.default)) for o in spec.pass_class().options)
            out.append(PassSpec(spec.name, opts))
        return Pipeline(tuple(out))

    def check_contract(self) -> None:
        """Refuse a pipeline where a pass runs before what it requires is established."""
        have: dict[str, str] = {}  # property -> the pass that provides it
        for spec in self.passes:
            cls = spec.pass_class()
            for need in cls.requires:
                if need not in have:
                    providers = [n for n, c in registered_passes().items() if need in c.provides]
                    hint = f" (add one of: {', '.join(providers)} before it)" if providers else ""
                    raise UserError(
                        f"pipeline '{self}': pass '{spec.name}' requires '{need}', "
                        f"which no earlier pass provides{hint}"
                    )
            for prop in cls.invalidates:
                have.pop(prop, None)
            for prop in cls.provides:
                have[prop] = spec.name


def parse_pipeline(text: str) -> Pipeline:
    """Parse `a,b{k=v}`; errors name the position. Pass names and options are validated."""
    p = _Parser(text)
    specs = p.parse()
    pipeline = Pipeline(tuple(specs))
    for spec in pipeline.passes:
        spec.instantiate()  # validates names, option names and ranges
    return pipeline


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> UserError:
        caret = " " * self.pos + "^"
        return UserError(f"bad pipeline at position {self.pos}: {what}\n  {self.text}\n  {caret}")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def match(self, regex: re.Pattern, what: str) -> str:
        self.skip_ws()
        m = regex.match(self.text, self.pos)
        if not m:
            found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of text"
            raise self.fail(f"expected {what}, found {found}")
        self.pos = m.end()
        return m.group(0)

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.fail(f"expected '{ch}', found {found}")
        self.pos += 1

    def parse(self) -> list[PassSpec]:
        if not self.text.strip():
            raise self.fail("empty pipeline")
        specs = [self.pass_spec()]
        while self.peek() == ",":
            self.pos += 1
            specs.append(self.pass_spec())
        if self.peek():
            raise self.fail(f"expected ',' or end of text, found {self.peek()!r}")
        return specs

    def pass_spec(self) -> PassSpec:
        name = self.match(_NAME, "a pass name")
        cls = get_pass(name)
        opts: list[tuple[str, Any]] = []
        if self.peek() == "{":
            self.pos += 1
            decl = {o.name: o for o in cls.options}
            while True:
                key_pos = self.pos
                key = self.match(_NAME, "an option name")
                if key not in decl:
                    self.pos = key_pos
                    raise self.fail(unknown_message(f"pass '{name}' has no option", key, decl))
                if any(k == key for k, _ in opts):
                    raise self.fail(f"option '{key}' given twice")
                self.expect("=")
                quote = _QUOTED.get(self.peek())
                if quote:
                    start = self.pos
                    m = quote.match(self.text, self.pos)
                    if not m:
                        raise self.fail(f"unterminated quoted value for '{key}' (from position {start})")
                    self.pos, value = m.end(), m.group(1)
                else:
                    value = self.match(_VALUE, f"a value for '{key}'")
                opts.append((key, decl[key].parse(value, f"pass '{name}'")))
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}")
                break
        return PassSpec(name, tuple(opts))

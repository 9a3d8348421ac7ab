"""Pipeline text form, pass options and the pass contract."""

from __future__ import annotations

import pytest

from edgecc.core.pass_base import Option, Pass, PassResult, registered, registered_passes
from edgecc.core.pipeline import parse_pipeline
from edgecc.errors import UserError


class _Quantish(Pass):
    name = "test-quantish"
    description = "test pass that provides 'quantized'"
    options = (
        Option("bits", int, 8, "bit width", low=2, high=8),
        Option("mode", str, "dynamic", "how", choices=("dynamic", "static")),
        Option("alpha", float, 0.5, "a ratio", low=0.0, high=1.0),
        Option("sym", bool, True, "symmetric"),
    )
    provides = ("quantized",)

    def run(self, model, ctx):
        return PassResult(model, False)


class _Packer(Pass):
    name = "test-packer"
    description = "test pass that requires 'quantized'"
    requires = ("quantized",)

    def run(self, model, ctx):
        return PassResult(model, False)


class _Dequant(Pass):
    name = "test-dequant"
    description = "test pass that invalidates 'quantized'"
    invalidates = ("quantized",)

    def run(self, model, ctx):
        return PassResult(model, False)


@pytest.fixture
def test_passes():
    with registered(_Quantish, _Packer, _Dequant):
        yield


@pytest.mark.usefixtures("test_passes")
@pytest.mark.parametrize("text", [
    "simplify",
    "simplify,fuse",
    "simplify{onnxsim=false},test-quantish{bits=4,mode=static,alpha=0.25,sym=false}",
    "test-quantish{mode=static,bits=2}",
    'prune-heads{heads="0:1,1:3",ratio=0.5}',
])
def test_canonical_text_round_trips(text):
    assert str(parse_pipeline(text)) == text


@pytest.mark.usefixtures("test_passes")
def test_whitespace_is_normalized_away():
    assert str(parse_pipeline(" simplify , test-quantish{ bits = 4 } ")) == "simplify,test-quantish{bits=4}"


@pytest.mark.usefixtures("test_passes")
def test_resolved_spells_out_defaults_and_round_trips():
    resolved = parse_pipeline("test-quantish{bits=4}").resolved()
    assert str(resolved) == "test-quantish{bits=4,mode=dynamic,alpha=0.5,sym=true}"
    assert str(parse_pipeline(str(resolved))) == str(resolved)


@pytest.mark.usefixtures("test_passes")
def test_quoted_values_hold_commas_and_print_quoted_only_when_needed():
    spec = parse_pipeline("prune-heads{heads='0:1,1:3'}").passes[0]
    assert spec.instantiate().requested == {0: {1}, 1: {3}}
    assert str(parse_pipeline('test-quantish{mode="static"}')) == "test-quantish{mode=static}"
    resolved = str(parse_pipeline("prune-heads{ratio=0.5}").resolved())
    assert 'heads=""' in resolved and str(parse_pipeline(resolved)) == resolved  # empty string too


@pytest.mark.usefixtures("test_passes")
def test_options_are_typed():
    spec = parse_pipeline("test-quantish{bits=4,alpha=0.25,sym=false}").passes[0]
    p = spec.instantiate()
    assert p.opts == {"bits": 4, "mode": "dynamic", "alpha": 0.25, "sym": False}


@pytest.mark.parametrize("text,position,fragment", [
    ("simplify,,fuse", 9, "expected a pass name"),
    ("simplify{onnxsim=true", 21, "expected '}'"),
    ("simplify{onnxsim}", 16, "expected '='"),
    ("simplify fuse", 9, "expected ',' or end of text"),
    ("", 0, "empty pipeline"),
    ('prune-heads{heads="0:1,1:3}', 18, "unterminated quoted value for 'heads'"),
])
def test_syntax_errors_show_the_position(text, position, fragment):
    with pytest.raises(UserError) as e:
        parse_pipeline(text)
    msg = str(e.value)
    assert f"position {position}" in msg and fragment in msg
    assert msg.splitlines()[2].index("^") == position + 2  # the caret under the offending char


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(UserError, match="unknown pass 'simplfy'; did you mean 'simplify'"):
        parse_pipeline("simplfy")


def test_unknown_option_suggests_the_closest_name():
    with pytest.raises(UserError, match="has no option 'onxsim'; did you mean 'onnxsim'"):
        parse_pipeline("simplify{onxsim=true}")


@pytest.mark.usefixtures("test_passes")
@pytest.mark.parametrize("text,fragment", [
    ("test-quantish{bits=16}", "must be in [2, 8]"),
    ("test-quantish{bits=four}", "expects int"),
    ("test-quantish{mode=weird}", "must be one of dynamic, static"),
    ("test-quantish{sym=maybe}", "expects bool"),
    ("test-quantish{bits=4,bits=4}", "given twice"),
])
def test_bad_option_values(text, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_pipeline(text)


@pytest.mark.usefixtures("test_passes")
def test_contract_refuses_a_pass_before_what_it_requires():
    with pytest.raises(UserError) as e:
        parse_pipeline("simplify,test-packer").check_contract()
    msg = str(e.value)
    assert "'test-packer' requires 'quantized'" in msg and "test-quantish" in msg


@pytest.mark.usefixtures("test_passes")
def test_contract_accepts_the_right_order_and_sees_invalidation():
    parse_pipeline("test-quantish,test-packer").check_contract()
    with pytest.raises(UserError, match="'test-packer' requires 'quantized'"):
        parse_pipeline("test-quantish,test-dequant,test-packer").check_contract()


def test_builtin_passes_are_registered_and_declared():
    passes = registered_passes()
    assert {"simplify", "fuse"} <= set(passes)
    assert not any(name.startswith("test-") for name in passes)  # test passes leave with their tests
    for cls in passes.values():
        assert cls.description and all(o.help for o in cls.options)

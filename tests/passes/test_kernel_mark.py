"""KernelMark: what a pass writes on a node survives model.opt.onnx, and a malformed mark is an
error naming the node."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from edgecc.core.kernel_mark import KernelMark
from edgecc.errors import UserError


def _node() -> ir.Node:
    return ir.Node("", "MatMul", [ir.Value(name="x"), ir.Value(name="w")], name="mm")


@pytest.mark.parametrize("mark", [KernelMark("int8", tile=16), KernelMark("int4_dot", isa="avx512vnni"),
                                  KernelMark("bsr", block=(1, 16))])
def test_a_mark_reads_back_from_the_node_and_from_its_saved_form(mark):
    node = _node()
    mark.write(node)
    assert KernelMark.read(node) == mark
    assert KernelMark.read(ir.serde.serialize_node(node)) == mark


def test_writing_a_mark_replaces_the_previous_one():
    node = _node()
    KernelMark("bsr", block=(4, 4)).write(node)
    KernelMark("int8", tile=8).write(node)
    assert KernelMark.read(node) == KernelMark("int8", tile=8)
    assert KernelMark.read(ir.serde.serialize_node(node)) == KernelMark("int8", tile=8)


def test_an_unmarked_node_has_no_mark():
    assert KernelMark.read(_node()) is None


@pytest.mark.parametrize("kernel, params", [("int8", {}), ("int8", {"tile": 0}), ("bsr", {"tile": 4}),
                                            ("magic", {})])
def test_an_inconsistent_mark_cannot_be_made(kernel, params):
    with pytest.raises(ValueError):
        KernelMark(kernel, **params)


@pytest.mark.parametrize("props, expected", [
    ({"edgecc.kernel": "int8"}, "no edgecc.tile"),
    ({"edgecc.kernel": "int8", "edgecc.tile": "wide"}, "tile 'wide' is not a number"),
    ({"edgecc.kernel": "bsr", "edgecc.block": "16"}, "block '16' is not RxC"),
    ({"edgecc.kernel": "magic"}, "unknown kernel 'magic'"),
])
def test_a_malformed_saved_mark_names_the_node(props, expected):
    node = _node()
    node.metadata_props.update(props)
    with pytest.raises(UserError, match=f"node 'mm': malformed kernel mark .*{expected}"):
        KernelMark.read(ir.serde.serialize_node(node))

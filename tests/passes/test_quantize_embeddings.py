"""quantize-embeddings: int8 rows, numerics vs ORT, the tied head shares its weight, compiled once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

import edgecc
from edgecc.core.kernel_mark import KernelMark
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.verify import run_ort
from edgecc.passes.pack_weights import PackWeights
from edgecc.passes.quantize_embeddings import QuantizeEmbeddings
from edgecc.passes.quantize_int8 import QuantizeInt8

V, D = 300, 64  # a vocabulary that is no multiple of the int8 panel width


def _lm(tied: bool = True, seed: int = 0) -> onnx.ModelProto:
    """ids -> embedding table -> x * 2 -> LM head, whose weight is the table transposed (tied: its
    own initializer holding the same values, as torch exporters write a tied head)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 0.05, (V, D)).astype(np.float32)
    table[7] *= 20  # rows of very different ranges: one scale per row matters
    head = table.T.copy() if tied else rng.normal(0, 0.05, (D, V)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("Mul", ["e", "two"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["B", "T", V]),
         helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, ["B", "T", D])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, *passes) -> tuple[list, onnx.ModelProto]:
    m, results = ir.from_proto(model), []
    for p in passes:
        results.append(run_pass(p, m, PassContext()))
        m = results[-1].model
    return results, ir.to_proto(m)


def _ids(rng=None) -> dict:
    rng = rng or np.random.default_rng(1)
    ids = rng.integers(0, V, (2, 9))
    ids[0, :3] = [7, -1, V - 1]  # the wide row, and a negative id (counts from the end)
    return {"ids": ids}


def _table(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "table"))


def test_untied_table_becomes_int8_rows_with_row_scales():
    model = _lm(tied=False)
    (result,), out = _run(model, QuantizeEmbeddings(min_weights=0))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "table" not in inits  # the float table is gone
    (table_q,) = [a for a in inits.values() if a.dtype == np.int8]
    assert table_q.shape == (V, D)
    assert result.stats["tables"] == 1 and result.stats["tied_to_int8_head"] == 0
    assert result.stats["int8_bytes"] == V * D + V * 4
    # ORT on the rewritten graph: each row within half its own step of the float row.
    table = _table(model)
    got = run_ort(out, _ids())["e"]
    want = table[_ids()["ids"]]
    step = np.abs(table).max(axis=1) / 127
    assert np.all(np.abs(got - want) <= step[_ids()["ids"]][..., None] * 0.5 + 1e-7)
    assert Counter(n.op_type for n in out.graph.node)["Gather"] == 2  # rows and their scales


def test_tied_head_lends_its_int8_weight_to_the_lookup():
    model = _lm(tied=True)
    results, out = _run(model, QuantizeInt8(min_weights=0), QuantizeEmbeddings(min_weights=0))
    assert results[1].stats["tied_to_int8_head"] == 1 and results[1].stats["int8_bytes"] == V * 4
    int8 = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 1  # one int8 copy: the head's
    lookup = next(n for n in out.graph.node if n.op_type == "Gather" and n.input[0] == int8[0].name)
    assert helper.get_attribute_value(lookup.attribute[0]) == 1  # by column
    # The lookup equals the untied int8 lookup of the same table, bit for bit.
    _, untied = _run(model, QuantizeEmbeddings(min_weights=0))
    feeds = _ids()
    assert np.array_equal(run_ort(out, feeds)["e"], run_ort(untied, feeds)["e"])


@pytest.mark.parametrize("why, passes", [
    ("a head of other values", lambda: (_lm(tied=False), [QuantizeInt8(min_weights=0)])),
    ("a SmoothQuant-scaled head", lambda: (_lm(), [QuantizeInt8(min_weights=0, smoothquant=0.5)])),
    ("a float head", lambda: (_lm(), [])),
])
def test_no_tie_without_the_same_int8_rows(why, passes):
    model, before = passes()
    results, out = _run(model, *before, QuantizeEmbeddings(min_weights=0))
    assert results[-1].stats["tables"] == 1 and results[-1].stats["tied_to_int8_head"] == 0, why


def test_small_tables_and_computed_tables_are_left_alone():
    (result,), _ = _run(_lm(), QuantizeEmbeddings())  # 19,200 weights < min_weights 65,536
    assert not result.changed and result.stats["tables"] == 0
    model = _lm()
    model.graph.node.insert(0, helper.make_node("Identity", ["table"], ["table_copy"]))
    model.graph.node[1].input[0] = "table_copy"
    model.graph.input.append(helper.make_tensor_value_info("table", onnx.TensorProto.FLOAT, [V, D]))
    (result,), _ = _run(model, QuantizeEmbeddings(min_weights=0))  # a graph input may override it
    assert result.stats["tables"] == 0


def test_compiled_tied_lookup_reads_the_packed_head(tmp_path):
    model = _lm()
    path = tmp_path / "lm.onnx"
    onnx.save(model, path)
    pipeline = "quantize-int8{min_weights=0},quantize-embeddings{min_weights=0},pack-weights"
    _, reference = _run(model, QuantizeInt8(min_weights=0), QuantizeEmbeddings(min_weights=0), PackWeights())
    marks = [KernelMark.read(n) for n in reference.graph.node if n.op_type == "Gather"]
    assert [m.kernel for m in marks if m] == ["int8_columns"]  # the rows; their scales are a plain Gather
    art = edgecc.compile(path, target="host", output=tmp_path / "a", pipeline=pipeline)  # verified vs ORT
    assert art.manifest["verification"]["ok"]
    feeds = _ids(np.random.default_rng(5))
    got = art.run(feeds)
    want = run_ort(reference, feeds)
    assert np.array_equal(got["e"], want["e"])  # the lookup is exact: the same int8 rows and scales
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    # One int8 copy of the V x D weights in the artifact, not two.
    weights = art.manifest["files"]["weights.bin"]["bytes"]
    assert V * D <= weights < 2 * V * D

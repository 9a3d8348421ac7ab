"""block-sparsity: structure, exactness vs the dense model with the same blocks zeroed, kernel
choice, fires / must not fire, and the compiled artifact."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

import edgecc
from edgecc.core.kernel_mark import KernelMark
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import run_pass
from edgecc.core.target import load_target
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.errors import UserError
from edgecc.passes.block_sparsity import BlockSparsity
from tests.passes.linear_models import linear_model


def _prune(model: onnx.ModelProto, target: str = "host", **opts):
    ctx = PassContext(target=load_target(target))
    result = run_pass(BlockSparsity(min_weights=0, **opts), ir.from_proto(model), ctx)
    return result, ir.to_proto(result.model)


def _weight(model: onnx.ModelProto) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))


def _zero_blocks(w: np.ndarray, r: int, c: int) -> np.ndarray:
    blocks = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c)
    return (np.abs(blocks).max(axis=(1, 3)) == 0)


@pytest.mark.parametrize("block,sparsity", [((16, 16), 0.5), ((1, 16), 0.75), ((8, 8), 0.9)])
def test_structure_exact_block_count_and_smallest_norms(block, sparsity):
    model = linear_model(k=64, n=64)
    _, out = _prune(model, block=f"{block[0]}x{block[1]}", sparsity=sparsity)
    before, after = _weight(model), _weight(out)
    zero = _zero_blocks(after, *block)
    assert zero.sum() == int(sparsity * zero.size)
    norms = np.linalg.norm(before.reshape(64 // block[0], block[0], 64 // block[1], block[1]), axis=(1, 3))
    assert norms[zero].max() <= norms[~zero].min()  # the weakest blocks went
    np.testing.assert_array_equal(after[after != 0], before[after != 0])  # the rest is untouched


def test_marks_bsr_where_the_cost_model_predicts_a_win_and_says_why():
    result, out = _prune(linear_model(k=64, n=64), block="1x16", sparsity=0.9)
    (node,) = [n for n in out.graph.node if n.op_type == "MatMul"]
    assert KernelMark.read(node) == KernelMark("bsr", block=(1, 16))
    assert result.stats["bsr"] == 1 and "faster" in next(iter(result.stats["decisions"].values()))


def test_keeps_dense_where_bsr_would_lose():
    result, out = _prune(linear_model(k=64, n=64), block="8x8", sparsity=0.3)
    assert result.stats["dense"] == 1 and result.stats["bsr"] == 0
    assert not any(n.metadata_props for n in out.graph.node)
    assert "dense" in next(iter(result.stats["decisions"].values()))


def test_equals_the_dense_model_with_the_same_blocks_zeroed():
    model = linear_model(k=64, n=64)
    _, out = _prune(model, block="16x16", sparsity=0.5)
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(model)
    w = _weight(model).copy()
    mask = np.repeat(np.repeat(_zero_blocks(_weight(out), 16, 16), 16, axis=0), 16, axis=1)
    w[mask] = 0
    zeroed.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    feeds = random_inputs(model, seed=1, dim_values={"B": 2, "T": 3})
    assert compare(run_ort(zeroed, feeds), run_ort(out, feeds), tolerance=(1e-6, 1e-6)).ok


@pytest.mark.parametrize("kwargs,fragment", [
    ({"k": 40, "n": 64}, "does not divide weight 40x64"),
    ({"weight_as_input": True}, "not a constant initializer"),
])
def test_does_not_fire_and_says_why(kwargs, fragment):
    result, out = _prune(linear_model(**kwargs), block="16x16", sparsity=0.5)
    assert not result.changed and result.stats["pruned"] == 0
    assert any(fragment in s for s in result.stats["skipped"]), result.stats["skipped"]


def test_small_weights_are_left_alone():
    result = run_pass(BlockSparsity(sparsity=0.5, min_weights=1 << 20), 
        ir.from_proto(linear_model()), PassContext(target=load_target("host")))
    assert not result.changed and "min_weights" in result.stats["skipped"][0]


@pytest.mark.parametrize("text,fragment", [
    ("block-sparsity{block=16y16}", "expects RxC"),
    ("block-sparsity{sparsity=0.999}", "must be in [0.0, 0.99]"),
])
def test_bad_options(text, fragment):
    with pytest.raises(UserError) as e:
        edgecc.parse_pipeline(text)
    assert fragment in str(e.value)


def test_compiled_bsr_artifact_matches_ort_and_stores_only_nonzero_blocks(example_path, tmp_path):
    model = example_path("tiny-lm")
    pipe = "simplify,fuse,block-sparsity{block=1x16,sparsity=%s,min_weights=1024}"
    light = edgecc.compile(model, "host", tmp_path / "s5", pipe % 0.5)
    heavy = edgecc.compile(model, "host", tmp_path / "s9", pipe % 0.9, keep_reference=True)
    for art in (light, heavy):
        v = art.manifest["verification"]
        assert v["ok"] and v["reference"] == "onnxruntime (optimized model)" and v["max_abs"] < 1e-5
        assert art.manifest["passes"][-1]["stats"]["bsr"] > 0
    sizes = [a.model_bytes for a in (light, heavy)]
    assert sizes[1] < 0.7 * sizes[0], sizes  # dropped blocks are not in the module
    opt = onnx.load(str(heavy.path / "model.opt.onnx"))
    feeds = random_inputs(opt, seed=6, dim_values={"batch": 2, "seq": 7})
    assert compare(run_ort(opt, feeds), heavy.run(feeds), tolerance=(1e-5, 1e-5)).ok


def _correlated(seed: int, rows: int = 64) -> np.ndarray:
    """Inputs [1, rows, 64] whose channels move together (rank 8 plus noise), as activations do."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).standard_normal((8, 64))
    return (rng.standard_normal((1, rows, 8)) @ mix + 0.05 * rng.standard_normal((1, rows, 64))).astype(np.float32)


def test_recover_refits_the_surviving_blocks_to_the_dense_output():
    model = linear_model(k=64, n=64)
    ctx = PassContext(target=load_target("host"), calibration={"x": _correlated(0, 256)})
    plain = ir.to_proto(run_pass(BlockSparsity(min_weights=0, block="8x8", sparsity=0.5),
                                 ir.from_proto(model), ctx).model)
    result = run_pass(BlockSparsity(min_weights=0, block="8x8", sparsity=0.5, recover=True), ir.from_proto(model), ctx)
    refit = ir.to_proto(result.model)
    w, w_plain, w_refit = _weight(model), _weight(plain), _weight(refit)
    np.testing.assert_array_equal(_zero_blocks(w_refit, 8, 8), _zero_blocks(w_plain, 8, 8))  # same storage
    held_out = _correlated(1)
    want = held_out @ w

    def error(v):
        return np.linalg.norm(held_out @ v - want) / np.linalg.norm(want)

    assert error(w_refit) < 0.5 * error(w_plain)
    stats = result.stats["recover"]
    assert stats["error_after"] < stats["error_before"]
    got = run_ort(refit, {"x": held_out})["y"]  # the refit weight is what ORT runs
    np.testing.assert_allclose(got, np.maximum(held_out @ w_refit, 0), rtol=1e-4, atol=1e-4)

"""prune-heads: exactness against the same torch model with those heads' attention outputs masked
to zero, structure, where it fires (both exporters, raw and after simplify,fuse, multi-head and
grouped-query, separate and fused projections, scaled_dot_product_attention) and where it must not,
the warning or error when nothing is removed, the refit of the output projection, option errors,
the compiled pruned LM, and Llama with rotary embeddings and a KV cache (the cache loses the pruned
K/V heads; scope=model ranks across blocks; a rotary table that differs per head is left alone)."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from edgecc.passes.prune_heads import PruneHeads
from onnx import numpy_helper
from torch import nn

import edgecc
from edgecc.core import lm_signature
from edgecc.core.pass_base import PassContext
from edgecc.core.pass_manager import PassManager, run_pass
from edgecc.core.pipeline import parse_pipeline
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.errors import UserError
from edgecc.lm import generate
from edgecc.models import llama
from edgecc.models.examples import TINY_LLAMA, _modules
from edgecc.runtime.artifact import REFERENCE_MODEL
from tests.conftest import parse_model

D, HEADS, DH = 128, 4, 32  # the tiny-lm example
EXACT = (1e-5, 1e-5)
PIPELINES = ("", "simplify,fuse,")
DIMS = {"batch": 2, "seq": 7}


def _export(module: nn.Module, x: torch.Tensor, exporter: str, in_name: str,
            out_name: str) -> onnx.ModelProto:
    """Export with dynamic batch and sequence dims named as the examples name them."""
    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", min=2, max=128)}
            program = torch.onnx.export(module, (x,), dynamo=True, input_names=[in_name],
                                        output_names=[out_name], dynamic_shapes=(dims,), verbose=False)
            return program.model_proto
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(module, (x,), f, dynamo=False, input_names=[in_name], output_names=[out_name],
                          dynamic_axes={in_name: axes, out_name: axes})
    return onnx.load_from_string(f.getvalue())


def _mask_heads(proj: nn.Linear, heads: int, removed) -> None:
    """Zero the attention outputs of `removed` heads where they enter the output projection."""
    mask = torch.ones(heads)
    mask[list(removed)] = 0

    def hook(_module, args):
        (x,) = args
        return (x * mask.repeat_interleave(x.shape[-1] // heads),)

    proj.register_forward_pre_hook(hook)


def _tiny_lm(removed: dict[int, list[int]] | None = None) -> nn.Module:
    """The tiny-lm example's torch model (same seed, same weights), heads masked if asked."""
    torch.manual_seed(0)
    model = _modules()["tiny-lm"]().eval()
    for layer, heads in (removed or {}).items():
        _mask_heads(model.blocks[layer].proj, HEADS, heads)
    return model


def _masked_lm(removed: dict[int, list[int]]) -> onnx.ModelProto:
    return _export(_tiny_lm(removed), torch.randint(0, 512, (2, 16)), "torchscript", "ids", "logits")


def _run(model: onnx.ModelProto, pipeline: str, ctx: PassContext | None = None):
    """(pruned proto, prune-heads stats, changed) after running `pipeline` on the model."""
    out, reports = PassManager(pipeline).run(ir.from_proto(model), ctx or PassContext())
    return ir.to_proto(out), reports[-1].stats, reports[-1].changed


def _same(reference: onnx.ModelProto, pruned: onnx.ModelProto, seed: int = 1) -> None:
    feeds = random_inputs(reference, seed=seed, dim_values=DIMS)
    result = compare(run_ort(reference, feeds, optimize=False), run_ort(pruned, feeds, optimize=False),
                     tolerance=EXACT)
    assert result.ok, result.detail


def _removed(stats: dict) -> dict[int, list[int]]:
    return {int(i): b["removed_heads"] for i, b in stats["blocks"].items() if b["removed_heads"]}


@pytest.fixture(scope="module")
def lm(example_path):
    return {e: onnx.load(str(example_path("tiny-lm", e))) for e in ("dynamo", "torchscript")}


# ----------------------------------------------------------------------------------------------
# Exactness: the pruned model is the unpruned one with those heads' attention outputs zeroed


@pytest.fixture(scope="module")
def masked_0_1_and_1_3():
    return _masked_lm({0: [1], 1: [3]})


@pytest.mark.parametrize("prefix", PIPELINES, ids=["raw", "simplify-fuse"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_equals_the_model_with_those_heads_masked(lm, masked_0_1_and_1_3, exporter, prefix):
    pruned, stats, changed = _run(lm[exporter], prefix + "prune-heads{heads=0:1;1:3}")
    assert changed and stats["blocks_found"] == 2 and stats["skipped"] == []
    assert _removed(stats) == {0: [1], 1: [3]}
    assert stats["heads_before"] == 8 and stats["heads_after"] == 6
    _same(masked_0_1_and_1_3, pruned)


def _head_norms(block) -> list[float]:
    """Per head, the L2 norm of its Q, K, V rows of torch's qkv weight and its proj columns."""
    qkv, proj = block.qkv.weight.detach().numpy(), block.proj.weight.detach().numpy()
    return [math.sqrt(sum(float((qkv[p * D + h * DH:p * D + (h + 1) * DH] ** 2).sum()) for p in range(3))
                      + float((proj[:, h * DH:(h + 1) * DH] ** 2).sum())) for h in range(HEADS)]


def test_ratio_removes_the_smallest_weight_norm_heads_exactly(lm):
    model = _tiny_lm()
    expected = {i: [int(np.argmin(_head_norms(b)))] for i, b in enumerate(model.blocks)}
    pruned, stats, _ = _run(lm["torchscript"], "prune-heads{ratio=0.25}")
    assert _removed(stats) == expected
    for i, block in enumerate(model.blocks):
        np.testing.assert_allclose([stats["blocks"][str(i)]["importance"][str(h)] for h in range(HEADS)],
                                   _head_norms(block), rtol=1e-5)
    _same(_masked_lm(expected), pruned)


def test_calibration_importance_is_the_error_removal_leaves_in_the_block_output(lm):
    """A head's importance: the energy of its share of the output projection's output, over the
    geometric mean of that output's energy and the residual stream's after the block adds it."""
    ids = np.random.default_rng(3).integers(0, 512, (2, 16)).astype(np.int64)
    model, seen, residual, added = _tiny_lm(), {}, {}, {}
    for i, block in enumerate(model.blocks):
        block.proj.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, D)))
        block.register_forward_pre_hook(lambda _m, args, i=i: residual.__setitem__(i, args[0].reshape(-1, D)))
        block.proj.register_forward_hook(lambda _m, _a, out, i=i: added.__setitem__(i, out.reshape(-1, D)))
    with torch.no_grad():
        model(torch.from_numpy(ids))
    damage = {}
    for i, x in seen.items():
        w = model.blocks[i].proj.weight.detach().T.double()  # [inputs, outputs]
        y = x.double() @ w
        stream = ((residual[i] + added[i]).double() ** 2).sum()
        scale = float(((y ** 2).sum() * stream).sqrt())
        damage[i] = [float(((x[:, h * DH:(h + 1) * DH].double() @ w[h * DH:(h + 1) * DH]) ** 2).sum()) / scale
                     for h in range(HEADS)]
    ctx = PassContext(calibration={"ids": ids})
    _, stats, changed = _run(lm["dynamo"], "prune-heads{importance=calibration}", ctx)
    assert changed
    for i, block in stats["blocks"].items():
        got = [block["importance"][str(h)] for h in range(HEADS)]
        np.testing.assert_allclose(got, damage[int(i)], rtol=1e-3)
        assert block["removed_heads"] == [int(np.argmin(damage[int(i)]))]


# ----------------------------------------------------------------------------------------------
# Structure: smaller weights, new shape constants, fewer parameters


def _floats(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def test_weights_and_shapes_shrink_after_simplify_fuse(lm):
    before, _, _ = _run(lm["dynamo"], "simplify,fuse")
    pruned, stats, _ = _run(lm["dynamo"], "simplify,fuse,prune-heads{ratio=0.25}")
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    gemms = [n for n in pruned.graph.node if n.op_type == "Gemm"]
    qkv = [inits[n.input[1]].shape for n in gemms if inits[n.input[1]].shape[1] % 3 == 0]
    proj = [inits[n.input[1]].shape for n in gemms if inits[n.input[1]].shape == (96, D)]
    assert qkv == [(D, 3 * 96)] * 2 and len(proj) == 2
    assert all(inits[n.input[2]].shape == (288,) for n in gemms if inits[n.input[1]].shape == (D, 288))
    removed = 2 * (D * 3 * DH + 3 * DH + DH * D)  # per layer: qkv columns and bias, proj rows
    assert _floats(before) - _floats(pruned) == removed == stats["weights_removed"]
    assert stats["bytes_removed"] == 4 * removed
    splits = [inits[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Split"]
    assert splits == [[96, 96, 96]] * 2
    # the shapes the pass rewrote: the Gemm's [.., 288], the heads [b, t, 3, 32], back to [b, t, 96]
    shapes = {tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in onnx.shape_inference.infer_shapes(pruned).graph.value_info}
    assert {(0, 0, 3, 32), (0, 3, 0, 0), (0, 0, 96), (0, 0, 288)} <= shapes
    assert not any(len(s) == 4 and HEADS in s[1:3] for s in shapes)


def test_heads_option_removes_exactly_that_head(lm):
    """The dynamo export shares one [b, t, 4, 32] shape between both layers: layer 1 keeps it."""
    pruned, stats, changed = _run(lm["dynamo"], "prune-heads{heads=0:1}")
    assert changed and _removed(stats) == {0: [1]} and stats["blocks_pruned"] == 1
    assert stats["blocks"]["1"]["heads_after"] == HEADS
    assert stats["weights_removed"] == D * 3 * DH + 3 * DH + DH * D
    _same(_masked_lm({0: [1]}), pruned)


def test_ratio_never_removes_every_head(lm):
    pruned, stats, _ = _run(lm["dynamo"], "simplify,fuse,prune-heads{ratio=0.9}")
    assert [b["heads_after"] for b in stats["blocks"].values()] == [1, 1]
    _same(_masked_lm(_removed(stats)), pruned)


def _gemm_attention() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Two heads of 8 over rank-2 tokens x[T, 16], every projection a Gemm with transB=1 (W is
    [N, K]), heads split with Reshape [-1, 2, 8] and merged back with [-1, 16]."""
    rng = np.random.default_rng(0)
    w = {f"w{p}": rng.standard_normal((16, 16)).astype(np.float32) for p in "qkvo"}
    w |= {f"b{p}": rng.standard_normal(16).astype(np.float32) for p in "qkvo"}
    h = onnx.helper
    nodes = [h.make_node("Gemm", ["x", f"w{p}", f"b{p}"], [p], transB=1) for p in "qkv"]
    nodes += [h.make_node("Reshape", [p, "heads"], [f"{p}3"]) for p in "qkv"]
    nodes += [h.make_node("Transpose", ["q3"], ["qh"], perm=[1, 0, 2]),
              h.make_node("Transpose", ["k3"], ["kt"], perm=[1, 2, 0]),
              h.make_node("Transpose", ["v3"], ["vh"], perm=[1, 0, 2]),
              h.make_node("MatMul", ["qh", "kt"], ["s"]), h.make_node("Softmax", ["s"], ["p"], axis=-1),
              h.make_node("MatMul", ["p", "vh"], ["a"]),
              h.make_node("Transpose", ["a"], ["at"], perm=[1, 0, 2]),
              h.make_node("Reshape", ["at", "merged"], ["m"]),
              h.make_node("Gemm", ["m", "wo", "bo"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k)
              for k, v in (("heads", [-1, 2, 8]), ("merged", [-1, 16]))]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["T", 16])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["T", 16])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, w


def test_gemm_with_transposed_weights_on_rank_2_tokens():
    model, w = _gemm_attention()
    result = run_pass(PruneHeads(heads="0:0"), ir.from_proto(model), PassContext())
    pruned = ir.to_proto(result.model)
    inits = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    gemms = {n.output[0]: inits[n.input[1]].shape for n in pruned.graph.node if n.op_type == "Gemm"}
    assert gemms == {"q": (8, 16), "k": (8, 16), "v": (8, 16), "y": (16, 8)}  # [N, K] with transB
    reshapes = sorted(inits[n.input[1]].tolist() for n in pruned.graph.node if n.op_type == "Reshape")
    assert reshapes == [[-1, 1, 8]] * 3 + [[-1, 8]]
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    q, k, v = (x @ w[f"w{p}"].T + w[f"b{p}"] for p in "qkv")
    heads = []
    for i in range(2):
        s = q[:, 8 * i:8 * i + 8] @ k[:, 8 * i:8 * i + 8].T
        p = np.exp(s - s.max(-1, keepdims=True))
        heads.append((p / p.sum(-1, keepdims=True)) @ v[:, 8 * i:8 * i + 8] * (i != 0))  # head 0 masked
    expected = np.concatenate(heads, axis=1) @ w["wo"].T + w["bo"]
    np.testing.assert_allclose(run_ort(pruned, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Grouped-query attention: a K/V head goes with its whole group of query heads


class GQA(nn.Module):
    """8 query heads share 4 K/V heads, repeated as torch's repeat_interleave, as expand+reshape
    (Llama's repeat_kv), or tiled with repeat (query head j then uses K/V head j % 4)."""

    def __init__(self, repeat: str, d: int = 64, heads: int = 8, kv_heads: int = 4, head_bias: bool = False):
        super().__init__()
        self.repeat, self.h, self.g, self.dh = repeat, heads, kv_heads, d // heads
        self.head_bias = nn.Parameter(torch.randn(heads, 1, 1)) if head_bias else None  # ALiBi-like
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.k, self.v = nn.Linear(d, kv_heads * self.dh), nn.Linear(d, kv_heads * self.dh)

    def _repeat(self, z):
        b, g, t, dh = z.shape
        r = self.h // self.g
        if self.repeat == "interleave":
            return z.repeat_interleave(r, dim=1)
        if self.repeat == "expand":
            return z[:, :, None].expand(b, g, r, t, dh).reshape(b, g * r, t, dh)
        return z.repeat(1, r, 1, 1)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.dh).transpose(1, 2)
        k, v = (self._repeat(p(x).view(b, t, self.g, self.dh).transpose(1, 2)) for p in (self.k, self.v))
        att = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        att = (att if self.head_bias is None else att + self.head_bias).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, self.h * self.dh))


def _gqa(repeat: str, removed=(), **kwargs) -> nn.Module:
    torch.manual_seed(1)
    model = GQA(repeat, **kwargs).eval()
    if removed:
        _mask_heads(model.o, model.h, removed)
    return model


@pytest.fixture(scope="module")
def gqa_exports():
    cache = {}

    def get(repeat, exporter):
        if (repeat, exporter) not in cache:
            cache[repeat, exporter] = _export(_gqa(repeat), torch.randn(2, 5, 64), exporter, "x", "y")
        return cache[repeat, exporter]

    return get


# TorchScript's expand form is the must-not-fire case below.
GQA_FORMS = [("interleave", "dynamo"), ("interleave", "torchscript"), ("expand", "dynamo"),
             ("tile", "dynamo"), ("tile", "torchscript")]


@pytest.mark.parametrize("prefix", PIPELINES, ids=["raw", "simplify-fuse"])
@pytest.mark.parametrize("repeat,exporter", GQA_FORMS)
def test_grouped_query_removes_whole_groups_exactly(gqa_exports, repeat, exporter, prefix):
    pruned, stats, changed = _run(gqa_exports(repeat, exporter), prefix + "prune-heads{ratio=0.25}")
    (block,) = stats["blocks"].values()
    assert changed and block["attention"] == "grouped-query"
    assert (block["kv_heads_before"], block["kv_heads_after"]) == (4, 3)
    assert (block["heads_before"], block["heads_after"]) == (8, 6)
    (kv,) = block["removed_kv_heads"]
    group = [kv, kv + 4] if repeat == "tile" else [2 * kv, 2 * kv + 1]
    assert block["removed_heads"] == group  # the K/V head's own query heads, and only those
    x = torch.randn(2, 5, 64)
    _same(_export(_gqa(repeat, group), x, "torchscript", "x", "y"), pruned)


@pytest.mark.parametrize("prefix", PIPELINES, ids=["raw", "simplify-fuse"])
@pytest.mark.parametrize("repeat,exporter", GQA_FORMS)
def test_unit_query_removes_single_query_heads_exactly(gqa_exports, repeat, exporter, prefix):
    """Three query heads: one K/V head loses both of its query heads and goes, another loses one
    of two and stays, so the groups differ in size and K/V are gathered per query head."""
    pruned, stats, changed = _run(gqa_exports(repeat, exporter), prefix + 'prune-heads{unit=query,heads="0:1,0:4,0:5"}')
    (block,) = stats["blocks"].values()
    assert changed and block["removed_heads"] == [1, 4, 5] and block["heads_after"] == 5
    # interleaved, query heads 2k and 2k + 1 share K/V head k; tiled, heads j and j + 4 share j % 4
    assert block["removed_kv_heads"] == ([1] if repeat == "tile" else [2])
    assert any(n.op_type == "Gather" and n.name.endswith(".per_query") for n in pruned.graph.node)
    x = torch.randn(2, 5, 64)
    _same(_export(_gqa(repeat, [1, 4, 5]), x, "torchscript", "x", "y"), pruned)


@pytest.mark.parametrize("prefix", PIPELINES, ids=["raw", "simplify-fuse"])
def test_does_not_guess_a_head_count_computed_at_run_time(gqa_exports, prefix):
    """TorchScript's expand+reshape reads the K/V head count with Shape at run time."""
    model = gqa_exports("expand", "torchscript")
    pruned, stats, changed = _run(model, prefix + "prune-heads{ratio=0.5}")
    assert not changed and stats["blocks_found"] == 1 and stats["blocks_skipped"] == 1
    (why,) = stats["skipped"]
    assert "run time" in why
    _same(model, pruned)


def test_does_not_prune_a_per_head_score_bias():
    model = _export(_gqa("interleave", head_bias=True), torch.randn(2, 5, 64), "torchscript", "x", "y")
    _, stats, changed = _run(model, "prune-heads{ratio=0.5}")
    assert not changed and "differs per head" in stats["skipped"][0]


# ----------------------------------------------------------------------------------------------
# Fused projections and scaled_dot_product_attention (GPT-2's c_attn, Phi-3's qkv_proj)


class FusedQKV(nn.Module):
    """One Linear(d, d + 2 * kv_heads * d/h) cut into Q, K, V by `cut`, then SDPA (or, with
    sdpa=False, softmax(Q K^T) V written out). "split" and "slice" cut the columns; "view" and
    "unbind" view them as [b, t, 3, h, d/h] and take Q, K, V off the 3-axis. With fewer K/V heads,
    K and V are repeated for SDPA's grouped-query attention (TorchScript exports no enable_gqa)."""

    def __init__(self, cut: str, d: int = 64, heads: int = 4, kv_heads: int = 4, sdpa: bool = True):
        super().__init__()
        self.cut, self.h, self.g, self.dh, self.sdpa = cut, heads, kv_heads, d // heads, sdpa
        self.qkv, self.o = nn.Linear(d, d + 2 * kv_heads * self.dh), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        y, kv = self.qkv(x), self.g * self.dh
        if self.cut in ("view", "unbind"):
            y = y.view(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
            q, k, v = y.unbind(0) if self.cut == "unbind" else (y[0], y[1], y[2])
        else:
            parts = (y.split([d, kv, kv], -1) if self.cut == "split"
                     else (y[..., :d], y[..., d:d + kv], y[..., d + kv:]))
            q, k, v = (p.view(b, t, -1, self.dh).transpose(1, 2) for p in parts)
            k, v = (z.repeat_interleave(self.h // self.g, 1) for z in (k, v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, d))


def _fused(cut: str, removed=(), **kwargs) -> nn.Module:
    torch.manual_seed(2)
    model = FusedQKV(cut, **kwargs).eval()
    if removed:
        _mask_heads(model.o, model.h, removed)
    return model


FUSED = [("split", {}), ("slice", {}), ("view", {}), ("unbind", {}), ("split", {"kv_heads": 2}),
         ("slice", {"kv_heads": 2, "sdpa": False})]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("cut,kwargs", FUSED, ids=["split", "slice", "view", "unbind", "split-gqa",
                                                   "slice-gqa-matmul"])
def test_fused_qkv_and_sdpa_prune_exactly(cut, kwargs, exporter):
    x = torch.randn(2, 5, 64)
    model = _export(_fused(cut, **kwargs), x, exporter, "x", "y")
    pruned, stats, changed = _run(model, "prune-heads{ratio=0.5}")
    (block,) = stats["blocks"].values()
    assert changed and stats["skipped"] == [] and block["projections"].startswith("fused QKV")
    assert (block["heads_before"], block["heads_after"]) == (4, 2)
    if kwargs.get("kv_heads") == 2:  # a K/V head goes with its two query heads
        assert block["attention"] == "grouped-query" and block["kv_heads_after"] == 1
        (kv,) = block["removed_kv_heads"]
        assert block["removed_heads"] == [2 * kv, 2 * kv + 1]
    assert stats["weights_removed"] == 64 * 2 * 16 * (3 if "kv_heads" not in kwargs else 2) + 2 * 16 * 64 + (
        2 * 16 * 3 if "kv_heads" not in kwargs else 2 * 16 + 16 * 2)
    _same(_export(_fused(cut, block["removed_heads"], **kwargs), x, "torchscript", "x", "y"), pruned)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_unit_query_on_fused_grouped_qkv_and_sdpa(exporter):
    """One of the two query heads of K/V head 0 goes: the fused projection loses its Q columns
    only, and SDPA's repeated K/V are gathered per query head."""
    x = torch.randn(2, 5, 64)
    model = _export(_fused("split", kv_heads=2), x, exporter, "x", "y")
    pruned, stats, changed = _run(model, 'prune-heads{unit=query,heads="0:1"}')
    (block,) = stats["blocks"].values()
    assert changed and block["removed_heads"] == [1] and block["removed_kv_heads"] == []
    assert stats["weights_removed"] == 64 * 16 + 16 + 16 * 64  # Q columns and bias, output rows
    _same(_export(_fused("split", [1], kv_heads=2), x, "torchscript", "x", "y"), pruned)


# ----------------------------------------------------------------------------------------------
# Nothing removed: a warning with the reasons, or with strict an error


def _logged(model: onnx.ModelProto, pipeline: str) -> list[str]:
    lines: list[str] = []
    PassManager(pipeline, log=lines.append).run(ir.from_proto(model), PassContext())
    return [line for line in lines if line.startswith("warning")]


@pytest.fixture(scope="module")
def per_head_bias():
    return _export(_gqa("interleave", head_bias=True), torch.randn(2, 5, 64), "torchscript", "x", "y")


def test_a_requested_pruning_that_removes_nothing_warns_why(per_head_bias, lm):
    (warning,) = _logged(per_head_bias, "prune-heads{ratio=0.5}")
    assert warning.startswith("warning: prune-heads{") and "removed no head: layer 0 (" in warning
    assert "differs per head" in warning
    (warning,) = _logged(lm["torchscript"], "prune-heads{ratio=0.2}")
    assert "layer 0 (ratio 0.2 of its 4 heads rounds down to none)" in warning
    assert _logged(lm["torchscript"], "prune-heads{ratio=0}") == []  # nothing asked, nothing to say


def test_strict_makes_it_an_error_naming_the_reason(per_head_bias):
    with pytest.raises(UserError, match="pass 'prune-heads': removed no head: layer 0 .*differs per head"):
        _run(per_head_bias, "prune-heads{ratio=0.5,strict=true}")
    no_softmax = parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, 4] x) => (float[B, 4] y) { y = Relu(x) }
    """)
    with pytest.raises(UserError, match="no attention block found \\(the model has no Softmax\\)"):
        _run(no_softmax, "prune-heads{strict=true}")


# ----------------------------------------------------------------------------------------------
# Recovery: the output projection refit on calibration data


def test_recover_refits_the_output_projection_closer_on_held_out_inputs():
    """Inputs of rank 8 in 64 dims, as real activations are correlated: the kept heads then carry
    part of what the removed ones did, and the refit puts it back."""
    model = _export(_fused("split"), torch.randn(2, 5, 64), "torchscript", "x", "y")
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((8, 64)).astype(np.float32)

    def draw(batch):
        return {"x": rng.standard_normal((batch, 12, 8)).astype(np.float32) @ mix}

    ctx, held_out = PassContext(calibration=draw(32)), draw(8)
    reference = run_ort(model, held_out, optimize=False)["y"]
    errors = {}
    for recover in ("false", "true"):
        pruned, stats, _ = _run(model, f"prune-heads{{ratio=0.5,recover={recover}}}", ctx)
        y = run_ort(pruned, held_out, optimize=False)["y"]
        errors[recover] = np.linalg.norm(y - reference) / np.linalg.norm(reference)
    assert errors["true"] < 0.95 * errors["false"]
    assert stats["recover"]["error_after"] < stats["recover"]["error_before"]
    assert stats["blocks"]["0"]["output_error"]["after_refit"] == pytest.approx(
        stats["recover"]["error_after"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Must not fire, and option errors


def test_no_attention_no_blocks():
    model = parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, 16] x) => (float[B, 4] y)
        <float[16, 4] w = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6,
                           0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6,
                           0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6,
                           0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6}>
        { h = MatMul(x, w)
          y = Softmax<axis = -1>(h) }
    """)
    result = run_pass(PruneHeads(), ir.from_proto(model), PassContext())
    assert not result.changed and result.stats["blocks_found"] == 0
    assert "not a MatMul of two computed tensors" in result.stats["not_attention"][0]


def test_a_block_whose_keys_leave_the_graph_is_left_alone(lm):
    """A K that is also a graph output (a KV cache) would change the model's interface."""
    model = onnx.ModelProto()
    model.CopyFrom(lm["torchscript"])
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("/blocks.1/Transpose_2_output_0"))
    _, stats, _ = _run(model, "prune-heads{ratio=0.25}")
    assert stats["blocks_pruned"] == 1 and stats["blocks_skipped"] == 1
    assert "graph output" in stats["skipped"][0] and stats["skipped"][0].startswith("layer 1")


@pytest.mark.parametrize("text", ["x:y", "0-1", "0:1;;1:2"])
def test_bad_heads_text_names_the_option(text):
    with pytest.raises(UserError, match="option 'heads'"):
        parse_pipeline(f"prune-heads{{heads={text}}}")


@pytest.mark.parametrize("heads,fragment", [("0:4", "head 4 is out of range"),
                                            ("2:0", "layer 2 does not exist"),
                                            ("0:0;0:1;0:2;0:3", "every head")])
def test_heads_outside_the_model_name_the_option(lm, heads, fragment):
    with pytest.raises(UserError, match=f"option 'heads'.*{fragment}"):
        run_pass(PruneHeads(heads=heads), ir.from_proto(lm["torchscript"]), PassContext())


def test_pipeline_text_round_trips():
    text = "prune-heads{ratio=0.5,heads=0:1;1:3,importance=calibration,strict=true,recover=true}"
    assert str(parse_pipeline(text)) == text


# ----------------------------------------------------------------------------------------------
# The pruned example LM compiles, verifies and is smaller


def test_pruned_lm_compiles_runs_and_is_smaller(example_path, tmp_path):
    path = example_path("tiny-lm")
    full = edgecc.compile(path, "host", tmp_path / "full", "simplify,fuse")
    pruned = edgecc.compile(path, "host", tmp_path / "p", "simplify,fuse,prune-heads{ratio=0.25}")
    verification = pruned.manifest["verification"]
    assert verification["ok"] and verification["reference"] == "onnxruntime (optimized model)"
    assert verification["relative_error_vs_fp32"] <= 1.0
    assert full.manifest["verification"]["ok"]
    assert pruned.model_bytes < full.model_bytes


# ----------------------------------------------------------------------------------------------
# Llama: rotary embeddings, a KV cache, query heads viewed as [b, kv, group, t, d]


def _llama(removed: dict[int, list[int]] | None = None) -> onnx.ModelProto:
    """The tiny-llama example (same seed, same weights; TorchScript), heads masked if asked."""
    cfg = llama.LlamaConfig(**TINY_LLAMA)
    model = llama.build(cfg, seed=0)
    for layer, heads in (removed or {}).items():
        _mask_heads(model.layers[layer].o_proj, cfg.heads, heads)
    with tempfile.TemporaryDirectory() as d:
        return onnx.load(str(llama.export(model, cfg, Path(d) / "model.onnx")))


@pytest.fixture(scope="module")
def tiny_llama():
    return _llama()


def _llama_feeds(past_kv_heads: dict[int, list[int]], seed: int = 5) -> dict[str, np.ndarray]:
    """A prompt of 4 tokens after 3 cached ones (batch 2), each layer's cache holding the K/V
    heads `past_kv_heads` names (the same random entries whichever are kept)."""
    rng = np.random.default_rng(seed)
    b, t, past, kv, dh = 2, 4, 3, TINY_LLAMA["kv_heads"], TINY_LLAMA["hidden"] // TINY_LLAMA["heads"]
    feeds = {"ids": rng.integers(0, TINY_LLAMA["vocab"], (b, t)), "attention_mask": np.ones((b, past + t), np.int64),
             "position_ids": np.tile(np.arange(past, past + t), (b, 1))}
    for i, keep in past_kv_heads.items():
        for kind in ("key", "value"):
            feeds[f"past.{i}.{kind}"] = rng.standard_normal((b, kv, past, dh)).astype(np.float32)[:, keep]
    return feeds


@pytest.mark.parametrize("prefix", ["", "simplify,group-kv-heads,fuse,fuse-siblings,"],
                         ids=["raw", "compile-pipeline"])
def test_llama_with_rope_and_kv_cache_prunes_exactly(tiny_llama, prefix):
    """The pruned model given the cache without the pruned heads' entries returns the masked model's
    logits and its present cache without them."""
    pruned, stats, changed = _run(tiny_llama, prefix + "prune-heads{ratio=0.5}")
    assert changed and stats["skipped"] == [] and stats["blocks_pruned"] == 2
    kv, layers = TINY_LLAMA["kv_heads"], TINY_LLAMA["layers"]
    kept = {int(i): [h for h in range(kv) if h not in b["removed_kv_heads"]] for i, b in stats["blocks"].items()}
    assert all(len(k) == 1 for k in kept.values())
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*pruned.graph.input, *pruned.graph.output]}
    assert shapes["past.0.key"] == ["batch", 1, "past", 32] and shapes["present.1.value"] == ["batch", 1, "past + seq", 32]
    sig = lm_signature.find(pruned)
    assert sig is not None and [e.shape[1] for e in sig.cache] == [1] * 2 * layers

    reference = run_ort(_llama(_removed(stats)), _llama_feeds({i: list(range(kv)) for i in range(layers)}),
                        optimize=False)
    got = run_ort(pruned, _llama_feeds(kept), optimize=False)
    np.testing.assert_allclose(got["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    for i in range(layers):
        for kind in ("key", "value"):
            name = f"present.{i}.{kind}"
            np.testing.assert_allclose(got[name], reference[name][:, kept[i]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["", "simplify,group-kv-heads,fuse,fuse-siblings,"],
                         ids=["raw", "compile-pipeline"])
def test_llama_unit_query_keeps_the_cache_of_a_group_that_keeps_a_head(tiny_llama, prefix):
    """Llama's [b, kv, group, t, d] view: layer 0 loses one query head of each group, layer 1 both
    heads of K/V head 1. The cache keeps layer 0's K/V heads and loses layer 1's head 1; the
    logits are the masked model's."""
    pruned, stats, changed = _run(tiny_llama, prefix + 'prune-heads{unit=query,heads="0:0,0:3,1:2,1:3"}')
    assert changed and stats["skipped"] == []
    assert [stats["blocks"][i]["removed_kv_heads"] for i in "01"] == [[], [1]]
    kept = {0: [0, 1], 1: [0]}
    sig = lm_signature.find(pruned)
    assert [e.shape[1] for e in sig.cache] == [2, 2, 1, 1]
    kv = list(range(TINY_LLAMA["kv_heads"]))
    reference = run_ort(_llama({0: [0, 3], 1: [2, 3]}), _llama_feeds({0: kv, 1: kv}), optimize=False)
    got = run_ort(pruned, _llama_feeds(kept), optimize=False)
    np.testing.assert_allclose(got["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    for i, heads in kept.items():
        for kind in ("key", "value"):
            name = f"present.{i}.{kind}"
            np.testing.assert_allclose(got[name], reference[name][:, heads], rtol=1e-5, atol=1e-5)


def test_unit_query_ratio_counts_query_heads_across_blocks(tiny_llama):
    """scope=model with calibration importance removes floor(ratio x 8) query heads, never all of
    a block's, each the least costly given what its block lost already; the result is exact."""
    ctx = PassContext(seed=3)
    pruned, stats, changed = _run(tiny_llama, "prune-heads{unit=query,ratio=0.5,scope=model,importance=calibration}", ctx)
    assert changed and stats["heads_after"] == 4
    removed = _removed(stats)
    assert all(len(heads) < TINY_LLAMA["heads"] for heads in removed.values())
    kept = {i: [h for h in range(TINY_LLAMA["kv_heads"]) if h not in stats["blocks"][str(i)]["removed_kv_heads"]]
            for i in range(TINY_LLAMA["layers"])}
    reference = run_ort(_llama(removed), _llama_feeds({i: list(range(2)) for i in range(2)}), optimize=False)
    got = run_ort(pruned, _llama_feeds(kept), optimize=False)
    np.testing.assert_allclose(got["logits"], reference["logits"], rtol=1e-5, atol=1e-5)


def test_scope_model_ranks_groups_across_blocks(tiny_llama):
    """Two blocks of 2 K/V heads: per layer, ratio 0.25 rounds to nothing; model-wide it removes
    the one group of least weight norm among all 4, and ratio 0.75 removes 3 of 4 only if no block
    loses all (it removes 2)."""
    _, stats, changed = _run(tiny_llama, "prune-heads{ratio=0.25}")
    assert not changed
    _, stats, changed = _run(tiny_llama, "prune-heads{ratio=0.25,scope=model}")
    scores = {(int(i), int(u)): s for i, b in stats["blocks"].items() for u, s in b["importance"].items()}
    removed = [(int(i), u) for i, b in stats["blocks"].items() for u in b["removed_kv_heads"]]
    assert changed and removed == [min(scores, key=scores.get)]
    _, stats, _ = _run(tiny_llama, "prune-heads{ratio=0.75,scope=model}")
    assert [b["kv_heads_after"] for b in stats["blocks"].values()] == [1, 1]


class PerHeadRope(nn.Module):
    """Q/K rotated with x * cos + rotate_half(x) * sin, where cos may differ per head (a learned
    table [h, t, d]): heads then are not interchangeable with zeros, and pruning must not fire."""

    def __init__(self, per_head: bool, d: int = 64, heads: int = 4, t: int = 5):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.cos = nn.Parameter(torch.randn(heads if per_head else 1, t, self.dh))
        self.sin = nn.Parameter(torch.randn(1, t, self.dh))

    def forward(self, x):
        b, t, d = x.shape
        half = self.dh // 2

        def rope(z):
            rotated = torch.cat((-z[..., half:], z[..., :half]), dim=-1)
            return z * self.cos + rotated * self.sin

        q, k, v = (p(x).view(b, t, self.h, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = (rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("per_head", [False, True], ids=["shared-table", "per-head-table"])
def test_rotary_tables_must_be_the_same_for_every_head(per_head):
    def rope(removed=()):
        torch.manual_seed(3)
        model = PerHeadRope(per_head).eval()
        if removed:
            _mask_heads(model.o, model.h, removed)
        return _export(model, torch.zeros(2, 5, 64), "torchscript", "x", "y")

    pruned, stats, changed = _run(rope(), "prune-heads{ratio=0.5}")
    if per_head:
        assert not changed and "differs per head" in stats["skipped"][0]
        return
    assert changed and stats["skipped"] == []
    feeds = {"x": np.random.default_rng(6).standard_normal((2, 5, 64)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(pruned, feeds, optimize=False)["y"],
                               run_ort(rope(stats["blocks"]["0"]["removed_heads"]), feeds, optimize=False)["y"],
                               rtol=1e-5, atol=1e-5)


def test_pruned_llama_compiles_and_generates_as_the_pruned_model(tiny_llama, tmp_path):
    """The artifact records the cache it takes (one K/V head a layer), passes verification (the
    source's cache given at the heads kept, its present outputs compared at them) and generates
    what ONNX Runtime generates with the pruned model."""
    path = tmp_path / "tiny-llama.onnx"
    onnx.save(tiny_llama, str(path))
    # One K/V group of layer 0: half of every head of both layers would move a random-weight
    # model's logits past prune-heads' drift bound, which verification holds it to.
    art = edgecc.compile(path, "host", tmp_path / "p", 'simplify,fuse,prune-heads{heads="0:0"}', keep_reference=True)
    assert art.manifest["verification"]["ok"]
    assert art.manifest["verification"]["input_shapes"]["past.0.key"][1] == 1
    sig = lm_signature.of_manifest(art.manifest, str(art.path))
    assert [e.shape[1] for e in sig.cache] == [1, 1] + [2] * 2 * (TINY_LLAMA["layers"] - 1)
    prompt = [72, 101, 108, 108, 111]
    want = generate.greedy(generate.ort_step(str(art.path / REFERENCE_MODEL)), sig, prompt, 6).tokens
    art.load_vm(1)
    assert generate.greedy(art.run, sig, prompt, 6).tokens == want

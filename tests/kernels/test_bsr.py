"""Block-sparse (BSR) matmul: pruning, storage, the compiled kernel on host and cross builds."""

import math

import numpy as np
import pytest
import tvm
from edgecc.kernels.bsr import (
    bsr_matmul_reference,
    build_dense_module,
    build_module,
    choose_kernel,
    from_bsr,
    magnitude_block_prune,
    to_bsr,
)
from tvm import relax
from tvm.support import cc
from tvm.support import nvcc as tvm_nvcc

from edgecc.core.target import load_target
from edgecc.errors import UserError
from tests.kernels.targets import (
    CROSS_CC,
    EM_AARCH64,
    HOST,
    JETSON,
    RPI4,
    e_machine,
    needs_cross_cc,
    needs_nvcc,
)

K, N = 256, 128


def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)


def _block_norms(w: np.ndarray, R: int, C: int) -> np.ndarray:
    return np.sqrt(np.square(w.reshape(K // R, R, N // C, C)).sum(axis=(1, 3)))


def _run(ex, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _assert_close_to_exact(y: np.ndarray, x: np.ndarray, w: np.ndarray):
    """fp32 sums of K products in a different order than float64: each output is within
    1e-5 of the sum of the absolute terms (about 3*sqrt(K) roundings of 6e-8 for K=256, the
    worst case being K of them). Scaling by |x| @ |w| rather than |y| keeps outputs that
    cancel to near zero from failing for no reason."""
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)) + 1e-30
    assert np.all(np.abs(y - exact) <= bound), np.max(np.abs(y - exact) / bound)


@pytest.mark.parametrize("block", [(4, 4), (8, 1), (1, 16), (16, 16)])
@pytest.mark.parametrize("sparsity", [0.0, 0.29, 0.5, 0.9, 0.99, 1.0])
def test_prune_zeroes_exactly_the_smallest_blocks(block, sparsity):
    w = _weights()
    R, C = block
    pruned = magnitude_block_prune(w, block, sparsity)
    norms, kept = _block_norms(w, R, C), _block_norms(pruned, R, C) > 0
    assert (~kept).sum() == math.floor(round(sparsity * norms.size, 9))  # 0.29 * 128 -> 37
    if kept.any() and (~kept).any():
        assert norms[~kept].max() <= norms[kept].min()
    # Whole blocks go; the others are untouched.
    mask = np.repeat(np.repeat(kept, R, axis=0), C, axis=1)
    np.testing.assert_array_equal(pruned, np.where(mask, w, 0))


def test_prune_counts_blocks_that_are_already_zero():
    w = _weights()
    w[:16, :16] = 0
    pruned = magnitude_block_prune(w, (16, 16), 0.125)  # 16 of 128 blocks: the zero one and 15 more
    assert (_block_norms(pruned, 16, 16) == 0).sum() == 16
    assert not pruned[:16, :16].any()


@pytest.mark.parametrize("block", [(3, 4), (4, 3), (512, 1), (0, 4)])
def test_block_must_divide_the_weight(block):
    R, C = block
    with pytest.raises(UserError, match=rf"block {R}x{C} does not divide the weight shape {K}x{N}"):
        magnitude_block_prune(_weights(), block, 0.5)
    with pytest.raises(UserError, match="does not divide"):
        to_bsr(_weights(), block)


def test_sparsity_out_of_range():
    with pytest.raises(UserError, match="sparsity must be in"):
        magnitude_block_prune(_weights(), (4, 4), 1.5)


@pytest.mark.parametrize("block", [(4, 4), (8, 1), (1, 16), (16, 16)])
def test_bsr_round_trip_is_exact(block):
    R, C = block
    w = magnitude_block_prune(_weights(), block, 0.7)
    w[:, :C] = 0  # an empty block column
    data, indices, indptr = to_bsr(w, block)
    nnz = int((_block_norms(w, R, C) > 0).sum())
    assert data.shape == (nnz, R, C) and data.dtype == np.float32
    assert indices.dtype == indptr.dtype == np.int32 and indptr.shape == (N // C + 1,)
    assert indptr[0] == indptr[1] == 0 and indptr[-1] == nnz
    for j in range(N // C):
        col = indices[indptr[j]:indptr[j + 1]]
        assert np.all(np.diff(col) > 0)  # ascending block rows: same summation order as dense
    np.testing.assert_array_equal(from_bsr(data, indices, indptr, w.shape), w)
    x = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    _assert_close_to_exact(bsr_matmul_reference(x, data, indices, indptr, w.shape), x, w)


# 1x1 blocks are left out: they are CSR with a scalar loop, which the cost model never picks.
@pytest.fixture(scope="module", params=[((4, 4), 0.5), ((4, 4), 0.9), ((8, 1), 0.5), ((8, 1), 0.9),
                                        ((16, 16), 0.5), ((16, 16), 0.9)], ids=str)
def compiled(request):
    """(block, pruned weight, executable with symbolic M) built once per block and sparsity."""
    block, sparsity = request.param
    w = magnitude_block_prune(_weights(), block, sparsity)
    return block, w, build_module("m", w, block, HOST)


@pytest.mark.parametrize("M", [1, 16])
def test_kernel_matches_numpy(compiled, M):
    _, w, ex = compiled
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    _assert_close_to_exact(_run(ex, x), x, w)


def test_kernel_equals_the_dense_model_with_the_same_blocks_zeroed(compiled):
    """Bit for bit: both kernels add each output's products in ascending k with the same FMA,
    and a zeroed weight only adds an exact 0 on the dense side."""
    _, w, ex = compiled
    x = np.random.default_rng(2).standard_normal((16, K)).astype(np.float32)
    y = _run(ex, x)
    for packed in (True, False):
        np.testing.assert_array_equal(y, _run(build_dense_module("m", w, HOST, packed=packed), x))


def test_empty_block_columns_give_zeros():
    """A column with no stored blocks must be written as 0, not left as whatever the
    allocator returned (TE's data-dependent reduction does the latter)."""
    w = magnitude_block_prune(_weights(), (16, 16), 0.9)
    w[:, :64] = 0
    ex = build_module("m", w, (16, 16), HOST)
    rng = np.random.default_rng(3)
    for M in (7, 7, 33):
        y = _run(ex, rng.standard_normal((M, K)).astype(np.float32))
        assert not y[:, :64].any()


def test_leading_dims_are_kept():
    w = magnitude_block_prune(_weights(), (1, 16), 0.5)
    ex = build_module((2, "seq", K), w, (1, 16), HOST)
    x = np.random.default_rng(4).standard_normal((2, 5, K)).astype(np.float32)
    y = _run(ex, x)
    assert y.shape == (2, 5, N)
    _assert_close_to_exact(y.reshape(10, N), x.reshape(10, K), w)


def test_library_holds_only_the_nonzero_blocks(tmp_path):
    """Two sparsities of one weight: the libraries differ by exactly the dropped blocks and
    their indices (4 + R*C*4 bytes each, up to section alignment), and hold the BSR bytes."""
    size, nnz = {}, {}
    w = np.random.default_rng(5).standard_normal((1024, 1024)).astype(np.float32)
    for s in (0.5, 0.9):
        pruned = magnitude_block_prune(w, (8, 8), s)
        arrays = to_bsr(pruned, (8, 8))
        lib = tmp_path / f"bsr{s}.so"
        build_module(1, pruned, (8, 8), HOST).export_library(str(lib))
        size[s], nnz[s] = lib.stat().st_size, len(arrays[1])
        blob = lib.read_bytes()
        assert all(a.tobytes() in blob for a in arrays)
    assert abs(size[0.5] - size[0.9] - (nnz[0.5] - nnz[0.9]) * (4 + 8 * 8 * 4)) <= 4096
    assert size[0.9] < 0.1 * w.nbytes + 128 * 1024  # 0.4 MB of blocks, a little code: not the 4 MB W


@needs_cross_cc
def test_cross_compiles_for_rpi4(tmp_path):
    w = magnitude_block_prune(_weights(), (1, 16), 0.9)
    lib = tmp_path / "bsr_a72.so"
    build_module("m", w, (1, 16), RPI4).export_library(str(lib), fcompile=cc.cross_compiler(CROSS_CC))
    assert e_machine(lib) == EM_AARCH64


@needs_nvcc
def test_builds_for_jetson():
    """Build only (no GPU here): the kernel is scheduled for CUDA and its source compiles for sm_87."""
    w = magnitude_block_prune(_weights(), (16, 16), 0.9)
    ex = build_module("m", w, (16, 16), JETSON)

    def modules(m):
        yield m
        for i in m.imports:
            yield from modules(i)

    sources = [m.inspect_source("") for m in modules(ex.mod) if m.kind == "cuda"]
    assert len(sources) == 1 and "bsr_matmul_kernel" in sources[0]
    with JETSON:
        assert len(tvm_nvcc.compile_cuda(sources[0], "cubin", compiler="nvcc")) > 0


@pytest.mark.parametrize("block, sparsity, kind", [
    ((16, 16), 0.3, "dense"), ((16, 16), 0.5, "bsr"), ((1, 16), 0.9, "bsr"),
    ((8, 8), 0.5, "dense"), ((8, 8), 0.9, "bsr"), ((1, 32), 0.3, "bsr"),
    ((4, 4), 0.7, "dense"), ((16, 1), 0.95, "dense"),
])
def test_choose_kernel_follows_the_measured_crossovers(block, sparsity, kind):
    """benchmarks/bsr_vs_dense.py on this host, 32 rows of x: 1x16 and 16x16 cross over at
    0.34-0.36, 8x8 at 0.65, 4x4 at 0.77, 1x32 at 0.09; 16x1 still loses at 0.95."""
    chosen, reason = choose_kernel(2048, 2048, block, sparsity, gpu=False)
    assert chosen == kind, reason


def test_choose_kernel_on_gpu_and_bad_input():
    assert load_target("jetson-orin-nano").is_gpu and not load_target("rpi4").is_gpu
    assert choose_kernel(2048, 2048, (16, 16), 0.9, gpu=True)[0] == "dense"
    assert choose_kernel(2048, 2048, (16, 16), 0.95, gpu=True)[0] == "bsr"
    with pytest.raises(UserError, match="does not divide"):
        choose_kernel(100, 2048, (16, 16), 0.9, gpu=False)

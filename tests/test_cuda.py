"""Ahead-of-time CUDA builds for a Jetson Orin Nano (sm_87, aarch64 host) without a GPU; one test,
marked gpu, runs an artifact on this machine's own GPU."""

import os
import platform
import shutil
import struct

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm.relax.frontend.onnx import from_onnx
from tvm.runtime.vm import VirtualMachine

import edgecc
from edgecc.backends.tvm_cuda import build_cuda, embedded_device_code
from edgecc.core.verify import compare, random_inputs, run_ort
from edgecc.errors import UserError

CROSS_CC = "aarch64-linux-gnu-gcc"
EM_AARCH64 = 183

needs_toolchain = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which(CROSS_CC) is None,
    reason=f"needs nvcc (CUDA toolkit) and {CROSS_CC} (apt-get install gcc-aarch64-linux-gnu)",
)


def _target(arch: str = "sm_87") -> tvm.target.Target:
    return tvm.target.Target(
        {"kind": "cuda", "arch": arch},
        host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"},
    )


def _tiny_model() -> onnx.ModelProto:
    """MatMul + Add + Relu, then LayerNorm: a GEMM kernel and reduction kernels."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype("float32"), "W"),
        numpy_helper.from_array(rng.standard_normal(32).astype("float32"), "b"),
        numpy_helper.from_array(np.ones(32, "float32"), "gamma"),
        numpy_helper.from_array(np.zeros(32, "float32"), "beta"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["biased"]),
        helper.make_node("Relu", ["biased"], ["act"]),
        helper.make_node("LayerNormalization", ["act", "gamma", "beta"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def relax_mod():
    return from_onnx(_tiny_model(), keep_params_in_input=False)


@pytest.fixture(scope="module")
def built(relax_mod, tmp_path_factory):
    lib = str(tmp_path_factory.mktemp("cuda") / "tiny_sm87.so")
    facts = build_cuda(relax_mod, _target(), lib, CROSS_CC)
    return lib, facts


def _e_machine(path: str) -> int:
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF"
    return struct.unpack_from("<H", header, 18)[0]


@needs_toolchain
def test_library_embeds_sm87_cubin(built):
    lib, facts = built
    assert _e_machine(lib) == EM_AARCH64
    assert facts["device_code"] == "cubin" and facts["arch"] == "sm_87"
    assert facts["kernels"] > 0
    assert facts["nvcc"].startswith("Cuda compilation tools")

    images = embedded_device_code(lib)
    cubins = [i for i in images if i["kind"] == "cubin"]
    assert cubins and all(c["arch"] == "sm_87" for c in cubins)
    assert sum(c["bytes"] for c in cubins) == facts["cubin_bytes"]
    # The device gets machine code only: no CUDA C source for it to JIT.
    assert not [i for i in images if i["kind"] == "cuda_source"]


@needs_toolchain
def test_build_leaves_no_global_state(built):
    assert "TVM_COMPILE_FORCE_FALLBACK" not in os.environ


@needs_toolchain
def test_plain_tvm_compile_holds_source_only(relax_mod, tmp_path):
    """Without build_cuda, TVM 0.27 ships CUDA source: the checker must tell the difference."""
    from tvm import relax
    from tvm.s_tir import dlight as dl
    from tvm.support import cc

    tgt = _target()
    with tgt:
        mod = relax.get_pipeline("zero")(relax_mod)
        mod = dl.ApplyDefaultSchedule(dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    lib = str(tmp_path / "plain.so")
    tvm.compile(mod, target=tgt).export_library(lib, fcompile=cc.cross_compiler(CROSS_CC))

    images = embedded_device_code(lib)
    assert [i["kind"] for i in images] == ["cuda_source"]
    assert images[0]["kernels"] > 0


def test_missing_nvcc_is_a_user_error(relax_mod, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match="nvcc not found.*CUDA toolkit"):
        build_cuda(relax_mod, _target(), str(tmp_path / "x.so"), CROSS_CC)


@needs_toolchain
def test_missing_cross_compiler_is_a_user_error(relax_mod, tmp_path):
    with pytest.raises(UserError, match="apt-get install gcc-aarch64-linux-gnu"):
        build_cuda(relax_mod, _target(), str(tmp_path / "x.so"), "no-such-aarch64-gcc")


@needs_toolchain
def test_arch_unsupported_by_nvcc_is_a_user_error(relax_mod, tmp_path):
    # Fermi (sm_20) left the CUDA toolkit in 9.0; CUDA 13 also dropped sm_53 (Jetson Nano).
    with pytest.raises(UserError, match="cannot build sm_20"):
        build_cuda(relax_mod, _target("sm_20"), str(tmp_path / "x.so"), CROSS_CC)


# Needs a CUDA GPU, nvcc and a TVM whose runtime loads CUDA modules; skips where any is missing.
# The default run deselects it; on such a machine:
#   .venv/bin/python -m pytest -q -m gpu tests/test_cuda.py
@pytest.mark.gpu
def test_artifact_for_this_gpu_runs_on_it_and_matches_onnxruntime(tmp_path):
    """The Jetson's target description with this GPU's own arch and limits, and host code for this
    CPU: the artifact's embedded cubin is for that arch, loads without a compiler and runs on the
    device, and its outputs match ONNX Runtime's."""
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA device here (or this TVM's runtime has no CUDA support)")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: CUDA artifacts embed a cubin it builds")
    arch = "sm_" + dev.compute_version.replace(".", "")
    target = tmp_path / "this-gpu.toml"
    target.write_text(f"""
name = "this-gpu"
description = "This machine's CUDA GPU ({arch}), host code for its {platform.machine()} CPU"
default_pipeline = "simplify,group-kv-heads,fuse,fuse-siblings"

[tvm]
kind = "cuda"
arch = "{arch}"
max_num_threads = {dev.max_threads_per_block}
max_threads_per_block = {dev.max_threads_per_block}
max_shared_memory_per_block = {dev.max_shared_memory_per_block}
thread_warp_size = {dev.warp_size}

[tvm.host]
kind = "llvm"
mtriple = "{platform.machine()}-linux-gnu"

[toolchain]
cc = "g++"
nvcc = "nvcc"
""")
    model = _tiny_model()
    onnx.save(model, tmp_path / "tiny.onnx")
    # edgecc verifies only artifacts that run on a CPU; this test runs the module itself.
    art = edgecc.compile(tmp_path / "tiny.onnx", str(target), tmp_path / "art", verify=False)
    lib = str(art.path / art.manifest["build"]["library"])
    assert art.manifest["build"]["device_code"] == "cubin"
    images = embedded_device_code(lib)  # machine code for this GPU only, no source to JIT
    assert images and all(i["kind"] == "cubin" and i["arch"] == arch for i in images)

    vm = VirtualMachine(tvm.runtime.load_module(lib), dev)
    feeds = random_inputs(model, seed=0)
    got = vm["main"](*[tvm.runtime.tensor(feeds[i.name], device=dev) for i in model.graph.input])
    result = compare(run_ort(model, feeds), {"y": got.numpy()}, across_engines=True)
    assert result.ok, result.detail

"""Run an edgecc artifact once, on aarch64 Python under qemu-user (see edgecc.runtime.emulator).

usage: emu_runner.py ARTIFACT_DIR IN.npz OUT.npz THREADS

Self-contained on purpose: the emulated environment has only the TVM runtime and numpy,
so this must not import edgecc, onnx or torch.
"""

import json
import os
import sys
from pathlib import Path


def _flatten(value, tensor_type):
    if isinstance(value, tensor_type):
        yield value
    else:
        for v in value:
            yield from _flatten(v, tensor_type)


def main(artifact: str, inp: str, out: str, threads: str) -> None:
    os.environ["TVM_NUM_THREADS"] = threads  # read when TVM's thread pool starts
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    build = manifest["build"]
    lib = tvm.runtime.load_module(str(Path(artifact) / build["library"]))
    vm = VirtualMachine(lib, tvm.cpu())
    with np.load(inp) as feeds:
        args = [tvm.runtime.tensor(feeds[spec["name"]]) for spec in manifest["inputs"]]
    if "weights" in build:  # the module's weights, stored beside it (edgecc.runtime.weights)
        data = np.fromfile(Path(artifact) / build["weights"]["file"], dtype=np.uint8)
        for t in build["weights"]["tensors"]:
            view = data[t["offset"]:t["offset"] + t["bytes"]].view(t["dtype"]).reshape(t["shape"])
            args.append(tvm.runtime.tensor(view))
    shapes = build.get("decode", {}).get("shapes")  # edgecc.runtime.artifact.entry
    step = shapes and all(tuple(args[[s["name"] for s in manifest["inputs"]].index(name)].shape) == tuple(shape)
                          for name, shape in shapes.items())
    values = list(_flatten(vm["decode" if step else "main"](*args), tvm.runtime.Tensor))
    names = [spec["name"] for spec in manifest["outputs"]]
    if len(values) != len(names):
        sys.exit(f"module returned {len(values)} outputs, manifest lists {len(names)}")
    np.savez(out, **{n: v.numpy() for n, v in zip(names, values)})


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2])
    main(*sys.argv[1:])

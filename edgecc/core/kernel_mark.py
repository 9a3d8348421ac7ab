"""Which edgecc kernel computes a node: chosen by a pass, read by the lowering and verification.

A pass writes a `KernelMark` on the node; it travels in the node's metadata_props, so it is saved
with model.opt.onnx, under keys only this module knows. Reading validates the mark: a malformed
one (a hand-edited file, a pass writing nonsense) is an error naming the node, not a KeyError deep
in the lowering.
"""

from __future__ import annotations

import dataclasses
import re

import onnx
import onnx_ir as ir

from edgecc.errors import UserError

KERNEL_KEY = "edgecc.kernel"
PARAM_KEYS = {"tile": "edgecc.tile", "isa": "edgecc.isa", "block": "edgecc.block"}
# The parameters each kernel takes; every one is required.
KERNELS = {"int8": ("tile",), "int8_dot": ("tile", "isa"), "int8_columns": ("tile",), "int4_dot": ("isa",),
           "bsr": ("block",)}
_BLOCK = re.compile(r"^(\d+)x(\d+)$")


def parse_block(text: str) -> tuple[int, int]:
    """"RxC" -> (R, C), both positive; ValueError otherwise."""
    m = _BLOCK.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"block '{text}' is not RxC with R, C >= 1")
    return int(m.group(1)), int(m.group(2))


@dataclasses.dataclass(frozen=True)
class KernelMark:
    kernel: str  # one of KERNELS
    tile: int | None = None  # int8, int8_dot, int8_columns: output columns per pre-transposed weight panel
    isa: str | None = None  # int8_dot, int4_dot: the int8 dot-product instruction set
    block: tuple[int, int] | None = None  # bsr: rows (along K) x columns (along N) of a block

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel '{self.kernel}' (known: {', '.join(KERNELS)})")
        for name in PARAM_KEYS:
            given = getattr(self, name) is not None
            if given != (name in KERNELS[self.kernel]):
                raise ValueError(f"kernel '{self.kernel}' {'takes no' if given else 'needs a'} {name}")
        if self.tile is not None and self.tile < 1:
            raise ValueError(f"tile {self.tile} is not positive")
        if self.isa is not None and not self.isa:
            raise ValueError("empty isa")
        if self.block is not None and (len(self.block) != 2 or min(self.block) < 1):
            raise ValueError(f"block {self.block} is not two positive sizes")

    def write(self, node: ir.Node) -> None:
        """Mark `node`, replacing any mark it had."""
        for key in PARAM_KEYS.values():
            node.metadata_props.pop(key, None)
        node.metadata_props[KERNEL_KEY] = self.kernel
        for name in KERNELS[self.kernel]:
            node.metadata_props[PARAM_KEYS[name]] = _format(getattr(self, name))

    @classmethod
    def read(cls, node: ir.Node | onnx.NodeProto) -> KernelMark | None:
        """The node's mark, None if it has none; UserError naming the node if it is malformed."""
        if isinstance(node, onnx.NodeProto):
            props = {p.key: p.value for p in node.metadata_props}
            name = node.name or node.output[0]
        else:
            props, name = node.metadata_props, node.name or node.outputs[0].name
        kernel = props.get(KERNEL_KEY)
        if kernel is None:
            return None
        try:
            params = {}
            for param in KERNELS.get(kernel, ()):
                if PARAM_KEYS[param] not in props:
                    raise ValueError(f"no {PARAM_KEYS[param]}")
                params[param] = _parse(param, props[PARAM_KEYS[param]])
            return cls(kernel, **params)
        except ValueError as e:
            mark = ", ".join(f"{k}={v}" for k, v in props.items() if k in (KERNEL_KEY, *PARAM_KEYS.values()))
            raise UserError(f"node '{name}': malformed kernel mark ({mark}): {e}") from None


def _format(value) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, tuple) else str(value)


def _parse(param: str, text: str):
    if param == "tile":
        if not text.isdigit():
            raise ValueError(f"tile '{text}' is not a number")
        return int(text)
    if param == "block":
        return parse_block(text)
    return text

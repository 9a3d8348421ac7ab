"""The `[edgetpu]` table of a target file: supported TFLite ops, their limits, verification bounds.

Checked when the target is loaded, so a malformed table fails with the file and the key, not in
the middle of a compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgecc.errors import UserError

# Every key is required, so a table states everything a prediction depends on.
_KEYS: dict[str, type | tuple] = {
    "compiler_version": str,  # the edgetpu_compiler release the table describes
    "max_inner_dims": int,  # only this many innermost dims of a tensor may be > 1
    "ops": dict,  # TFLite builtin op -> highest op version mapped
    "limits": dict,  # per-op limitations, below
    "verify": dict,  # bounds of the int8 model against fp32
}
_LIMIT_KEYS: dict[str, type | tuple] = {
    "no_fused_activation": list,  # ops that must not carry a fused activation
    "fully_connected_max_output_dims": int,  # FULLY_CONNECTED: output dims > 1 allowed
    "mean_channel_multiple": int,  # MEAN over the innermost (z) dim: its size a multiple of this
    "softmax_max_elements": int,  # SOFTMAX: input elements
    "softmax_max_dims": int,  # SOFTMAX: input dims > 1 allowed
}
_VERIFY_KEYS: dict[str, type | tuple] = {"min_cosine": (int, float), "max_relative_rmse": (int, float)}


def check_edgetpu_table(table: dict[str, Any], path: Path) -> dict[str, Any]:
    from ai_edge_litert.schema_py_generated import BuiltinOperator

    def check(tab: dict, known: dict, where: str) -> None:
        for key in tab:
            if key not in known:
                raise UserError(f"{path}: unknown key '{where}{key}' (known: {', '.join(known)})")
        for key, typ in known.items():
            if key not in tab:
                raise UserError(f"{path}: missing key '{where}{key}'")
            if not isinstance(tab[key], typ) or isinstance(tab[key], bool):
                raise UserError(f"{path}: key '{where}{key}' has the wrong type ({type(tab[key]).__name__})")

    check(table, _KEYS, "edgetpu.")
    check(table["limits"], _LIMIT_KEYS, "edgetpu.limits.")
    check(table["verify"], _VERIFY_KEYS, "edgetpu.verify.")
    for op, version in table["ops"].items():
        if not hasattr(BuiltinOperator, op):
            raise UserError(f"{path}: key 'edgetpu.ops.{op}' is not a TFLite builtin operator")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{path}: key 'edgetpu.ops.{op}' must be an op version (int >= 1)")
    for op in table["limits"]["no_fused_activation"]:
        if op not in table["ops"]:
            raise UserError(
                f"{path}: key 'edgetpu.limits.no_fused_activation' names '{op}', which is not in edgetpu.ops"
            )
    return table

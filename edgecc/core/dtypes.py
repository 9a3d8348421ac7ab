"""ml_dtypes' one-byte element types, which TVM cannot hold: a compiled module holds their codes
in uint8 (edgecc.frontend.converters.narrow_types), so artifacts and verification feed them so."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

CODED_DTYPES = {np.dtype(t) for t in (
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.float8_e8m0fnu, ml_dtypes.float4_e2m1fn, ml_dtypes.int4, ml_dtypes.uint4, ml_dtypes.int2,
    ml_dtypes.uint2)}


def stored(dtype: Any) -> np.dtype:
    """The dtype the compiled module holds `dtype` in."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint8) if dtype in CODED_DTYPES else dtype

"""Optional compiled pass (numba) for the pair sums of :func:`ilr_inspect.measure.stream.row_stats`.

One loop over the elements of the previous value a and the current value b yields, per row, ‖a‖², ‖b‖², ‖d‖²
and ⟨d,a⟩ with d = b − a, all accumulated in float64: for float32 data d is exact and each product is correct
to 2⁻⁵³. stream.py checks its derived angles against exactly this arithmetic (a sum of n float64 terms is within
n·2⁻⁵³·Σ|terms| in any order), so ordinary data passes the first time. The sums may therefore be reassociated
("reassoc", which lets LLVM vectorise the loop: ~6× faster than the strict scalar order) and products fused into
FMAs ("contract", one rounding instead of two); no other fast-math flag (NaN/inf semantics are kept).
The loop is serial on purpose: stream.py already runs one tensor per worker thread (nogil releases the GIL), and
a parallel loop inside each call (prange) measured 3× slower on 2 cores (thread-pool spin-waits and a lock
against the non-thread-safe fallback threading layer).
Importing this module raises ImportError when numba is not installed; stream.py then keeps its NumPy path.

Load time is what a short run pays: importing numba ~0.3 s, and the first call (loading the cached machine code)
~0.55 s, of which ~0.3 s is numba registering its np.linalg support, which imports scipy.linalg only to find
BLAS. The kernel needs no BLAS, so where this process is ours (the CLI, a Ray worker: ILR_INSPECT_LEAN_NUMBA=1)
scipy.linalg is hidden during that first call; numba then records "no BLAS" for this process only, which no
code of ours uses. Library callers keep numba's normal behaviour (their own jitted np.dot may need BLAS).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from numba import njit


def _pair_sums_py(b: np.ndarray, a: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    rows, cols = b.shape
    out = np.zeros((rows, 4), dtype=np.float64)
    for r in range(rows):
        aa = 0.0
        bb = 0.0
        dd = 0.0
        da = 0.0
        for j in range(cols):
            x = np.float64(a[r, j])
            y = np.float64(b[r, j])
            d = y - x
            aa += x * x
            bb += y * y
            dd += d * d
            da += d * x
        out[r, 0] = aa
        out[r, 1] = bb
        out[r, 2] = dd
        out[r, 3] = da
    return out


_FLAGS: dict[str, Any] = {"fastmath": {"reassoc", "contract"}, "nogil": True}
try:  # machine code cached in __pycache__ next to this file, else in ~/.cache/numba (NUMBA_CACHE_DIR)
    _pair_sums = njit(cache=True, **_FLAGS)(_pair_sums_py)
except RuntimeError:  # no writable cache location at all: compile once per process (~0.5 s) instead
    _pair_sums = njit(cache=False, **_FLAGS)(_pair_sums_py)


_loaded: set[Any] = set()


def warm(dtype: Any) -> None:
    """Load the machine code for one dtype (float32 or float64) now; see the module's note on load time."""
    dt = np.dtype(dtype)
    if dt in _loaded:
        return
    lean = (os.environ.get("ILR_INSPECT_LEAN_NUMBA") == "1" and "numba.np.arraymath" not in sys.modules
            and "scipy.linalg" not in sys.modules)
    if lean:
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import fails fast: numba skips BLAS
    try:
        z = np.zeros((1, 1), dtype=dt)
        _pair_sums(z, z)
    finally:
        if lean and sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]
    _loaded.add(dt)


def pair_sums(b: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(‖a‖², ‖b‖², ‖b − a‖², ⟨b − a, a⟩) per row of two C-contiguous 2-D float32/float64 arrays, in float64."""
    if b.dtype not in _loaded:
        warm(b.dtype)
    s = _pair_sums(b, a)
    return s[:, 0], s[:, 1], s[:, 2], s[:, 3]

"""Optional compiled pass (numba) for the float64 sums of :func:`ilr_inspect.measure.stream.row_stats`.

Two loops, both accumulating in float64: ``norm_sums`` (‖b‖² per row, for a checkpoint with no previous value
or a tensor whose angle nobody asked for) and ``pair_sums`` (‖b‖², ‖d‖² and ⟨d,a⟩ with d = b − a, against the
previous value a whose ‖a‖² is already known from the previous checkpoint). For float32 data d is exact and each
product is correct to 2⁻⁵³. stream.py checks its derived angles against exactly this arithmetic (a sum of n
float64 terms is within n·2⁻⁵³·Σ|terms| in any order), so ordinary data passes the first time. The sums may
therefore be reassociated ("reassoc", which lets LLVM vectorise the loop: ~6× faster than the strict scalar
order) and products fused into FMAs ("contract"); no other fast-math flag (NaN/inf semantics are kept).
The ‖b‖² of both loops is the same sum in the same vectorised order (a test checks they agree bit for bit), so a
tensor's norm does not depend on whether its angle was computed too.
The loops are serial on purpose: stream.py already runs one tensor per worker thread (nogil releases the GIL),
and a parallel loop inside each call (prange) measured 3× slower on 2 cores (thread-pool spin-waits and a lock
against the non-thread-safe fallback threading layer).
Importing this module raises ImportError when numba is not installed; stream.py then keeps its NumPy path.

Load time is what a short run pays: importing numba ~0.3 s, and the first call (loading the cached machine code)
~0.55 s, of which ~0.3 s is numba registering its np.linalg support, which imports scipy.linalg only to find
BLAS. The kernel needs no BLAS, so where this process is ours (the CLI, a Ray worker: ILR_INSPECT_LEAN_NUMBA=1)
scipy.linalg is hidden during that first call; numba then records "no BLAS" for this process only, which no
code of ours uses. Library callers keep numba's normal behaviour (their own jitted np.dot may need BLAS).
Each (loop, dtype) variant loaded costs a little more, so callers load only what their pass needs (:func:`warm`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
from numba import njit


def _norm_sums_py(b: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    rows, cols = b.shape
    out = np.zeros(rows, dtype=np.float64)
    for r in range(rows):
        bb = 0.0
        for j in range(cols):
            y = np.float64(b[r, j])
            bb += y * y
        out[r] = bb
    return out


def _pair_sums_py(b: np.ndarray, a: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    rows, cols = b.shape
    out = np.zeros((rows, 3), dtype=np.float64)
    for r in range(rows):
        bb = 0.0
        dd = 0.0
        da = 0.0
        for j in range(cols):
            x = np.float64(a[r, j])
            y = np.float64(b[r, j])
            d = y - x
            bb += y * y
            dd += d * d
            da += d * x
        out[r, 0] = bb
        out[r, 1] = dd
        out[r, 2] = da
    return out


_FLAGS: dict[str, Any] = {"fastmath": {"reassoc", "contract"}, "nogil": True}


def _jit(fn: Any) -> Any:
    try:  # machine code cached in __pycache__ next to this file, else in ~/.cache/numba (NUMBA_CACHE_DIR)
        return njit(cache=True, **_FLAGS)(fn)
    except RuntimeError:  # no writable cache location at all: compile once per process (~0.5 s) instead
        return njit(cache=False, **_FLAGS)(fn)


_norm_sums = _jit(_norm_sums_py)
_pair_sums = _jit(_pair_sums_py)
_loaded: set[tuple[str, Any]] = set()


def warm(dtype: Any, loops: tuple[str, ...] = ("norm", "pair")) -> None:
    """Load the machine code of these loops for one dtype (float32 or float64) now; see the module's note."""
    dt = np.dtype(dtype)
    todo = [k for k in loops if (k, dt) not in _loaded]
    if not todo:
        return
    lean = (os.environ.get("ILR_INSPECT_LEAN_NUMBA") == "1" and "numba.np.arraymath" not in sys.modules
            and "scipy.linalg" not in sys.modules)
    if lean:
        sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # import fails fast: numba skips BLAS
    try:
        z = np.zeros((1, 1), dtype=dt)
        for k in todo:
            if k == "norm":
                _norm_sums(z)
            else:
                _pair_sums(z, z)
            _loaded.add((k, dt))
    finally:
        if lean and sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]


def norm_sums(b: np.ndarray) -> np.ndarray:
    """‖b‖² per row of a C-contiguous 2-D float32/float64 array, in float64."""
    if ("norm", b.dtype) not in _loaded:
        warm(b.dtype, ("norm",))
    return np.asarray(_norm_sums(b))


def pair_sums(b: np.ndarray, a: np.ndarray,
              aa: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(‖a‖², ‖b‖², ‖b − a‖², ⟨b − a, a⟩) per row of two C-contiguous 2-D float32/float64 arrays, in float64.
    ``aa``: ‖a‖² per row when already known (the previous checkpoint's ‖b‖²); else :func:`norm_sums` of a."""
    if ("pair", b.dtype) not in _loaded:
        warm(b.dtype, ("pair",))
    if aa is None:
        aa = norm_sums(a)
    s = _pair_sums(b, a)
    return aa, s[:, 0], s[:, 1], s[:, 2]

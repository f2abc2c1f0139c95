"""The ahead-of-time compiled row sums (``_ckernel``, built from _ckernel.c at install), with the interface of
:mod:`ilr_inspect.measure._kernel`: ``norm_sums``, ``pair_sums`` and ``warm`` (nothing to load).

Importing this module raises ImportError when the extension was not built (no C compiler at install); stream.py
then falls back to numba, else NumPy. Float64 sums in a fixed order (see _ckernel.c), so the error model of
stream._kernel_stats — ≤ cols·2⁻⁵³·Σ|terms| per sum — holds as for the numba loops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _ckernel

NATIVE = True  # stream.py: no load cost, so every pass may use it


def warm(dtype: Any, loops: tuple[str, ...] = ("norm", "pair")) -> None:
    """Nothing to load (the machine code is part of the installed package)."""


def norm_sums(b: np.ndarray) -> np.ndarray:
    """‖b‖² per row of a C-contiguous 2-D float32/float64 array, in float64."""
    rows, cols = b.shape
    out = np.empty(rows, dtype=np.float64)
    _ckernel.norm_sums(b, rows, cols, b.dtype == np.float64, out)
    return out


def pair_sums(b: np.ndarray, a: np.ndarray,
              aa: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(‖a‖², ‖b‖², ‖b − a‖², ⟨b − a, a⟩) per row of two C-contiguous 2-D arrays of one dtype (float32 or
    float64), in float64. ``aa``: ‖a‖² per row when already known; else :func:`norm_sums` of a."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError("pair_sums needs two arrays of one shape and dtype")
    rows, cols = b.shape
    out = np.empty((rows, 3), dtype=np.float64)
    _ckernel.pair_sums(b, a, rows, cols, b.dtype == np.float64, out)
    if aa is None:
        aa = norm_sums(a)
    return aa, out[:, 0], out[:, 1], out[:, 2]

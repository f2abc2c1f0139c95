"""The single pass over a series: every needed tensor of every checkpoint is read once.

For each tensor we keep per-row float64 sums — ‖w_r‖² and the tangential term P_r = ‖a_r‖‖b_r‖·‖â_r − b̂_r‖²
against the previous checkpoint — which is all the norms, angles and relative updates of every unit kind need,
without the cancellation of 1 − cos for tiny angles (docs/theory.md).

Where a reader hands out views of a memory map (safetensors, torch zip) the loop is checkpoint-major: checkpoint
i is read in storage order against checkpoint i − 1, still mapped, whose pages are then released, so resident
file pages stay within two checkpoints and anonymous memory within a few cache-sized blocks. Where a reader copies
each tensor, the loop is tensor-major (two copies of one tensor alive at a time). ‖w‖² of the previous checkpoint
is reused as ‖a‖². The sums of one tensor run on a worker thread while the next is read (NumPy and the compiled
pass release the GIL). A caller that needs only norms names the tensors that need pairs (``pair_names``); the
others are summed alone, keep no previous value, and a checkpoint none of whose tensors is kept is released as soon
as it is summed (one checkpoint resident). A tensor holding NaN or inf gets a warning and null values for its own
checkpoint only.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import Checkpoint

if TYPE_CHECKING:
    from ..formats import OpenOptions

CHUNK = 1 << 20  # elements per block of work: stays in the last-level cache; temporaries ≤ 4 MiB each
BLOCK = 256  # float32 partial sums cover at most 256 products; partials are then summed in float64
FAST_Q = 0.04  # ‖â−b̂‖² above which the ⟨a,b⟩ form is accurate to 1e-5 rad (see _block_stats)
ANGLE_TOL = 2e-6  # rigorous bound on the angle error (rad) the derived form must meet; the target is 1e-5
NORM_TOL = 1e-6  # ... and on the relative error of ‖b‖², i.e. 5e-7 on the norm (the target is 1e-6)
_U = 2.0**-24  # float32 unit roundoff
_DOT_EPS = BLOCK * _U  # rigorous relative bound for a float32 partial over ≤ BLOCK products, any summation order


@dataclass
class TensorStats:
    """Per-row float64 sums for one tensor at one checkpoint (rows = first dimension; 1-D: its entries; or one
    row for the whole tensor when no unit needs rows).

    ``tang`` is P = ‖a‖‖b‖·‖â − b̂‖² = 2(‖a‖‖b‖ − ⟨a,b⟩) against the previous checkpoint's value a: the angle is
    2·atan2(√q, √(4−q)) with q = P/(‖a‖‖b‖), and ‖a − b‖² = P + (‖a‖ − ‖b‖)². P is computed without the
    cancellation that ruins 1 − cos (or ‖a−b‖² − (‖a‖−‖b‖)²) when the change is mostly radial.
    """

    sumsq: np.ndarray
    prev_sumsq: np.ndarray | None  # None for the first checkpoint or when the shape changed
    tang: np.ndarray | None
    numel: int


def _rows(shape: tuple[int, ...]) -> int:
    """Output channels; a 1-D tensor (bias, BN γ) is per-channel too, so its entries are its rows."""
    if len(shape) >= 2:
        return int(shape[0])
    if len(shape) == 1 and shape[0] <= 1 << 16:
        return int(shape[0])
    return 1


def _einsum_vecdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray(np.einsum("...i,...i->...", a, b))


_vecdot: Callable[[np.ndarray, np.ndarray], np.ndarray] = getattr(np, "vecdot", _einsum_vecdot)  # NumPy < 2.0


def _row_dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ_j x_ij·y_ij per row in float64. Float32 data: SIMD partial sums over ≤ BLOCK products (relative error of
    a partial ≲ 32·2⁻²⁴ even in the worst case), accumulated in float64 — as accurate as a float64 pass for the
    1e-6 target, and far cheaper than converting every element to float64."""
    # np.vecdot (a gufunc) releases the GIL, so worker threads really run in parallel; einsum does not.
    if x.dtype == np.float64:
        return _dot64(x, y)
    rows, cols = x.shape
    k = cols // BLOCK
    if k and cols == k * BLOCK:
        parts = _vecdot(x.reshape(rows, k, BLOCK), y.reshape(rows, k, BLOCK))
        return np.asarray(parts.sum(axis=1, dtype=np.float64))
    out = np.zeros(rows, dtype=np.float64)
    if k:
        parts = _vecdot(x[:, : k * BLOCK].reshape(rows, k, BLOCK), y[:, : k * BLOCK].reshape(rows, k, BLOCK))
        out += parts.sum(axis=1, dtype=np.float64)
    out += _vecdot(x[:, k * BLOCK :], y[:, k * BLOCK :])
    return out


_SUB = 8192  # float64 rows are summed in pieces of at most this many: OpenBLAS's ddot (behind np.vecdot) starts
# its own threads above 10000 elements, which fight the worker threads (measured 20-50× slower on a busy machine)


def _dot64(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ_j x_ij·y_ij per row of 2-D float64 arrays, in single-threaded pieces of ≤ _SUB elements."""
    rows, cols = x.shape
    if cols <= _SUB:
        return np.asarray(_vecdot(x, y))
    k = cols // _SUB
    out = np.asarray(_vecdot(x[:, : k * _SUB].reshape(rows, k, _SUB), y[:, : k * _SUB].reshape(rows, k, _SUB)))
    out = out.sum(axis=1)
    if cols > k * _SUB:
        out += _vecdot(x[:, k * _SUB :], y[:, k * _SUB :])
    return np.asarray(out)


def _blocks(n_rows: int, cols: int) -> list[tuple[slice, slice]]:
    """Long rows are cut into pieces of CHUNK; short rows are grouped so each block holds about CHUNK elements.
    The first block is a small probe (about CHUNK/16), so that choosing the form for the rest costs little."""
    if cols > CHUNK:
        probe = CHUNK // 16
        cuts = [(0, probe), *((j, j + CHUNK) for j in range(probe, cols, CHUNK))]
        return [(slice(i, i + 1), slice(lo, hi)) for i in range(n_rows) for lo, hi in cuts]
    row_step = max(1, CHUNK // cols)
    first = max(1, row_step // 16)
    starts = [0, *range(first, n_rows, row_step)]
    return [(slice(s, min(e, n_rows)), slice(0, cols)) for s, e in zip(starts, [*starts[1:], n_rows], strict=True)]


def _as_work(x: np.ndarray, buf: np.ndarray | None) -> np.ndarray:
    """The block in the working dtype, converted into a reused buffer when it is not already in it."""
    if buf is None or x.dtype == buf.dtype:
        return x
    out = buf[: x.size].reshape(x.shape)
    np.copyto(out, x, casting="unsafe")
    return out


def _exact_tang(x: np.ndarray, y: np.ndarray, aa: np.ndarray, bb: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """P from d = b − (‖b‖/‖a‖)·a elementwise: ‖d‖² = P·‖b‖/‖a‖ with no cancellation however small the angle or
    large the norm change (rounding d adds ≲ 1e-7 rad)."""
    na, nb = np.sqrt(aa), np.sqrt(bb)
    live = (na > 0) & (nb > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(live, nb / na, 0.0)
        back = np.where(live, na / nb, 0.0)
    d = scratch[: x.size].reshape(x.shape)
    np.multiply(y, scale.astype(x.dtype)[:, None], out=d)
    np.subtract(x, d, out=d)
    return np.asarray(_row_dot(d, d) * back)


def _derived(aa: np.ndarray, dd: np.ndarray, da: np.ndarray, e: float = _DOT_EPS,
             u: float = _U) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`_derived_rows`, with ok = every live row meets the bounds."""
    bb, p, ok = _derived_rows(aa, dd, da, e, u)
    return bb, p, bool(np.all(ok))


def _derived_rows(aa: np.ndarray, dd: np.ndarray, da: np.ndarray, e: float = _DOT_EPS,
                  u: float = _U) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """‖b‖² and P from ‖a‖², ‖d‖² and ⟨d,a⟩ of the difference d = b − a (three passes instead of four).

    ‖b‖² = ‖a‖² + 2⟨d,a⟩ + ‖d‖², and with ρ = ‖a‖ − ‖b‖ = −(2⟨d,a⟩ + ‖d‖²)/(‖a‖ + ‖b‖) (no cancellation),
    ‖b − (‖b‖/‖a‖)a‖² = ‖d + (ρ/‖a‖)a‖² = ‖d‖² + 2ρ⟨d,a⟩/‖a‖ + ρ² = P·‖b‖/‖a‖. The terms cancel where the change
    is mostly radial, so a rigorous bound on the angle error must stay below ANGLE_TOL, and one on ‖b‖² below
    NORM_TOL, in every row; ok is False for a live row where one does not, and the caller computes it another way.
    The bounds take the dot products' errors as ≤ _DOT_EPS·Σ|terms| (≤ BLOCK float32 products per partial, any
    summation order), with |ρ| ≤ ‖d‖ and |⟨d,a⟩| ≤ ‖d‖‖a‖, and d's own rounding (≤ u|d|, moving b by ≤ u‖d‖).
    ``e`` and ``u`` are those two error rates: float32 blocks by default; the compiled pass's float64 sums pass
    their own. A row with a non-finite sum is never ok (its ‖b‖² must come from b itself, not from a)."""
    bb = np.maximum(aa + 2.0 * da + dd, 0.0)
    na, nb, nd = np.sqrt(aa), np.sqrt(bb), np.sqrt(dd)
    live = (na > 0) & (nb > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = -(2.0 * da + dd) / (na + nb)
        t = np.maximum(dd + rho * (rho + 2.0 * da / na), 0.0)
        q = t / bb
        dq = 2.0 * ((3.0 * e + 4.0 * u * u) * dd + nd * (3.0 * e * q * nb + 4.0 * u * np.sqrt(t))) / bb
        hi = np.minimum(q + dq, 3.99)
        d_theta = (np.sqrt(hi) - np.sqrt(np.maximum(q - dq, 0.0))) / np.sqrt(1.0 - hi / 4.0)
        d_norm = (e * (2.0 * na + nd) + 2.0 * u * (nb + nd)) * nd / bb
        p = np.where(live, t * na / nb, 0.0)
    ok = (~live | ((d_theta <= ANGLE_TOL) & (d_norm <= NORM_TOL))) & np.isfinite(bb)
    return bb, p, ok


def _block_stats(x: np.ndarray, y: np.ndarray, scratch: np.ndarray, mode: str,
                 aa: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """‖b‖², ‖a‖² and P for each row of one block (rows wholly inside it, or one piece of a long row), read while
    the block is in cache, so memory sees each element once. Three forms, cheapest first where they hold:

    - ``derived`` (float32, small changes): d = b − a, then :func:`_derived` (sweeps: a², d = b − a, d², d·a);
    - ``fast`` (float32, large angles): P = 2(‖a‖‖b‖ − ⟨a,b⟩) (sweeps: a², b², a·b). Its error is ~ε‖a‖‖b‖
      (ε ≲ 2e-6 for the blocked sums), so it is kept only where every live row has q = P/(‖a‖‖b‖) ≥ FAST_Q, i.e.
      angles ≥ ~0.2 rad, where the angle error stays below 1e-5 rad;
    - ``exact``: :func:`_exact_tang` (sweeps: a², b², d = b − (‖b‖/‖a‖)·a in two, d²).

    ``mode`` is the form to try first: the one that held for the previous block, as neighbours change alike.
    ``aa`` is ‖a‖² of the block's rows when already known (the previous checkpoint's norms, in float64).
    Returns (‖b‖², ‖a‖², P, the form to try first on the next block)."""
    aa = _row_dot(y, y) if aa is None else aa
    ab = None
    if mode == "derived":
        d = scratch[: x.size].reshape(x.shape)
        np.subtract(x, y, out=d)
        da = _row_dot(d, y)
        bb, p, ok = _derived(aa, _row_dot(d, d), da)
        if ok:
            with np.errstate(divide="ignore", invalid="ignore"):
                big = bool(np.all(p >= 2 * FAST_Q * np.sqrt(aa * bb)))
            return bb, aa, p, ("fast" if big else "derived")
        ab = aa + da  # ⟨a,b⟩ = ‖a‖² + ⟨a,d⟩: the fast form below needs only ‖b‖² more
        mode = "fast"
    bb = _row_dot(x, x)
    nn = np.sqrt(aa * bb)
    live = nn > 0
    if mode == "fast":
        p = np.maximum(2.0 * (nn - (_row_dot(x, y) if ab is None else ab)), 0.0)
        if bool(np.all(p[live] >= FAST_Q * nn[live])):
            return bb, aa, np.where(live, p, 0.0), "fast"
        mode = "derived" if ab is None and x.dtype == np.float32 else "exact"
    p = _exact_tang(x, y, aa, bb, scratch)
    if mode == "exact" and bool(np.all(p[live] >= 2 * FAST_Q * nn[live])):
        mode = "fast"
    return bb, aa, p, mode


_U64 = 2.0**-53  # float64 unit roundoff


_NORM_BUF = 1 << 15  # float64 elements (256 KiB) widened at a time by _norm64: written and read again while in L2;
# measured 0.83-1.14 ns/element against 1.26-1.40 with 2 MiB pieces (float32 tensors of 64 MiB, one thread)


def _norm64(b: np.ndarray) -> np.ndarray:
    """Σ_j b_ij² per row of 2-D b, every product and sum in float64 (agrees with a float64 recomputation to
    ~1e-15). Float32 and narrower data is widened in cache-sized pieces into one reused buffer, then summed by
    the float64 gufunc: ~2.5× the cost of the float32 partial sums, still well under the cost of reading."""
    if b.dtype == np.float64:
        return _dot64(b, b)
    n_rows, cols = b.shape
    out = np.zeros(n_rows, dtype=np.float64)
    buf = np.empty(min(b.size, _NORM_BUF), dtype=np.float64)
    if cols > buf.size:
        for r in range(n_rows):
            for lo in range(0, cols, buf.size):
                piece = b[r, lo:lo + buf.size]
                x = buf[: piece.size]
                np.copyto(x, piece, casting="unsafe")
                out[r] += float(_dot64(x.reshape(1, -1), x.reshape(1, -1))[0])
        return out
    step = max(1, buf.size // cols)
    for lo in range(0, n_rows, step):
        blk = b[lo:lo + step]
        x = buf[: blk.size].reshape(blk.shape)
        np.copyto(x, blk, casting="unsafe")
        out[lo:lo + step] = _dot64(x, x)
    return out


def row_stats(cur: np.ndarray, prev: np.ndarray | None, *, rows: bool = True, kernel: bool = True,
              prev_sumsq: np.ndarray | None = None) -> TensorStats:
    """Row sums for the current value b and, against the previous checkpoint's value a, the tangential term P.

    ‖b‖² is always a float64 sum of float64 products (:func:`_norm64`, or the compiled pass). P comes from one
    sweep over cache-sized blocks: each block yields ‖a‖² and P of its rows while it is in cache
    (:func:`_block_stats`), so memory sees every element once. A row longer than a block is cut into pieces i, each
    with its own P_i; then P = Σ P_i + 2(‖a‖‖b‖ − Σ ‖a_i‖‖b_i‖), from P = 2(‖a‖‖b‖ − ⟨a,b⟩) and
    ⟨a,b⟩ = Σ ⟨a_i,b_i⟩. The last term is ≥ 0 (Cauchy–Schwarz) and its first-order sensitivity to errors in the
    piece norms vanishes where the pieces' norm ratios agree, so it adds only float64 rounding (~1e-8 rad). A
    per-piece angle bound carries over to the row: with weights w_i = ‖a_i‖‖b_i‖/(‖a‖‖b‖), Σ w_i ≤ 1,
    Δq ≤ Σ w_i·2√q_i·tol ≤ 2√q·tol since q ≥ Σ w_i q_i.
    ``prev_sumsq`` is ‖a‖² per row as computed for the previous checkpoint: reused instead of summed again.
    Data that is neither float32 nor float64 is converted block by block into a reused buffer.
    With ``kernel`` (and :data:`KERNEL`), float32/float64 data takes the compiled loops when numba is installed
    (:func:`_kernel_stats`, :func:`_norm_sums`).
    """
    n_rows = _rows(cur.shape) if rows else 1
    b = np.asarray(cur).reshape(n_rows, -1)
    a = None
    if prev is not None and prev.shape == cur.shape:
        a = np.asarray(prev).reshape(n_rows, -1)
    cols = b.shape[1]
    if cols == 0 or n_rows == 0:
        z = None if a is None else np.zeros(n_rows)
        return TensorStats(np.zeros(n_rows, dtype=np.float64), z, z, 0)
    if a is None:
        return TensorStats(_norm_sums(b, kernel), None, None, int(b.size))
    if prev_sumsq is not None and prev_sumsq.shape != (n_rows,):
        prev_sumsq = None
    work = np.dtype(np.float64 if b.dtype == np.float64 else np.float32)
    kern = _pair_kernel() if kernel and KERNEL and b.dtype == work and a.dtype == work else None
    if kern is not None and b.flags.c_contiguous and a.flags.c_contiguous:
        return _kernel_stats(kern, b, a, prev_sumsq)
    bufx = None if b.dtype == work else np.empty(min(b.size, CHUNK), dtype=work)
    _, pss, tang = _numpy_pair(b, a, work, bufx) if prev_sumsq is None else _numpy_pair(b, a, work, bufx, prev_sumsq)
    return TensorStats(_norm_sums(b, kernel), pss, tang, int(b.size))


def _norm_sums(b: np.ndarray, kernel: bool) -> np.ndarray:
    """‖b‖² per row of 2-D b in float64: the compiled loop where the pass uses it (the same sum, bit for bit, as
    the ‖b‖² of its pair loop, so a norm does not depend on whether the angle was asked for), else
    :func:`_norm64`."""
    if kernel and KERNEL and b.dtype in (np.float32, np.float64) and b.flags.c_contiguous:
        kern = _pair_kernel()
        if kern is not None:
            return np.asarray(kern.norm_sums(b))
    return _norm64(b)


def _numpy_pair(b: np.ndarray, a: np.ndarray, work: np.dtype[Any], bufx: np.ndarray | None,
                prev_sumsq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """‖b‖², ‖a‖² and P per row of 2-D b and a, block by block in NumPy (see :func:`row_stats`); blocks of whole
    rows take ‖a‖² from ``prev_sumsq`` when given."""
    n_rows, cols = b.shape
    size = min(b.size, CHUNK)
    blocks = _blocks(n_rows, cols)
    ss = np.zeros(n_rows, dtype=np.float64)
    bufy = None if a.dtype == work else np.empty(size, dtype=work)
    scratch = np.empty(size, dtype=work)
    pss = np.zeros(n_rows, dtype=np.float64)
    tang = np.zeros(n_rows, dtype=np.float64)
    cross = np.zeros(n_rows, dtype=np.float64) if cols > CHUNK else None  # Σ ‖a_i‖‖b_i‖ over pieces of a row
    mode = "derived" if work == np.float32 else "exact"
    known = prev_sumsq if prev_sumsq is not None and cross is None else None
    for rs, cs in blocks:
        x = _as_work(b[rs, cs], bufx)
        y = _as_work(a[rs, cs], bufy)
        bb, aa, p, mode = _block_stats(x, y, scratch, mode, None if known is None else known[rs])
        ss[rs] += bb
        pss[rs] += aa
        tang[rs] += p
        if cross is not None:
            cross[rs] += np.sqrt(aa * bb)
    if cross is not None:
        tang += 2.0 * np.maximum(np.sqrt(pss * ss) - cross, 0.0)
    return ss, pss, tang


KERNEL = True  # use the compiled loops: the built extension (_native), else numba's (_kernel) when installed
# ... in a series pass only from this much work on (or once they are loaded anyway): importing numba and loading
# the cached machine code costs ~0.64 s CPU once per process (0.31 import + 0.33 first call, lean; measured on this
# 2-core machine, busy). In-process on 10 × 256 MiB float32 (671M elements, 604M pairs), busy machine: `norms`
# 0.86-1.09 s CPU with NumPy's _norm64 and 0.40 s with the norm loop (~0.7-1.0 ns saved per element: the load is
# repaid from ~6-9e8 elements); `angles` 2.6-2.7 s with the NumPy blocks and 0.59 s with the pair loop (~3.4 ns
# saved per pair: repaid from ~1.9e8 pairs). A pass loads the kernel when pairs/KERNEL_MIN_PAIRS +
# elements summed alone/KERNEL_MIN_NORMS ≥ 1 (see use_kernel). ILR_INSPECT_KERNEL=on|off forces the choice.
# These thresholds apply to numba only: the extension built at install (_ckernel.c) has no load cost and is used
# for every pass.
KERNEL_MIN_PAIRS = 3 << 26  # ~2.0e8 pairs (0.75 GiB of float32 pairs)
KERNEL_MIN_NORMS = 3 << 28  # ~8.1e8 elements (3 GiB of float32)
_kernel_mod: Any = None  # None: not tried yet; False: numba missing; else the module


def _native() -> Any:
    """The ahead-of-time compiled loops (_ckernel.c, built at install; no load cost), or None where they were not
    built. ILR_INSPECT_NATIVE=0 hides them (the numba loops are then the compiled pass)."""
    if os.environ.get("ILR_INSPECT_NATIVE", "1") == "0":
        return None
    try:
        from . import _native as native
    except ImportError:
        return None
    return native


def _pair_kernel() -> Any:
    """The compiled pass: the built extension, else numba's loops imported on first use (numba costs ~0.3 s to
    import), or None."""
    global _kernel_mod
    if _kernel_mod is None:
        native = _native()
        if native is not None:
            _kernel_mod = native
        else:
            try:
                from . import _kernel

                _kernel_mod = _kernel
            except ImportError:
                _kernel_mod = False
    return _kernel_mod or None


def _warm_kernel(dtypes: Collection[str] = ("float32", "float64"), loops: tuple[str, ...] = ("norm", "pair")) -> None:
    """Import numba and load the machine code for these dtypes and loops (a worker runs this while the first
    checkpoint is read); each variant's first load costs more, so only what the pass needs is loaded."""
    kern = _pair_kernel()
    if kern is not None:
        for dt in dtypes:
            kern.warm(np.dtype(dt), loops)


def use_kernel(checkpoints: Sequence[Checkpoint], order: Sequence[str], pairs: Collection[str]) -> bool:
    """Whether a pass over these tensors should load the compiled loops: ILR_INSPECT_KERNEL=on|off, else by size
    (element pairs against a previous value, and elements summed alone), or when they are loaded anyway."""
    forced = os.environ.get("ILR_INSPECT_KERNEL", "auto").lower()
    if forced in ("on", "off"):
        return forced == "on"
    if _kernel_mod or _native() is not None:  # loaded anyway, or nothing to load
        return True
    n_pairs = n_single = 0
    for i, ck in enumerate(checkpoints):
        for n in order:
            if n in ck.tensors:
                k = math.prod(ck.tensors[n].shape)
                if i and n in pairs:
                    n_pairs += k
                else:
                    n_single += k
    # n_pairs / KERNEL_MIN_PAIRS + n_single / KERNEL_MIN_NORMS ≥ 1, without dividing (a threshold may be 0)
    return n_pairs * KERNEL_MIN_NORMS + n_single * KERNEL_MIN_PAIRS >= KERNEL_MIN_PAIRS * KERNEL_MIN_NORMS


def _kernel_stats(kern: Any, b: np.ndarray, a: np.ndarray, prev_sumsq: np.ndarray | None = None) -> TensorStats:
    """Row sums from one compiled loop over a and b (float64 sums of float64 products and differences), then per
    row the cheapest form of P whose bound holds — derived, else fast (q ≥ FAST_Q) — and the NumPy path for the
    rows left (mostly radial changes where neither bound holds).

    ‖a‖² is ``prev_sumsq`` (the previous checkpoint's ‖b‖², a float64 sum of the same kind) when given, so the loop
    sums three terms, not four. The error model is the loop's own arithmetic: each sum has ≤ cols float64 terms, so
    its error is ≤ cols·2⁻⁵³·Σ|terms| in any summation order (the loop is reassociated), and d = b − a is rounded
    once (≤ 2⁻⁵³|d|; exact for float32 data of similar magnitude). ‖b‖² is the loop's own sum, never derived from
    a, so a non-finite a cannot touch it."""
    aa, bb, dd, da = kern.pair_sums(b, a) if prev_sumsq is None else kern.pair_sums(b, a, prev_sumsq)
    cols = b.shape[1]
    e = (cols + 2) * _U64
    _, p, ok = _derived(aa, dd, da, e, _U64)
    if not ok:
        _, p, ok_rows = _derived_rows(aa, dd, da, e, _U64)
        nn = np.sqrt(aa * bb)
        live = nn > 0  # False for NaN: such rows get no angle (P = NaN below)
        p_fast = np.maximum(2.0 * (nn - (aa + da)), 0.0)  # ⟨a,b⟩ = ‖a‖² + ⟨d,a⟩
        fast = live & (p_fast >= FAST_Q * nn)
        finite = np.isfinite(nn)
        p = np.where(ok_rows, p, np.where(fast, p_fast, np.where(finite, 0.0, np.nan)))
        bad = np.flatnonzero(~ok_rows & ~fast & live)
        if bad.size:  # contiguous runs of rows, as views: no copy of the tensor
            cuts = np.flatnonzero(np.diff(bad) > 1) + 1
            for run in np.split(bad, cuts):
                lo, hi = int(run[0]), int(run[-1]) + 1
                p[lo:hi] = _numpy_pair(b[lo:hi], a[lo:hi], b.dtype, None)[2]
    return TensorStats(np.asarray(bb), np.asarray(aa), np.asarray(p), int(b.size))


@dataclass
class CheckpointStats:
    index: int
    checkpoint: Checkpoint
    tensors: dict[str, TensorStats]
    warnings: list[str]


def _progress(total: int, quiet: bool) -> Any:
    if quiet or not sys.stderr.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def stream_stats(checkpoints: Sequence[Checkpoint], names: Sequence[str], *, quiet: bool = True,
                 row_names: Collection[str] | None = None, ray: str | None = None,
                 options: OpenOptions | None = None,
                 pair_names: Collection[str] | None = None) -> Iterator[CheckpointStats]:
    """Per-tensor statistics for each checkpoint, yielded in step order. Tensors in ``row_names`` (default: all)
    get per-row sums, the others one total. Tensors in ``pair_names`` (default: all) also get the pair sums
    against the previous checkpoint (``prev_sumsq``, ``tang``); the others only ‖w‖², read once per checkpoint
    with no previous value kept.

    ``ray``: a Ray address (``local``, ``auto``, ``host:port``): the same pass split into tasks on the cluster
    (:mod:`ilr_inspect.scaleout.measure`), which reopen the checkpoints from their paths with ``options``; the
    results are the same sums, bit for bit where that module says so.

    Checkpoint-major where tensors are views of a memory map (:func:`_mapped`): checkpoint i is read once, in
    storage order, against the still-mapped checkpoint i − 1, whose mapping is then released — resident file
    pages stay within two checkpoints and anonymous memory within a few blocks. Elsewhere (formats whose reader
    copies or widens each tensor) tensor-major, so that at most two copies of one tensor are alive."""
    wanted = set(names)
    with_rows = wanted if row_names is None else set(row_names)
    order: list[str] = []
    seen: set[str] = set()
    for ck in checkpoints:
        for n in ck.tensors:
            if n in wanted and n not in seen:
                seen.add(n)
                order.append(n)
    warns: list[list[str]] = [[] for _ in checkpoints]
    for i, ck in enumerate(checkpoints):
        missing = wanted - set(ck.tensors)
        if missing:
            warns[i].append(f"{len(missing)} unit tensor(s) not in {ck.path.name}: {sorted(missing)[:3]}")
    with_pairs = wanted if pair_names is None else wanted & set(pair_names)
    kernel = use_kernel(checkpoints, order, with_pairs)
    if ray is not None:
        from ..scaleout.measure import ray_stream_stats

        yield from ray_stream_stats(ray, checkpoints, order, with_rows, kernel, warns, options=options, quiet=quiet,
                                    pair_names=with_pairs)
        return
    workers = max(1, min(4, os.cpu_count() or 1))
    progress = _progress(len(order) * len(checkpoints), quiet)
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task("measuring", total=len(order) * len(checkpoints))

    def advance() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    by_ck = _mapped(checkpoints, order)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilr-measure") as pool:
            if kernel and KERNEL and _kernel_mod is None:  # numba loads on one core while the other reads
                work = {"float64" if ck.tensors[n].dtype == "float64" else "float32"
                        for ck in checkpoints for n in order if n in ck.tensors}
                loops = ("norm", "pair") if with_pairs and len(checkpoints) > 1 else ("norm",)
                pool.submit(_warm_kernel, sorted(work), loops)
            run = _by_checkpoint if by_ck else _by_tensor
            yield from run(pool, workers, checkpoints, order, with_rows, kernel, warns, advance, with_pairs)
    finally:
        if progress is not None:
            progress.stop()


_Advance = Callable[[], None]
_MAPPED_FORMATS = frozenset({"safetensors", "hf", "torch", "lightning"})
_VIEW_DTYPES = frozenset({"float32", "float64", "float16"})


def _mapped(checkpoints: Sequence[Checkpoint], order: Sequence[str]) -> bool:
    """Whether every checkpoint's reader hands out views of a memory map for these tensors (no copies), so that
    keeping a whole previous checkpoint costs file pages, not anonymous memory."""
    return all(ck.format in _MAPPED_FORMATS and all(ck.tensors[n].dtype in _VIEW_DTYPES
                                                    for n in order if n in ck.tensors) for ck in checkpoints)


_MADV_DONTNEED = 4  # Linux
_libc: Any = None


def _get_libc() -> Any:
    """libc with madvise typed (OSError where it cannot be loaded)."""
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


def _release(ck: Checkpoint) -> None:
    """Drop the resident pages of a checkpoint's file mappings once no array of it is needed.

    Readers keep a file mapped while the checkpoint is open (a later command may read it again), so instead of
    unmapping, the private read-only file mappings of this checkpoint's files (found in /proc/self/maps) are
    advised MADV_DONTNEED: the pages leave this process (they stay in the page cache) and a later read faults them
    in again from the file. Only private mappings of the checkpoint's own files are touched, which nothing
    writes; elsewhere (not Linux, no libc) this does nothing."""
    if not sys.platform.startswith("linux"):
        return
    root = str(ck.path.resolve())
    try:
        libc = _get_libc()
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[1].startswith("r") or parts[1][3] != "p":
            continue
        path = parts[5].rstrip("\n")
        if path != root and not path.startswith(root + os.sep):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        libc.madvise(lo, hi - lo, _MADV_DONTNEED)


def _check(name: str, st: TensorStats, warns: list[str]) -> TensorStats:
    if not bool(np.all(np.isfinite(st.sumsq))):
        warns.append(f"{name}: holds NaN or inf; its norm (and angles to it) are null for this checkpoint only")
    return st


def _by_checkpoint(pool: ThreadPoolExecutor, workers: int, checkpoints: Sequence[Checkpoint], order: Sequence[str],
                   with_rows: set[str], kernel: bool, warns: list[list[str]], advance: _Advance,
                   with_pairs: Collection[str] | None = None) -> Iterator[CheckpointStats]:
    """Checkpoint i against the still-mapped i − 1. Only tensors in ``with_pairs`` (default: all) keep their
    previous value; a checkpoint none of whose tensors is kept is released as soon as its own sums are done."""
    pairs = set(order) if with_pairs is None else set(with_pairs)
    prev_arrays: dict[str, np.ndarray] = {}
    prev_sums: dict[str, np.ndarray] = {}
    prev_shapes: dict[str, tuple[int, ...]] = {}
    prev_ck: Checkpoint | None = None
    wanted = set(order)
    for i, ck in enumerate(checkpoints):
        pending: deque[tuple[str, Future[TensorStats]]] = deque()
        cur_arrays: dict[str, np.ndarray] = {}
        done: dict[str, TensorStats] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for name in ck.tensors:
            if name not in wanted:
                continue
            cur = ck.read(name)
            prev = prev_arrays.pop(name, None)
            shapes[name] = cur.shape
            was = prev_shapes.get(name)
            if was is not None and was != cur.shape:  # told for every tensor, whether or not its pair is summed
                warns[i].append(f"{name}: shape {was} -> {cur.shape}; no angle for this pair")
                prev = None
            fut = pool.submit(row_stats, cur, prev, rows=name in with_rows, kernel=kernel,
                              prev_sumsq=prev_sums.get(name) if prev is not None else None)
            pending.append((name, fut))
            if name in pairs:
                cur_arrays[name] = cur
            del cur, prev
            while len(pending) > workers:
                n, f = pending.popleft()
                done[n] = _check(n, f.result(), warns[i])
            advance()
        while pending:
            n, f = pending.popleft()
            done[n] = _check(n, f.result(), warns[i])
        prev_arrays.clear()
        if prev_ck is not None:
            _release(prev_ck)
            prev_ck = None
        if cur_arrays:
            prev_arrays, prev_ck = cur_arrays, ck
        else:
            _release(ck)
        prev_sums = {n: s.sumsq for n, s in done.items() if n in pairs}
        prev_shapes = shapes
        yield CheckpointStats(i, ck, done, warns[i])
    prev_arrays.clear()
    if prev_ck is not None:
        _release(prev_ck)


def _by_tensor(pool: ThreadPoolExecutor, workers: int, checkpoints: Sequence[Checkpoint], order: Sequence[str],
               with_rows: set[str], kernel: bool, warns: list[list[str]], advance: _Advance,
               with_pairs: Collection[str] | None = None) -> Iterator[CheckpointStats]:
    per_ck: list[dict[str, TensorStats]] = [{} for _ in checkpoints]
    pending: deque[tuple[int, str, Future[TensorStats]]] = deque()
    for name in order:
        prev: np.ndarray | None = None
        prev_sumsq: Future[TensorStats] | None = None
        keep = with_pairs is None or name in with_pairs
        was: tuple[int, ...] | None = None
        for i, ck in enumerate(checkpoints):
            if name not in ck.tensors:
                prev = prev_sumsq = None
                was = None
                continue
            cur = ck.read(name)
            if not keep:  # ‖w‖² only: no previous value held
                if was is not None and was != cur.shape:
                    warns[i].append(f"{name}: shape {was} -> {cur.shape}; no angle for this pair")
                was = cur.shape
                pending.append((i, name, pool.submit(row_stats, cur, None, rows=name in with_rows, kernel=kernel)))
                del cur
                while len(pending) > workers:
                    j, n, f = pending.popleft()
                    per_ck[j][n] = _check(n, f.result(), warns[j])
                advance()
                continue
            if prev is not None and prev.shape != cur.shape:
                warns[i].append(f"{name}: shape {prev.shape} -> {cur.shape}; no angle for this pair")
                prev = prev_sumsq = None
            # Always reuse ‖a‖² (waiting for it if need be: it ran while cur was read), so that the sums do not
            # depend on timing and match the Ray path bit for bit.
            known = prev_sumsq.result().sumsq if prev_sumsq is not None else None
            fut = pool.submit(row_stats, cur, prev, rows=name in with_rows, kernel=kernel, prev_sumsq=known)
            pending.append((i, name, fut))
            prev, prev_sumsq = cur, fut
            del cur
            while len(pending) > workers:
                j, n, f = pending.popleft()
                per_ck[j][n] = _check(n, f.result(), warns[j])
            advance()
        del prev
    while pending:
        j, n, f = pending.popleft()
        per_ck[j][n] = _check(n, f.result(), warns[j])
    for i, ck in enumerate(checkpoints):
        yield CheckpointStats(i, ck, per_ck[i], warns[i])

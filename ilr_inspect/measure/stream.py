"""The single pass over a series: every needed tensor of every checkpoint is read once.

For each tensor we keep per-row float64 sums — ‖w_r‖² and the tangential term P_r = ‖a_r‖‖b_r‖·‖â_r − b̂_r‖²
against the previous checkpoint — which is all the norms, angles and relative updates of every unit kind need,
without the cancellation of 1 − cos for tiny angles (theory.md §13.4).

The loop is tensor-major: for one tensor name it walks the checkpoints in step order, so the previous
checkpoint's value of that tensor is still in memory (often still in the CPU cache) when the next one is read.
Every byte of every file is read once, and memory is bounded by a few copies of the largest tensor — never by
the model or the series. The sums of one tensor run on a worker thread while the next is read (NumPy releases
the GIL).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint

CHUNK = 1 << 18  # elements per block of work: stays in cache, bounds temporaries to 1 MiB (float32)
BLOCK = 256  # float32 partial sums cover at most 256 products; partials are then summed in float64
FAST_Q = 0.04  # ‖â−b̂‖² above which the one-sweep ⟨a,b⟩ form is accurate to 1e-5 rad (see row_stats)


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
    fast: bool = False  # P came from the one-sweep ⟨a,b⟩ form (a hint for the next checkpoint's pair)


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


def _row_sumsq(x: np.ndarray) -> np.ndarray:
    """Σ_j x_ij² per row in float64. Float32 data: SIMD partial sums over ≤ BLOCK products (relative error of a
    partial ≲ 32·2⁻²⁴ even in the worst case), accumulated in float64 — as accurate as a float64 pass for the
    1e-6 target, and 10–50× cheaper than converting every element to float64."""
    # np.vecdot (a gufunc) releases the GIL, so worker threads really run in parallel; einsum does not.
    if x.dtype == np.float64:
        return np.asarray(_vecdot(x, x))
    rows, cols = x.shape
    k = cols // BLOCK
    out = np.zeros(rows, dtype=np.float64)
    if k:
        main = x[:, : k * BLOCK].reshape(rows, k, BLOCK)
        out += _vecdot(main, main).sum(axis=1, dtype=np.float64)
    if cols > k * BLOCK:
        tail = x[:, k * BLOCK :]
        out += _vecdot(tail, tail).astype(np.float64)
    return out


def _row_dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ_j x_ij·y_ij per row, float32 partials over ≤ BLOCK products accumulated in float64."""
    rows, cols = x.shape
    k = cols // BLOCK
    out = np.zeros(rows, dtype=np.float64)
    if k:
        out += _vecdot(x[:, : k * BLOCK].reshape(rows, k, BLOCK), y[:, : k * BLOCK].reshape(rows, k, BLOCK)).sum(
            axis=1, dtype=np.float64)
    if cols > k * BLOCK:
        out += _vecdot(x[:, k * BLOCK :], y[:, k * BLOCK :]).astype(np.float64)
    return out


def _blocks(n_rows: int, cols: int) -> list[tuple[slice, slice]]:
    # Large rows are cut into column blocks; small rows are grouped so each block holds about CHUNK elements.
    col_step = cols if cols <= CHUNK else CHUNK
    row_step = max(1, CHUNK // col_step)
    return [(slice(i, i + row_step), slice(j, j + col_step))
            for i in range(0, n_rows, row_step) for j in range(0, cols, col_step)]


def row_stats(cur: np.ndarray, prev: np.ndarray | None, *, rows: bool = True,
              prev_sumsq: np.ndarray | None = None, try_fast: bool = True) -> TensorStats:
    """Row sums for the current value and, against the previous checkpoint's value, the tangential term P.

    Fast path (float32 data): one sweep gives ‖b‖², ‖a‖² and ⟨a,b⟩, and P = 2(‖a‖‖b‖ − ⟨a,b⟩). Its error is
    ~ε‖a‖‖b‖ (ε ≲ 2e-6 even in the worst case for the blocked sums), so it is kept only where every row has
    q = P/(‖a‖‖b‖) ≥ FAST_Q, i.e. angles ≥ ~0.2 rad, where the angle error stays below 1e-5 rad. Otherwise a
    second sweep over the blocks (still in memory, no file read) forms d = b − (‖b‖/‖a‖)·a elementwise, whose
    squared norm is P·‖b‖/‖a‖ with no cancellation however small the angle or large the norm change (in float32
    the rounding of d adds ≲ 1e-7 rad). ``try_fast=False`` skips the first attempt (the previous pair of this
    tensor needed the second sweep, so this one very likely does too).
    """
    n_rows = _rows(cur.shape) if rows else 1
    b = np.asarray(cur).reshape(n_rows, -1)
    a = None
    if prev is not None and prev.shape == cur.shape:
        a = np.asarray(prev).reshape(n_rows, -1)
    cols = b.shape[1]
    ss = np.zeros(n_rows, dtype=np.float64)
    if cols == 0 or n_rows == 0:
        z = None if a is None else np.zeros(n_rows)
        return TensorStats(ss, z, z, 0)
    work = np.float64 if b.dtype == np.float64 else np.float32
    blocks = _blocks(n_rows, cols)
    need_prev = a is not None and (prev_sumsq is None or prev_sumsq.shape != ss.shape)
    pss = np.zeros(n_rows, dtype=np.float64) if need_prev or prev_sumsq is None else prev_sumsq
    ab = np.zeros(n_rows, dtype=np.float64)
    fast = a is not None and work == np.float32 and try_fast
    for rs, cs in blocks:
        x = b[rs, cs]
        if x.dtype != work:
            x = x.astype(work)
        ss[rs] += _row_sumsq(x)
        if a is not None and (fast or need_prev):
            y = a[rs, cs]
            y = y if y.dtype == work else y.astype(work)
            if need_prev:
                pss[rs] += _row_sumsq(y)
            if fast:
                ab[rs] += _row_dot(x, y)
    if a is None:
        return TensorStats(ss, None, None, int(b.size))
    na, nb = np.sqrt(pss), np.sqrt(ss)
    live = (na > 0) & (nb > 0)
    if fast:
        tang = np.maximum(2.0 * (na * nb - ab), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = tang / (na * nb)
        if bool(np.all(q[live] >= FAST_Q)):
            return TensorStats(ss, pss, np.where(live, tang, 0.0), int(b.size), fast=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(live, nb / na, 0.0)
        back = np.where(live, na / nb, 0.0)
    tang = np.zeros(n_rows, dtype=np.float64)
    scale_w = scale.astype(work)
    scratch = np.empty(min(b.size, CHUNK), dtype=work)
    for rs, cs in blocks:
        x = b[rs, cs]
        d = scratch[: x.size].reshape(x.shape)
        np.multiply(a[rs, cs], scale_w[rs, None], out=d, casting="unsafe")
        np.subtract(x, d, out=d, casting="unsafe")
        tang[rs] += _row_sumsq(d)
    return TensorStats(ss, pss, tang * back, int(b.size))


def _chained(cur: np.ndarray, prev: np.ndarray | None, rows: bool,
             prev_stats: Future[TensorStats] | None) -> TensorStats:
    """row_stats with the previous checkpoint's sums of the same tensor (submitted earlier, so never a deadlock)."""
    if prev_stats is None or prev is None:
        return row_stats(cur, prev, rows=rows)
    before = prev_stats.result()
    # The first pair has no hint; later pairs retry the one-sweep form only if it worked last time.
    return row_stats(cur, prev, rows=rows, prev_sumsq=before.sumsq, try_fast=before.fast or before.tang is None)


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
                 row_names: Collection[str] | None = None) -> Iterator[CheckpointStats]:
    """Per-tensor statistics for each checkpoint, yielded in step order. Tensors in ``row_names`` (default: all)
    get per-row sums, the others one total."""
    wanted = set(names)
    with_rows = wanted if row_names is None else set(row_names)
    order: list[str] = []
    for ck in checkpoints:
        order.extend(n for n in ck.tensors if n in wanted and n not in order)
    per_ck: list[dict[str, TensorStats]] = [{} for _ in checkpoints]
    warns: list[list[str]] = [[] for _ in checkpoints]
    for i, ck in enumerate(checkpoints):
        missing = wanted - set(ck.tensors)
        if missing:
            warns[i].append(f"{len(missing)} unit tensor(s) not in {ck.path.name}: {sorted(missing)[:3]}")
    workers = max(1, min(4, os.cpu_count() or 1))
    progress = _progress(len(order) * len(checkpoints), quiet)
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task("measuring", total=len(order) * len(checkpoints))
    pending: deque[tuple[int, str, Future[TensorStats]]] = deque()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ilr-measure") as pool:
            for name in order:
                prev: np.ndarray | None = None
                prev_fut: Future[TensorStats] | None = None
                for i, ck in enumerate(checkpoints):
                    if name not in ck.tensors:
                        prev = None
                        continue
                    cur = ck.read(name)
                    if prev is not None and prev.shape != cur.shape:
                        warns[i].append(f"{name}: shape {prev.shape} -> {cur.shape}; no angle for this pair")
                        prev = None
                    fut = pool.submit(_chained, cur, prev, name in with_rows, prev_fut)
                    pending.append((i, name, fut))
                    prev, prev_fut = cur, fut
                    del cur
                    while len(pending) > workers:
                        j, n, fut = pending.popleft()
                        per_ck[j][n] = fut.result()
                    if progress is not None and task is not None:
                        progress.advance(task)
                del prev
            while pending:
                j, n, fut = pending.popleft()
                per_ck[j][n] = fut.result()
    finally:
        if progress is not None:
            progress.stop()
    for i, ck in enumerate(checkpoints):
        yield CheckpointStats(i, ck, per_ck[i], warns[i])

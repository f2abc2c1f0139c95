"""The single tensor pass of :func:`ilr_inspect.measure.stream.stream_stats`, split into Ray tasks.

A task is one tensor group × one checkpoint segment. It is sent paths, the format names, the open options, tensor
names, which of them need pair sums, and the kernel flag — never tensors — reopens its checkpoints on the worker,
and walks each tensor's chain through the segment (two tensors in memory), calling
:func:`~ilr_inspect.measure.stream.row_stats` exactly as the local pass does: same ``rows``, same ``kernel``, ‖a‖²
reused from the previous checkpoint, pairs only for the tensors the local pass gives pairs. Segments of tensors
with pairs overlap by one checkpoint: the boundary is read by both neighbours (the earlier one measures it, the
later one only needs it as the previous value a and its ‖a‖²). A tensor without pairs (``norms`` needs only ‖w‖²)
skips the boundary, and a task none of whose tensors has pairs does not even open it, so each of its checkpoints
is read once. Only the per-row float64 sums and warnings come back; the driver reduces them into the same
:class:`~ilr_inspect.measure.stream.CheckpointStats` sequence in step order, so everything downstream is unchanged.

Bit-identity: every sum is the same computation on the same bytes as the local pass (the compiled pair loop takes
the known ‖a‖² just as the local pass does), so ‖w‖², ‖a‖² and P — and hence every table column — are
bit-identical.

Worker start-up is part of every Ray run. What a worker imports for a task is this module (NumPy, the checkpoint
record, the measure package for the stream's sums: ~65 ms CPU beyond NumPy, measured) and, inside the task, the
format readers; Ray's own worker start (importing ray, ~1-2 s CPU) dwarfs it.

Dead workers: Ray reruns a task whose worker died (``max_retries``); a task is a pure function of files, so a
rerun gives the same result.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import Checkpoint
from ..errors import IlrError, InputError
from ..measure.stream import CheckpointStats, TensorStats, _check, _progress, row_stats

if TYPE_CHECKING:
    from ..formats import OpenOptions

MIN_TASK_BYTES_ENV = "ILR_INSPECT_RAY_TASK_BYTES"
MIN_TASK_BYTES = 64 << 20  # below this a task's fixed cost (scheduling, reopening headers) starts to show
MAX_TASK_BYTES = 1 << 30  # above this a retried task loses much work, and progress is coarse
TASKS_PER_CPU = 4  # enough tasks to balance uneven groups across the cluster
MAX_RETRIES = 3

_Sums = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]
_TaskResult = list[tuple[dict[str, _Sums], list[str]]]


@dataclass(frozen=True)
class Plan:
    """Tensor groups (contiguous runs of the pass order) × checkpoint segments (``[lo, hi)`` new checkpoints)."""

    groups: list[list[str]]
    segments: list[tuple[int, int]]
    group_bytes: int  # the largest group's bytes in one checkpoint
    total_bytes: int

    @property
    def tasks(self) -> int:
        return len(self.groups) * len(self.segments)

    def describe(self) -> str:
        ck = max((hi - lo for lo, hi in self.segments), default=0)
        return (f"{self.tasks} tasks = {len(self.groups)} tensor group(s) of ≤ {self.group_bytes / 2**20:.1f} MiB "
                f"× {len(self.segments)} segment(s) of ≤ {ck} checkpoint(s) "
                f"({self.total_bytes / 2**30:.2f} GiB in all)")


def plan(checkpoints: Sequence[Checkpoint], order: Sequence[str], cpus: int,
         min_task_bytes: int | None = None) -> Plan:
    """About TASKS_PER_CPU tasks per CPU, each reading between ``min_task_bytes`` and MAX_TASK_BYTES. Tensor
    groups come first (they cost nothing extra); checkpoint segments only where groups are too few (each boundary
    is read twice)."""
    if min_task_bytes is None:
        env = os.environ.get(MIN_TASK_BYTES_ENV)
        min_task_bytes = int(env) if env and env.isdigit() else MIN_TASK_BYTES
    size: dict[str, int] = {}
    for ck in checkpoints:
        for n in order:
            if n in ck.tensors:
                size[n] = max(size.get(n, 0), ck.tensors[n].nbytes)
    per_ck = sum(size.values())
    total = sum(ck.tensors[n].nbytes for ck in checkpoints for n in order if n in ck.tensors)
    wanted = max(TASKS_PER_CPU * max(1, cpus), math.ceil(total / MAX_TASK_BYTES))
    wanted = max(1, min(wanted, total // max(1, min_task_bytes)))
    n_groups = max(1, min(len(order), wanted))
    target = per_ck / n_groups
    groups: list[list[str]] = []
    cur: list[str] = []
    acc = 0
    for n in order:  # contiguous runs by bytes, so a group reads a contiguous stretch of each file
        if cur and acc + size[n] / 2 > target and len(groups) < n_groups - 1:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(n)
        acc += size[n]
    if cur:
        groups.append(cur)
    n_seg = max(1, min(len(checkpoints), math.ceil(wanted / len(groups))))
    cuts = [round(k * len(checkpoints) / n_seg) for k in range(n_seg + 1)]
    segments = [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]
    gbytes = max((sum(size[n] for n in g) for g in groups), default=0)
    return Plan(groups, segments, gbytes, total)


def measure_task(paths: list[str], formats: list[str], options: OpenOptions, names: list[str],
                 shapes: list[dict[str, tuple[int, ...]]], rows: list[bool], kernel: bool,
                 boundary: bool, pairs: list[bool] | None = None,
                 before: dict[str, tuple[int, ...]] | None = None) -> _TaskResult:
    """One task, on a worker: reopen the checkpoints, walk each tensor's chain, return the sums.

    ``boundary``: the first checkpoint belongs to the previous segment; it is read only as the previous value of
    the tensors with ``pairs`` (default: all), and there only their shapes matter to the others. ``before``: the
    shapes in the checkpoint before the first, where that one is not opened (a segment with no pairs)."""
    from ..formats import detect
    from ..storage import to_path

    os.environ.setdefault("ILR_INSPECT_LEAN_NUMBA", "1")  # a Ray worker is ours (measure/_kernel.py)
    cks: list[Checkpoint] = []
    try:
        for p, fmt, want in zip(paths, formats, shapes, strict=True):
            path = to_path(p)  # a local path, or a URL (s3://, gs://, ...) the worker opens with its own credentials
            ck = detect(path).open(path, options)
            cks.append(ck)
            got = {n: tuple(ck.tensors[n].shape) for n in names if n in ck.tensors}
            if ck.format != fmt or got != want:
                raise InputError("changed since the series was listed (format or tensors differ on a Ray worker)",
                                 hint="rerun once the checkpoints are final; every node must see the same files",
                                 path=path)
        start = 1 if boundary else 0
        out: _TaskResult = [({}, []) for _ in cks[start:]]
        for name, by_rows, paired in zip(names, rows, pairs or [True] * len(names), strict=True):
            prev: np.ndarray | None = None
            prev_ss: np.ndarray | None = None
            if not paired:  # ‖w‖² only, as the local pass: no previous value, the boundary is not read
                for j in range(start, len(cks)):
                    ck = cks[j]
                    info = cks[j - 1].tensors.get(name) if j else None
                    was = tuple(info.shape) if info is not None else (before or {}).get(name) if not j else None
                    if name not in ck.tensors:
                        continue
                    cur = ck.read(name)
                    if was is not None and tuple(was) != cur.shape:
                        out[j - start][1].append(f"{name}: shape {tuple(was)} -> {cur.shape}; no angle for this pair")
                    st0 = _check(name, row_stats(cur, None, rows=by_rows, kernel=kernel), out[j - start][1])
                    out[j - start][0][name] = (st0.sumsq, st0.prev_sumsq, st0.tang, st0.numel)
                    del cur
                continue
            for j, ck in enumerate(cks):
                if name not in ck.tensors:
                    prev = prev_ss = None
                    continue
                cur = ck.read(name)
                if prev is not None and prev.shape != cur.shape:
                    if j >= start:
                        out[j - start][1].append(f"{name}: shape {prev.shape} -> {cur.shape}; no angle for this pair")
                    prev = prev_ss = None
                st: TensorStats
                if j < start:
                    st = row_stats(cur, None, rows=by_rows, kernel=kernel)
                else:
                    st = row_stats(cur, prev, rows=by_rows, kernel=kernel,
                                   prev_sumsq=prev_ss if prev is not None else None)
                    _check(name, st, out[j - start][1])
                    out[j - start][0][name] = (st.sumsq, st.prev_sumsq, st.tang, st.numel)
                prev, prev_ss = cur, st.sumsq
                del cur
            del prev
        return out
    finally:
        for ck in cks:
            ck.close()


def _cause(exc: BaseException) -> BaseException:
    """The user's error behind a failed task (a RayTaskError wraps it)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, IlrError) else exc


def ray_stream_stats(address: str, checkpoints: Sequence[Checkpoint], order: Sequence[str], with_rows: set[str],
                     kernel: bool, warns: list[list[str]], *, options: OpenOptions | None = None,
                     quiet: bool = True, pair_names: Collection[str] | None = None) -> Iterator[CheckpointStats]:
    """The Ray counterpart of the local loop in ``stream_stats``: same arguments, same yields."""
    from ..formats import OpenOptions
    from .cluster import session

    opts = options or OpenOptions()
    with_pairs = set(order) if pair_names is None else set(pair_names)
    with session(address) as ray:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pl = plan(checkpoints, order, cpus)
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(measure_task)
        refs: dict[Any, tuple[int, int]] = {}
        for gi, group in enumerate(pl.groups):
            rows = [n in with_rows for n in group]
            paired = [n in with_pairs for n in group]
            for si, (lo, hi) in enumerate(pl.segments):
                first = max(0, lo - 1) if any(paired) else lo  # the boundary is read only for pairs
                seg = checkpoints[first:hi]
                shapes = [{n: tuple(ck.tensors[n].shape) for n in group if n in ck.tensors} for ck in seg]
                before = ({n: tuple(checkpoints[lo - 1].tensors[n].shape) for n in group
                           if n in checkpoints[lo - 1].tensors} if first == lo > 0 else None)
                ref = remote.options(name=f"ilr-measure g{gi} s{si}").remote(
                    [str(ck.path) for ck in seg], [ck.format for ck in seg], opts, group, shapes, rows, kernel,
                    first < lo, paired, before)
                refs[ref] = (gi, si)
        got: dict[tuple[int, int], _TaskResult] = {}
        progress = _progress(pl.tasks, quiet)
        task = progress.add_task("measuring on Ray", total=pl.tasks) if progress is not None else None
        if progress is not None:
            progress.start()
        seg_of = [0] * len(checkpoints)
        for si, (lo, hi) in enumerate(pl.segments):
            for i in range(lo, hi):
                seg_of[i] = si
        nxt = 0
        pending = list(refs)
        try:
            while nxt < len(checkpoints):
                while not all((gi, seg_of[nxt]) in got for gi in range(len(pl.groups))):
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        try:
                            got[refs[ref]] = ray.get(ref)
                        except Exception as exc:  # re-raised as the worker's own error when it has one
                            raise _cause(exc) from None
                        if progress is not None and task is not None:
                            progress.advance(task)
                si = seg_of[nxt]
                lo = pl.segments[si][0]
                tensors: dict[str, TensorStats] = {}
                for gi in range(len(pl.groups)):
                    stats, ws = got[(gi, si)][nxt - lo]
                    tensors.update({n: TensorStats(*v) for n, v in stats.items()})
                    warns[nxt].extend(ws)
                yield CheckpointStats(nxt, checkpoints[nxt], tensors, warns[nxt])
                nxt += 1
                if nxt == len(checkpoints) or seg_of[nxt] != si:  # a finished segment's sums are no longer needed
                    for gi in range(len(pl.groups)):
                        got.pop((gi, si), None)
        finally:
            if progress is not None:
                progress.stop()
            for ref in pending:
                ray.cancel(ref, force=True)

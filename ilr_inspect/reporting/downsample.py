"""Keep charts of long series and many units small without hiding anything that matters.

Checkpoint tables are *thinned*: a subset of real checkpoints is charted (so every plotted point is a row of the
``norms``/``angles`` table), evenly spaced, always with the first and the last checkpoint and every schedule
change. Dense log curves are *aggregated* per bin (mean with a min–max band), the last bin ending at the last
logged step. Callers say in the chart caption when either happened.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Thinned:
    frame: pd.DataFrame
    total: int  # distinct x values before thinning
    kept: int  # distinct x values charted

    @property
    def thinned(self) -> bool:
        return self.kept < self.total


def pick_steps(steps: Sequence[float], max_points: int, keep: Iterable[float] = ()) -> list[float]:
    """At most about ``max_points`` of the distinct ``steps``, evenly spaced by index; the first, the last and
    every value in ``keep`` are always included (so the result may exceed ``max_points`` by ``len(keep)``)."""
    distinct = sorted(set(steps))
    if len(distinct) <= max_points:
        return distinct
    n = max(max_points, 2)
    idx = np.unique(np.round(np.linspace(0, len(distinct) - 1, n)).astype(int))
    chosen = {distinct[i] for i in idx}
    chosen.update(s for s in keep if s in set(distinct))
    return sorted(chosen)


def thin(frame: pd.DataFrame, x: str, max_points: int, keep: Iterable[float] = ()) -> Thinned:
    """Rows of ``frame`` at a subset of its distinct ``x`` values (see :func:`pick_steps`)."""
    values = frame[x].dropna()
    total = int(values.nunique())
    chosen = pick_steps(list(values.unique()), max_points, keep)
    if len(chosen) == total:
        return Thinned(frame, total, total)
    return Thinned(frame[frame[x].isin(chosen)].reset_index(drop=True), total, len(chosen))


def aggregate(frame: pd.DataFrame, x: str, y: str, by: str, max_points: int) -> tuple[pd.DataFrame, bool]:
    """Per ``by`` group with more than ``max_points`` rows: bins of consecutive rows (in ``x`` order) reduced to
    the bin's last ``x``, the mean of ``y`` and its min/max. Columns: ``by``, ``x``, ``y``, ``y_min``, ``y_max``,
    ``n``. Groups that fit are returned unchanged with ``y_min = y_max = y`` and ``n = 1``."""
    parts: list[pd.DataFrame] = []
    aggregated = False
    for key, group in frame.sort_values([by, x]).groupby(by, sort=True):
        g = group[[x, y]].dropna()
        if len(g) <= max_points:
            part = pd.DataFrame({by: key, x: g[x].to_numpy(), y: g[y].to_numpy(), "y_min": g[y].to_numpy(),
                                 "y_max": g[y].to_numpy(), "n": 1})
        else:
            aggregated = True
            # Bin edges by row index; the last bin always contains the last row, so the run's end is shown.
            bins = np.minimum((np.arange(len(g)) * max_points) // len(g), max_points - 1)
            grouped = g.assign(_bin=bins).groupby("_bin", sort=True)
            part = pd.DataFrame({
                by: key,
                x: grouped[x].max().to_numpy(),
                y: grouped[y].mean().to_numpy(),
                "y_min": grouped[y].min().to_numpy(),
                "y_max": grouped[y].max().to_numpy(),
                "n": grouped[y].size().to_numpy(),
            })
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[by, x, y, "y_min", "y_max", "n"]), False
    return pd.concat(parts, ignore_index=True), aggregated


def top_units(norms: pd.DataFrame, max_units: int) -> tuple[list[str], int]:
    """The units to draw as lines: the ``max_units`` with the most parameters (ties by name), and how many there
    were. Only scale-invariant units are considered when there are any."""
    frame = norms
    if "scale_invariant" in frame.columns and frame["scale_invariant"].fillna(False).astype(bool).any():
        frame = frame[frame["scale_invariant"].fillna(False).astype(bool)]
    if "numel" in frame.columns:
        sizes = frame.groupby("unit", sort=True)["numel"].max().fillna(0)
    else:
        sizes = frame.groupby("unit", sort=True).size().astype(float) * 0
    order = sorted(sizes.index, key=lambda u: (-float(sizes[u]), str(u)))
    return [str(u) for u in order[:max_units]], len(order)

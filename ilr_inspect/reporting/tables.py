"""The tables a report is built from, and small derived views shared by charts, summary and gates.

Every table is optional: a report shows what exists (no angles for a single checkpoint, no distance without a
model and probe, no equilibrium without a results folder) and says what is missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class ReportTables:
    """Library results as DataFrames (columns in docs/schema.md) plus provenance ``meta`` for the footer."""

    norms: pd.DataFrame | None = None
    angles: pd.DataFrame | None = None
    units: pd.DataFrame | None = None
    ls: pd.DataFrame | None = None
    hparams: pd.DataFrame | None = None
    distance: pd.DataFrame | None = None
    equilibrium: pd.DataFrame | None = None
    equilibrium_meta: dict[str, Any] = field(default_factory=dict)
    equilibrium_curves: pd.DataFrame | None = None  # per arm and evaluation: distance_between, noise_floor
    curves: pd.DataFrame | None = None  # training curves from logs: step, tag, value, kind
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    title: str = "ilr-inspect report"
    _changes: pd.DataFrame | None = field(default=None, repr=False, compare=False)  # cache of schedule_changes


def si_mask(frame: pd.DataFrame) -> pd.Series:
    """Rows of scale-invariant units; all rows when the table does not say (angles has no such column)."""
    if "scale_invariant" not in frame.columns:
        return pd.Series(True, index=frame.index)
    return frame["scale_invariant"].fillna(False).astype(bool)


def si_units(tables: ReportTables) -> set[str] | None:
    """Names of scale-invariant units from the units table (or the norms table), None when unknown."""
    for frame in (tables.units, tables.norms):
        if isinstance(frame, pd.DataFrame) and "scale_invariant" in frame.columns and not frame.empty:
            return {str(u) for u in frame.loc[si_mask(frame), "unit"].unique()}
    return None


def si_angles(tables: ReportTables) -> pd.DataFrame | None:
    """Angle rows of scale-invariant units (the only ones with a meaningful equilibrium prediction)."""
    if tables.angles is None or tables.angles.empty:
        return None
    names = si_units(tables)
    frame = tables.angles
    return frame if names is None else frame[frame["unit"].astype(str).isin(names)]


def si_norms(tables: ReportTables) -> pd.DataFrame | None:
    if tables.norms is None or tables.norms.empty:
        return None
    frame = tables.norms
    mask = si_mask(frame)
    return frame[mask] if mask.any() else frame


def _same(a: Any, b: Any) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return bool(a == b)


def hyper_frame(tables: ReportTables) -> pd.DataFrame | None:
    """Per checkpoint × parameter (hparams table) or × unit (norms table) lr and weight decay, keyed ``item``."""
    if tables.hparams is not None and not tables.hparams.empty:
        frame = tables.hparams.rename(columns={"parameter": "item"})
    elif tables.norms is not None and not tables.norms.empty and "lr" in tables.norms.columns:
        frame = tables.norms.rename(columns={"unit": "item"})
    else:
        return None
    cols = [c for c in ("step", "item", "lr", "weight_decay", "momentum", "optimizer", "source") if c in frame]
    out = frame[cols].dropna(subset=["step"]).copy()
    out["step"] = out["step"].astype("float64")
    return out.sort_values(["item", "step"], kind="stable").reset_index(drop=True)


def _fmt(v: Any) -> str:
    return "none" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def schedule_changes(tables: ReportTables) -> pd.DataFrame:
    """Checkpoints where any parameter's lr or weight decay differs from its value at the previous checkpoint:
    columns ``step`` and ``change`` (the most common old → new transition at that step, in words)."""
    if tables._changes is None:
        tables._changes = _schedule_changes(tables)
    return tables._changes


def _schedule_changes(tables: ReportTables) -> pd.DataFrame:
    frame = hyper_frame(tables)
    rows: list[dict[str, Any]] = []
    if frame is not None:
        seen: dict[float, dict[str, int]] = {}
        for _, g in frame.groupby("item", sort=False):
            steps = g["step"].to_numpy(dtype="float64")
            for col, name in (("lr", "lr"), ("weight_decay", "wd")):
                if col not in g.columns:
                    continue
                values = list(g[col])
                for i in range(1, len(values)):
                    a, b = values[i - 1], values[i]
                    if not _same(a, b):
                        words = f"{name} {_fmt(a)} → {_fmt(b)}"
                        bucket = seen.setdefault(float(steps[i]), {})
                        bucket[words] = bucket.get(words, 0) + 1
        for step in sorted(seen):
            counts = seen[step]
            kinds: dict[str, str] = {}
            for words in sorted(counts, key=lambda w: (-counts[w], w)):
                kinds.setdefault(words.split(" ", 1)[0], words)
            rows.append({"step": step, "change": "; ".join(kinds[k] for k in sorted(kinds))})
    return pd.DataFrame(rows, columns=["step", "change"])


def step_domain(tables: ReportTables) -> tuple[float, float] | None:
    """One step axis for every step chart, so a schedule change lines up with its effect on norms and loss."""
    values: list[float] = []
    for frame, cols in ((tables.norms, ("step",)), (tables.angles, ("step_from", "step_to")),
                        (tables.hparams, ("step",)), (tables.curves, ("step",)), (tables.ls, ("step",))):
        if frame is None or frame.empty:
            continue
        for c in cols:
            if c in frame.columns:
                col = pd.to_numeric(frame[c], errors="coerce").dropna()
                if len(col):
                    values.extend((float(col.min()), float(col.max())))
    if not values:
        return None
    lo, hi = min(values), max(values)
    return (lo, hi if hi > lo else lo + 1)


def finite(values: pd.Series) -> np.ndarray:
    arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    out: np.ndarray = arr[np.isfinite(arr)]
    return out

"""`ls` and `hparams`: what a series holds, and the hyperparameter timeline with the source of every value."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .output import Result, provenance
from .series import Series, open_series

SeriesLike = Series | Sequence[str | Path] | str | Path


def as_series(paths: SeriesLike, **kwargs: Any) -> tuple[Series, bool]:
    """A Series from paths (opened here, so the caller closes it) or the Series itself."""
    if isinstance(paths, Series):
        return paths, False
    return open_series(paths, **kwargs), True


def _settings(series: Series, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"warnings": list(series.warnings)}
    if series.overrides is not None:
        s["overrides"] = {k: v for k, v in vars(series.overrides).items() if v is not None} if hasattr(
            series.overrides, "__dict__") else {
            f: getattr(series.overrides, f) for f in ("lr", "weight_decay", "momentum", "optimizer")
            if getattr(series.overrides, f) is not None}
    s.update(extra or {})
    return s


def ls(paths: SeriesLike, **series_kwargs: Any) -> Result:
    """One row per checkpoint: where its step came from, its format, size, and where hyperparameters were found."""
    series, owned = as_series(paths, **series_kwargs)
    try:
        rows = []
        for c in series:
            hp = series.hparams_for(c)
            sources = sorted({h.source for h in hp.values() if h.source != "none"})
            rows.append({
                "step": c.step,
                "step_source": c.step_source,
                "checkpoint": str(c.path),
                "format": c.format,
                "tensors": len(c.tensors),
                "bytes": c.nbytes,
                "hparams_source": ", ".join(sources) if sources else "none",
                "parameters": len(c.parameters),
                "epoch": c.metadata.get("epoch"),
            })
        frame = pd.DataFrame(rows, columns=["step", "step_source", "checkpoint", "format", "tensors", "bytes",
                                            "hparams_source", "parameters", "epoch"])
        frame["step"] = frame["step"].astype("Int64")
        frame["epoch"] = frame["epoch"].astype("Int64")
        meta = provenance([c.path for c in series], _settings(series))
        if series.logs is not None:
            meta["logs"] = sorted({str(s) for s in series.logs.scalars["source"].unique()}) if len(
                series.logs.scalars) else []
        return Result("ls", frame, meta)
    finally:
        if owned:
            series.close()


HPARAM_COLUMNS = ["step", "checkpoint", "parameter", "lr", "weight_decay", "momentum", "beta2", "optimizer",
                  "wd_mode", "source", "lr_timing"]


def hparams(paths: SeriesLike, *, trainable_only: bool = True, **series_kwargs: Any) -> Result:
    """One row per checkpoint × trainable parameter: lr, weight decay, momentum/β1, β2, optimizer family,
    weight-decay mode and the source of the values. ``lr_timing`` says whether ``lr`` is the value for the next
    update (saved optimizer state) or the one used at that step (logs)."""
    series, owned = as_series(paths, **series_kwargs)
    try:
        rows = []
        for c in series:
            for name, hp in series.hparams_for(c).items():
                rows.append({
                    "step": c.step, "checkpoint": str(c.path), "parameter": name, "lr": hp.lr,
                    "weight_decay": hp.weight_decay, "momentum": hp.momentum, "beta2": hp.beta2,
                    "optimizer": hp.optimizer, "wd_mode": hp.wd_mode, "source": hp.source,
                    "lr_timing": hp.lr_timing if hp.lr is not None else None,
                })
        frame = pd.DataFrame(rows, columns=HPARAM_COLUMNS)
        frame["step"] = frame["step"].astype("Int64")
        for col in ("lr", "weight_decay", "momentum", "beta2"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
        meta = provenance([c.path for c in series], _settings(series, {"trainable_only": trainable_only}))
        if frame["lr"].isna().all() and len(frame):
            meta.setdefault("notes", []).append(
                "no learning rate found in the checkpoints or logs: pass --lr/--wd/--momentum/--optimizer")
        return Result("hparams", frame, meta)
    finally:
        if owned:
            series.close()


def changes(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of an hparams table where any value differs from the previous checkpoint (schedule changes)."""
    if frame.empty:
        return frame
    cols = ["lr", "weight_decay", "momentum"]
    per_step = frame.groupby("step", sort=True)[cols].first()
    diff = per_step.ne(per_step.shift()) & per_step.shift().notna()
    return per_step[diff.any(axis=1)].reset_index()

"""`ls` and `hparams`: what a series holds, and the hyperparameter timeline with the source of every value."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .output import Records, Result, provenance, whole_or_float
from .series import Series, SeriesSource, borrow

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["HPARAM_COLUMNS", "changes", "hparams", "ls", "missing_note", "whole_or_float"]

SeriesLike = SeriesSource  # kept for callers that imported the old name


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
    with borrow(paths, **series_kwargs) as series:
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
                "aliases": ", ".join(f"{a.path.name} ({a.how})" for a in series.aliases if a.same_as == c.path),
            })
        # HF trainer_state epochs are fractional (0.5): step and epoch are whole numbers where they can be.
        frame = Records(rows, ["step", "step_source", "checkpoint", "format", "tensors", "bytes", "hparams_source",
                               "parameters", "epoch", "aliases"], {"step": "whole-or-float", "epoch": "whole-or-float"})
        meta = provenance([c.path for c in series], _settings(series))
        meta["axis"] = series.axis
        meta["aliases"] = [{"path": str(a.path), "same_as": str(a.same_as), "how": a.how} for a in series.aliases]
        if series.logs is not None:
            meta["logs"] = sorted({str(s) for s in series.logs.scalars["source"].unique()}) if len(
                series.logs.scalars) else []
        return Result("ls", frame, meta)


HPARAM_COLUMNS = ["step", "checkpoint", "parameter", "lr", "weight_decay", "momentum", "beta2", "optimizer",
                  "wd_mode", "source", "lr_timing", "lr_source", "wd_source", "momentum_source"]


def _na(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or type(v).__name__ == "NAType"


def missing_note(frame: pd.DataFrame | Sequence[Mapping[str, Any]]) -> str | None:
    """One note naming the parameters left without an intrinsic LR (lr or weight decay missing, or no way to
    tell how weight decay is applied) and the flags that supply what is missing. ``frame``: hparams rows, as a
    DataFrame or as plain dicts (no pandas needed)."""
    rows: Sequence[Mapping[Any, Any]] = frame if isinstance(frame, Sequence) else frame.to_dict(orient="records")
    if not rows:
        return None
    no_lr = [_na(r["lr"]) for r in rows]
    no_wd = [_na(r["weight_decay"]) for r in rows]
    no_mode = [_na(r["wd_mode"]) and not _na(r["weight_decay"]) and r["weight_decay"] != 0 for r in rows]
    no_opt = [_na(r["optimizer"]) for r in rows]
    bad = [a or b or c for a, b, c in zip(no_lr, no_wd, no_mode, strict=True)]
    if not any(bad):
        return None
    params = list(dict.fromkeys(str(r["parameter"]) for r, b in zip(rows, bad, strict=True) if b))
    total = len({r["parameter"] for r in rows if not _na(r["parameter"])})
    ckpts = len({r["checkpoint"] for r, b in zip(rows, bad, strict=True) if b and not _na(r["checkpoint"])})
    flags = []
    if any(no_lr):
        flags.append("--lr VALUE (learning rate)")
    if any(no_wd):
        flags.append("--wd VALUE (weight decay)")
    if any(no_mode) or any(w and o for w, o in zip(no_wd, no_opt, strict=True)):
        flags.append("--optimizer sgd|adam|adamw|lion (how weight decay is applied)")
    sgd = [not o and str(r["optimizer"]).lower().startswith("sgd") for r, o in zip(rows, no_opt, strict=True)]
    if any(_na(r["momentum"]) and (s or o) and b for r, s, o, b in zip(rows, sgd, no_opt, bad, strict=True)):
        flags.append("--momentum VALUE (SGD momentum, 0 if none)")
    shown = ", ".join(params[:6]) + (f", … ({len(params) - 6} more)" if len(params) > 6 else "")
    lacking = "/".join(what for what, m in (("lr", no_lr), ("weight decay", no_wd),
                                             ("how weight decay is applied", no_mode)) if any(m))
    return (f"no intrinsic LR for {len(params)} of {total} parameters at {ckpts} checkpoint(s) ({shown}): the "
            f"files and logs do not give {lacking}; pass " + ", ".join(flags))


def hparams(paths: SeriesLike, *, trainable_only: bool = True, **series_kwargs: Any) -> Result:
    """One row per checkpoint × trainable parameter: lr, weight decay, momentum/β1, β2, optimizer family,
    weight-decay mode and the source of the values. ``lr_timing`` says whether ``lr`` is the value for the next
    update (saved optimizer state) or the one used at that step (logs)."""
    with borrow(paths, **series_kwargs) as series:
        rows = []
        for c in series:
            for name, hp in series.hparams_for(c).items():
                src = series.field_sources(c, name, hp)
                rows.append({
                    "step": c.step, "checkpoint": str(c.path), "parameter": name, "lr": hp.lr,
                    "weight_decay": hp.weight_decay, "momentum": hp.momentum, "beta2": hp.beta2,
                    "optimizer": hp.optimizer, "wd_mode": hp.wd_mode, "source": hp.source,
                    "lr_timing": hp.lr_timing if hp.lr is not None else None,
                    "lr_source": src["lr"], "wd_source": src["weight_decay"], "momentum_source": src["momentum"],
                })
        frame = Records(rows, HPARAM_COLUMNS, {"step": "whole-or-float", "lr": "float64", "weight_decay": "float64",
                                               "momentum": "float64", "beta2": "float64"})
        meta = provenance([c.path for c in series], _settings(series, {"trainable_only": trainable_only}))
        meta["axis"] = series.axis
        note = missing_note(rows)
        if note and note not in series.warnings:  # open_series already warned with the same line
            meta.setdefault("notes", []).append(note)
        return Result("hparams", frame, meta)


def changes(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of an hparams table where any value differs from the previous checkpoint (schedule changes)."""
    if frame.empty:
        return frame
    cols = ["lr", "weight_decay", "momentum"]
    per_step = frame.groupby("step", sort=True)[cols].first()
    diff = per_step.ne(per_step.shift()) & per_step.shift().notna()
    return per_step[diff.any(axis=1)].reset_index()

"""`ls` and `hparams`: what a series holds, and the hyperparameter timeline with the source of every value."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .output import Result, provenance
from .series import Series, SeriesSource, borrow

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
        frame = pd.DataFrame(rows, columns=["step", "step_source", "checkpoint", "format", "tensors", "bytes",
                                            "hparams_source", "parameters", "epoch", "aliases"])
        frame["step"] = whole_or_float(frame["step"])
        frame["epoch"] = whole_or_float(frame["epoch"])  # HF trainer_state epochs are fractional (0.5)
        meta = provenance([c.path for c in series], _settings(series))
        meta["axis"] = series.axis
        meta["aliases"] = [{"path": str(a.path), "same_as": str(a.same_as), "how": a.how} for a in series.aliases]
        if series.logs is not None:
            meta["logs"] = sorted({str(s) for s in series.logs.scalars["source"].unique()}) if len(
                series.logs.scalars) else []
        return Result("ls", frame, meta)


HPARAM_COLUMNS = ["step", "checkpoint", "parameter", "lr", "weight_decay", "momentum", "beta2", "optimizer",
                  "wd_mode", "source", "lr_timing", "lr_source", "wd_source", "momentum_source"]


def whole_or_float(col: pd.Series) -> pd.Series:
    """A nullable integer column when every value is whole, else float: a missing or fractional value never
    fails the cast (pandas refuses ``Int64`` for 0.5, and object columns mixing None and numbers)."""
    values = pd.to_numeric(col, errors="coerce").astype("float64")
    finite = values.dropna()
    if bool((finite == finite.round()).all()) and bool((finite.abs() < 2**53).all()):
        return values.astype("Int64")
    return values


def missing_note(frame: pd.DataFrame) -> str | None:
    """One note naming the parameters left without an intrinsic LR (lr or weight decay missing, or no way to
    tell how weight decay is applied) and the flags that supply what is missing."""
    if frame.empty:
        return None
    no_lr = frame["lr"].isna()
    no_wd = frame["weight_decay"].isna()
    no_mode = frame["wd_mode"].isna() & frame["weight_decay"].fillna(0).ne(0)
    bad = no_lr | no_wd | no_mode
    if not bool(bad.any()):
        return None
    params = list(dict.fromkeys(frame.loc[bad, "parameter"].astype(str)))
    total = frame["parameter"].nunique()
    ckpts = frame.loc[bad, "checkpoint"].nunique()
    flags = []
    if bool(no_lr.any()):
        flags.append("--lr VALUE (learning rate)")
    if bool(no_wd.any()):
        flags.append("--wd VALUE (weight decay)")
    if bool(no_mode.any()) or bool((no_wd & frame["optimizer"].isna()).any()):
        flags.append("--optimizer sgd|adam|adamw|lion (how weight decay is applied)")
    sgd = frame["optimizer"].fillna("").str.lower().str.startswith("sgd")
    if bool((frame["momentum"].isna() & (sgd | frame["optimizer"].isna()) & bad).any()):
        flags.append("--momentum VALUE (SGD momentum, 0 if none)")
    shown = ", ".join(params[:6]) + (f", … ({len(params) - 6} more)" if len(params) > 6 else "")
    lacking = "/".join(what for what, m in (("lr", no_lr), ("weight decay", no_wd),
                                             ("how weight decay is applied", no_mode)) if bool(m.any()))
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
        frame = pd.DataFrame(rows, columns=HPARAM_COLUMNS)
        frame["step"] = whole_or_float(frame["step"])
        for col in ("lr", "weight_decay", "momentum", "beta2"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
        meta = provenance([c.path for c in series], _settings(series, {"trainable_only": trainable_only}))
        meta["axis"] = series.axis
        note = missing_note(frame)
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

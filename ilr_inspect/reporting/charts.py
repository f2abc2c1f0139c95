"""Altair chart builders: one function per chart, each returning a :class:`Figure` with a one-line caption.

Charts read *named* datasets (``alt.NamedData``); the page stores each dataset once and hands it to every chart
that uses it, and the PNG/SVG export adds them to the spec. Every step chart shares one x domain so the rows
of the page line up. Parameter (selection) names are fixed, never Altair's global counters, so the output is
deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from .downsample import aggregate, thin, top_units
from .tables import ReportTables, hyper_frame, schedule_changes, si_angles, si_norms, step_domain

WIDE = 820
HALF = 380
HEIGHT = 260
_LEGEND = alt.Legend(orient="bottom", columns=4, labelLimit=260, symbolLimit=40, title=None)


@dataclass
class Figure:
    name: str  # DOM id and export file stem
    section: str
    title: str
    caption: str
    chart: Any  # an Altair top-level chart
    data: dict[str, pd.DataFrame] = field(default_factory=dict)

    def spec(self) -> dict[str, Any]:
        """The Vega-Lite spec without data (the page or the exporter supplies ``datasets``)."""
        spec: dict[str, Any] = self.chart.to_dict()
        spec.pop("$schema", None)  # a URL string; the page must not mention remote resources
        spec.pop("datasets", None)
        return spec


@dataclass(frozen=True)
class Options:
    max_units: int = 12  # units drawn as lines; the rest appear as a min–max band and in the heat map
    max_points: int = 400  # checkpoints charted per line before thinning
    max_heat_units: int = 150  # heat-map cells are the largest dataset: 150 × 100 keeps the page small
    max_heat_steps: int = 100


def _x_step(domain: tuple[float, float] | None, field_name: str = "step", title: str = "training step") -> Any:
    scale = alt.Scale(domain=list(domain), nice=False) if domain else alt.Scale(nice=False)
    return alt.X(f"{field_name}:Q", title=title, scale=scale)


def _schedule_layer(domain: tuple[float, float] | None, title: str = "training step") -> Any:
    return alt.Chart(alt.NamedData(name="schedule")).mark_rule(strokeDash=[4, 3], color="#888").encode(
        x=_x_step(domain, title=title), tooltip=[alt.Tooltip("step:Q", title="step"), alt.Tooltip("change:N")]
    )


def _positive(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Rows usable on a log axis (a zero or missing value cannot be drawn there)."""
    out = frame.copy()
    for c in cols:
        out[c] = pd.to_numeric(out[c], errors="coerce")
        out.loc[~(out[c] > 0), c] = np.nan
    return out


def _shown_note(shown: int, total: int, kept: int, steps: int) -> str:
    notes = []
    if shown < total:
        notes.append(f"lines for the {shown} of {total} units with the most parameters; grey band = range of all")
    if kept < steps:
        notes.append(f"{kept} of {steps} checkpoints charted (first, last and schedule changes kept)")
    return f" ({'; '.join(notes)})" if notes else ""


def _prepared_norms(tables: ReportTables, opts: Options) -> tuple[pd.DataFrame, pd.DataFrame | None, str] | None:
    frame = si_norms(tables)
    if frame is None:
        return None
    shown, total = top_units(frame, opts.max_units)
    keep = schedule_changes(tables)["step"].tolist()
    thinned = thin(frame, "step", opts.max_points, keep)
    cols = [c for c in ("step", "unit", "norm", "effective_lr", "intrinsic_time", "intrinsic_time_total")
            if c in frame.columns]
    lines = thinned.frame[thinned.frame["unit"].astype(str).isin(shown)][cols]
    lines = _positive(lines, [c for c in ("norm", "effective_lr") if c in cols])
    band = None
    if total > len(shown):
        src = _positive(thinned.frame, [c for c in ("norm", "effective_lr") if c in cols])
        agg = {"norm_min": ("norm", "min"), "norm_max": ("norm", "max")}
        if "effective_lr" in cols:
            agg.update(elr_min=("effective_lr", "min"), elr_max=("effective_lr", "max"))
        band = src.groupby("step", sort=True).agg(**agg).reset_index()
    return lines, band, _shown_note(len(shown), total, thinned.kept, thinned.total)


def _unit_color(sel: Any) -> dict[str, Any]:
    return {
        "color": alt.Color("unit:N", legend=_LEGEND, title="unit"),
        "opacity": alt.when(sel).then(alt.value(1.0)).otherwise(alt.value(0.12)),
    }


def _norm_panel(y: str, y_title: str, x: Any, band: pd.DataFrame | None, band_cols: tuple[str, str] | None,
                sel: Any, with_schedule: bool, domain: tuple[float, float] | None, width: int) -> Any:
    line = alt.Chart(alt.NamedData(name="norms")).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=x,
        y=alt.Y(f"{y}:Q", title=y_title, scale=alt.Scale(type="log")),
        detail="unit:N",
        tooltip=[alt.Tooltip("unit:N"), alt.Tooltip("step:Q"), alt.Tooltip(f"{y}:Q", format=".4g")],
        **_unit_color(sel),
    )
    layers: list[Any] = []
    if band is not None and band_cols is not None:
        layers.append(alt.Chart(alt.NamedData(name="norms_band")).mark_area(color="#bbb", opacity=0.35).encode(
            x=x, y=alt.Y(f"{band_cols[0]}:Q", scale=alt.Scale(type="log")), y2=f"{band_cols[1]}:Q"))
    layers.append(line)
    if with_schedule:
        layers.append(_schedule_layer(domain))
    return alt.layer(*layers).properties(width=width, height=HEIGHT)


def norms_vs_step(tables: ReportTables, opts: Options) -> Figure | None:
    """Weight norm and effective LR of each unit against the training step."""
    prep = _prepared_norms(tables, opts)
    if prep is None:
        return None
    lines, band, note = prep
    domain = step_domain(tables)
    sel = alt.selection_point(name="pick_norm_step", fields=["unit"], bind="legend")
    x = _x_step(domain)
    has_elr = "effective_lr" in lines.columns and lines["effective_lr"].notna().any()
    left = _norm_panel("norm", "weight norm ‖w‖", x, band, ("norm_min", "norm_max"), sel, True, domain,
                       HALF if has_elr else WIDE).add_params(sel)
    panels = [left]
    if has_elr:
        panels.append(_norm_panel("effective_lr", "effective LR η/‖w‖²", x, band,
                                  ("elr_min", "elr_max") if band is not None and "elr_min" in band else None,
                                  sel, True, domain, HALF))
    data = {"norms": lines, "schedule": schedule_changes(tables)}
    if band is not None:
        data["norms_band"] = band
    return Figure(
        "norms_vs_step", "dynamics", "Norm and effective LR vs step",
        "Weight decay shrinks each scale-invariant unit's norm, which raises its effective learning rate η/‖w‖²; "
        f"dashed lines mark schedule changes{note}.",
        alt.hconcat(*panels).resolve_scale(color="shared"), data)


def norms_vs_intrinsic_time(tables: ReportTables, opts: Options) -> Figure | None:
    """The same quantities against intrinsic time (Σ η·λ), the clock on which units relax to equilibrium."""
    prep = _prepared_norms(tables, opts)
    if prep is None:
        return None
    lines, _, note = prep
    # The cumulative clock keeps one line per unit across schedule changes (the per-row column restarts at 0).
    tcol = "intrinsic_time_total" if "intrinsic_time_total" in lines.columns else "intrinsic_time"
    if tcol not in lines.columns or not lines[tcol].notna().any():
        return None
    sel = alt.selection_point(name="pick_norm_time", fields=["unit"], bind="legend")
    x = alt.X(f"{tcol}:Q", title="intrinsic time Σ λ_e since the first checkpoint", scale=alt.Scale(nice=False))
    has_elr = "effective_lr" in lines.columns and lines["effective_lr"].notna().any()
    panels = [_norm_panel("norm", "weight norm ‖w‖", x, None, None, sel, False, None,
                          HALF if has_elr else WIDE).add_params(sel)]
    if has_elr:
        panels.append(_norm_panel("effective_lr", "effective LR η/‖w‖²", x, None, None, sel, False, None, HALF))
    note = note.replace("; grey band = range of all", "")
    return Figure(
        "norms_vs_intrinsic_time", "dynamics", "Norm and effective LR vs intrinsic time",
        "Against intrinsic time Σηλ, runs with different lr and weight decay but the same product relax alike; "
        f"norms relax with a time constant of about 1/4 on this axis, 1/(4ηλ) steps{note}.",
        alt.hconcat(*panels).resolve_scale(color="shared"), {"norms": lines})


def angles_vs_prediction(tables: ReportTables, opts: Options) -> Figure | None:
    """Measured angular update per step of each unit with the equilibrium prediction."""
    frame = si_angles(tables)
    if frame is None or frame.empty or "angle_per_step" not in frame.columns:
        return None
    norms = si_norms(tables)
    shown, total = top_units(norms if norms is not None else frame, opts.max_units)
    keep = schedule_changes(tables)["step"].tolist()
    thinned = thin(frame, "step_to", opts.max_points, keep)
    cols = [c for c in ("step_from", "step_to", "unit", "angle_per_step", "predicted_angle_per_step", "ratio")
            if c in frame.columns]
    lines = _positive(thinned.frame[thinned.frame["unit"].astype(str).isin(shown)][cols], ["angle_per_step"])
    domain = step_domain(tables)
    x = _x_step(domain, "step_to", "training step (end of interval)")
    sel = alt.selection_point(name="pick_angle", fields=["unit"], bind="legend")
    layers: list[Any] = [
        alt.Chart(alt.NamedData(name="angles")).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
            x=x, y=alt.Y("angle_per_step:Q", title="angle per step (rad)", scale=alt.Scale(type="log")),
            detail="unit:N",
            tooltip=[alt.Tooltip("unit:N"), alt.Tooltip("step_from:Q"), alt.Tooltip("step_to:Q"),
                     alt.Tooltip("angle_per_step:Q", format=".4g"),
                     alt.Tooltip("predicted_angle_per_step:Q", format=".4g", title="predicted"),
                     alt.Tooltip("ratio:Q", format=".3f")],
            **_unit_color(sel)).add_params(sel)
    ]
    data: dict[str, pd.DataFrame] = {"angles": lines, "schedule": schedule_changes(tables)}
    pred_note = ""
    if "predicted_angle_per_step" in frame.columns and frame["predicted_angle_per_step"].notna().any():
        pred = _positive(thinned.frame, ["predicted_angle_per_step"]).groupby("step_to", sort=True)[
            "predicted_angle_per_step"].median().dropna().reset_index()
        data["angles_pred"] = pred
        layers.append(alt.Chart(alt.NamedData(name="angles_pred")).mark_line(
            color="black", strokeDash=[6, 3], strokeWidth=2, interpolate="step-before").encode(
            x=x, y=alt.Y("predicted_angle_per_step:Q", scale=alt.Scale(type="log")),
            tooltip=[alt.Tooltip("step_to:Q"), alt.Tooltip("predicted_angle_per_step:Q", format=".4g",
                                                           title="predicted")]))
        pred_note = ("; the black dashed line is what free diffusion on the sphere would reach over each gap, per "
                     "step — the prediction √(2ηλ/(1+μ)) (SGD, or its AdamW form) for one-step gaps, an upper bound "
                     "for longer gaps (the loss pulls the weights back), so a series saved sparsely sits below it "
                     "at equilibrium")
    layers.append(_schedule_layer(domain, "training step (end of interval)"))
    note = _shown_note(len(shown), total, thinned.kept, thinned.total).replace("; grey band = range of all", "")
    return Figure(
        "angles_vs_prediction", "dynamics", "Angular update per step vs the equilibrium prediction",
        f"How far each unit's direction turns per step between checkpoints{pred_note}{note}.",
        alt.layer(*layers).properties(width=WIDE, height=HEIGHT), data)


def _step_angle_cells(norms: pd.DataFrame | None) -> pd.DataFrame | None:
    """Per unit and checkpoint the reconstructed last-step ratio, as cells spanning from the previous checkpoint."""
    if norms is None or "step_angle_ratio" not in norms.columns:
        return None
    frame = norms[pd.to_numeric(norms["step_angle_ratio"], errors="coerce") > 0]
    if frame.empty:
        return None
    cols = ["step", "unit", "step_angle_ratio", "step_angle", "step_angle_predicted", "step_angle_source"]
    out = frame[[c for c in cols if c in frame.columns]].sort_values(["unit", "step"]).copy()
    out["step_from"] = out.groupby("unit")["step"].shift(1)
    out["step_from"] = out["step_from"].fillna(out["step"])
    return out.rename(columns={"step": "step_to"})


def angle_ratio_heatmap(tables: ReportTables, opts: Options) -> Figure | None:
    """The 100-unit view: the last-step angle over its prediction where the optimizer state gives it; otherwise
    the gap angle as a fraction of the free-diffusion bound, coloured as a fraction, never as a deviation."""
    norms = si_norms(tables)
    cells = _step_angle_cells(norms)
    if cells is not None:
        return _step_ratio_heatmap(tables, opts, cells)
    frame = si_angles(tables)
    if frame is None or frame.empty or "ratio" not in frame.columns or not frame["ratio"].notna().any():
        return None
    units, total = top_units(norms if norms is not None else frame, opts.max_heat_units)
    thinned = thin(frame, "step_to", opts.max_heat_steps, schedule_changes(tables)["step"].tolist())
    heat = _positive(thinned.frame[thinned.frame["unit"].astype(str).isin(units)][
        ["step_from", "step_to", "unit", "ratio"]], ["ratio"]).rename(columns={"ratio": "fraction_of_bound"})
    domain = step_domain(tables)
    n_units = int(heat["unit"].nunique())
    notes = []
    if len(units) < total:
        notes.append(f"the {len(units)} of {total} units with the most parameters")
    if thinned.kept < thinned.total:
        notes.append(f"{thinned.kept} of {thinned.total} intervals")
    chart = alt.Chart(alt.NamedData(name="angles_heat")).mark_rect().encode(
        x=_x_step(domain, "step_from", "training step"), x2="step_to:Q",
        y=alt.Y("unit:N", title=None, sort=units, axis=alt.Axis(labelLimit=220, labelFontSize=9)),
        # One hue: darker = closer to the bound. Below 1 is what equilibrium looks like over long gaps.
        color=alt.Color("fraction_of_bound:Q", title="gap angle / bound",
                        scale=alt.Scale(scheme="greys", domain=[0, 1.2], clamp=True)),
        tooltip=[alt.Tooltip("unit:N"), alt.Tooltip("step_from:Q"), alt.Tooltip("step_to:Q"),
                 alt.Tooltip("fraction_of_bound:Q", format=".3f", title="gap angle / free-diffusion bound")],
    ).properties(width=WIDE, height=max(120, min(900, 9 * n_units)))
    suffix = f" (showing {', '.join(notes)})" if notes else ""
    return Figure(
        "angle_ratio_heatmap", "dynamics", "Gap angle as a fraction of the free-diffusion bound",
        "No optimizer state was saved, so the per-step angle cannot be measured. Shown instead: the angle between "
        "consecutive checkpoints over arccos(e^(−λ_e·k)), the angle free diffusion on the sphere would reach in k "
        "steps. The loss pulls the weights back, so this is an upper bound: values below 1 are expected at "
        "equilibrium and are not a deviation from theory. Equilibrium is judged by stationarity instead (units "
        f"table: regime){suffix}.", chart, {"angles_heat": heat})


def _step_ratio_heatmap(tables: ReportTables, opts: Options, cells: pd.DataFrame) -> Figure:
    norms = si_norms(tables)
    units, total = top_units(norms if norms is not None else cells, opts.max_heat_units)
    thinned = thin(cells, "step_to", opts.max_heat_steps, schedule_changes(tables)["step"].tolist())
    heat = thinned.frame[thinned.frame["unit"].astype(str).isin(units)]
    domain = step_domain(tables)
    n_units = int(heat["unit"].nunique())
    # A colour domain symmetric around 1 in log space, so white always means "as predicted".
    logs = np.abs(np.log(heat["step_angle_ratio"].dropna().to_numpy(float)))
    spread = float(np.exp(max(float(logs.max()) if logs.size else 0.0, math.log(1.1))))
    notes = []
    if len(units) < total:
        notes.append(f"the {len(units)} of {total} units with the most parameters")
    if thinned.kept < thinned.total:
        notes.append(f"{thinned.kept} of {thinned.total} checkpoints")
    estimated = int((heat.get("step_angle_source", pd.Series(dtype=str)) == "estimate").sum())
    if estimated:
        notes.append(f"{estimated} cells are estimates (see the tooltip)")
    chart = alt.Chart(alt.NamedData(name="angles_heat")).mark_rect().encode(
        x=_x_step(domain, "step_from", "training step"), x2="step_to:Q",
        y=alt.Y("unit:N", title=None, sort=units, axis=alt.Axis(labelLimit=220, labelFontSize=9)),
        color=alt.Color("step_angle_ratio:Q", title="last step / predicted",
                        scale=alt.Scale(type="log", scheme="redblue", reverse=True, domain=[1 / spread, spread],
                                        domainMid=1, clamp=True)),
        tooltip=[alt.Tooltip("unit:N"), alt.Tooltip("step_to:Q", title="checkpoint step"),
                 alt.Tooltip("step_angle:Q", format=".4g", title="last-step angle (rad)"),
                 alt.Tooltip("step_angle_predicted:Q", format=".4g", title="predicted Δ*"),
                 alt.Tooltip("step_angle_ratio:Q", format=".3f", title="ratio"),
                 alt.Tooltip("step_angle_source:N", title="source")],
    ).properties(width=WIDE, height=max(120, min(900, 9 * n_units)))
    suffix = f" (showing {', '.join(notes)})" if notes else ""
    return Figure(
        "angle_ratio_heatmap", "dynamics", "Last-step angle over the prediction, per unit",
        "The angle of the last update at each checkpoint, reconstructed from the saved optimizer state, over the "
        "equilibrium prediction Δ*: white means at equilibrium, red turns faster than theory, blue slower. One "
        f"checkpoint is one noisy sample; look at the spread along a row{suffix}.", chart, {"angles_heat": heat})


def hparams_timeline(tables: ReportTables, opts: Options) -> Figure | None:
    """lr and weight decay over steps, per group of parameters that share a schedule, with the value source."""
    frame = hyper_frame(tables)
    if frame is None or not frame["lr"].notna().any():
        return None
    # Parameters with identical timelines form one group, so 100+ parameters draw as a handful of lines.
    groups: dict[Any, list[str]] = {}
    for item, g in frame.groupby("item", sort=True):
        sig = tuple(map(tuple, g[["step", "lr", "weight_decay"]].astype("float64").fillna(-1.0).to_numpy()))
        groups.setdefault(sig, []).append(str(item))
    label = {}
    for i, members in enumerate(sorted(groups.values(), key=lambda m: (-len(m), m[0]))):
        name = f"group {i + 1}: {members[0]}" + (f" + {len(members) - 1} more" if len(members) > 1 else "")
        for m in members:
            label[m] = name
    rep = frame[frame["item"].isin({m[0] for m in groups.values()})].copy()
    rep["group"] = rep["item"].map(label)
    keep = schedule_changes(tables)["step"].tolist()
    thinned = thin(rep, "step", opts.max_points, keep)
    cols = [c for c in ("step", "group", "lr", "weight_decay", "momentum", "source") if c in rep.columns]
    data = {"hparams": thinned.frame[cols], "schedule": schedule_changes(tables)}
    domain = step_domain(tables)
    base = alt.Chart(alt.NamedData(name="hparams"))
    tips = [alt.Tooltip("group:N"), alt.Tooltip("step:Q"), alt.Tooltip("lr:Q", format=".4g"),
            alt.Tooltip("weight_decay:Q", format=".4g")] + ([alt.Tooltip("source:N")] if "source" in cols else [])
    color = alt.Color("group:N", legend=alt.Legend(orient="bottom", columns=2, labelLimit=380, title=None))
    shape = alt.Shape("source:N", legend=alt.Legend(orient="bottom", title="source")) if "source" in cols else (
        alt.Undefined)

    def panel(y: str, title: str) -> Any:
        # Weight decay may be 0 (no log axis then); the learning rate spans decades.
        scale = alt.Scale(zero=True) if y == "weight_decay" else alt.Scale(type="log")
        return alt.layer(
            base.mark_line(interpolate="step-after").encode(x=_x_step(domain), y=alt.Y(f"{y}:Q", title=title,
                                                                                       scale=scale), color=color),
            base.mark_point(filled=True, size=30).encode(x=_x_step(domain), y=f"{y}:Q", color=color, shape=shape,
                                                         tooltip=tips),
            _schedule_layer(domain),
        ).properties(width=HALF, height=200)

    note = f" ({thinned.kept} of {thinned.total} checkpoints charted)" if thinned.thinned else ""
    return Figure(
        "hparams_timeline", "hyperparameters", "Hyperparameter timeline",
        "Learning rate and weight decay stored with each checkpoint, per group of parameters sharing a schedule; "
        f"marker shape tells where each value came from, dashed lines mark changes{note}.",
        alt.hconcat(panel("lr", "learning rate η"), panel("weight_decay", "weight decay λ")), data)


def _curve_kind(tag: str) -> str:
    t = tag.lower()
    if "loss" in t:
        return "loss"
    if "acc" in t:
        return "accuracy"
    if t.endswith("lr") or "learning_rate" in t or "lr-" in t or "/lr" in t:
        return "lr"
    return "other"


def training_curves(tables: ReportTables, opts: Options) -> Figure | None:
    """Curves found in the training logs, on the same step axis as the checkpoint charts."""
    curves = tables.curves
    if curves is None or curves.empty:
        return None
    frame = curves.copy()
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame = frame.dropna(subset=["step", "value"])
    if frame.empty:
        return None
    kind_col = next((c for c in ("kind", "metric_kind", "metric") if c in frame.columns), None)
    kinds = frame[kind_col].astype(str) if kind_col else frame["tag"].astype(str).map(_curve_kind)
    frame["panel"] = kinds
    frame["series"] = frame["tag"].astype(str)
    agg, aggregated = aggregate(frame, "step", "value", "series", opts.max_points)
    agg["panel"] = agg["series"].map(dict(zip(frame["series"], frame["panel"], strict=False)))
    domain = step_domain(tables)
    base = alt.Chart()  # layers inherit the faceted data, so each panel shows only its own curves
    color = alt.Color("series:N", legend=alt.Legend(orient="bottom", columns=3, labelLimit=300, title=None,
                                                      symbolOpacity=1))
    layers = [base.mark_line().encode(
        x=_x_step(domain), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)), color=color,
        tooltip=[alt.Tooltip("series:N"), alt.Tooltip("step:Q"), alt.Tooltip("value:Q", format=".4g"),
                 alt.Tooltip("n:Q", title="points averaged")])]
    if aggregated:
        layers.insert(0, base.mark_area(opacity=0.2).encode(x=_x_step(domain), y="y_min:Q", y2="y_max:Q",
                                                           color=color))
    layers.append(_schedule_layer(domain))
    chart = alt.layer(*layers, data=alt.NamedData(name="curves")).properties(width=WIDE, height=150).facet(
        row=alt.Row("panel:N", title=None, header=alt.Header(labelAngle=0, labelAlign="left", labelFontWeight="bold"))
    ).resolve_scale(y="independent")
    note = " (dense curves averaged per bin; band = min–max within the bin; the last bin ends at the last step)" if (
        aggregated) else ""
    return Figure(
        "training_curves", "logs", "Training curves from the logs",
        "Loss, accuracy and learning rate recorded in the training logs, on the same step axis as the checkpoint "
        f"charts, so a schedule change (dashed) can be read against its effect{note}.", chart,
        {"curves": agg, "schedule": schedule_changes(tables)})


def distance_heatmap(tables: ReportTables, opts: Options) -> Figure | None:
    """Function-space distance between every pair of checkpoints."""
    frame = tables.distance
    if frame is None or frame.empty:
        return None
    metric = next((c for c in ("disagreement", "tv", "kl_ab") if c in frame and frame[c].notna().any()), None)
    if metric is None:
        return None
    pairs = frame[["step_a", "step_b", metric]].rename(columns={metric: "value"})
    mirrored = pairs.rename(columns={"step_a": "step_b", "step_b": "step_a"})
    both = pd.concat([pairs, mirrored], ignore_index=True).drop_duplicates(["step_a", "step_b"])
    n = int(pd.concat([both["step_a"], both["step_b"]]).nunique())
    size = max(200, min(640, 14 * n))
    words = {"disagreement": "fraction of probe inputs on which the two checkpoints predict different classes",
             "tv": "total-variation distance between their predicted class distributions",
             "kl_ab": "KL divergence between their predicted distributions"}[metric]
    chart = alt.Chart(alt.NamedData(name="distance")).mark_rect().encode(
        x=alt.X("step_a:O", title="checkpoint step"), y=alt.Y("step_b:O", title="checkpoint step"),
        color=alt.Color("value:Q", title=metric, scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip("step_a:O"), alt.Tooltip("step_b:O"), alt.Tooltip("value:Q", format=".4g",
                                                                               title=metric)],
    ).properties(width=size, height=size)
    return Figure("distance_heatmap", "function", "Function-space distance",
                  f"Each cell is the {words}; a dark block means those checkpoints compute nearly the same function.",
                  chart, {"distance": both})


def fitted_exponent(meta: dict[str, Any]) -> float | None:
    """The t_eq ∝ λ_e^(−exponent) fit stored by the equilibrium command, wherever in ``meta`` it sits."""
    for key in ("exponent", "fitted_exponent", "scaling_exponent", "t_eq_exponent"):
        value = meta.get(key)
        if isinstance(value, dict):
            value = value.get("exponent", value.get("value"))
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            return float(value)
    fit = meta.get("fit")
    if isinstance(fit, dict):
        return fitted_exponent(fit)
    return None


def equilibrium_scaling(tables: ReportTables, opts: Options) -> Figure | None:
    """Measured time to equilibrium against the intrinsic LR, with the fitted power law."""
    frame = tables.equilibrium
    if frame is None or frame.empty or not {"intrinsic_lr", "t_eq_steps"} <= set(frame.columns):
        return None
    pts = _positive(frame, ["intrinsic_lr", "t_eq_steps"]).dropna(subset=["intrinsic_lr", "t_eq_steps"])
    if pts.empty:
        return None
    cols = [c for c in ("start", "lr", "weight_decay", "momentum", "intrinsic_lr", "seeds", "t_eq_steps",
                        "t_eq_intrinsic", "noise_floor") if c in pts.columns]
    pts = pts[cols].copy()
    if "start" in pts:
        pts["start"] = pts["start"].astype(str)
    data = {"equilibrium": pts}
    tips = [alt.Tooltip(f"{c}:{'N' if c == 'start' else 'Q'}", format="" if c == "start" else ".4g")
            for c in cols]
    color = alt.Color("start:N", title="start") if "start" in pts else alt.value("#1f77b4")
    layers: list[Any] = [alt.Chart(alt.NamedData(name="equilibrium")).mark_point(filled=True, size=70).encode(
        x=alt.X("intrinsic_lr:Q", title="intrinsic LR λ_e = η·λ", scale=alt.Scale(type="log")),
        y=alt.Y("t_eq_steps:Q", title="steps to equilibrium", scale=alt.Scale(type="log")),
        color=color, tooltip=tips)]
    exponent = fitted_exponent(tables.equilibrium_meta)
    if exponent is not None:
        # Place the fitted slope through the points (least squares of the intercept only, in log space).
        lx, ly = np.log(pts["intrinsic_lr"].to_numpy(float)), np.log(pts["t_eq_steps"].to_numpy(float))
        c = float(np.mean(ly + exponent * lx))
        xs = np.exp(np.linspace(lx.min(), lx.max(), 2)) if lx.max() > lx.min() else np.exp(lx[:1])
        data["equilibrium_fit"] = pd.DataFrame({"intrinsic_lr": xs, "t_fit": np.exp(c - exponent * np.log(xs))})
        layers.append(alt.Chart(alt.NamedData(name="equilibrium_fit")).mark_line(color="black").encode(
            x=alt.X("intrinsic_lr:Q", scale=alt.Scale(type="log")),
            y=alt.Y("t_fit:Q", scale=alt.Scale(type="log"))))
    fit_words = (f"the line is the fitted power law t_eq ∝ λ_e^−{exponent:.3g} (theory: exponent 1)"
                 if exponent is not None else "no fitted exponent was stored with the results")
    return Figure("equilibrium_scaling", "function", "Time to equilibrium vs intrinsic LR",
                  f"Steps until retrained copies from different starts become indistinguishable; {fit_words}.",
                  alt.layer(*layers).properties(width=HALF + 120, height=HEIGHT), data)


def equilibrium_curves(tables: ReportTables, opts: Options) -> Figure | None:
    """Distance between retrained copies from different starts, per arm, against intrinsic time."""
    frame = tables.equilibrium_curves
    need = {"arm", "intrinsic_time", "distance_between", "noise_floor"}
    if frame is None or frame.empty or not need <= set(frame.columns):
        return None
    curves = _positive(frame.drop_duplicates(["arm", "intrinsic_time"])[sorted(need)], ["distance_between",
                                                                                     "noise_floor"])
    curves["arm"] = curves["arm"].astype(str)
    agg_d, _ = aggregate(curves, "intrinsic_time", "distance_between", "arm", opts.max_points)
    agg_f, _ = aggregate(curves, "intrinsic_time", "noise_floor", "arm", opts.max_points)
    data = agg_d[["arm", "intrinsic_time", "distance_between"]].merge(
        agg_f[["arm", "intrinsic_time", "noise_floor"]], on=["arm", "intrinsic_time"], how="outer")
    x = alt.X("intrinsic_time:Q", title="intrinsic time λ_e·t", scale=alt.Scale(nice=False))
    color = alt.Color("arm:N", legend=alt.Legend(orient="bottom", columns=3, labelLimit=300, title="arm"))
    base = alt.Chart(alt.NamedData(name="equilibrium_curves"))
    layers: list[Any] = [
        base.mark_line().encode(x=x, y=alt.Y("distance_between:Q", title="distance between starts",
                                             scale=alt.Scale(type="log")), color=color,
                                tooltip=["arm:N", alt.Tooltip("intrinsic_time:Q", format=".3g"),
                                         alt.Tooltip("distance_between:Q", format=".4g"),
                                         alt.Tooltip("noise_floor:Q", format=".4g")]),
        base.mark_line(strokeDash=[4, 3]).encode(x=x, y=alt.Y("noise_floor:Q", scale=alt.Scale(type="log")),
                                                 color=color)]
    out = {"equilibrium_curves": data}
    eq = tables.equilibrium
    if eq is not None and {"arm", "t_eq_intrinsic"} <= set(eq.columns):
        marks = eq[["arm", "t_eq_intrinsic"]].dropna().assign(arm=lambda f: f["arm"].astype(str))
        if len(marks):
            out["equilibrium_marks"] = marks
            layers.append(alt.Chart(alt.NamedData(name="equilibrium_marks")).mark_rule(strokeWidth=2).encode(
                x="t_eq_intrinsic:Q", color=color, tooltip=["arm:N", alt.Tooltip("t_eq_intrinsic:Q", format=".3g")]))
    exponent = fitted_exponent(tables.equilibrium_meta)
    fit = f"; fitted exponent of t_eq ∝ λ_e^−k: k = {exponent:.3g} (theory: 1)" if exponent is not None else ""
    return Figure("equilibrium_curves", "function", "Equilibrium curves",
                  "Solid: distance between copies retrained from different starts; dashed: the same-start noise "
                  f"floor; a vertical line marks each arm's time to equilibrium{fit}.",
                  alt.layer(*layers).properties(width=WIDE, height=HEIGHT), out)


def fec_exponent_figure(rows: pd.DataFrame, meta: dict[str, Any]) -> Figure | None:
    """The Fast Equilibrium Conjecture test: t_eq (steps) against 1/λ_e on log–log axes, one point per
    equilibrated arm with its bootstrap interval, the fitted power law and a slope-1 reference line.

    Used by the report (``--equilibrium DIR``) and written by ``equilibrium`` into its results folder."""
    need = {"intrinsic_lr", "t_eq_steps"}
    if rows is None or rows.empty or not need <= set(rows.columns):
        return None
    pts = rows[rows["t_eq_steps"].notna() & (rows["t_eq_steps"] > 0) & (rows["intrinsic_lr"] > 0)].copy()
    if pts.empty:
        return None
    pts["inv_lr"] = 1.0 / pts["intrinsic_lr"].astype(float)
    for col in ("t_eq_low_steps", "t_eq_high_steps", "t_eq_intrinsic", "arm"):
        if col not in pts:
            pts[col] = np.nan if col != "arm" else ""
    pts = pts[["arm", "intrinsic_lr", "inv_lr", "t_eq_steps", "t_eq_low_steps", "t_eq_high_steps",
               "t_eq_intrinsic"]].assign(arm=lambda f: f["arm"].astype(str))
    lx, ly = np.log(pts["inv_lr"].to_numpy(float)), np.log(pts["t_eq_steps"].to_numpy(float))
    grid = np.exp(np.linspace(lx.min(), lx.max(), 2)) if lx.max() > lx.min() else np.exp(lx[:1])
    ref = float(np.mean(ly - lx))  # slope 1 through the points' centre: t_eq·λ_e = their geometric mean
    lines = [pd.DataFrame({"inv_lr": grid, "t": np.exp(ref) * grid, "line": "slope 1 (conjecture)"})]
    k = fitted_exponent(meta)
    if k is not None:
        stored = meta.get("exponent_intercept")
        c = (float(stored) if isinstance(stored, (int, float)) and math.isfinite(float(stored))
             else float(np.mean(ly - k * lx)))
        lines.append(pd.DataFrame({"inv_lr": grid, "t": np.exp(c) * grid**k, "line": f"fit: slope {k:.3g}"}))
    names = [str(f["line"].iloc[0]) for f in reversed(lines)]  # fit (solid black) first, reference (dashed grey)
    x = alt.X("inv_lr:Q", title="1/λ_e (steps)", scale=alt.Scale(type="log", nice=False))
    y = alt.Y("t_eq_steps:Q", title="t_eq (steps)", scale=alt.Scale(type="log"))
    tips = ["arm:N", alt.Tooltip("intrinsic_lr:Q", format=".3g"), alt.Tooltip("t_eq_steps:Q", format=".0f"),
            alt.Tooltip("t_eq_low_steps:Q", format=".0f"), alt.Tooltip("t_eq_high_steps:Q", format=".0f"),
            alt.Tooltip("t_eq_intrinsic:Q", title="t_eq·λ_e", format=".3g")]
    base = alt.Chart(alt.NamedData(name="fec_points"))
    # Interval rules only where both ends are known: a layer with no valid mark gives Vega an infinite extent.
    has_interval = bool((pts["t_eq_low_steps"].notna() & pts["t_eq_high_steps"].notna()).any())
    layers: list[Any] = [
        *([base.mark_rule(color="#1f77b4").encode(x=x, y="t_eq_low_steps:Q", y2="t_eq_high_steps:Q")]
          if has_interval else []),
        base.mark_point(filled=True, size=70, color="#1f77b4").encode(x=x, y=y, tooltip=tips),
        alt.Chart(alt.NamedData(name="fec_lines")).mark_line().encode(
            x=alt.X("inv_lr:Q", scale=alt.Scale(type="log")), y=alt.Y("t:Q", scale=alt.Scale(type="log")),
            color=alt.Color("line:N", scale=alt.Scale(domain=names, range=["#000000", "#888888"][-len(names):]),
                            legend=alt.Legend(orient="bottom", title=None)),
            strokeDash=alt.StrokeDash("line:N", scale=alt.Scale(domain=names, range=[[1, 0], [5, 4]][-len(names):]),
                                      legend=alt.Legend(orient="bottom", title=None))),  # one merged legend
    ]
    lo, hi = meta.get("exponent_low"), meta.get("exponent_high")
    interval = (f" (95 % interval [{lo:.3g}, {hi:.3g}])" if isinstance(lo, (int, float)) and isinstance(
        hi, (int, float)) and math.isfinite(lo) and math.isfinite(hi) else "")
    fit_words = (f"fitted t_eq ∝ (1/λ_e)^{k:.3g}{interval}" if k is not None else "no fitted exponent")
    return Figure("fec_exponent", "function", "Fast Equilibrium Conjecture: t_eq vs 1/λ_e",
                  f"Each point is an arm's time to equilibrium with its bootstrap interval; {fit_words}; the grey "
                  "dashed line has slope 1 (t_eq ∝ 1/λ_e, the conjecture).",
                  alt.layer(*layers).properties(width=HALF + 120, height=HEIGHT),
                  {"fec_points": pts, "fec_lines": pd.concat(lines, ignore_index=True)})


def equilibrium_exponent(tables: ReportTables, opts: Options) -> Figure | None:
    """Report hook for :func:`fec_exponent_figure` (``report --equilibrium DIR``)."""
    if tables.equilibrium is None:
        return None
    return fec_exponent_figure(tables.equilibrium, tables.equilibrium_meta)


BUILDERS: tuple[Callable[[ReportTables, Options], Figure | None], ...] = (
    norms_vs_step, norms_vs_intrinsic_time, angles_vs_prediction, angle_ratio_heatmap, hparams_timeline,
    training_curves, distance_heatmap, equilibrium_scaling, equilibrium_exponent, equilibrium_curves,
)


def build_figures(tables: ReportTables, opts: Options) -> list[Figure]:
    return [f for f in (b(tables, opts) for b in BUILDERS) if f is not None]

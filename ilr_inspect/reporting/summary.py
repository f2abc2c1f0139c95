"""The run summary in words (shared by the HTML page) and the short Markdown summary for CI job pages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from .gates import METRICS, GateOutcome, Value, fmt_value
from .tables import ReportTables, schedule_changes, si_mask

# The numbers a CI reader wants first; the rest are in the HTML page.
KEY_METRICS = ("step_angle_ratio", "final_angle_ratio", "max_angle_ratio", "elr_spread", "min_norm",
               "final_intrinsic_time", "equilibrium_fraction", "max_disagreement", "equilibrium_exponent")


def _counts(values: pd.Series) -> str:
    counts = values.dropna().astype(str).value_counts()
    return ", ".join(f"{k} ×{v}" if len(counts) > 1 else str(k) for k, v in sorted(counts.items()))


def _num(v: Any) -> str:
    return "n/a" if v is None or pd.isna(v) else f"{float(v):.4g}"


def _timeline(frame: pd.DataFrame, col: str) -> str | None:
    if col not in frame.columns or not frame[col].notna().any():
        return None
    # A series without steps (axis: epoch) keeps its checkpoint order.
    key, by_step = ("step", True) if "step" in frame.columns and frame["step"].notna().any() else ("checkpoint", False)
    distinct = frame.groupby(key, sort=by_step)[col].nunique()
    if (distinct > 1).any():
        # Parameter groups differ (e.g. no weight decay on norm layers): list the values, not a misleading median.
        values = sorted(frame[col].dropna().unique())
        shown = ", ".join(_num(v) for v in values[:6]) + (" …" if len(values) > 6 else "")
        return f"{shown} (differs between parameters)"
    per_step = frame.groupby(key, sort=by_step)[col].first().dropna()
    first, last = per_step.iloc[0], per_step.iloc[-1]
    lo, hi = per_step.min(), per_step.max()
    text = _num(first) if first == last else f"{_num(first)} → {_num(last)}"
    if (lo, hi) != (min(first, last), max(first, last)):
        text += f" (range {_num(lo)} … {_num(hi)})"
    return text


def run_facts(tables: ReportTables) -> list[tuple[str, str]]:
    """(label, value) lines describing the run; only what the tables say."""
    facts: list[tuple[str, str]] = []
    steps_src = tables.ls if tables.ls is not None else tables.norms
    if steps_src is not None and not steps_src.empty:
        steps = pd.to_numeric(steps_src["step"], errors="coerce").dropna()
        n = len(tables.ls) if tables.ls is not None else int(steps.nunique())
        span = f" (steps {int(steps.min())} … {int(steps.max())})" if len(steps) else ""
        facts.append(("Checkpoints", f"{n}{span}"))
    if tables.ls is not None and not tables.ls.empty:
        facts.append(("Formats", _counts(tables.ls["format"])))
        if "step_source" in tables.ls:
            facts.append(("Step read from", _counts(tables.ls["step_source"])))
    hp = tables.hparams if tables.hparams is not None and not tables.hparams.empty else tables.norms
    if hp is not None and not hp.empty:
        for col, label in (("optimizer", "Optimizer"), ("wd_mode", "Weight-decay mode")):
            if col in hp.columns and hp[col].notna().any():
                facts.append((label, _counts(hp[col].drop_duplicates())))
        for col, label in (("lr", "Learning rate"), ("weight_decay", "Weight decay"), ("momentum", "Momentum / β1")):
            text = _timeline(hp, col)
            if text is not None:
                facts.append((label, text))
        changes = schedule_changes(tables)
        if len(changes):
            facts.append(("Schedule changes", f"{len(changes)} (at steps "
                          f"{', '.join(str(int(s)) for s in changes['step'][:8])}{' …' if len(changes) > 8 else ''})"))
    if tables.hparams is not None and "source" in tables.hparams and tables.hparams["source"].notna().any():
        facts.append(("Hyperparameter sources", _counts(tables.hparams.drop_duplicates(["step", "source"])["source"])))
    elif tables.ls is not None and "hparams_source" in tables.ls:
        facts.append(("Hyperparameter sources", _counts(tables.ls["hparams_source"])))
    units = tables.units if tables.units is not None else tables.norms
    if units is not None and not units.empty:
        per_unit = units.drop_duplicates("unit")
        si = per_unit[si_mask(per_unit)] if "scale_invariant" in per_unit else per_unit
        evidence = f" (evidence: {_counts(si['evidence'])})" if "evidence" in si and len(si) else ""
        facts.append(("Units", f"{len(per_unit)}, of which {len(si)} scale-invariant{evidence}"))
        if "regime" in si.columns and si["regime"].notna().any():
            facts.append(("Regimes", _counts(si["regime"])))
    if tables.curves is not None and not tables.curves.empty:
        tags = sorted(tables.curves["tag"].astype(str).unique())
        facts.append(("Training logs", f"{len(tags)} curves: {', '.join(tags[:6])}{' …' if len(tags) > 6 else ''}"))
    if tables.distance is not None and not tables.distance.empty:
        facts.append(("Function-space distance", f"{len(tables.distance)} checkpoint pairs"))
    if tables.equilibrium is not None and not tables.equilibrium.empty:
        facts.append(("Equilibrium runs", f"{len(tables.equilibrium)} arms"))
    if tables.warnings:
        facts.append(("Warnings", str(len(tables.warnings))))
    return facts


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(tables: ReportTables, metrics: dict[str, Value], outcomes: Sequence[GateOutcome], *,
             html_name: str | None, created: str | None) -> str:
    """A short summary for ``$GITHUB_STEP_SUMMARY`` / merge-request notes: facts, key numbers, gates."""
    lines = [f"## {tables.title}", "", "| | |", "|---|---|"]
    lines += [f"| {label} | {_cell(value)} |" for label, value in run_facts(tables)]
    key = [(name, metrics.get(name)) for name in KEY_METRICS if metrics.get(name) is not None]
    if key:
        lines += ["", "| Metric | Value | Meaning |", "|---|---|---|"]
        lines += [f"| `{name}` | {fmt_value(v)} | {_cell(METRICS[name].description)} |" for name, v in key]
    if outcomes:
        lines += ["", "**Gates (`--fail-if`)**", ""]
        for o in outcomes:
            mark = "⚠️ not evaluated" if o.held is None else ("❌ **holds**" if o.held else "✅ ok")
            lines.append(f"- {mark}: `{o.gate.expr}` — {'' if o.held is None else 'observed '}{o.observed}")
    if tables.warnings:
        lines += ["", "<details><summary>Warnings</summary>", ""]
        lines += [f"- {_cell(w)}" for w in tables.warnings[:20]]
        if len(tables.warnings) > 20:
            lines.append(f"- … and {len(tables.warnings) - 20} more (see the HTML report)")
        lines += ["", "</details>"]
    footer = [f"ilr-inspect {tables.meta.get('version', '')}".strip()]
    if created:
        footer.append(created)
    if html_name:
        footer.append(f"full report: `{html_name}`")
    lines += ["", f"<sub>{' · '.join(footer)}</sub>", ""]
    return "\n".join(lines)

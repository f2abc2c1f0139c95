"""``--fail-if EXPR``: thresholds on the report's tables for CI.

An expression is ``METRIC OP VALUE`` with OP one of ``> >= < <= == !=``. Numeric metrics compare with a number
(``max_angle_ratio>1.5``, ``min_norm<1e-3``); the label metric ``regime`` takes ``==``/``!=`` and a regime name
(``regime==periodic`` holds when at least one scale-invariant unit is periodic; ``regime!=equilibrium`` holds
when at least one is not at equilibrium). ``unstable`` is accepted as another name for ``periodic`` (the
instability-driven oscillation of Lobacheva et al.). The metric set is :data:`METRICS` (docs/report.md lists
it). A malformed expression or unknown metric is a usage error, raised before any work is done; a metric whose
table is absent (e.g. ``max_disagreement`` without ``--model/--probe``) is reported as not evaluable.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UsageError
from .charts import fitted_exponent
from .tables import ReportTables, finite, si_angles, si_mask, si_norms

Value = float | list[str] | None

REGIMES = ("approaching", "equilibrium", "periodic", "no-weight-decay", "undetermined")
_REGIME_ALIASES = {"unstable": "periodic"}
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
_EXPR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(\S(?:.*\S)?)\s*$")


def _last_rows(frame: pd.DataFrame, col: str) -> pd.DataFrame:
    values = pd.to_numeric(frame[col], errors="coerce")
    out: pd.DataFrame = frame[values == values.max()]
    return out


def _stat(frame: pd.DataFrame | None, col: str, fn: Callable[[np.ndarray], float]) -> float | None:
    if frame is None or col not in frame.columns:
        return None
    values = finite(frame[col])
    return float(fn(values)) if values.size else None


def _checkpoints(t: ReportTables) -> Value:
    if t.ls is not None:
        return float(len(t.ls))
    return float(t.norms["step"].nunique()) if t.norms is not None else None


def _units(t: ReportTables) -> Value:
    frame = t.units if t.units is not None else t.norms
    return float(frame["unit"].nunique()) if frame is not None else None


def _si_units(t: ReportTables) -> Value:
    frame = t.units if t.units is not None else t.norms
    if frame is None or "scale_invariant" not in frame.columns:
        return None
    return float(frame.loc[si_mask(frame), "unit"].nunique())


def _final_angle_ratio(t: ReportTables) -> Value:
    frame = si_angles(t)
    return None if frame is None else _stat(_last_rows(frame, "step_to"), "ratio", np.median)


def _step_angle_ratio(t: ReportTables) -> Value:
    """Median over scale-invariant units of each unit's median last-step ratio over its last 10 checkpoints
    (the per-step angle reconstructed from the optimizer state, docs/step-angle.md)."""
    frame = si_norms(t)
    if frame is None or "step_angle_ratio" not in frame.columns:
        return None
    frame = frame[pd.to_numeric(frame["step_angle_ratio"], errors="coerce").notna()]
    if frame.empty:
        return None
    per_unit = frame.sort_values("step").groupby("unit")["step_angle_ratio"].apply(
        lambda s: float(np.median(s.to_numpy(float)[-10:])))
    return float(np.median(per_unit.to_numpy(float)))


def _elr_spread(t: ReportTables) -> Value:
    frame = si_norms(t)
    if frame is None or "effective_lr" not in frame.columns:
        return None
    values = finite(_last_rows(frame, "step")["effective_lr"])
    values = values[values > 0]
    return float(values.max() / values.min()) if values.size else None


def _final_intrinsic_time(t: ReportTables) -> Value:
    frame = si_norms(t)
    return None if frame is None else _stat(_last_rows(frame, "step"), "intrinsic_time", np.max)


def _regimes(t: ReportTables) -> list[str] | None:
    if t.units is None or "regime" not in t.units.columns or t.units.empty:
        return None
    frame = t.units[si_mask(t.units)] if si_mask(t.units).any() else t.units
    return [str(r) for r in frame["regime"].dropna()]


def _equilibrium_fraction(t: ReportTables) -> Value:
    regimes = _regimes(t)
    return None if not regimes else sum(r == "equilibrium" for r in regimes) / len(regimes)


def _periodic_units(t: ReportTables) -> Value:
    regimes = _regimes(t)
    return None if regimes is None else float(sum(r == "periodic" for r in regimes))


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    compute: Callable[[ReportTables], Value]
    needs: str  # what to provide when the metric is not available
    label: bool = False


_ANGLES = "angles need at least two checkpoints"
_NORMS = "needs the norms table (a checkpoint series)"
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("checkpoints", "number of checkpoints in the series", _checkpoints, _NORMS),
    Metric("units", "number of units", _units, _NORMS),
    Metric("si_units", "number of scale-invariant units", _si_units, _NORMS),
    Metric("step_angle_ratio", "median over scale-invariant units of the last-step angle (from the optimizer "
           "state) over the equilibrium prediction, median of the last 10 checkpoints; 1 = at equilibrium",
           _step_angle_ratio, "needs optimizer state in the checkpoints"),
    Metric("max_angle_ratio", "largest gap angle over its free-diffusion bound arccos(e^(-λ_e·k)), any "
           "scale-invariant unit and interval (a bound: below 1 is normal at equilibrium for gaps of many steps)",
           lambda t: _stat(si_angles(t), "ratio", np.max), _ANGLES),
    Metric("min_angle_ratio", "smallest gap angle over its free-diffusion bound, any scale-invariant unit and "
           "interval",
           lambda t: _stat(si_angles(t), "ratio", np.min), _ANGLES),
    Metric("final_angle_ratio", "median over scale-invariant units of the gap angle over its free-diffusion "
           "bound in the last interval",
           _final_angle_ratio, _ANGLES),
    Metric("max_angle_per_step", "largest angle per step (radians), any scale-invariant unit and interval",
           lambda t: _stat(si_angles(t), "angle_per_step", np.max), _ANGLES),
    Metric("min_norm", "smallest norm of a scale-invariant unit at any checkpoint",
           lambda t: _stat(si_norms(t), "norm", np.min), _NORMS),
    Metric("max_norm", "largest norm of a scale-invariant unit at any checkpoint",
           lambda t: _stat(si_norms(t), "norm", np.max), _NORMS),
    Metric("max_effective_lr", "largest effective LR η/‖w‖² of a scale-invariant unit at any checkpoint",
           lambda t: _stat(si_norms(t), "effective_lr", np.max), "needs lr in the checkpoints, logs or --lr"),
    Metric("elr_spread", "largest / smallest effective LR across scale-invariant units at the last checkpoint",
           _elr_spread, "needs lr in the checkpoints, logs or --lr"),
    Metric("final_intrinsic_time", "intrinsic time Σηλ reached at the last checkpoint (largest over units)",
           _final_intrinsic_time, "needs lr and weight decay"),
    Metric("equilibrium_fraction", "fraction of scale-invariant units whose regime is 'equilibrium'",
           _equilibrium_fraction, "needs the units table with regimes"),
    Metric("periodic_units", "number of scale-invariant units in the periodic regime", _periodic_units,
           "needs the units table with regimes"),
    Metric("max_disagreement", "largest prediction disagreement between two checkpoints (distance table)",
           lambda t: _stat(t.distance, "disagreement", np.max), "needs --model and --probe"),
    Metric("max_tv", "largest total-variation distance between two checkpoints (distance table)",
           lambda t: _stat(t.distance, "tv", np.max), "needs --model and --probe"),
    Metric("equilibrium_exponent", "fitted exponent of t_eq ∝ λ_e^-exponent (equilibrium results)",
           lambda t: fitted_exponent(t.equilibrium_meta), "needs --equilibrium DIR with a fitted exponent"),
    Metric("regime", "the regimes of the scale-invariant units (compare with == or != and a regime name)",
           _regimes, "needs the units table with regimes", label=True),
)}


@dataclass(frozen=True)
class Gate:
    expr: str
    metric: str
    op: str
    value: float | str


@dataclass(frozen=True)
class GateOutcome:
    gate: Gate
    held: bool | None  # None: the metric could not be computed from these inputs
    observed: str

    @property
    def line(self) -> str:
        if self.held is None:
            return f"{self.gate.expr}: not evaluated ({self.observed})"
        return f"{self.gate.expr}: {'HOLDS' if self.held else 'ok'} (observed {self.observed})"


def parse(expr: str) -> Gate:
    """Parse one ``--fail-if`` expression, or raise a :class:`UsageError` saying what is wrong."""
    m = _EXPR.match(expr)
    if m is None:
        raise UsageError(f"--fail-if {expr!r} is not of the form METRIC OP VALUE",
                         hint="e.g. --fail-if 'max_angle_ratio>1.5'; OP is one of > >= < <= == !=")
    name, op, raw = m.group(1), m.group(2), m.group(3)
    metric = METRICS.get(name)
    if metric is None:
        raise UsageError(f"--fail-if {expr!r}: unknown metric {name!r}",
                         hint=f"known metrics: {', '.join(METRICS)} (see docs/report.md)")
    if metric.label:
        if op not in ("==", "!="):
            raise UsageError(f"--fail-if {expr!r}: {name} is a label; compare it with == or !=")
        value = _REGIME_ALIASES.get(raw.strip("'\""), raw.strip("'\""))
        if value not in REGIMES:
            raise UsageError(f"--fail-if {expr!r}: {raw!r} is not a regime",
                             hint=f"one of {', '.join(REGIMES)} (or 'unstable' for periodic)")
        return Gate(expr, name, op, value)
    try:
        number = float(raw)
    except ValueError:
        raise UsageError(f"--fail-if {expr!r}: {raw!r} is not a number", hint="e.g. 1.5, 1e-3") from None
    if math.isnan(number):
        raise UsageError(f"--fail-if {expr!r}: NaN cannot be compared")
    return Gate(expr, name, op, number)


def parse_all(exprs: Sequence[str]) -> list[Gate]:
    return [parse(e) for e in exprs]


def fmt_value(value: Value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        counts = pd.Series(value, dtype="object").value_counts()
        return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) if len(counts) else "none"
    return f"{value:.6g}"


def compute_metrics(tables: ReportTables) -> dict[str, Value]:
    return {name: m.compute(tables) for name, m in METRICS.items()}


def evaluate(gates: Sequence[Gate], metrics: dict[str, Value]) -> list[GateOutcome]:
    out = []
    for g in gates:
        value = metrics.get(g.metric)
        if value is None:
            out.append(GateOutcome(g, None, f"{g.metric} is not available: {METRICS[g.metric].needs}"))
        elif isinstance(value, list):
            held = (g.value in value) if g.op == "==" else any(v != g.value for v in value)
            out.append(GateOutcome(g, held, fmt_value(value)))
        else:
            out.append(GateOutcome(g, bool(_OPS[g.op](value, g.value)), fmt_value(value)))
    return out

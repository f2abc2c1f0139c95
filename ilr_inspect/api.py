"""The public table functions that need both detection and measurement: ``units``, ``norms``, ``angles``, ``run``.

They live above both packages so that neither imports the other: :mod:`ilr_inspect.invariance` decides units,
:mod:`ilr_inspect.measure` measures given units, and this module joins the two. All three table functions take the
same keywords: the series-opening ones of :func:`ilr_inspect.series.borrow`, and the detection ones below
(``DETECT_KEYWORDS``), passed on to :func:`ilr_inspect.invariance.detect_units` when the caller gives no units.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .invariance import detect_units
from .invariance.unit import Unit
from .measure import Measurement, SeriesLike, measure
from .output import Records, Result, provenance
from .series import SeriesSource, borrow

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["DETECT_KEYWORDS", "angles", "norms", "run", "units"]

# The keywords every table function accepts for unit detection (a test holds the signatures to this list).
DETECT_KEYWORDS = ("model", "probe", "graph", "granularity", "units_file", "param_names")


def _detect(series: SeriesLike, units: Sequence[Unit] | None, *, model: nn.Module | None,
            probe: torch.Tensor | None, graph: Any, granularity: str, units_file: str | Path | None,
            param_names: Mapping[str, str] | None) -> list[Unit]:
    """The caller's units, else the detectors' decisions on the first checkpoint."""
    if units is not None:
        return list(units)
    cks = series.checkpoints
    if not cks:
        return []
    return detect_units(cks[0], model=model, probe=probe, graph=graph, granularity=granularity,
                        units_file=units_file, param_names=param_names)


def _inputs(series: SeriesLike) -> list[Path]:
    return [c.path for c in series.checkpoints]


def _meta(series_paths: Iterable[Path], m: Measurement, settings: dict[str, Any] | None) -> dict[str, Any]:
    meta = provenance(list(series_paths), settings or {})
    meta["warnings"] = m.warnings
    meta["units"] = [{"unit": u.name, "members": list(u.members), "kind": u.kind, "evidence": u.evidence,
                      "scale_invariant": u.scale_invariant} for u in m.units]
    return meta


def run(source: SeriesSource, *, units: Sequence[Unit] | None = None, per_tensor: bool = False,
        model: nn.Module | None = None, probe: torch.Tensor | None = None, graph: Any = None,
        granularity: str = "tensor", units_file: str | Path | None = None,
        param_names: Mapping[str, str] | None = None, quiet: bool = True, ray: str | None = None,
        **series_kwargs: Any) -> Measurement:
    """The whole :class:`~ilr_inspect.measure.Measurement` (norms, angles, regimes) of one streamed pass.

    ``ray``: a Ray address (``local``, ``auto``, ``host:port``) to run the pass on (``pip install
    'ilr-inspect[ray]'``); None runs it in this process.
    """
    with borrow(source, **series_kwargs) as series:
        found = _detect(series, units, model=model, probe=probe, graph=graph, granularity=granularity,
                        units_file=units_file, param_names=param_names)
        return measure(series, found, per_tensor=per_tensor, granularity=granularity, quiet=quiet, ray=ray,
                       options=series_kwargs.get("options"))


def _measured(source: SeriesSource, units: Sequence[Unit] | None, per_tensor: bool, model: nn.Module | None,
              probe: torch.Tensor | None, graph: Any, granularity: str, units_file: str | Path | None,
              param_names: Mapping[str, str] | None, quiet: bool,
              series_kwargs: dict[str, Any], ray: str | None = None,
              angles: bool = True) -> tuple[Measurement, list[Path]]:
    """One streamed pass for norms/angles, and the checkpoint paths it read (for provenance). ``angles=False``:
    only the norms tables are needed, so the pass sums pairs only where a norms column uses an angle."""
    with borrow(source, **series_kwargs) as series:
        found = _detect(series, units, model=model, probe=probe, graph=graph, granularity=granularity,
                        units_file=units_file, param_names=param_names)
        return (measure(series, found, per_tensor=per_tensor, granularity=granularity, quiet=quiet, ray=ray,
                        options=series_kwargs.get("options"), angles=angles),
                _inputs(series))


def norms(source: SeriesSource, *, units: Sequence[Unit] | None = None, per_tensor: bool = False,
          model: nn.Module | None = None, probe: torch.Tensor | None = None, graph: Any = None,
          granularity: str = "tensor", units_file: str | Path | None = None,
          param_names: Mapping[str, str] | None = None, quiet: bool = True,
          settings: dict[str, Any] | None = None, ray: str | None = None, **series_kwargs: Any) -> Result:
    """Per unit (or ``per_tensor``: per parameter tensor) and checkpoint: norm, effective/intrinsic LR, predictions.

    ``units``: measure these instead of detecting them (then the detection keywords are unused).
    """
    m, inputs = _measured(source, units, per_tensor, model, probe, graph, granularity, units_file, param_names,
                          quiet, series_kwargs, ray, angles=False)
    rows = m.tensor_rows if per_tensor else m.norm_rows
    if per_tensor and len(rows):
        first = ("step", "checkpoint", "parameter")
        rows = Records(rows.rows, [*first, *[c for c in rows.names() if c not in first]])
    return Result("norms", rows, _meta(inputs, m, settings))


def angles(source: SeriesSource, *, units: Sequence[Unit] | None = None, per_tensor: bool = False,
           model: nn.Module | None = None, probe: torch.Tensor | None = None, graph: Any = None,
           granularity: str = "tensor", units_file: str | Path | None = None,
           param_names: Mapping[str, str] | None = None, quiet: bool = True,
           settings: dict[str, Any] | None = None, ray: str | None = None, **series_kwargs: Any) -> Result:
    """Per consecutive checkpoint pair and unit: cosine, angle, per step and per √step, vs the prediction.

    ``units``: measure these instead of detecting them (then the detection keywords are unused).
    """
    m, inputs = _measured(source, units, per_tensor, model, probe, graph, granularity, units_file, param_names,
                          quiet, series_kwargs, ray)
    return Result("angles", m.tensor_angle_rows if per_tensor else m.angle_rows, _meta(inputs, m, settings))


def units(source: SeriesSource, *, model: nn.Module | None = None, probe: torch.Tensor | None = None,
          graph: Any = None, granularity: str = "tensor", units_file: str | Path | None = None,
          param_names: Mapping[str, str] | None = None, quiet: bool = True,
          settings: dict[str, Any] | None = None, measure_regime: bool = True,
          measurement: Measurement | None = None, ray: str | None = None, **series_kwargs: Any) -> Result:
    """The decision table (docs/cli.md, ``units``): one row per unit with evidence, reason and regime.

    ``measurement``: a pass already made by :func:`ilr_inspect.measure.measure` (the report's); its units and
    regimes are used as they are, so nothing is detected or read again.
    """
    with borrow(source, **series_kwargs) as series:
        if not series.checkpoints:
            from .errors import EmptySeriesError

            raise EmptySeriesError("no checkpoints in the series", hint="check the path or glob")
        m = measurement
        found = m.units if m is not None else _detect(
            series, None, model=model, probe=probe, graph=graph, granularity=granularity, units_file=units_file,
            param_names=param_names)
        regimes: dict[str, Any] = {}
        checks: dict[str, str] = {}
        warnings: list[str] = []
        if m is None and measure_regime:
            m = measure(series, found, granularity=granularity, quiet=quiet, ray=ray,
                        options=series_kwargs.get("options"))
        if m is not None:
            from .invariance.trajectory import cross_check  # pandas, only for the units table

            regimes = m.regimes
            checks = cross_check(m.norms, m.angles)
            warnings = m.warnings
        inputs = _inputs(series)
    rows = []
    for u in found:
        reg = regimes.get(u.name)
        rows.append({
            "unit": u.name, "members": u.members_text, "kind": u.kind, "scale_invariant": u.scale_invariant,
            "evidence": u.evidence, "reason": u.reason, "regime": reg.regime if reg else "undetermined",
            "regime_detail": reg.detail if reg else "not measured",
            "role": u.role, "heuristic": u.heuristic, "confidence": u.confidence, "deviation": u.deviation,
            "normalizer": u.normalizer, "source": u.source or "", "groups": u.groups, "n_members": len(u.members),
            "trajectory_check": checks.get(u.name, "") if u.scale_invariant else "",
        })
    meta = provenance(inputs, settings or {})
    meta["warnings"] = warnings
    return Result("units", Records(rows), meta)

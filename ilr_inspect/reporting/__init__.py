"""The report: every table of the other commands on one self-contained HTML page, plus chart exports, a Markdown
summary for CI, and ``--fail-if`` gates.

:func:`build_report` works from DataFrames (:class:`ReportTables`); :func:`report` opens a series and computes
those tables with the library (``inventory``, ``invariance``, ``measure``, ``function_space``, ``logs``).
Outputs are written atomically. The caller decides what a held gate means (the CLI exits with code 3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError, UsageError
from ..output import atomic_write, atomic_write_text, provenance
from .charts import Figure, Options, build_figures
from .gates import GateOutcome, Value, compute_metrics, evaluate, parse_all
from .page import javascript_bundle, records, render, vega_versions, vegalite_version
from .summary import markdown, run_facts
from .tables import ReportTables

__all__ = ["ReportResult", "ReportTables", "build_report", "export_figure", "load_equilibrium", "report"]


@dataclass
class ReportResult:
    html: Path
    html_bytes: int
    bundle_bytes: int  # of html_bytes, the inlined JavaScript
    figures: list[str]
    metrics: dict[str, Value]
    gates: list[GateOutcome]
    images: list[Path] = field(default_factory=list)
    summary_md: Path | None = None

    @property
    def held(self) -> list[GateOutcome]:
        return [g for g in self.gates if g.held]

    @property
    def not_evaluated(self) -> list[GateOutcome]:
        return [g for g in self.gates if g.held is None]


def _full_spec(fig: Figure) -> dict[str, Any]:
    spec = fig.spec()
    spec["datasets"] = {name: records(frame) for name, frame in fig.data.items()}
    return spec


def export_figure(fig: Figure, folder: Path, kind: str) -> Path:
    """Write one chart as ``folder/<name>.png`` (2× scale) or ``.svg`` with vl-convert (no browser, no network)."""
    import vl_convert

    spec, version = _full_spec(fig), vegalite_version()
    path = Path(folder) / f"{fig.name}.{kind}"
    if kind == "png":
        png: bytes = vl_convert.vegalite_to_png(spec, vl_version=version, scale=2, allowed_base_urls=[])
        atomic_write(path, lambda fh: fh.write(png))
    elif kind == "svg":
        atomic_write_text(path, vl_convert.vegalite_to_svg(spec, vl_version=version, allowed_base_urls=[]))
    else:
        raise UsageError(f"unknown image kind {kind!r}")
    return path


def build_report(
    tables: ReportTables,
    out: Path,
    *,
    png_dir: Path | None = None,
    svg_dir: Path | None = None,
    summary_md: Path | None = None,
    fail_if: Sequence[str] = (),
    max_units: int = 12,
    max_points: int = 400,
    timestamp: str | None = None,
) -> ReportResult:
    """Render the page (and the requested exports) from tables; evaluate the gates; write everything."""
    gates = parse_all(fail_if)
    if max_units < 1 or max_points < 2:
        raise UsageError("--max-units must be ≥ 1 and --max-points ≥ 2")
    if timestamp is not None:
        tables.meta = {**tables.meta, "created": timestamp, "command": None}
    opts = Options(max_units=max_units, max_points=max_points)
    figures = build_figures(tables, opts)
    metrics = compute_metrics(tables)
    outcomes = evaluate(gates, metrics)
    bundle = javascript_bundle(vegalite_version())
    page = render(tables, figures, run_facts(tables), metrics, outcomes, bundle=bundle, versions=vega_versions())
    data = page.encode("utf-8")
    out = Path(out)
    atomic_write(out, lambda fh: fh.write(data))
    images: list[Path] = []
    for folder, kind in ((png_dir, "png"), (svg_dir, "svg")):
        if folder is not None:
            images.extend(export_figure(f, Path(folder), kind) for f in figures)
    if summary_md is not None:
        atomic_write_text(Path(summary_md), markdown(tables, metrics, outcomes, html_name=out.name,
                                                     created=tables.meta.get("created")))
    return ReportResult(out, len(data), len(bundle.encode("utf-8")), [f.name for f in figures], metrics, outcomes,
                        images, Path(summary_md) if summary_md is not None else None)


def load_equilibrium(path: Path) -> tuple[pd.DataFrame, dict[str, Any], pd.DataFrame | None]:
    """Rows, meta and curves of an ``equilibrium`` result: the results folder (``equilibrium.json`` and, when
    present, ``curves.csv``) or the JSON file itself."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    if p.is_dir():
        p = p / "equilibrium.json"
    if not p.is_file():
        raise InputError("no equilibrium results here", path=path,
                         hint="pass the --out folder of `ilr-inspect equilibrium` (it holds equilibrium.json)")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
        rows, meta = obj["rows"], obj.get("meta", {})
        if not isinstance(rows, list) or not isinstance(meta, dict):
            raise TypeError("rows must be a list and meta an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not an ilr-inspect equilibrium JSON result ({exc})", path=p,
                         hint="expected {'schema': ..., 'meta': {...}, 'rows': [...]}") from None
    curves_path = folder / "curves.csv"
    curves = pd.read_csv(curves_path) if curves_path.is_file() else None
    return pd.DataFrame(rows), meta, curves


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    target = path.resolve()
    return any(f.is_dir() and (target == f.resolve() or f.resolve() in target.parents) for f in folders)


def report(
    paths: Any,
    *,
    out: Path,
    png_dir: Path | None = None,
    svg_dir: Path | None = None,
    summary_md: Path | None = None,
    fail_if: Sequence[str] = (),
    model: str | None = None,
    probe: str | Path | None = None,
    equilibrium: Path | None = None,
    max_units: int = 12,
    max_points: int = 400,
    timestamp: str | None = None,
    title: str | None = None,
    units_file: str | Path | None = None,
    out_is_default: bool = False,
    ray: str | None = None,
    **series_kwargs: Any,
) -> ReportResult:
    """Compute every table for a checkpoint series (a Series or paths) and write the report.

    ``out_is_default`` marks an output path the user did not choose; such a path is refused when it would land
    inside a checkpoint folder (outputs the user named explicitly are written where asked). ``ray``: a Ray address
    for the measurement pass (see :func:`ilr_inspect.measure.measure`).
    """
    from ..series import borrow

    parse_all(fail_if)  # a malformed gate is a usage error before any checkpoint is read
    if (model is None) != (probe is None):
        raise UsageError("--model and --probe go together (function-space distance needs both)")
    with borrow(paths, **series_kwargs) as series:
        folders = [c.path for c in series if c.path.is_dir()] + ([series.root] if series.root is not None else [])
        if out_is_default and _inside(Path(out), folders):
            raise UsageError(f"the default output {out} would be written into the checkpoint folder",
                             hint="choose where the report goes with -o FILE")
        tables = _compute_tables(series, model=model, probe=probe, units_file=units_file, ray=ray,
                                 options=series_kwargs.get("options"))
        inputs = [c.path for c in series]
    if equilibrium is not None:
        tables.equilibrium, tables.equilibrium_meta, tables.equilibrium_curves = load_equilibrium(Path(equilibrium))
        inputs.append(Path(equilibrium))
    root = series.root
    tables.title = title or f"ilr-inspect report: {root.name if root is not None else 'series'}"
    settings = {"max_units": max_units, "max_points": max_points, "fail_if": list(fail_if), "model": model,
                "probe": str(probe) if probe is not None else None,
                "equilibrium": str(equilibrium) if equilibrium is not None else None,
                "warnings": list(tables.warnings)}
    tables.meta = provenance(inputs, settings, timestamp)
    return build_report(tables, Path(out), png_dir=png_dir, svg_dir=svg_dir, summary_md=summary_md,
                        fail_if=fail_if, max_units=max_units, max_points=max_points, timestamp=timestamp)


def _compute_tables(series: Any, *, model: str | None, probe: str | Path | None,
                    units_file: str | Path | None, ray: str | None = None, options: Any = None) -> ReportTables:
    """The other commands' tables, from their library functions, reading every checkpoint once: one measurement
    pass gives the norms and angles rows and the regimes the units table reports."""
    from ..api import units
    from ..invariance import detect_units
    from ..inventory import hparams, ls
    from ..measure import measure

    tables = ReportTables(warnings=list(series.warnings))
    tables.ls = ls(series).rows
    tables.hparams = hparams(series).rows
    detect: dict[str, Any] = {"units_file": units_file}
    module = probe_data = None
    if model is not None and probe is not None:
        # With a model and a probe the units come from the graph and functional tiers, not names alone.
        from ..models import build_model, load_weights
        from ..probe import load_probe

        module, probe_data = build_model(str(model)), load_probe(probe)
        loaded = load_weights(module, series.checkpoints[0])
        detect.update(model=module, probe=probe_data.inputs[:64], param_names=dict(loaded.mapping))
    found = detect_units(series.checkpoints[0], **detect)
    m = measure(series, found, quiet=True, ray=ray, options=options)
    tables.norms, tables.angles = m.norms, m.angles
    tables.warnings.extend(w for w in m.warnings if w not in tables.warnings)
    # The units table from the same pass: no second detection, no second read.
    tables.units = units(series, measurement=m).rows
    if len(series) < 2:
        tables.warnings.append("a single checkpoint: no angular updates (they need two checkpoints)")
    if module is not None and probe_data is not None:
        from ..function_space import distance

        tables.distance = distance(series, module, probe_data, pairs="all").rows
    if series.logs is not None:
        tables.curves = series.logs.curves()
    return tables

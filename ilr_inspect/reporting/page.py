"""HTML assembly: one self-contained page that renders offline.

The Vega, Vega-Lite and vega-embed JavaScript comes from vl-convert (``javascript_bundle``) and is inlined once
for the whole page; each dataset is stored once as JSON and handed to every chart that reads it. A
Content-Security-Policy forbids every network fetch, so a chart that tried one would fail loudly (console
error) instead of silently calling home. No CDN, no web fonts, no external images.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from .charts import Figure
from .gates import METRICS, GateOutcome, Value, fmt_value
from .tables import ReportTables, si_mask

BUNDLE_ID = "vega-bundle"
_CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
        "img-src data: blob:; connect-src 'none'; font-src 'none'; base-uri 'none'; form-action 'none'")
_SECTIONS = (
    ("summary", "Run summary"), ("units", "Units"), ("dynamics", "Norms, effective LR and angular updates"),
    ("hyperparameters", "Hyperparameters"), ("logs", "Training curves"), ("function", "Function space"),
    ("provenance", "Provenance"),
)
_MISSING = {
    "dynamics": "No norms or angles: the series has no measurable units.",
    "hyperparameters": "No learning rate was found in the checkpoints or logs (pass --lr/--wd to set one).",
    "logs": "No training logs (TensorBoard, CSV, trainer_state.json) were found next to the checkpoints.",
    "function": "No function-space results: pass --model and --probe for distances, --equilibrium DIR for "
                "time-to-equilibrium results.",
}
_STYLE = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  margin: 0 auto; max-width: 1120px; padding: 0 20px 40px; color: #222; line-height: 1.45; }
header { border-bottom: 1px solid #ddd; padding: 14px 0 8px; }
h1 { font-size: 1.5em; margin: 0 0 4px; } h2 { font-size: 1.2em; margin: 28px 0 8px; }
nav a { margin-right: 14px; font-size: .92em; }
.muted { color: #666; font-size: .9em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table { border-collapse: collapse; font-size: .88em; }
th, td { border-bottom: 1px solid #eee; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f6f6; position: sticky; top: 0; }
.scroll { max-height: 420px; overflow: auto; border: 1px solid #eee; }
figure { margin: 18px 0 26px; } figcaption { color: #444; font-size: .92em; margin-top: 4px; }
figure h3 { font-size: 1em; margin: 0 0 6px; }
.chart { min-height: 60px; overflow-x: auto; }
.holds { color: #b00020; font-weight: 600; } .ok { color: #17683a; } .na { color: #8a6d00; }
.badge { border-radius: 3px; padding: 0 5px; font-size: .85em; background: #eee; }
.regime-equilibrium { background: #d8f0dd; } .regime-periodic { background: #fde2c8; }
.regime-approaching { background: #dbe8fb; } .regime-no-weight-decay { background: #eee; }
pre { background: #f7f7f7; padding: 8px; overflow: auto; font-size: .82em; }
"""
_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message)); document.body.setAttribute('data-errors', String(errors.length));
  });
  var data = JSON.parse(document.getElementById('ilr-data').textContent);
  var charts = JSON.parse(document.getElementById('ilr-charts').textContent);
  var opts = {renderer: 'svg', mode: 'vega-lite',
              actions: {export: true, source: false, compiled: false, editor: false}};
  var jobs = charts.map(function (c) {
    var el = document.getElementById('chart-' + c.name);
    var spec = Object.assign({}, c.spec, {datasets: {}});
    c.data.forEach(function (n) { spec.datasets[n] = data[n]; });
    return vegaEmbed(el, spec, opts).then(function () { el.setAttribute('data-rendered', 'true'); })
      .catch(function (err) {
        el.setAttribute('data-rendered', 'error');
        el.textContent = 'This chart could not be drawn: ' + err;
        console.error(err);
      });
  });
  Promise.all(jobs).then(function () {
    document.body.setAttribute('data-charts-done', String(jobs.length));
  });
  var box = document.getElementById('unit-filter');
  if (box) {
    box.addEventListener('input', function () {
      var q = box.value.toLowerCase();
      document.querySelectorAll('#units-table tbody tr').forEach(function (tr) {
        tr.style.display = tr.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
      });
    });
  }
})();
"""


def vegalite_version() -> str | None:
    """The Vega-Lite version Altair writes specs for, as vl-convert names it (e.g. ``6.4``)."""
    import altair as alt
    import vl_convert

    m = re.match(r"v?(\d+)\.(\d+)", str(alt.SCHEMA_VERSION))
    if m is None:
        return None
    wanted = f"{m.group(1)}.{m.group(2)}"
    return wanted if wanted in vl_convert.get_vegalite_versions() else None


@functools.lru_cache(maxsize=2)
def javascript_bundle(vl_version: str | None) -> str:
    """Vega + Vega-Lite + vega-embed as one script (window.vegaEmbed), from vl-convert, safe to inline."""
    import vl_convert

    make: Any = vl_convert.javascript_bundle  # its stub wants a snippet; the default one sets window.vegaEmbed
    bundle: str = make(vl_version=vl_version)
    # A literal "</script" would end the inline script early; in JavaScript "<\\/script" means the same.
    return re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)


def _clean(v: Any) -> Any:
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, float):
        # Six significant digits: what a chart or tooltip can show; keeps long series small.
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if hasattr(v, "item"):
        return _clean(v.item())
    if isinstance(v, (bool, int, str)):
        return v
    return str(v)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    cols = [str(c) for c in frame.columns]
    return [dict(zip(cols, (_clean(v) for v in row), strict=True)) for row in frame.itertuples(index=False)]


def _json_for_script(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False, sort_keys=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _facts_html(facts: Sequence[tuple[str, str]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return f'<dl class="facts">{items}</dl>'


def _gates_html(outcomes: Sequence[GateOutcome]) -> str:
    if not outcomes:
        return ""
    rows = []
    for o in outcomes:
        cls, word = ("na", "not evaluated") if o.held is None else (("holds", "HOLDS") if o.held else ("ok", "ok"))
        rows.append(f'<tr><td><code>{_e(o.gate.expr)}</code></td><td class="{cls}">{word}</td>'
                    f"<td>{_e(o.observed)}</td></tr>")
    return ("<h3>Gates (--fail-if)</h3><table><thead><tr><th>condition</th><th>result</th><th>observed</th></tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def _metrics_html(metrics: dict[str, Value]) -> str:
    rows = [f"<tr><td><code>{_e(k)}</code></td><td>{_e(fmt_value(v))}</td><td>{_e(METRICS[k].description)}</td></tr>"
            for k, v in metrics.items() if v is not None]
    if not rows:
        return ""
    return ("<details><summary>Metrics available to <code>--fail-if</code></summary><table><thead><tr><th>metric"
            f"</th><th>value</th><th>meaning</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>")


def _members(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(m) for m in v)
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _units_html(tables: ReportTables) -> str:
    frame = tables.units
    if frame is None or frame.empty:
        return '<p class="muted">No units table.</p>'
    frame = frame.assign(_si=si_mask(frame)).sort_values("_si", ascending=False, kind="stable")
    cols = [c for c in ("unit", "kind", "scale_invariant", "evidence", "regime", "regime_detail", "reason",
                        "members") if c in frame.columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for rec in frame[cols].to_dict(orient="records"):
        cells = []
        for c in cols:
            v = rec[c]
            if c == "members":
                full = _members(v)
                short = full if len(full) <= 120 else full[:117] + "…"
                cells.append(f'<td title="{_e(full)}">{_e(short)}</td>')
            elif c == "regime" and isinstance(v, str):
                cells.append(f'<td><span class="badge regime-{_e(v)}">{_e(v)}</span></td>')
            else:
                cells.append(f"<td>{_e(_members(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    filt = ('<p><input id="unit-filter" type="search" placeholder="filter units…" aria-label="filter units"> '
            f'<span class="muted">{len(frame)} units; scale-invariant first</span></p>') if len(frame) > 15 else ""
    return (f'{filt}<div class="scroll"><table id="units-table"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
            '<p class="muted">Evidence: graph (traced model), functional (scaling test with a probe), name-rule '
            "(names and shapes), gradient (optimizer state), user (--units file). Regime: approaching, "
            "equilibrium, periodic (norms repeatedly collapse and jump), no-weight-decay, undetermined.</p>")


def _figure_html(fig: Figure) -> str:
    return (f'<figure id="fig-{_e(fig.name)}"><h3>{_e(fig.title)}</h3>'
            f'<div class="chart" id="chart-{_e(fig.name)}" data-chart="{_e(fig.name)}"></div>'
            f"<figcaption>{_e(fig.caption)}</figcaption></figure>")


def _provenance_html(meta: dict[str, Any], vega_versions: dict[str, str]) -> str:
    packages = {**dict(meta.get("packages") or {}), **vega_versions}
    pkg = " · ".join(f"{_e(k)} {_e(v)}" for k, v in packages.items())
    inputs = meta.get("inputs") or []
    rows = "".join(
        f"<tr><td>{_e(i.get('path', ''))}</td><td>{_e(i.get('bytes', ''))}</td>"
        f"<td><code>{_e(str(i.get('sha256', ''))[:16])}</code></td><td>{_e(i.get('hash_scope', ''))}</td></tr>"
        for i in inputs if isinstance(i, dict))
    table = ('<div class="scroll"><table><thead><tr><th>input</th><th>bytes</th><th>sha256 (first 16)</th>'
             f"<th>hashed</th></tr></thead><tbody>{rows}</tbody></table></div>") if rows else ""
    settings = json.dumps(meta.get("settings") or {}, indent=2, sort_keys=True, default=str)
    command = f"<p>Command: <code>{_e(meta['command'])}</code></p>" if meta.get("command") else ""
    return (f"<p>Made by {_e(meta.get('tool', 'ilr-inspect'))} {_e(meta.get('version', ''))} on "
            f"{_e(meta.get('created', ''))}.</p>{command}<p class=\"muted\">{pkg}</p>{table}"
            f"<details><summary>Settings</summary><pre>{_e(settings)}</pre></details>")


def vega_versions() -> dict[str, str]:
    import vl_convert

    return {"vega": str(vl_convert.get_vega_version()), "vega-lite": f"{vegalite_version() or 'latest'}",
            "vega-embed": str(vl_convert.get_vega_embed_version())}


def render(tables: ReportTables, figures: Sequence[Figure], facts: Sequence[tuple[str, str]],
           metrics: dict[str, Value], outcomes: Sequence[GateOutcome], *, bundle: str,
           versions: dict[str, str]) -> str:
    """The whole page as a string."""
    datasets: dict[str, list[dict[str, Any]]] = {}
    for fig in figures:
        for name, frame in fig.data.items():
            datasets.setdefault(name, records(frame))
    charts = [{"name": f.name, "data": sorted(f.data), "spec": f.spec()} for f in figures]
    by_section: dict[str, list[Figure]] = {}
    for f in figures:
        by_section.setdefault(f.section, []).append(f)
    sections: dict[str, str] = {
        "summary": _facts_html(facts) + _gates_html(outcomes) + _metrics_html(metrics) + (
            "<details><summary>Warnings</summary><ul>"
            + "".join(f"<li>{_e(w)}</li>" for w in tables.warnings) + "</ul></details>" if tables.warnings else ""),
        "units": _units_html(tables),
        "provenance": _provenance_html(tables.meta, versions),
    }
    for key in ("dynamics", "hyperparameters", "logs", "function"):
        figs = by_section.get(key, [])
        sections[key] = "".join(_figure_html(f) for f in figs) if figs else f'<p class="muted">{_MISSING[key]}</p>'
    nav = "".join(f'<a href="#{k}">{_e(t)}</a>' for k, t in _SECTIONS)
    body = "".join(f'<section id="{k}"><h2>{_e(t)}</h2>{sections[k]}</section>' for k, t in _SECTIONS)
    created = tables.meta.get("created", "")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(tables.title)}</title><style>{_STYLE}</style>\n"
        f'<script id="{BUNDLE_ID}">{bundle}</script>\n</head><body>'
        f'<header><h1>{_e(tables.title)}</h1><div class="muted">ilr-inspect {_e(tables.meta.get("version", ""))}'
        f" · {_e(created)}</div><nav>{nav}</nav></header>\n{body}\n"
        f'<script type="application/json" id="ilr-data">{_json_for_script(datasets)}</script>\n'
        f'<script type="application/json" id="ilr-charts">{_json_for_script(charts)}</script>\n'
        f"<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def strip_bundle(page: str) -> str:
    """The page with the inlined JavaScript bundle replaced by a marker (for golden files and size checks)."""
    return re.sub(rf'(<script id="{BUNDLE_ID}">).*?(</script>)', r"\1/* bundle */\2", page, count=1, flags=re.S)

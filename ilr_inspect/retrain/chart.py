"""The results folder's chart: t_eq vs 1/λ_e as a PNG and a self-contained HTML page (vl-convert, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..output import atomic_write, atomic_write_text


def write_standalone(fig: Any, stem: Path) -> list[Path]:
    """Write ``stem.png`` (2× scale) and ``stem.html`` (Vega, Vega-Lite and vega-embed inlined: opens offline),
    both titled with the figure's title and caption."""
    import vl_convert

    from ..reporting import _full_spec
    from ..reporting.page import vegalite_version

    spec = _full_spec(fig)
    spec["title"] = {"text": fig.title, "subtitle": _wrap(fig.caption), "anchor": "start"}
    version = vegalite_version()
    png_bytes: bytes = vl_convert.vegalite_to_png(spec, vl_version=version, scale=2, allowed_base_urls=[])
    png, html = stem.with_suffix(".png"), stem.with_suffix(".html")
    atomic_write(png, lambda fh: fh.write(png_bytes))
    atomic_write_text(html, vl_convert.vegalite_to_html(spec, vl_version=version, bundle=True))
    return [png, html]


def _wrap(text: str, width: int = 100) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines

"""`report`: the self-contained HTML page, chart exports, a Markdown summary and `--fail-if` gates."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ThresholdError, UsageError
from .common import HParamOptions, PathsArg, RayOpt, SeriesOptions, command, print_warnings, stderr

DEFAULT_OUT = Path("report.html")


@command("report")
def report_cmd(
    paths: PathsArg,
    hp: HParamOptions,
    so: SeriesOptions,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="The HTML file to write (default ./report.html; never inside the checkpoint folder "
                               "unless you name that path).")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Also write every chart as DIR/<chart>.png.")] = None,
    svg: Annotated[Path | None, typer.Option("--svg", help="Also write every chart as DIR/<chart>.svg.")] = None,
    summary_md: Annotated[Path | None, typer.Option(
        "--summary-md", help="Write a short Markdown summary (for $GITHUB_STEP_SUMMARY or a merge request).")] = None,
    fail_if: Annotated[list[str] | None, typer.Option(
        "--fail-if", help="Exit with code 3 after writing the report when EXPR holds, e.g. 'max_angle_ratio>1.5', "
                          "'regime==periodic', 'min_norm<1e-3' (repeatable; metrics in docs/report.md).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model for function-space distances (as for `distance`); never picked up on "
                              "its own (a model file beside the checkpoints is only named in a note).")] = None,
    probe: Annotated[str | None, typer.Option(
        "--probe", help="Probe inputs for distances (.npz with x[, y]); with --model, probe.npz next to the "
                        "checkpoints is used when omitted.")] = None,
    no_distance: Annotated[bool, typer.Option("--no-distance", help="Skip function-space distances.")] = False,
    equilibrium: Annotated[Path | None, typer.Option(
        "--equilibrium", help="Results folder of `ilr-inspect equilibrium` (equilibrium.json, curves.csv).")] = None,
    units_file: Annotated[Path | None, typer.Option(
        "--units", help="YAML/TOML file naming the scale-invariant units (overrides detection).")] = None,
    max_units: Annotated[int, typer.Option(
        "--max-units", help="Units drawn as lines per chart (the rest as a range band and in the heat map).")] = 12,
    max_points: Annotated[int, typer.Option(
        "--max-points", help="Checkpoints charted per line before thinning (first, last and schedule changes are "
                             "always kept).")] = 400,
    timestamp: Annotated[str | None, typer.Option(
        "--timestamp", help="Fixed creation time for reproducible output (also env ILR_INSPECT_TIMESTAMP).")] = None,
    title: Annotated[str | None, typer.Option("--title", help="Page title.")] = None,
    ray: RayOpt = None,
) -> None:
    """All of the above in one self-contained HTML page that renders offline (no network requests).

    Exit code 3 when a --fail-if condition holds (the report is written first).

    Example: ilr-inspect report runs/x/ckpts -o report.html --summary-md summary.md --fail-if 'max_angle_ratio>1.5'
    """
    from ..reporting import report
    from ..reporting.gates import parse_all
    from ..series import expand_paths

    parse_all(fail_if or [])  # malformed gates fail before any checkpoint is read
    from ..evidence import locate, model_hint, without_model_file

    quiet = so.quiet
    candidates = expand_paths(paths)
    if no_distance:
        model = probe = None
    elif model is None and probe is None:
        named = model_hint(candidates)  # model code beside the series is named, never run on its own
        if named is not None and not quiet:
            stderr.print(f"note: no function-space distances; add --model {named} --probe PROBE to include them "
                         "(ilr-inspect only runs model code you name)", markup=False)
    elif model is None:
        raise UsageError("--model and --probe go together (function-space distance needs both)")
    else:
        ev = locate(candidates, model, probe)
        if ev.probe_spec is None:
            raise UsageError("--model and --probe go together; no probe.npz was found next to the checkpoints")
        for note in ev.notes if not quiet else []:
            stderr.print(note, markup=False)
        probe = ev.probe_spec
    candidates = without_model_file(candidates, model)
    series = so.open([str(c) for c in candidates], hp=hp)
    with series:
        result = report(series, out=output or DEFAULT_OUT, out_is_default=output is None, png_dir=png, svg_dir=svg,
                        summary_md=summary_md, fail_if=fail_if or [], model=model, probe=probe,
                        equilibrium=equilibrium, units_file=units_file, max_units=max_units, max_points=max_points,
                        timestamp=timestamp, title=title,
                        ray=ray, options=so.open_options())
    print_warnings(series, quiet)
    if not quiet:
        stderr.print(f"wrote {result.html} ({result.html_bytes - result.bundle_bytes} bytes + "
                     f"{result.bundle_bytes} bytes of inlined JavaScript; {len(result.figures)} charts)", markup=False)
        for path in [*result.images, *([result.summary_md] if result.summary_md else [])]:
            stderr.print(f"wrote {path}", markup=False)
    for outcome in result.gates:
        if not quiet or outcome.held is not False:
            stderr.print(f"--fail-if {outcome.line}", markup=False)
    if result.held:
        raise ThresholdError(
            "threshold reached: " + "; ".join(f"{g.gate.expr} (observed {g.observed})" for g in result.held),
            hint="the report was written; see its Run summary")
    if result.not_evaluated:
        raise UsageError("; ".join(g.line for g in result.not_evaluated),
                         hint="drop the gate or provide the input it needs")

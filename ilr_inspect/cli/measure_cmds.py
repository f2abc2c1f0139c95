"""`units`, `norms`, `angles`: scale-invariant units and the core measurements (no torch import at load)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer

from .common import (
    Granularity,
    HParamOptions,
    OutputOptions,
    PathsArg,
    RayOpt,
    SeriesOptions,
    choice,
    command,
    print_warnings,
    stderr,
)

if TYPE_CHECKING:
    from ..output import Result
    from ..series import Series

_UNITS_TABLE = ["unit", "kind", "scale_invariant", "evidence", "regime", "reason", "regime_detail"]
_NORMS_TABLE = ["step", "unit", "norm", "effective_lr", "intrinsic_lr", "intrinsic_time", "relaxation_done",
                "predicted_norm", "norm_ratio"]
_NORMS_PT_TABLE = ["step", "parameter", "unit", "norm", "effective_lr", "intrinsic_lr", "intrinsic_time"]
_ANGLES_TABLE = ["step_from", "step_to", "unit", "cosine", "angle", "angle_per_step", "angle_per_sqrt_step",
                 "relative_update", "predicted_angle_per_step", "ratio"]


@dataclass(frozen=True)
class DetectOptions:
    """The evidence for scale-invariant units (see ilr_inspect.evidence)."""

    __cli_bundle__: ClassVar[bool] = True

    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="model.py:build, pkg.mod:factory, a .pt2 or TorchScript file: enables the graph tier "
                              "(torch.fx / torch.export) and, with --probe, the functional check. Never picked up "
                              "on its own: a model file beside the checkpoints is only named in a note.")] = None
    probe: Annotated[str | None, typer.Option(
        "--probe", "-p", help="Probe batch (.npz x[/y], .pt, image folder, module:function) for the functional "
                              "check (scale each unit by 0.5 and 2 with normalizers in train mode). Default: "
                              "probe.npz next to the checkpoints when --model is given.")] = None
    graph: Annotated[Path | None, typer.Option(
        "--graph", help="A graph to analyse without running code: torch.export .pt2 or ONNX file.")] = None
    units_file: Annotated[Path | None, typer.Option(
        "--units", help="YAML/TOML file: unit name -> tensor glob patterns (overrides every detector).")] = None
    granularity: Annotated[Granularity, typer.Option(
        "--granularity", case_sensitive=False,
        help="channel treats each output channel (or norm group) as its own unit and reports RMS over channels, "
             "as the theory predicts per channel under BatchNorm.")] = Granularity.tensor
    probe_size: Annotated[int, typer.Option(
        "--probe-size", help="Probe examples used by the functional check.")] = 64

    def settings(self) -> dict[str, Any]:
        return {"granularity": choice(self.granularity), "model": self.model, "probe": self.probe,
                "graph": str(self.graph or ""), "units_file": str(self.units_file or "")}

    def detect_kwargs(self, series: Series, quiet: bool) -> dict[str, Any]:
        from ..evidence import for_detection

        ev = for_detection(series, self.model, self.probe, self.graph)
        for note in ev.notes if not quiet else []:
            stderr.print(note, markup=False)
        return {"units_file": self.units_file, **ev.detect_kwargs(self.probe_size)}


def _run(kind: str, paths: list[str], per_tensor: bool, detect: DetectOptions, hp: HParamOptions,
         so: SeriesOptions, ray: str | None = None) -> Result:
    from ..api import angles, norms, units

    gran = choice(detect.granularity)
    settings = {**detect.settings(), **so.settings(), **hp.settings()}
    with so.open(paths, hp=hp) as series:
        kw = detect.detect_kwargs(series, so.quiet)
        if ray:  # workers reopen the checkpoints from their paths, with the same reader options
            kw.update(ray=ray, options=so.open_options())
        if kind == "units":
            result = units(series, granularity=gran, quiet=so.quiet, settings=settings, **kw)
        else:
            fn = norms if kind == "norms" else angles
            result = fn(series, per_tensor=per_tensor, granularity=gran, quiet=so.quiet,
                        settings={**settings, "per_tensor": per_tensor}, **kw)
    print_warnings(series, so.quiet)
    return result


@command("units")
def units_cmd(paths: PathsArg, out: OutputOptions, detect: DetectOptions, hp: HParamOptions,
              so: SeriesOptions, ray: RayOpt = None) -> None:
    """Scale-invariant units with the evidence for each decision (user file > functional > graph > name rules)
    and each unit's regime (approaching / equilibrium / periodic / no-weight-decay / undetermined).

    Example: ilr-inspect units ckpts/ --model model.py:build --probe probe.npz
    """
    out.emit(_run("units", paths, False, detect, hp, so, ray), _UNITS_TABLE, quiet=so.quiet)


_DOCS = {
    "norms": """Per unit and checkpoint: norm (float64), effective LR (lr/‖w‖², lr/‖w‖ for Adam), intrinsic LR λ_e,
    intrinsic time Σλ_e since the last schedule change, predicted equilibrium norm and relaxation progress.

    Each checkpoint file is read once (norms and angles come from the same pass). Example:
    ilr-inspect norms ckpts/ --per-tensor -f csv -o norms.csv
    """,
    "angles": """Angular update between consecutive checkpoints per unit: cosine, angle (stable 2·atan2 form), per
    step and per √step, relative update, and the equilibrium prediction for that gap (ratio = measured /
    predicted).

    Example: ilr-inspect angles ckpts/ --granularity channel
    """,
}


def _measure_command(kind: str) -> None:
    """`norms` and `angles` are one command over the same streamed pass; only the table differs."""

    def run(paths: PathsArg, out: OutputOptions, detect: DetectOptions, hp: HParamOptions, so: SeriesOptions,
            per_tensor: Annotated[bool, typer.Option(
                "--per-tensor", help="One row per parameter tensor instead of per unit.")] = False,
            ray: RayOpt = None) -> None:
        if kind == "norms":
            cols = _NORMS_PT_TABLE if per_tensor else _NORMS_TABLE
        else:
            cols = ["parameter", *_ANGLES_TABLE] if per_tensor else _ANGLES_TABLE
        out.emit(_run(kind, paths, per_tensor, detect, hp, so, ray), cols, quiet=so.quiet)

    run.__name__ = run.__qualname__ = f"{kind}_cmd"
    command(kind, doc=_DOCS[kind])(run)


_measure_command("norms")
_measure_command("angles")

"""`units`, `norms`, `angles`: scale-invariant units and the core measurements (no torch import at load)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .app import app
from .common import (
    EmaOpt,
    FormatOpt,
    KeyOpt,
    LrOpt,
    MomentumOpt,
    OnMismatchOpt,
    OptimizerOpt,
    OutOpt,
    PathsArg,
    QuietOpt,
    StepRegexOpt,
    TrustOpt,
    WdOpt,
    emit,
    open_series_from_cli,
    print_warnings,
    stderr,
)

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="model.py:build, pkg.mod:factory, a .pt2 or TorchScript file: enables the graph tier "
                          "(torch.fx / torch.export) and, with --probe, the functional check. Default: a step-less "
                          ".pt2/TorchScript file next to the checkpoints.")]
ProbeOpt = Annotated[str | None, typer.Option(
    "--probe", "-p", help="Probe batch (.npz x[/y], .pt, image folder, module:function) for the functional check "
                          "(scale each unit by 0.5 and 2 with normalizers in train mode). Default: probe.npz next "
                          "to the checkpoints when a model is available.")]
GraphOpt = Annotated[Path | None, typer.Option(
    "--graph", help="A graph to analyse without running code: torch.export .pt2 or ONNX file.")]
UnitsOpt = Annotated[Path | None, typer.Option(
    "--units", help="YAML/TOML file: unit name -> tensor glob patterns (overrides every detector).")]
GranOpt = Annotated[str, typer.Option(
    "--granularity", help="tensor | channel: channel treats each output channel (or norm group) as its own unit "
                          "and reports RMS over channels, as the theory predicts per channel under BatchNorm.")]
PerTensorOpt = Annotated[bool, typer.Option("--per-tensor", help="One row per parameter tensor instead of per unit.")]
ProbeSizeOpt = Annotated[int, typer.Option("--probe-size", help="Probe examples used by the functional check.")]

_UNITS_TABLE = ["unit", "kind", "scale_invariant", "evidence", "regime", "reason", "regime_detail"]
_NORMS_TABLE = ["step", "unit", "norm", "effective_lr", "intrinsic_lr", "intrinsic_time", "relaxation_done",
                "predicted_norm", "norm_ratio"]
_NORMS_PT_TABLE = ["step", "parameter", "unit", "norm", "effective_lr", "intrinsic_lr", "intrinsic_time"]
_ANGLES_TABLE = ["step_from", "step_to", "unit", "cosine", "angle", "angle_per_step", "angle_per_sqrt_step",
                 "relative_update", "predicted_angle_per_step", "ratio"]


def _detect_kwargs(series: Any, model: str | None, probe: str | None, graph: Path | None, units_file: Path | None,
                   probe_size: int, quiet: bool) -> dict[str, Any]:
    """Build the evidence the user pointed at (or that sits next to the checkpoints)."""
    kw: dict[str, Any] = {"units_file": units_file}
    cks = series.checkpoints
    if not cks:
        return kw
    candidates = [c.path for c in cks]
    if graph is not None:
        kw["graph"] = _graph_from_file(graph)
    model_spec: str | Path | None = model
    if model_spec is None:
        from .distance_cmd import discover_model

        found = discover_model(candidates)
        model_spec = found if isinstance(found, Path) else None  # never run a model.py the user did not name
        if model_spec is not None and not quiet:
            stderr.print(f"model: {model_spec} (found next to the checkpoints)", markup=False)
    if model_spec is None:
        if probe is not None:
            raise UsageError("--probe needs a model", hint="pass --model model.py:build (or a .pt2 file)")
        return kw
    from ..models import build_model, is_torch_export, load_weights

    module = build_model(str(model_spec))
    report = load_weights(module, cks[0])
    kw["model"] = module
    kw["param_names"] = dict(report.mapping)
    if "graph" not in kw and Path(str(model_spec)).is_file() and is_torch_export(Path(str(model_spec))):
        kw["graph"] = Path(str(model_spec))
    probe_spec: str | Path | None = probe
    if probe_spec is None:
        from .distance_cmd import discover_probe

        probe_spec = discover_probe(candidates)
    if probe_spec is not None:
        from ..probe import load_probe

        kw["probe"] = load_probe(probe_spec).inputs[:probe_size]
    return kw


def _graph_from_file(path: Path) -> Any:
    if path.suffix.lower() == ".onnx":
        from ..invariance.onnx_graph import load_onnx_graph

        return load_onnx_graph(path)
    return path


def _open(paths: list[str], **kw: Any) -> Any:
    return open_series_from_cli(paths, **kw)


def _check_gran(granularity: str) -> str:
    if granularity not in ("tensor", "channel"):
        raise typer.BadParameter("expected tensor or channel", param_hint="--granularity")
    return granularity


@app.command("units")
def units_cmd(
    paths: PathsArg,
    model: ModelOpt = None,
    probe: ProbeOpt = None,
    graph: GraphOpt = None,
    units_file: UnitsOpt = None,
    granularity: GranOpt = "tensor",
    probe_size: ProbeSizeOpt = 64,
    fmt: FormatOpt = "table",
    output: OutOpt = None,
    lr: LrOpt = None,
    wd: WdOpt = None,
    momentum: MomentumOpt = None,
    optimizer: OptimizerOpt = None,
    trust_pickle: TrustOpt = False,
    key: KeyOpt = None,
    ema: EmaOpt = False,
    step_regex: StepRegexOpt = None,
    on_mismatch: OnMismatchOpt = "stop",
    quiet: QuietOpt = False,
) -> None:
    """Scale-invariant units with the evidence for each decision (user file > functional > graph > name rules)
    and each unit's regime (approaching / equilibrium / periodic / no-weight-decay / undetermined).

    Example: ilr-inspect units ckpts/ --model model.py:build --probe probe.npz
    """
    from ..invariance import units

    gran = _check_gran(granularity)
    series = _open(paths, trust_pickle=trust_pickle, key=key, ema=ema, step_regex=step_regex,
                   on_mismatch=on_mismatch, quiet=quiet, lr=lr, wd=wd, momentum=momentum, optimizer=optimizer)
    with series:
        kw = _detect_kwargs(series, model, probe, graph, units_file, probe_size, quiet)
        result = units(series, granularity=gran, quiet=quiet,
                       settings={"granularity": gran, "model": model, "probe": probe, "graph": str(graph or ""),
                                 "units_file": str(units_file or "")}, **kw)
    print_warnings(series, quiet)
    emit(result, fmt, output, table_columns=_UNITS_TABLE, quiet=quiet)


def _measure_cmd(kind: str, paths: list[str], per_tensor: bool, model: str | None, probe: str | None,
                 graph: Path | None, units_file: Path | None, granularity: str, probe_size: int, fmt: str,
                 output: Path | None, quiet: bool, open_kw: dict[str, Any]) -> None:
    from ..measure import angles, norms

    gran = _check_gran(granularity)
    series = _open(paths, quiet=quiet, **open_kw)
    with series:
        kw = _detect_kwargs(series, model, probe, graph, units_file, probe_size, quiet)
        fn = norms if kind == "norms" else angles
        settings = {"granularity": gran, "per_tensor": per_tensor, "model": model, "probe": probe,
                    "units_file": str(units_file or ""), **{k: v for k, v in open_kw.items() if v is not None}}
        result = fn(series, per_tensor=per_tensor, granularity=gran, quiet=quiet, settings=settings,
                    detect_kwargs=kw)
    print_warnings(series, quiet)
    if kind == "norms":
        cols = _NORMS_PT_TABLE if per_tensor else _NORMS_TABLE
    else:
        cols = (["parameter", *_ANGLES_TABLE]) if per_tensor else _ANGLES_TABLE
    emit(result, fmt, output, table_columns=cols, quiet=quiet)


@app.command("norms")
def norms_cmd(
    paths: PathsArg,
    per_tensor: PerTensorOpt = False,
    model: ModelOpt = None,
    probe: ProbeOpt = None,
    graph: GraphOpt = None,
    units_file: UnitsOpt = None,
    granularity: GranOpt = "tensor",
    probe_size: ProbeSizeOpt = 64,
    fmt: FormatOpt = "table",
    output: OutOpt = None,
    lr: LrOpt = None,
    wd: WdOpt = None,
    momentum: MomentumOpt = None,
    optimizer: OptimizerOpt = None,
    trust_pickle: TrustOpt = False,
    key: KeyOpt = None,
    ema: EmaOpt = False,
    step_regex: StepRegexOpt = None,
    on_mismatch: OnMismatchOpt = "stop",
    quiet: QuietOpt = False,
) -> None:
    """Per unit and checkpoint: norm (float64), effective LR (lr/‖w‖², lr/‖w‖ for Adam), intrinsic LR λ_e,
    intrinsic time Σλ_e since the last schedule change, predicted equilibrium norm and relaxation progress.

    Each checkpoint file is read once (norms and angles come from the same pass). Example:
    ilr-inspect norms ckpts/ --per-tensor -f csv -o norms.csv
    """
    _measure_cmd("norms", paths, per_tensor, model, probe, graph, units_file, granularity, probe_size, fmt, output,
                 quiet, {"trust_pickle": trust_pickle, "key": key, "ema": ema, "step_regex": step_regex,
                         "on_mismatch": on_mismatch, "lr": lr, "wd": wd, "momentum": momentum,
                         "optimizer": optimizer})


@app.command("angles")
def angles_cmd(
    paths: PathsArg,
    per_tensor: PerTensorOpt = False,
    model: ModelOpt = None,
    probe: ProbeOpt = None,
    graph: GraphOpt = None,
    units_file: UnitsOpt = None,
    granularity: GranOpt = "tensor",
    probe_size: ProbeSizeOpt = 64,
    fmt: FormatOpt = "table",
    output: OutOpt = None,
    lr: LrOpt = None,
    wd: WdOpt = None,
    momentum: MomentumOpt = None,
    optimizer: OptimizerOpt = None,
    trust_pickle: TrustOpt = False,
    key: KeyOpt = None,
    ema: EmaOpt = False,
    step_regex: StepRegexOpt = None,
    on_mismatch: OnMismatchOpt = "stop",
    quiet: QuietOpt = False,
) -> None:
    """Angular update between consecutive checkpoints per unit: cosine, angle (stable 2·atan2 form), per step and
    per √step, relative update, and the equilibrium prediction for that gap (ratio = measured / predicted).

    Example: ilr-inspect angles ckpts/ --granularity channel
    """
    _measure_cmd("angles", paths, per_tensor, model, probe, graph, units_file, granularity, probe_size, fmt,
                 output, quiet, {"trust_pickle": trust_pickle, "key": key, "ema": ema, "step_regex": step_regex,
                                 "on_mismatch": on_mismatch, "lr": lr, "wd": wd, "momentum": momentum,
                                 "optimizer": optimizer})

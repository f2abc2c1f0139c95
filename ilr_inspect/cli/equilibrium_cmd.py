"""``ilr-inspect equilibrium``: retrain from checkpoints and measure the time to equilibrium."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .common import Format, FormatOpt, OutOpt, QuietOpt, check_format, emit, stderr

_COLUMNS = ["arm", "intrinsic_lr", "seeds", "t_eq_steps", "t_eq_resolution_steps", "t_eq_low_steps",
            "t_eq_high_steps", "t_eq_intrinsic", "noise_floor", "noise_floor_rse", "distance_between",
            "t_norm_steps", "t_norm_predicted_steps", "angle_ratio", "test_acc", "status"]


@app.command()
def equilibrium(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Folder holding ilr.toml (see docs/equilibrium.md).")],
    config: Annotated[Path | None, typer.Option("--config", help="The ilr.toml (default RUN_DIR/ilr.toml).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Results folder (default RUN_DIR/ilr-results; never a checkpoint folder).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    horizon: Annotated[float | None, typer.Option("--horizon", help="Override the horizon (units of 1/λ_e).")] = None,
    eval_every: Annotated[float | None, typer.Option("--eval-every", help="Override the cadence (in 1/λ_e).")] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", help="Override the seeds per start (≥ 2).")] = None,
    bootstrap: Annotated[int | None, typer.Option("--bootstrap", help="Bootstrap resamples for intervals.")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Smoke test: horizon 0.3/λ_e, 2 seeds; too short to measure t_eq (no verdicts).")] = False,
    arm: Annotated[list[str] | None, typer.Option("--arm", help="Run only this arm id (repeatable).")] = None,
    no_fuse: Annotated[bool, typer.Option("--no-fuse", help="Train branches one by one (no torch.vmap).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the forward/loss.")] = False,
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="Capture the whole step in a CUDA graph.")] = False,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads (default: 1 or torch's default, whichever runs a step faster here).")] = None,
    curves: Annotated[Path | None, typer.Option("--curves", help="Also write the curves table to FILE.")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", envvar="ILR_INSPECT_RAY_ADDRESS", show_envvar=True,
        help="Run one Ray task per arm: local (a cluster in this process), auto (`ray start --head` here) or "
             "HOST:PORT; --threads is then the CPUs per arm (default 1), and each arm gets a GPU on CUDA.")] = None,
    fmt: FormatOpt = Format.table,
    output: OutOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Retrain every start with several seeds per arm and report when the function-space distance between starts
    falls to the seed-to-seed noise floor (t_eq, in steps and in units of 1/λ_e), and the fitted exponent."""
    check_format(fmt)
    from ..output import OutputFormat, atomic_write, serialize  # pandas: only when the command runs
    from ..retrain import equilibrium as run

    result = run(
        run_dir, config=config, out=out, device=device, resume=resume, horizon=horizon, eval_every=eval_every,
        seeds=seeds, bootstrap=bootstrap, quick=quick, arms=arm or None, fuse=False if no_fuse else None,
        compile=compile, cuda_graph=cuda_graph, threads=threads, progress=not quiet,
        log=None if quiet else lambda m: stderr.print(m, markup=False), ray=ray.strip() or None if ray else None,
    )
    emit(result, fmt, output, table_columns=_COLUMNS, quiet=quiet)
    if curves is not None and result.curves is not None:
        kind: OutputFormat = "parquet" if curves.suffix == ".parquet" else "json" if curves.suffix == ".json" else "csv"
        data = serialize(result.curves, kind)
        atomic_write(curves, lambda fh: fh.write(data))

"""`ls` and `hparams` commands."""

from __future__ import annotations

from .common import HParamOptions, OutputOptions, PathsArg, SeriesOptions, command, print_warnings, stderr


@command("ls")
def ls_cmd(paths: PathsArg, out: OutputOptions, so: SeriesOptions) -> None:
    """List the series: files, steps (and where each came from), format, tensors, bytes, hyperparameter sources.

    Example: ilr-inspect ls runs/x/checkpoints/
    """
    from ..inventory import ls

    with so.open(paths) as series:
        result = ls(series)
    print_warnings(series, so.quiet)
    out.emit(result, quiet=so.quiet)


@command("hparams")
def hparams_cmd(paths: PathsArg, out: OutputOptions, hp: HParamOptions, so: SeriesOptions) -> None:
    """The lr / weight-decay / momentum timeline per checkpoint and parameter, with the source of each value.

    `lr` from saved optimizer state is the value for the NEXT update; from logs it is the value USED at that step
    (column lr_timing says which). Example: ilr-inspect hparams ckpts/ --format csv -o hparams.csv
    """
    from ..inventory import hparams

    with so.open(paths, hp=hp) as series:
        result = hparams(series)
    print_warnings(series, so.quiet)
    for note in result.meta.get("notes", []) if not so.quiet else []:
        stderr.print(f"note: {note}", markup=False)
    out.emit(result, quiet=so.quiet)

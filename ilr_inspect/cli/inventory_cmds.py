"""`ls` and `hparams` commands."""

from __future__ import annotations

from typing import Any

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
)


@app.command("ls")
def ls_cmd(
    paths: PathsArg,
    fmt: FormatOpt = "table",
    output: OutOpt = None,
    trust_pickle: TrustOpt = False,
    key: KeyOpt = None,
    ema: EmaOpt = False,
    step_regex: StepRegexOpt = None,
    on_mismatch: OnMismatchOpt = "stop",
    quiet: QuietOpt = False,
) -> None:
    """List the series: files, steps (and where each came from), format, tensors, bytes, hyperparameter sources.

    Example: ilr-inspect ls runs/x/checkpoints/
    """
    from ..inventory import ls

    series = open_series_from_cli(paths, trust_pickle=trust_pickle, key=key, ema=ema, step_regex=step_regex,
                                  on_mismatch=on_mismatch, quiet=quiet)
    with series:
        result = ls(series)
    print_warnings(series, quiet)
    emit(result, fmt, output, quiet=quiet)


@app.command("hparams")
def hparams_cmd(
    paths: PathsArg,
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
    """The lr / weight-decay / momentum timeline per checkpoint and parameter, with the source of each value.

    `lr` from saved optimizer state is the value for the NEXT update; from logs it is the value USED at that step
    (column lr_timing says which). Example: ilr-inspect hparams ckpts/ --format csv -o hparams.csv
    """
    from ..inventory import hparams

    series = open_series_from_cli(paths, trust_pickle=trust_pickle, key=key, ema=ema, step_regex=step_regex,
                                  on_mismatch=on_mismatch, quiet=quiet, lr=lr, wd=wd, momentum=momentum,
                                  optimizer=optimizer)
    with series:
        result: Any = hparams(series)
    print_warnings(series, quiet)
    for note in result.meta.get("notes", []):
        if not quiet:
            from .common import stderr

            stderr.print(f"note: {note}", markup=False)
    emit(result, fmt, output, quiet=quiet)

"""Lightning ``CSVLogger`` ``metrics.csv``, Keras ``CSVLogger`` files and generic CSV / JSONL logs (one record per
logging call).

Lightning writes sparse rows: each ``log_metrics`` call is a row with only its own columns filled, so the table
is melted to (step, tag, value) and empty cells are dropped. Other CSV/JSONL files need a ``step`` column; its
name, and the names of the lr / weight-decay / momentum columns, can be given with a :class:`ColumnMap`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import LogFormatError
from .tags import ColumnMap

if TYPE_CHECKING:
    import pandas as pd

STEP_NAMES = ("step", "global_step", "_step", "iteration", "iter", "trainer/global_step", "train/global_step")
_TIME_NAMES = ("wall_time", "_timestamp", "timestamp", "time")


def _step_column(columns: list[str], mapping: ColumnMap | None) -> str:
    if mapping is not None and mapping.step is not None:
        if mapping.step not in columns:
            raise LogFormatError(f"no column {mapping.step!r} (given as the step column)")
        return mapping.step
    for name in STEP_NAMES:
        if name in columns:
            return name
    raise LogFormatError("no step column (name it with --log-step-col)")


def tidy(table: pd.DataFrame, mapping: ColumnMap | None) -> pd.DataFrame:
    """Wide table (one row per logging call) → long rows (step, tag, value, wall_time), empty cells dropped."""
    import pandas as pd

    cols = [str(c) for c in table.columns]
    table.columns = pd.Index(cols)
    step_col = _step_column(cols, mapping)
    steps = pd.to_numeric(table[step_col], errors="coerce")
    ok = steps.notna() & (steps == steps.round())
    if not ok.any():
        raise LogFormatError(f"column {step_col!r} holds no integer steps")
    table = table[ok]
    time_col = next((c for c in _TIME_NAMES if c in cols and c != step_col), None)
    wall = pd.to_numeric(table[time_col], errors="coerce") if time_col else pd.Series(math.nan, index=table.index)
    parts = []
    for col in cols:
        if col in (step_col, time_col):
            continue
        values = pd.to_numeric(table[col], errors="coerce")
        keep = pd.Series(np.isfinite(values.to_numpy(dtype="float64")), index=values.index)
        if keep.any():
            parts.append(
                pd.DataFrame(
                    {
                        "step": steps[ok][keep].astype("int64"),
                        "tag": col,
                        "value": values[keep].astype("float64"),
                        "wall_time": wall[keep].astype("float64"),
                    }
                )
            )
    if not parts:
        raise LogFormatError("no numeric columns besides the step")
    return pd.concat(parts, ignore_index=True)


def read_csv(path: Path, mapping: ColumnMap | None = None) -> pd.DataFrame:
    import pandas as pd

    try:
        table = pd.read_csv(path, low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LogFormatError(f"not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc
    return tidy(table, mapping)


def read_jsonl(path: Path, mapping: ColumnMap | None = None) -> pd.DataFrame:
    """One JSON object per line; unparsable lines are skipped (a crashed run leaves a torn last line)."""
    import pandas as pd

    records: list[dict[str, Any]] = []
    bad = 0
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(obj, dict):
                records.append({k: v for k, v in obj.items() if not isinstance(v, dict | list)})
            else:
                bad += 1
    if not records:
        raise LogFormatError("no JSON object lines")
    if bad > len(records):
        raise LogFormatError(f"{bad} of {bad + len(records)} lines are not JSON objects")
    return tidy(pd.DataFrame.from_records(records), mapping)


# Keras ``CSVLogger(filename)`` (any name; the docs use ``training.log``): a header ``epoch,<sorted log keys>`` and
# one row per epoch, ``epoch`` 0-based and written at the epoch's end (keras/src/callbacks/csv_logger.py).
KERAS_READER = "epoch-csv"  # also timm summary.csv: same layout (0-based epoch, row at epoch end)
_HEAD_BYTES = 4096


def is_keras_csvlogger(path: Path) -> bool:
    """A CSV whose first column is ``epoch`` and that has no step column."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEAD_BYTES).split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    except OSError:
        return False
    cols = [c.strip() for c in head.split(",")]
    return len(cols) >= 2 and cols[0] == "epoch" and not set(cols) & set(STEP_NAMES)


def read_keras_csvlogger(path: Path) -> pd.DataFrame:
    """Long rows whose ``step`` is the number of epochs completed (row ``epoch`` e is written after epoch e+1)."""
    import pandas as pd

    try:
        table = pd.read_csv(path, low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise LogFormatError(f"not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc
    epochs = pd.to_numeric(table["epoch"], errors="coerce")
    table = table.drop(columns=["epoch"]).assign(step=epochs + 1)
    return tidy(table, None)

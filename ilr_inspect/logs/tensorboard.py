"""TensorBoard event files, scalars only, via tbparse (the maintained reader; no hand-written protobuf parsing)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import require
from .data import LogFormatError

READER = "tensorboard"


def is_event_file(path: Path) -> bool:
    return path.name.startswith("events.out.tfevents.")


def read(path: Path) -> pd.DataFrame:
    """One event file → rows (step, tag, value, wall_time). Only the scalars event type is parsed."""
    tbparse: Any = require("tbparse", "tensorboard", "reading TensorBoard event files")
    with warnings.catch_warnings():
        # tbparse 0.0.9 uses pandas APIs deprecated in pandas 3; that noise is not the user's concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        reader = tbparse.SummaryReader(str(path), extra_columns={"wall_time"}, event_types={"scalars"})
        frame: pd.DataFrame = reader.scalars
    if frame.empty:
        raise LogFormatError("no scalars in it (empty, corrupt, or only non-scalar summaries)")
    out = pd.DataFrame(
        {
            "step": frame["step"].astype("int64"),
            "tag": frame["tag"].astype(str),
            "value": frame["value"].astype("float64"),
            "wall_time": frame["wall_time"].astype("float64"),
        }
    )
    return out.reset_index(drop=True)

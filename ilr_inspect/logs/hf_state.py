"""Hugging Face Trainer ``trainer_state.json``: its ``log_history`` list as tidy scalar rows.

Every ``checkpoint-N/`` holds a copy of the history so far; several copies are merged by (step, tag), the copy
with the largest ``global_step`` winning (after a resume from an earlier checkpoint, it holds the run that
continued). ``learning_rate`` timing depends on the transformers version that wrote the file (see
``ilr_inspect.logs.tags``); the version is read from the ``config.json`` saved next to it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import safety
from ..errors import IlrError

if TYPE_CHECKING:
    import pandas as pd

READER = "hf-trainer-state"
FILENAME = "trainer_state.json"
# huggingface/transformers#36973 (merged 2025-03-26, so first in 4.51) logs the lr used by the step, not the next one.
FIXED_IN = (4, 51)


def load(path: Path) -> tuple[int, pd.DataFrame]:
    """(global_step, rows) of one file; raises ValueError when it is not a trainer state (or breaks a parsing
    limit of :mod:`ilr_inspect.safety`); entries of unexpected types are skipped."""
    import pandas as pd

    try:
        state = safety.load_json(path, what="trainer_state.json")
    except IlrError as exc:
        raise ValueError(exc.message) from exc
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError("no 'log_history' list: not a Hugging Face trainer_state.json")
    rows: list[tuple[int, str, float]] = []
    for entry in state["log_history"]:
        if not isinstance(entry, dict) or not _is_step(entry.get("step")):
            continue
        step = entry["step"]
        for key, value in entry.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range is no log value
                continue
            if math.isfinite(number):
                rows.append((step, str(key), number))
    global_step = state.get("global_step")
    frame = pd.DataFrame(rows, columns=["step", "tag", "value"])
    frame["wall_time"] = math.nan
    return (global_step if isinstance(global_step, int) and _is_step(global_step) else -1), frame


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def transformers_version(path: Path) -> tuple[int, int] | None:
    """``transformers_version`` from the model config saved next to a trainer_state.json, if any."""
    cfg = path.parent / "config.json"
    if not safety.regular_file(cfg):
        return None
    try:
        data: Any = safety.load_json(cfg, what="config.json")
    except IlrError:
        return None
    version = data.get("transformers_version") if isinstance(data, dict) else None
    m = re.match(r"(\d+)\.(\d+)", version) if isinstance(version, str) else None
    return (int(m[1]), int(m[2])) if m else None


def logs_next_lr(version: tuple[int, int] | None) -> bool | None:
    """True when that transformers version logged the *next* lr; None when the version is unknown."""
    return None if version is None else version < FIXED_IN


def merge(loaded: list[tuple[Path, int, pd.DataFrame]]) -> list[tuple[Path, pd.DataFrame]]:
    """Drop (step, tag) rows that a newer copy of the history also has; returns what each file contributes."""

    seen: set[tuple[int, str]] = set()
    out: list[tuple[Path, pd.DataFrame]] = []
    for path, _, frame in sorted(loaded, key=lambda t: t[1], reverse=True):
        keys = list(zip(frame["step"].tolist(), frame["tag"].tolist(), strict=True))
        keep = [k not in seen for k in keys]
        seen.update(keys)
        out.append((path, frame[keep].reset_index(drop=True)))
    return out

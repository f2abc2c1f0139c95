"""TensorBoard event files, scalars only, via tbparse (the maintained reader; no hand-written protobuf parsing).

tbparse (through TensorBoard's record reader) stops silently at the first damaged record. The record framing
(length + masked CRC32C, the TFRecord format) is therefore checked first: a damaged or truncated file gives a
warning naming the byte offset, and only the records before it are parsed, so no value is attributed to a
record that was not read (docs/security.md).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import require
from .data import LogFormatError

if TYPE_CHECKING:
    import pandas as pd

READER = "tensorboard"
WARNINGS_ATTR = "ilr_warnings"


def is_event_file(path: Path) -> bool:
    return path.name.startswith("events.out.tfevents.")


def scan_records(path: Path) -> tuple[int, int, str | None]:
    """(records, bytes in whole valid records, problem or None) — framing and CRCs only, nothing parsed."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = path.stat().st_size
    good = records = 0
    with path.open("rb") as fh:
        while good < size:
            head = fh.read(12)
            if len(head) < 12:
                return records, good, f"truncated record header at byte {good}"
            (length,) = struct.unpack("<Q", head[:8])
            if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                return records, good, f"damaged record header at byte {good}"
            if good + 16 + length > size:
                return records, good, f"truncated record at byte {good} (it claims {length} bytes)"
            body = fh.read(length)
            crc = fh.read(4)
            if len(body) < length or len(crc) < 4 or struct.unpack("<I", crc)[0] != masked_crc32c(body):
                return records, good, f"damaged record at byte {good}"
            good += 16 + length
            records += 1
    return records, good, None


def _parse(path: Path) -> pd.DataFrame:

    tbparse: Any = require("tbparse", "tensorboard", "reading TensorBoard event files")
    with warnings.catch_warnings():
        # tbparse 0.0.9 uses pandas APIs deprecated in pandas 3; that noise is not the user's concern.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        reader = tbparse.SummaryReader(str(path), extra_columns={"wall_time"}, event_types={"scalars"})
        frame: pd.DataFrame = reader.scalars
    return frame


def read(path: Path) -> pd.DataFrame:
    """One event file → rows (step, tag, value, wall_time). Only the scalars event type is parsed.

    A damaged file yields the rows of its intact leading records and ``frame.attrs[WARNINGS_ATTR]`` says where
    it was cut.
    """
    import pandas as pd

    require("tbparse", "tensorboard", "reading TensorBoard event files")
    records, good, problem = scan_records(path)
    notes: list[str] = []
    if problem is None:
        frame = _parse(path)
    else:
        if records == 0:
            raise LogFormatError(f"{problem}; no intact record before it")
        # Parse a copy of the intact prefix (in a private temp folder, never beside the input).
        tmp = tempfile.mkdtemp(prefix="ilr-tb-")
        try:
            cut = Path(tmp) / path.name
            with path.open("rb") as src, cut.open("wb") as dst:
                remaining = good
                while remaining:
                    chunk = src.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    dst.write(chunk)
                    remaining -= len(chunk)
            frame = _parse(cut)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        last = int(frame["step"].max()) if not frame.empty else None
        notes.append(f"{problem}: only the first {records} records were read"
                     + (f" (scalars up to step {last}); later values are not used" if last is not None else ""))
    if frame.empty:
        raise LogFormatError("no scalars in it (empty, corrupt, or only non-scalar summaries)"
                             + (f"; {notes[0]}" if notes else ""))
    out = pd.DataFrame(
        {
            "step": frame["step"].astype("int64"),
            "tag": frame["tag"].astype(str),
            "value": frame["value"].astype("float64"),
            "wall_time": frame["wall_time"].astype("float64"),
        }
    )
    out = out.reset_index(drop=True)
    out.attrs[WARNINGS_ATTR] = notes
    return out


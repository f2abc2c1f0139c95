"""Training logs and hyperparameter sidecar files found next to checkpoints, as one tidy :class:`LogData`.

Readers: TensorBoard event files (tbparse, scalars only), Lightning ``metrics.csv`` and generic CSV/JSONL
(:mod:`.csvlog`), Hugging Face ``trainer_state.json`` (:mod:`.hf_state`), sidecars (:mod:`.sidecar`). When
each source's logged lr was used is documented, and tested, in :mod:`.tags`. A file that does not parse is
skipped with a line in ``LogData.warnings``; nothing here raises on a foreign file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import safety
from ..errors import MissingExtraError
from . import csvlog, hf_state, sidecar, tensorboard
from .data import SCALAR_COLUMNS, LogData, LogFormatError
from .tags import ColumnMap, classify, timing_of

if TYPE_CHECKING:  # pandas (and yaml) load inside the readers: a series without logs never imports them
    import pandas as pd

__all__ = ["ColumnMap", "LogData", "discover", "map_epochs", "read_logs", "steps_per_epoch"]

_MAX_DEPTH = 4  # root/lightning_logs/version_0/checkpoints, root/runs/<name>/events…
_MAX_ENTRIES = 50_000  # bound the walk on a huge folder
_SKIP_DIRS = {".git", "__pycache__", "wandb", ".ipynb_checkpoints", "node_modules"}
_LOG_CSV = {"metrics.csv", "progress.csv", "history.csv", "log.csv", "training_log.csv"}
_CKPT_DIR = re.compile(r"^(checkpoint-\d+|global_step\d+|step_?\d+|\d+)$")


def _is_jsonl_log(name: str) -> bool:
    stem, _, ext = name.rpartition(".")
    return ext in ("jsonl", "ndjson") and any(w in stem.lower() for w in ("log", "metric", "history", "progress"))


def _kind(path: Path) -> str | None:
    name = path.name
    if tensorboard.is_event_file(path):
        return "tensorboard"
    if name == hf_state.FILENAME:
        return "hf"
    if (name in _LOG_CSV or name.endswith((".log", ".csv"))) and csvlog.is_keras_csvlogger(path):
        return "keras-csv"
    if name in _LOG_CSV:
        return "csv"
    if _is_jsonl_log(name):
        return "jsonl"
    if name in sidecar.NAMES:
        return "sidecar"
    return None


def _walk(top: Path, max_depth: int) -> Iterator[Path]:
    """Files under ``top`` down to ``max_depth`` folders, hidden and tooling folders skipped, bounded."""
    count = 0
    base = len(top.parts)
    for dirpath, dirnames, filenames in os.walk(top):
        depth = len(Path(dirpath).parts) - base
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        if depth >= max_depth:
            dirnames[:] = []
        for f in sorted(filenames):
            count += 1
            if count > _MAX_ENTRIES:
                return
            yield Path(dirpath) / f


def discover(root: Path) -> list[Path]:
    """Log and sidecar files for the checkpoints under ``root`` (a checkpoint folder, or one checkpoint).

    Searched: ``root`` itself (a few levels down), its parent's own files, and the parent's ``lightning_logs/
    version_*/`` and ``runs/*/`` (HF TensorBoard) folders — never above the parent. Of the ``trainer_state.json``
    copies kept in every ``checkpoint-N/``, only the newest per folder is returned (it holds the history so far),
    plus a top-level one. Sidecars are taken from ``root``, the parent and log folders, not from inside
    ``checkpoint-N/`` (those ``config.json`` files describe the model).
    """
    root = Path(root)
    if root.is_file():
        root = root.parent
    parent = root.parent
    candidates: list[Path] = list(_walk(root, _MAX_DEPTH))
    if parent != root and parent.is_dir():
        candidates += sorted(p for p in parent.iterdir() if p.is_file())
        for sub in ("lightning_logs", "runs"):
            d = parent / sub
            if d.is_dir() and d.resolve() != root.resolve():
                candidates += list(_walk(d, 2))
    seen: set[Path] = set()
    found: list[Path] = []
    newest_state: dict[Path, tuple[int, Path]] = {}
    for path in candidates:
        try:
            key = path.resolve()
        except (RuntimeError, OSError):  # symlink loop: nothing to read (the series warns about it)
            continue
        if key in seen:
            continue
        seen.add(key)
        kind = _kind(path)
        if kind is None:
            continue
        if kind == "hf":
            m = re.search(r"(\d+)$", path.parent.name)
            group = path.parent.parent if m else path.parent
            rank = int(m[1]) if m else 1 << 62  # the output dir's own copy is written last
            if group not in newest_state or rank > newest_state[group][0]:
                newest_state[group] = (rank, path)
            continue
        if kind == "sidecar" and _CKPT_DIR.match(path.parent.name):
            continue
        found.append(path)
    found += [p for _, p in newest_state.values()]
    return sorted(found)


def _rel(path: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:  # another drive on Windows
        return str(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else "unreadable"


def _expand(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += discover(p) if p.is_dir() else [p]
    return out


_SIDECAR_ORDER = ("hparams", "hyperparameters", "args", "training_args", "config")


def read_logs(
    paths: Iterable[str | Path], *, columns: ColumnMap | None = None, root: str | Path | None = None
) -> LogData:
    """Read log and sidecar files (folders are searched with :func:`discover`) into one :class:`LogData`.

    ``columns`` names the step/lr/wd/momentum columns of generic CSV/JSONL logs; ``root`` makes ``source``
    paths relative (default: the common folder of the inputs).
    """
    import pandas as pd

    files = _expand(Path(p) for p in paths)
    base = Path(root) if root is not None else (Path(os.path.commonpath([p.parent for p in files])) if files else None)
    data = LogData(columns=columns)
    frames: list[pd.DataFrame] = []
    states: list[tuple[Path, int, pd.DataFrame]] = []
    hf_next: bool | None = None
    sidecars: list[Path] = []
    epoch_frames: list[pd.DataFrame] = []

    def warn(path: Path, why: str) -> None:
        data.warnings.append(f"{_rel(path, base)}: skipped, {why}")

    def add(frame: pd.DataFrame, path: Path, reader: str) -> None:
        frames.append(frame.assign(source=_rel(path, base), reader=reader))

    for path in files:
        if not safety.regular_file(path):  # a FIFO/device named like a log would block or stream forever
            warn(path, "not a regular file (FIFO, device, socket or broken link)")
            continue
        kind = _kind(path) or {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(path.suffix)
        try:
            if kind == "tensorboard":
                tb = tensorboard.read(path)
                data.warnings += [f"{_rel(path, base)}: {w}" for w in tb.attrs.get(tensorboard.WARNINGS_ATTR, [])]
                add(tb, path, tensorboard.READER)
            elif kind == "keras-csv":
                epoch_frames.append(csvlog.read_keras_csvlogger(path).assign(
                    source=_rel(path, base), reader=csvlog.KERAS_READER))
            elif kind == "csv":
                add(csvlog.read_csv(path, columns), path, "csv")
            elif kind == "jsonl":
                add(csvlog.read_jsonl(path, columns), path, "jsonl")
            elif kind == "hf":
                step, frame = hf_state.load(path)
                states.append((path, step, frame))
                version_next = hf_state.logs_next_lr(hf_state.transformers_version(path))
                if version_next is not None:
                    hf_next = bool(hf_next) or version_next
            elif kind == "sidecar":
                sidecars.append(path)
            else:
                warn(path, "not a log format ilr-inspect reads")
        except LogFormatError as exc:
            warn(path, str(exc))
        except MissingExtraError as exc:  # an optional reader: the other logs are still worth reading
            warn(path, f"{exc.message} ({exc.hint})")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(path, f"{type(exc).__name__}: {_first_line(exc)}")
        except Exception as exc:  # tbparse/protobuf raise their own types on corrupt event files
            warn(path, f"{type(exc).__name__}: {_first_line(exc)}")
    for path, frame in hf_state.merge(states):
        add(frame, path, hf_state.READER)

    _assemble(data, frames, bool(hf_next))
    if epoch_frames:
        data.epoch_scalars = pd.concat(epoch_frames, ignore_index=True).assign(timing="")[list(SCALAR_COLUMNS)]
    hf_rows = data.scalars["tag"].isin(["learning_rate", "train/learning_rate"]) & data.scalars["reader"].isin(
        [hf_state.READER, tensorboard.READER]
    )
    if hf_next is None and bool(hf_rows.any()):
        data.warnings.append(
            "Hugging Face learning_rate timing: transformers version unknown (no config.json next to "
            "trainer_state.json); assumed >= 4.51, which logs the lr used by each step"
        )
    _read_sidecars(data, sidecars, base)
    return data


def steps_per_epoch(pairs: Iterable[tuple[int | None, Any]]) -> int | None:
    """Steps per epoch from checkpoints' (step, epochs completed) pairs, when every pair with both agrees on one
    whole number (a pair whose step is no multiple of its epoch, or two different ratios, give None)."""
    both = [(s, e) for s, e in pairs
            if isinstance(s, int) and isinstance(e, int) and not isinstance(e, bool) and e > 0 and s > 0]
    rates = {s / e for s, e in both}
    if len(rates) != 1:
        return None
    rate = rates.pop()
    return int(rate) if rate == int(rate) else None


def map_epochs(data: LogData, per_epoch: int) -> int:
    """Move epoch-indexed log rows into ``data.scalars`` at step = epochs completed × ``per_epoch``.

    A value logged at an epoch's end (Keras CSVLogger) describes that epoch, so its lr was *used* by the steps up
    to that step. Returns how many rows were mapped.
    """
    import pandas as pd

    rows = data.epoch_scalars
    if rows.empty or per_epoch <= 0:
        return 0
    rows = rows.assign(step=(rows["step"] * per_epoch).astype("int64"))
    for tag in rows["tag"].unique():
        hp = classify(str(tag), data.columns)
        if hp is not None:
            rows.loc[rows["tag"] == tag, "timing"] = timing_of(hp, csvlog.KERAS_READER, False)
    scalars = pd.concat([data.scalars, rows[list(SCALAR_COLUMNS)]], ignore_index=True)
    data.scalars = scalars.sort_values(["source", "tag", "step"], kind="stable").reset_index(drop=True)
    data.epoch_scalars = rows.iloc[0:0]
    return len(rows)


def _assemble(data: LogData, frames: list[pd.DataFrame], hf_next: bool) -> None:
    import pandas as pd

    frames = [f for f in frames if not f.empty]
    if not frames:
        return
    scalars = pd.concat(frames, ignore_index=True)
    scalars["timing"] = ""
    for tag, reader in scalars[["tag", "reader"]].drop_duplicates().itertuples(index=False):
        hp = classify(str(tag), data.columns)
        if hp is not None:
            mask = (scalars["tag"] == tag) & (scalars["reader"] == reader)
            scalars.loc[mask, "timing"] = timing_of(hp, str(reader), hf_next)
    scalars["step"] = scalars["step"].astype("int64")
    scalars["tag"] = scalars["tag"].astype(str)
    data.scalars = scalars[list(SCALAR_COLUMNS)].sort_values(["source", "tag", "step"], kind="stable")
    data.scalars = data.scalars.reset_index(drop=True)


def _read_sidecars(data: LogData, paths: list[Path], base: Path | None) -> None:
    import yaml

    def order(p: Path) -> tuple[int, int]:
        stem = p.name.split(".")[0]
        return (_SIDECAR_ORDER.index(stem) if stem in _SIDECAR_ORDER else 99, len(p.parts))

    for path in sorted(paths, key=order):
        try:
            found, notes = sidecar.extract(sidecar.load(path))
        except (OSError, ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            data.warnings.append(f"{_rel(path, base)}: skipped, {type(exc).__name__}: {_first_line(exc)}")
            continue
        data.warnings += [f"{_rel(path, base)}: {n}" for n in notes]
        for key, value in found.items():
            if key not in data.constants:
                data.constants[key] = value
                data.constant_sources[key] = _rel(path, base)


"""Rendering library results: the machine-readable contract (JSON/CSV/Parquet) and human tables.

JSON is ``{"schema": ..., "meta": {...}, "rows": [...]}``; ``meta`` carries provenance. Files are written
atomically (temporary file in the target folder, then ``os.replace``) so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import IO, Any, Literal

import pandas as pd

from . import __version__

OutputFormat = Literal["table", "csv", "json", "parquet"]
SCHEMA_VERSION = 1
_PROVENANCE_PACKAGES = ("numpy", "pandas", "torch", "safetensors", "altair", "vl-convert-python")


@dataclass
class Result:
    """A tidy table plus the provenance and settings that produced it. Every library command returns one."""

    kind: str
    rows: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def schema(self) -> str:
        return f"ilr-inspect/{self.kind}/v{SCHEMA_VERSION}"


def package_versions(names: Iterable[str] = _PROVENANCE_PACKAGES) -> dict[str, str]:
    out: dict[str, str] = {"ilr-inspect": __version__, "python": platform.python_version()}
    for n in names:
        try:
            out[n] = importlib_metadata.version(n)
        except importlib_metadata.PackageNotFoundError:
            continue
    return out


def file_fingerprint(path: Path, *, full_hash: bool = False) -> dict[str, Any]:
    """Size, mtime and a hash. By default the hash covers the first and last MiB, so provenance stays cheap
    on 100 GB files; ``full_hash`` reads everything."""
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    size = 0
    for f in files:
        st = f.stat()
        size += st.st_size
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            if full_hash or st.st_size <= 2 << 20:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read(1 << 20))
    return {"path": str(p), "bytes": size, "sha256": h.hexdigest(), "hash_scope": "full" if full_hash else "head+tail"}


def provenance(inputs: Iterable[Path] = (), settings: Mapping[str, Any] | None = None,
               timestamp: str | None = None) -> dict[str, Any]:
    """The ``meta`` block: tool and package versions, inputs with sizes and hashes, resolved settings."""
    fixed = timestamp or os.environ.get("ILR_INSPECT_TIMESTAMP")
    return {
        "tool": "ilr-inspect",
        "version": __version__,
        "created": fixed or datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["ilr-inspect", *sys.argv[1:]]) if fixed is None else None,
        "packages": package_versions(),
        "inputs": [file_fingerprint(p) for p in inputs],
        "settings": dict(settings or {}),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return _jsonable(value.item())
        except (ValueError, AttributeError):
            pass
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def to_json_obj(result: Result) -> dict[str, Any]:
    from .schema import describe

    rows = [{k: _jsonable(v) for k, v in r.items()} for r in result.rows.to_dict(orient="records")]
    # ``columns``: name, type, unit and meaning of each column, from ilr_inspect/schema.py (docs/schema.md).
    return {"schema": result.schema, "columns": describe(result.kind, [str(c) for c in result.rows.columns]),
            "meta": _jsonable(result.meta), "rows": rows}


def atomic_write(path: Path, writer: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    from .errors import InputError, UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError("is a folder; the output needs a file name", hint="pass -o FOLDER/name.ext", path=path)
    try:  # an unwritable or missing folder is a problem with the output path, not a bug
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"cannot write the output here ({exc.strerror or exc})",
                         hint="choose a writable folder for -o", path=path) from exc
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _as_parquet_text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return v
    return json.dumps(_jsonable(v))


def serialize(result: Result, fmt: OutputFormat) -> bytes:
    """Bytes of the machine formats (``table`` is rendered by the CLI with rich)."""
    if fmt == "json":
        return (json.dumps(to_json_obj(result), indent=2, allow_nan=False) + "\n").encode()
    if fmt == "csv":
        return result.rows.to_csv(index=False).encode()
    if fmt == "parquet":
        import io

        buf = io.BytesIO()
        frame = result.rows.copy()
        # Parquet needs one type per column; object columns with mixed content become strings.
        for col in frame.columns:
            if frame[col].dtype == object:
                frame[col] = frame[col].map(_as_parquet_text)
        frame.to_parquet(buf, index=False)
        return buf.getvalue()
    raise ValueError(f"not a machine format: {fmt}")

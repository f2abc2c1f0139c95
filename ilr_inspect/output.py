"""Rendering library results: the machine-readable contract (JSON/CSV/Parquet) and human tables.

JSON is ``{"schema": ..., "meta": {...}, "rows": [...]}``; ``meta`` carries provenance. Files are written
atomically (temporary file in the target folder, then ``os.replace``) so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from . import __version__

if TYPE_CHECKING:
    import pandas as pd

OutputFormat = Literal["table", "csv", "json", "parquet"]
SCHEMA_VERSION = 1
_PROVENANCE_PACKAGES = ("numpy", "pandas", "torch", "safetensors", "altair", "vl-convert-python")


ColumnDtype = Literal["whole-or-float", "float64"]
_MISSING = object()  # a key absent from a row: pandas fills it with NaN


def _is_null(v: Any) -> bool:
    """Missing in pandas' sense (None, NaN, pd.NA, NaT) without importing pandas."""
    return v is None or v is _MISSING or (isinstance(v, float) and v != v) or type(v).__name__ in ("NAType",
                                                                                                   "NaTType")


def _to_float(v: Any) -> float:
    return math.nan if v is None or v is _MISSING else float(v)


def _whole_or_float_values(values: list[Any]) -> tuple[str, list[Any]]:
    """The rule of :func:`whole_or_float` on plain values: ``Int64`` (ints and None) when every finite value is
    whole and below 2**53, else ``float`` (NaN for missing)."""
    floats = [_to_float(v) for v in values]
    if all(math.isfinite(f) and f == math.floor(f) and abs(f) < 2**53 for f in floats if f == f):
        return "Int64", [None if f != f else int(f) for f in floats]
    return "float", floats


def whole_or_float(col: pd.Series) -> pd.Series:
    """A nullable integer column when every value is whole, else float: a missing or fractional value never
    fails the cast (pandas refuses ``Int64`` for 0.5, and object columns mixing None and numbers)."""
    import pandas as pd

    values = pd.to_numeric(col, errors="coerce").astype("float64")
    finite = values.dropna()
    if bool((finite == finite.round()).all()) and bool((finite.abs() < 2**53).all()):
        return values.astype("Int64")
    return values


_PLAIN = (type(None), bool, int, float, str)


def _infer(values: list[Any]) -> tuple[str, list[Any]] | None:
    """The dtype pandas gives a column built from these row values (``DataFrame(list_of_dicts)``), as a kind
    (``int``, ``float``, ``bool``, ``object``) and the values as ``frame[c].tolist()`` returns them. None when
    a value is of a type this does not cover (the caller then goes through pandas)."""
    np = sys.modules.get("numpy")  # a NumPy scalar implies NumPy is loaded; nothing is imported for this
    np_bool, np_int, np_float = (np.bool_, np.int64, np.float64) if np is not None else ((), (), ())
    seen: set[str] = set()
    for v in values:
        if v is None:
            seen.add("none")
        elif v is _MISSING:
            seen.add("nan")
        elif type(v) is bool or isinstance(v, np_bool):
            seen.add("bool")
        elif type(v) is int or isinstance(v, np_int):
            if not -(2**63) <= int(v) < 2**63:
                return None
            seen.add("int")
        elif type(v) is float or isinstance(v, np_float):
            seen.add("float")
        elif type(v) is str:
            seen.add("str")
        else:
            return None
    if not seen or seen <= {"none"} or "str" in seen or ("bool" in seen and seen != {"bool"}):
        return "object", [math.nan if v is _MISSING else v for v in values]
    if seen == {"bool"}:
        return "bool", [bool(v) for v in values]
    if seen == {"int"}:
        return "int", [int(v) for v in values]
    return "float", [_to_float(v) for v in values]


@dataclass
class Records:
    """A table as plain rows, typed the way pandas would type them but without importing pandas: the CLI renders
    tables, CSV and JSON from it; the DataFrame is built on first use (:meth:`frame`).

    ``columns``: the column order (default: keys in order of first appearance, as ``pandas.DataFrame(rows)``);
    ``dtypes``: columns cast after construction (``whole-or-float``: :func:`whole_or_float`; ``float64``: numeric).
    """

    rows: list[dict[str, Any]]
    columns: list[str] | None = None
    dtypes: dict[str, ColumnDtype] = field(default_factory=dict)
    _frame: Any = field(default=None, init=False, repr=False, compare=False)

    def names(self) -> list[str]:
        if self.columns is not None:
            return list(self.columns)
        return list(dict.fromkeys(k for r in self.rows for k in r))

    def __len__(self) -> int:
        return len(self.rows)

    def frame(self) -> pd.DataFrame:
        """The DataFrame (built once)."""
        if self._frame is None:
            import pandas as pd

            frame = pd.DataFrame(self.rows, columns=self.columns) if self.columns is not None \
                else pd.DataFrame(self.rows)
            for col, dtype in self.dtypes.items():
                if col in frame.columns:
                    frame[col] = whole_or_float(frame[col]) if dtype == "whole-or-float" \
                        else pd.to_numeric(frame[col], errors="coerce").astype("float64")
            self._frame = frame
        return self._frame  # type: ignore[no-any-return]

    def typed(self) -> list[tuple[str, str, list[Any]]] | None:
        """(name, kind, values) per column as the DataFrame would hold them (kinds: int, float, bool, Int64,
        object); None when a value's type is not covered and only pandas can say."""
        out = []
        for name in self.names():
            values = [r.get(name, _MISSING) for r in self.rows]
            dtype = self.dtypes.get(name)
            if dtype is not None:
                if any(not (v is None or v is _MISSING or type(v) in (int, float)) for v in values):
                    return None
                kind, norm = _whole_or_float_values(values) if dtype == "whole-or-float" \
                    else ("float", [_to_float(v) for v in values])
            else:
                got = _infer(values)
                if got is None:
                    return None
                kind, norm = got
            out.append((name, kind, norm))
        return out


@dataclass
class Result:
    """A tidy table plus the provenance and settings that produced it. Every library command returns one.

    ``data`` is a DataFrame or :class:`Records`; ``rows`` is always the DataFrame (built on first access from
    Records, so rendering a table, CSV or JSON never needs pandas)."""

    kind: str
    data: Any  # pd.DataFrame | Records
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> pd.DataFrame:
        return self.data.frame() if isinstance(self.data, Records) else self.data

    @property
    def frame(self) -> pd.DataFrame:
        return self.rows

    @property
    def schema(self) -> str:
        return f"ilr-inspect/{self.kind}/v{SCHEMA_VERSION}"

    def columns(self) -> list[str]:
        return self.data.names() if isinstance(self.data, Records) else [str(c) for c in self.data.columns]

    def column_values(self) -> list[tuple[str, list[Any]]]:
        """Each column's values as ``frame[c].tolist()`` gives them, from Records without pandas when possible."""
        typed = self.data.typed() if isinstance(self.data, Records) else None
        if typed is not None:
            return [(name, values) for name, _, values in typed]
        frame = self.rows
        return [(str(c), frame[c].tolist()) for c in frame.columns]


_DIST_SUFFIXES = (".dist-info", ".egg-info")
_VERSION_CACHE: dict[str, str | None] = {}


def _normalize(name: str) -> str:
    # importlib.metadata's normalisation (PEP 503, then dashes as underscores)
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _fast_versions(names: list[str]) -> dict[str, str | None] | None:
    """``importlib.metadata.version(name)`` for each name (None: not installed), by the same search over
    ``sys.path`` (the first ``NAME-*.dist-info`` / ``.egg-info`` of a folder entry, in ``os.listdir`` order) and
    the ``Version`` header of its METADATA / PKG-INFO, without importing importlib.metadata and the email
    package (~20 ms per process). None whenever the case is not the plain one (another distribution finder, a
    zip or .egg entry on sys.path, an unusual metadata file): the caller then asks importlib.metadata."""
    if any(getattr(f, "find_distributions", None) is not None and getattr(f, "__name__", "") != "PathFinder"
           for f in sys.meta_path):
        return None
    wanted = {_normalize(n) for n in names}
    found: dict[str, str] = {}  # normalized name -> its first metadata folder
    for entry in sys.path:
        root = entry or "."
        try:
            children = os.listdir(root)
        except OSError:
            if os.path.exists(root):  # a zip (or something else importlib.metadata may look inside)
                return None
            continue
        if os.path.basename(entry).lower().endswith(".egg"):
            return None
        for child in children:
            low = child.lower()
            if low.endswith(_DIST_SUFFIXES):
                key = _normalize(low.rpartition(".")[0].partition("-")[0])
                if key in wanted and key not in found:
                    found[key] = os.path.join(root, child)
        if len(found) == len(wanted):
            break
    out: dict[str, str | None] = {}
    for n in names:
        dist = found.get(_normalize(n))
        version = _version_header(dist) if dist is not None else None
        if dist is not None and version is None:
            return None
        out[n] = version
    return out


def _version_header(dist: str) -> str | None:
    """The ``Version`` header as the email parser reads it (first one, value after the colon without leading
    blanks); None when the file is missing or the header is absent, folded or not plain."""
    for name in ("METADATA", "PKG-INFO") if os.path.isdir(dist) else ("",):
        try:
            with open(os.path.join(dist, name) if name else dist, encoding="utf-8") as fh:
                for line in fh:
                    if line in ("\n", "\r\n"):  # end of the headers
                        return None
                    if line[:1] in (" ", "\t"):  # the continuation of another header
                        continue
                    key, sep, value = line.partition(":")
                    if not sep:  # not a header line: the email parser would end the headers here
                        return None
                    if key.lower() == "version":
                        following = fh.readline()
                        if following[:1] in (" ", "\t"):  # a folded header: leave it to the email parser
                            return None
                        value = value.lstrip(" \t").rstrip("\r\n")
                        return value or None
            return None
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            return None
    return None


def package_versions(names: Iterable[str] = _PROVENANCE_PACKAGES) -> dict[str, str]:
    out: dict[str, str] = {"ilr-inspect": __version__, "python": platform.python_version()}
    names = list(names)
    missing = [n for n in names if n not in _VERSION_CACHE]
    if missing:
        fast = _fast_versions(missing)
        if fast is None:
            from importlib import metadata as importlib_metadata

            fast = {}
            for n in missing:
                try:
                    fast[n] = importlib_metadata.version(n)
                except importlib_metadata.PackageNotFoundError:
                    fast[n] = None
        _VERSION_CACHE.update(fast)
    for n in names:
        version = _VERSION_CACHE[n]
        if version is not None:
            out[n] = version
    return out


def file_fingerprint(path: Path, *, full_hash: bool = False) -> dict[str, Any]:
    """Size, mtime and a hash. By default the hash covers the first and last MiB, so provenance stays cheap
    on 100 GB files; ``full_hash`` reads everything."""
    from .storage import is_remote, remote_fingerprint

    if is_remote(path):  # a URL: sizes and the store's ETags, no object bytes (docs/scale-out.md)
        return remote_fingerprint(path)
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
    if type(value).__name__ in ("NAType", "NaTType"):  # pd.NA, pd.NaT (pandas is not imported for this)
        return None
    return value


def _typed(result: Result) -> list[tuple[str, str, list[Any]]] | None:
    return result.data.typed() if isinstance(result.data, Records) else None


def to_json_obj(result: Result) -> dict[str, Any]:
    from .schema import describe

    typed = _typed(result)
    if typed is None:
        rows = [{k: _jsonable(v) for k, v in r.items()} for r in result.rows.to_dict(orient="records")]
    else:  # the values ``to_dict(orient="records")`` gives, without building the frame
        cols = [(name, [_jsonable(v) for v in values]) for name, _, values in typed]
        rows = [{name: values[i] for name, values in cols} for i in range(len(result.data))]
    # ``columns``: name, type, unit and meaning of each column, from ilr_inspect/schema.py (docs/schema.md).
    return {"schema": result.schema, "columns": describe(result.kind, result.columns()),
            "meta": _jsonable(result.meta), "rows": rows}


def _csv_cells(kind: str, values: list[Any]) -> list[Any]:
    """Cells as ``DataFrame.to_csv`` writes them: numeric columns through NumPy's shortest repr (the same digits
    as Python's ``repr``), missing values empty, other objects left to the csv module."""
    if kind == "float":
        return ["" if v != v else repr(v) for v in values]
    if kind in ("int", "bool", "Int64"):
        return ["" if v is None else str(v) for v in values]
    return ["" if _is_null(v) else v for v in values]


def to_csv_text(result: Result) -> str:
    """CSV text, byte for byte what ``result.rows.to_csv(index=False)`` writes."""
    typed = _typed(result)
    if typed is None:
        return str(result.rows.to_csv(index=False))
    buf = io.StringIO()
    if not typed:
        return "\n"
    import csv

    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, quotechar='"', doublequote=True)
    writer.writerow([name for name, _, _ in typed])
    cols = [_csv_cells(kind, values) for _, kind, values in typed]
    writer.writerows(zip(*cols, strict=True))
    return buf.getvalue()


def atomic_write(path: Path, writer: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    from .errors import InputError, UsageError

    path = Path(path)
    if path.is_dir():
        raise UsageError("is a folder; the output needs a file name", hint="pass -o FOLDER/name.ext", path=path)
    try:  # an unwritable or missing folder is a problem with the output path, not a bug
        path.parent.mkdir(parents=True, exist_ok=True)
        import tempfile  # here, not at the top: only a run that writes a file needs it (issue 14)

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
        return to_csv_text(result).encode()
    if fmt == "parquet":
        buf = io.BytesIO()
        frame = result.rows.copy()
        # Parquet needs one type per column; object columns with mixed content become strings.
        for col in frame.columns:
            if frame[col].dtype == object:
                frame[col] = frame[col].map(_as_parquet_text)
        frame.to_parquet(buf, index=False)
        return buf.getvalue()
    raise ValueError(f"not a machine format: {fmt}")

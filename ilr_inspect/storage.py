"""Paths that may be URLs: local paths stay ``pathlib.Path``; ``s3://``, ``gs://``, ``hf://``, ``memory://``... become
a :class:`RemotePath` over fsspec with the subset of the ``Path`` API the readers use (docs/scale-out.md).

fsspec is imported only when a URL is given, so local runs and ``--help`` never load it. Remote reads are ranged:
headers and single tensors are fetched by byte range, never whole weight files; every byte fetched is counted
(:func:`bytes_fetched`) so tests and benchmarks can check it. Formats without a ranged reader are staged into a
private temporary folder (:func:`stage`), deleted at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import posixpath
import re
import shutil
import stat as stat_mod
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from .errors import IlrError, InputError

# "s3://", "gs://", "hf://", "memory://", "file://"... (two letters at least: "C://" is a Windows drive).
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
BLOCK_SIZE = 256 * 1024  # read-ahead block of remote file objects: headers need a few KiB, not fsspec's 5 MiB
HEAD_BYTES = 16 * 1024  # the first ranged read of a safetensors file: 8 bytes + most headers in one request
_EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hf": "hf"}
_PACKAGE = {"s3": "s3fs", "gcs": "gcsfs", "hf": "huggingface_hub"}

_lock = threading.Lock()
_stats = {"bytes": 0, "requests": 0}


def is_url(raw: object) -> bool:
    """A string naming a non-local fsspec URL (``file://`` is local)."""
    if isinstance(raw, RemotePath):
        return True
    m = _URL.match(str(raw)) if isinstance(raw, str) else None
    return bool(m) and m is not None and m.group(1).lower() != "file"


def is_remote(path: object) -> bool:
    return isinstance(path, RemotePath)


def to_path(raw: str | os.PathLike[str]) -> Path:
    """A local ``Path`` for a path or ``file://`` URL; a :class:`RemotePath` (typed as Path: it offers the subset
    of the API the readers use) for any other URL."""
    if isinstance(raw, RemotePath):
        return cast(Path, raw)
    if isinstance(raw, Path):
        return raw
    text = os.fspath(raw)
    if text.lower().startswith("file://"):
        return Path(text[len("file://"):])
    if is_url(text):
        return cast(Path, RemotePath.from_url(text))
    return Path(text)


# --- counters -------------------------------------------------------------------------------------------------

def _count(n: int) -> None:
    with _lock:
        _stats["bytes"] += n
        _stats["requests"] += 1


def bytes_fetched() -> int:
    """Bytes fetched from remote storage by this process (data bodies; listings and HEAD requests excluded)."""
    return _stats["bytes"]


def requests_made() -> int:
    return _stats["requests"]


def reset_counter() -> None:
    with _lock:
        _stats["bytes"] = _stats["requests"] = 0


def _report_at_exit() -> None:  # ILR_INSPECT_IO_STATS=1: one line on stderr, for benchmarks and tests
    if _stats["requests"]:
        print(f"ilr-inspect: remote storage: {_stats['bytes']} bytes fetched in {_stats['requests']} reads",
              file=sys.stderr)


# --- errors ---------------------------------------------------------------------------------------------------

class RemoteError(InputError):
    """A URL that cannot be read: backend missing, credentials refused, host unreachable."""


def _missing_backend(protocol: str, exc: BaseException) -> RemoteError:
    extra = _EXTRA.get(protocol, "remote")
    pkg = _PACKAGE.get(extra, "the fsspec backend for it")
    return RemoteError(f"reading {protocol}:// URLs needs {pkg}, which is not installed ({str(exc)[:120]})",
                       hint=f"pip install 'ilr-inspect[{extra}]'")


def _failure(url: str, exc: BaseException) -> IlrError:
    if isinstance(exc, IlrError):
        return exc
    if isinstance(exc, ImportError):
        return _missing_backend(url.split("://", 1)[0], exc)
    kind = type(exc).__name__
    text = " ".join(str(exc).split())[:200]
    hint = ("check the URL, the credentials (e.g. AWS_PROFILE / AWS_ACCESS_KEY_ID) and the endpoint "
            "(AWS_ENDPOINT_URL, or ILR_INSPECT_STORAGE_OPTIONS)")
    if isinstance(exc, PermissionError):
        return RemoteError(f"{url}: access denied ({text})", hint=hint)
    return RemoteError(f"{url}: cannot read from remote storage ({kind}: {text})", hint=hint)


def _storage_options(protocol: str) -> dict[str, Any]:
    """Extra fsspec options from ``ILR_INSPECT_STORAGE_OPTIONS`` (JSON; either flat, or keyed by protocol)."""
    raw = os.environ.get("ILR_INSPECT_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"ILR_INSPECT_STORAGE_OPTIONS is not JSON ({exc})",
                         hint='e.g. {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}') from exc
    if not isinstance(opts, dict):
        raise InputError("ILR_INSPECT_STORAGE_OPTIONS must be a JSON object")
    scoped = opts.get(protocol)
    return dict(scoped) if isinstance(scoped, dict) else {k: v for k, v in opts.items() if not isinstance(v, dict)
                                                            or k in ("client_kwargs", "config_kwargs")}


_FS: dict[str, Any] = {}
_LISTINGS: dict[tuple[int, str], dict[str, dict[str, Any]] | None] = {}


def used() -> bool:
    """Whether this process has opened a URL (a remote filesystem was set up)."""
    return bool(_FS)


def _filesystem(url: str) -> tuple[Any, str]:
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec  # type: ignore[import-untyped]
    except ImportError as exc:
        raise _missing_backend(protocol, exc) from exc
    try:
        if protocol not in _FS:
            opts = _storage_options(protocol)
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if protocol in ("s3", "s3a") and endpoint and "endpoint_url" not in opts and "client_kwargs" not in opts:
                opts["endpoint_url"] = endpoint
            _FS[protocol] = fsspec.filesystem(protocol, **opts)
        fs = _FS[protocol]
        if not getattr(finish, "registered", False):
            atexit.register(finish)
            finish.registered = True  # type: ignore[attr-defined]
        return fs, fs._strip_protocol(url)
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise InputError(f"unknown URL scheme {protocol}:// ({exc})",
                         hint="use s3://, gs://, hf://, file:// or another fsspec protocol") from exc
    except Exception as exc:
        raise _failure(url, exc) from exc


# --- the path object ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Stat:
    st_size: int
    st_mode: int
    st_mtime: float = 0.0


class RemotePath:
    """An object in fsspec storage, with the part of ``pathlib.Path`` the readers call. ``str()`` is the URL."""

    __slots__ = ("_fs", "_p")

    def __init__(self, fs: Any, key: str) -> None:
        self._fs = fs
        self._p = PurePosixPath(key)

    @classmethod
    def from_url(cls, url: str) -> RemotePath:
        fs, key = _filesystem(url.rstrip("/") if url.count("/") > 3 else url)
        return cls(fs, key.rstrip("/") or key)

    def _new(self, key: str | PurePosixPath) -> RemotePath:
        return RemotePath(self._fs, str(key))

    # pure-path API
    @property
    def key(self) -> str:
        return str(self._p)

    @property
    def name(self) -> str:
        return self._p.name

    @property
    def suffix(self) -> str:
        return self._p.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._p.suffixes

    @property
    def stem(self) -> str:
        return self._p.stem

    @property
    def parts(self) -> tuple[str, ...]:
        return self._p.parts

    @property
    def parent(self) -> RemotePath:
        return self._new(self._p.parent)

    @property
    def parents(self) -> list[RemotePath]:
        return [self._new(p) for p in self._p.parents if str(p) not in (".", "/", "")]

    def __truediv__(self, other: str | os.PathLike[str]) -> RemotePath:
        return self._new(self._p / os.fspath(other))

    def joinpath(self, *others: str) -> RemotePath:
        return self._new(self._p.joinpath(*others))

    def with_name(self, name: str) -> RemotePath:
        return self._new(self._p.with_name(name))

    def with_suffix(self, suffix: str) -> RemotePath:
        return self._new(self._p.with_suffix(suffix))

    def relative_to(self, other: RemotePath | str) -> PurePosixPath:
        return self._p.relative_to(other._p if isinstance(other, RemotePath) else str(other))

    def match(self, pattern: str) -> bool:
        return self._p.match(pattern)

    def as_posix(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return str(self._fs.unstrip_protocol(self.key))

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def _proto(self) -> str:
        protocol = self._fs.protocol
        return str(protocol[0] if isinstance(protocol, (tuple, list)) else protocol)

    def __eq__(self, other: object) -> bool:  # by URL: a path sent to another process (Ray) still compares equal
        return isinstance(other, RemotePath) and other._proto() == self._proto() and other._p == self._p

    def __hash__(self) -> int:
        return hash(("remote", self._proto(), self._p))

    def __lt__(self, other: RemotePath) -> bool:
        return self._p < other._p

    # no __fspath__: local-only code (builtin open, os.stat) must fail loudly, never open a local "s3:" file

    # file-system API (fsspec caches listings, so is_file/is_dir after a listing cost no request)
    def _call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._fs, what)(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _failure(str(self), exc) from exc

    def _info(self) -> dict[str, Any] | None:
        key = self.key.rstrip("/")
        parent = posixpath.dirname(key)
        if parent and parent != key:  # one listing of the folder answers for all its entries
            listing = self._listing(parent)
            if listing is not None:
                return listing.get(key)
        try:
            return cast(dict[str, Any], self._call("info", self.key))
        except FileNotFoundError:
            return None

    def _listing(self, key: str) -> dict[str, dict[str, Any]] | None:
        """``{name: info}`` of a folder (cached for the process), or None when it is not a folder."""
        ck = (id(self._fs), key)
        if ck not in _LISTINGS:
            try:
                entries = self._call("ls", key, detail=True)
                _LISTINGS[ck] = {str(e["name"]).rstrip("/"): e for e in entries
                                 if str(e["name"]).rstrip("/") != key}
            except (FileNotFoundError, NotADirectoryError):
                _LISTINGS[ck] = None
        return _LISTINGS[ck]

    def exists(self) -> bool:
        return self._info() is not None

    def is_file(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "file"

    def is_dir(self) -> bool:
        info = self._info()
        return info is not None and info.get("type") == "directory"

    def is_symlink(self) -> bool:
        return False

    def resolve(self, strict: bool = False) -> RemotePath:
        return self._new(posixpath.normpath(self.key))

    def absolute(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def stat(self) -> _Stat:
        info = self._info()
        if info is None:
            raise FileNotFoundError(str(self))
        mode = stat_mod.S_IFDIR if info.get("type") == "directory" else stat_mod.S_IFREG
        return _Stat(int(info.get("size") or 0), mode | 0o444)

    def etag(self) -> str | None:
        """The object's ETag / checksum when the store gives one (same bytes → same tag within one store)."""
        info = self._info() or {}
        for k in ("ETag", "etag", "md5Hash", "crc32c", "checksum", "blob_id"):  # S3, GCS, other stores, HF Hub
            if info.get(k):
                return str(info[k]).strip('"')
        return None

    def iterdir(self) -> Iterator[RemotePath]:
        listing = self._listing(self.key.rstrip("/")) or {}
        return iter([self._new(k) for k in sorted(listing)])

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        found = self._call("glob", posixpath.join(self.key, pattern))
        return iter(sorted(self._new(str(k)) for k in found))

    def walk(self, max_depth: int | None = None) -> Iterator[tuple[RemotePath, list[str], list[str]]]:
        """Like ``os.walk`` (top-down; pruning ``dirnames`` in place skips those folders)."""
        listing = self._listing(self.key.rstrip("/"))
        if listing is None:
            return
        dirs: list[str] = []
        files: list[str] = []
        for n, e in sorted(listing.items()):
            (dirs if e.get("type") == "directory" else files).append(posixpath.basename(n))
        yield self, dirs, files
        if max_depth is not None and max_depth <= 1:
            return
        for d in dirs:
            yield from (self / d).walk(None if max_depth is None else max_depth - 1)

    def open(self, mode: str = "rb", *, block_size: int = BLOCK_SIZE, **_: Any) -> IO[Any]:
        if mode not in ("rb", "r"):
            raise InputError("remote storage is read-only here", path=str(self))
        fh = self._call("open", self.key, "rb", block_size=block_size, cache_type="readahead")
        cache = getattr(fh, "cache", None)
        if cache is not None and hasattr(cache, "fetcher"):
            inner = cache.fetcher

            def counted(start: int, end: int) -> bytes:
                data: bytes = inner(start, end)
                _count(len(data))
                return data

            cache.fetcher = counted
        if mode == "r":
            import io

            return io.TextIOWrapper(fh, encoding="utf-8")
        return cast(IO[bytes], fh)

    def read_bytes(self) -> bytes:
        data = cast(bytes, self._call("cat_file", self.key))
        _count(len(data))
        return data

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def read_range(self, start: int, end: int) -> bytes:
        data = cast(bytes, self._call("cat_file", self.key, start=start, end=end))
        _count(len(data))
        return data

    def read_ranges(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """Several ranges of this object, requested concurrently (fsspec ``cat_ranges``; async backends such as
        s3fs and gcsfs send them at once)."""
        if not spans:
            return []
        got = self._call("cat_ranges", [self.key] * len(spans), [a for a, _ in spans], [b for _, b in spans],
                         on_error="raise")
        out = [bytes(d) for d in got]
        for d in out:
            _count(len(d))
        return out


# --- helpers the readers share ---------------------------------------------------------------------------------

def read_range(path: Path, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of a file: one ranged request for a remote object, a seek + read locally."""
    if isinstance(path, RemotePath):
        return path.read_range(start, end)
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(max(0, end - start))


def read_ranges(path: Path, spans: list[tuple[int, int]]) -> list[bytes]:
    """:func:`read_range` for several ranges: concurrent requests for a remote object."""
    if isinstance(path, RemotePath):
        return path.read_ranges(spans)
    return [read_range(path, a, b) for a, b in spans]


def open_binary(path: Path, block_size: int = BLOCK_SIZE) -> IO[bytes]:
    """A seekable binary file object: the builtin file locally; remotely an fsspec file reading ahead in
    ``block_size`` blocks (a zip reader seeks to the central directory and then reads members in order)."""
    if isinstance(path, RemotePath):
        return cast(IO[bytes], path.open("rb", block_size=block_size))
    return open(path, "rb")


def remote_glob(pattern: Path) -> list[Path]:
    """Objects and folders matching a remote glob URL (``s3://bucket/run/step_*.safetensors``)."""
    assert isinstance(pattern, RemotePath)
    found = pattern._call("glob", pattern.key)
    return [cast(Path, pattern._new(str(k).rstrip("/"))) for k in sorted(found)]


def walk(top: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` for a local folder or a remote prefix, yielding the folder as a path object."""
    if isinstance(top, RemotePath):
        for here, dirs, files in top.walk():
            yield cast(Path, here), dirs, files
        return
    for dirpath, dirnames, filenames in os.walk(top):
        yield Path(dirpath), dirnames, filenames


def remote_fingerprint(path: Path) -> dict[str, Any]:
    """Provenance of a remote file or folder from its listing: total size and a hash of names + ETags."""
    import hashlib

    top = cast(RemotePath, path)
    if top.is_dir():
        files = [here / f for here, _d, names in top.walk() for f in names]
    else:
        files = [top]
    h = hashlib.sha256()
    size = 0
    for f in sorted(files, key=str):
        size += f.stat().st_size
        h.update(f"{f.relative_to(top) if f != top else f.name}:{f.etag()}".encode())
    return {"path": str(top), "bytes": size, "sha256": h.hexdigest(), "hash_scope": "names+etags"}


def identity(path: Path) -> str:
    """A key naming one file or folder: the normalized URL, or the absolute local path."""
    if isinstance(path, RemotePath):
        return str(path.resolve())
    return os.path.normpath(os.path.abspath(path))


def inside(path: Path, root: Path) -> bool:
    """True when remote ``path`` stays under the URL prefix ``root`` after normalizing ``..``."""
    p, r = path.resolve(), root.resolve()
    return p == r or str(p).startswith(str(r).rstrip("/") + "/")


_STAGE: list[str] = []


def _cleanup() -> None:
    while _STAGE:
        shutil.rmtree(_STAGE.pop(), ignore_errors=True)


def finish() -> None:
    """End-of-process work (also registered with atexit; the CLI's fast exit calls it explicitly): delete the
    temporary copies and, with ILR_INSPECT_IO_STATS=1, print the bytes fetched."""
    _cleanup()
    if os.environ.get("ILR_INSPECT_IO_STATS"):
        _report_at_exit()
        _stats["requests"] = 0  # printed once


def _copy(src: RemotePath, dst: Path) -> int:
    """Stream one object to a local file in 8 MiB ranged reads (never the whole object in memory)."""
    size = src.stat().st_size
    with open(dst, "wb") as out:
        for start in range(0, size, 8 << 20):
            out.write(src.read_range(start, min(size, start + (8 << 20))))
    return size


def stage_tree(files: list[Path], root: Path) -> Path:
    """Copy remote ``files`` (all under ``root``) into a private temporary folder with the same relative layout;
    returns the local folder standing for ``root``."""
    top = tempfile.mkdtemp(prefix="ilr-inspect-logs-")
    _STAGE.append(top)
    local = Path(top) / root.name
    local.mkdir()
    for f in files:
        rf, rr = cast(RemotePath, f), cast(RemotePath, root)
        dst = local / rf.relative_to(rr)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy(rf, dst)
    return local


_VIEWS: dict[str, Path] = {}


def local_view(checkpoint: Any, names: tuple[str, ...] = ("config.json", "args.yaml")) -> Path:
    """A local stand-in for a checkpoint's path: the path itself when local; for a remote one its staged copy, or
    a temporary folder holding only the small description files beside it (``names``)."""
    p = checkpoint.path
    if not isinstance(p, RemotePath):
        return Path(p)
    staged = checkpoint.metadata.get("staged_copy")
    if staged:
        return Path(staged)
    folder = p if p.is_dir() else p.parent
    key = str(folder)
    if key not in _VIEWS:
        top = tempfile.mkdtemp(prefix="ilr-inspect-view-")
        _STAGE.append(top)
        local = Path(top) / folder.name
        local.mkdir()
        for n in names:
            if (folder / n).is_file() and (folder / n).stat().st_size <= 64 * 1024 * 1024:
                _copy(folder / n, local / n)
        _VIEWS[key] = local
    return _VIEWS[key] if p.is_dir() else _VIEWS[key] / p.name


def stage(path: Path, note: list[str] | None = None) -> Path:
    """Copy a remote checkpoint file or folder into a private temporary folder (deleted at exit) and return
    the local copy, for formats read only from local files. ``note`` gets one line naming the bytes fetched."""
    if not isinstance(path, RemotePath):
        return path
    top = tempfile.mkdtemp(prefix="ilr-inspect-stage-")
    _STAGE.append(top)
    local = Path(top) / path.name
    total = 0
    if path.is_dir():
        for here, _dirs, files in path.walk():
            rel = here.relative_to(path)
            (local / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                total += _copy(here / f, local / rel / f)
    else:
        total = _copy(path, local)
    if note is not None:
        note.append(f"no ranged reader for this format: downloaded {total} bytes to a temporary copy")
    return local

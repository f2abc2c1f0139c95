"""NumPy ``.npz`` archives (``np.savez``, MLX ``mx.savez``): one array per member, names as stored.

Headers come from each member's ``.npy`` header (``numpy.lib.format``), so listing reads no tensor data; object
arrays would need pickle to load and are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, guess_kind
from ..errors import CorruptCheckpointError, InputError
from . import ZIP_MAGIC, OpenOptions

NAME = "npz"
EXTRA: str | None = None

_ZIP_MAGIC = ZIP_MAGIC


def sniff(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() != ".npz":
        return False
    with path.open("rb") as f:
        return f.read(4) == _ZIP_MAGIC


def _header(npz: Any, name: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of one member from its .npy header, without reading the data."""
    fmt = np.lib.format
    with npz.zip.open(f"{name}.npy") as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(f)
    return tuple(int(d) for d in shape), np.dtype(dtype)


class NpzSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Our own handle: np.load leaks the one it opens when the zip directory is unreadable.
        self._file = path.open("rb")
        try:
            self._npz: Any = np.load(self._file, allow_pickle=False)
        except Exception as exc:  # OSError/ValueError/BadZipFile/EOFError on a damaged zip directory
            self._file.close()
            raise CorruptCheckpointError(
                f"cannot read the .npz archive ({_short(exc)})", hint="the file may be truncated; re-save it",
                path=path) from exc
        if not hasattr(self._npz, "files"):  # np.load returned a single array: a .npy renamed to .npz
            self._file.close()
            raise InputError("not an .npz archive (a single .npy array)", hint="rename it to .npy", path=path)
        try:
            self._infos = self._headers()
        except BaseException:
            self.close()
            raise

    def _headers(self) -> list[TensorInfo]:
        from ..safety import check_shape, check_zip_member

        infos: list[TensorInfo] = []
        self.skipped: list[str] = []
        for name in self._npz.files:
            try:
                info = self._npz.zip.getinfo(f"{name}.npy")
                check_zip_member(info, path=self.path)  # declared size and ratio, before inflating anything
                shape, dtype = _header(self._npz, name)
            except InputError:
                raise
            except Exception as exc:  # numpy raises ValueError/SyntaxError, zlib its own error, on damage
                raise CorruptCheckpointError(
                    f"malformed header for array {name!r} ({_short(exc)})", hint="re-save the file", path=self.path
                ) from exc
            shape = check_shape(shape, name=name, path=self.path)
            if dtype.hasobject:
                raise InputError(
                    f"array {name!r} holds Python objects, which need pickle to load",
                    hint="re-save it with numeric arrays only (np.savez of float/int arrays)",
                    path=self.path,
                )
            if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in "biufc":
                # Structured/compound, string, datetime… arrays have no norm; named, never dropped silently.
                self.skipped.append(f"array {name!r} skipped: dtype {dtype} is not a numeric tensor")
                continue
            need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if need > info.file_size:
                raise CorruptCheckpointError(
                    f"array {name!r} declares {need} bytes of data but its member holds {info.file_size}",
                    hint="the file is truncated or damaged; re-save it", path=self.path)
            infos.append(TensorInfo(name, shape, str(dtype), guess_kind(name)))
        return infos

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._npz[name])
        except Exception as exc:  # ValueError/OSError/BadZipFile/EOFError/zlib.error from a damaged member
            raise CorruptCheckpointError(
                f"cannot read array {name!r} ({_short(exc)})", hint="the file may be truncated; re-save it",
                path=self.path) from exc

    def close(self) -> None:
        self._npz.close()
        self._file.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def open(path: Path, options: OpenOptions) -> Checkpoint:
    source = NpzSource(path)
    meta: dict[str, Any] = {"arrays": len(source.infos())}
    if source.skipped:
        meta["warnings"] = list(source.skipped)
    if not source.infos():
        source.close()
        raise InputError("no numeric arrays in this .npz", hint="; ".join(source.skipped) or "it is empty",
                         path=path)
    return Checkpoint(path=path, format=NAME, source=source, metadata=meta)

"""A torch-free lazy reader for ``torch.save`` zip archives (torch ≥ 1.6), local or remote (docs/formats.md).

Reads only the zip central directory and ``<prefix>/data.pkl``; the pickle is unpickled by a restricted
unpickler that imports nothing: every global is looked up in an exact allowlist of inert stand-ins (the data-only
globals ``torch.load(weights_only=True)`` allows here, see ``_torchutil.allowed_globals`` and docs/security.md).
Tensors become :class:`LazyTensor` records (storage, dtype, offset, shape, stride); their bytes are read only
when asked for: a zero-copy view of a memory map for a local file, one ranged read for any other seekable file
object (a remote fsspec file; with a ``ranged`` reader, exactly the tensor's bytes in one request, its local
zip header included). Whatever this reader cannot represent (quantized, sparse, nested or subclassed
tensors, torch objects outside the allowlist) raises :class:`NotLazy`, and the caller falls back to torch.load.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import collections
import contextlib
import io
import math
import mmap
import os
import pathlib
import pickle
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import CorruptCheckpointError, UnsafePickleError
from ..safety import check_zip_member, zip_member_bytes

_HINT = "the file may be truncated or not written by torch.save; re-save or remove it"
# Bytes asked for beyond a member's name when its local header is fetched with its data: torch pads the extra field
# to align the data to 64 bytes (plus a Zip64 record in large archives).
_HEADER_SLACK = 128
# Storages up to this size (scalars: step counters, loss, epoch) are fetched together right after data.pkl when
# the archive is remote.
_SMALL_BYTES = 64
_SMALL_MAX = 4096  # at most this many (a few per parameter of a large model); any others are read when asked for

# Legacy typed-storage class names torch.save pickles for each tensor's storage → dtype (torch spelling).
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# bfloat16 is kept as raw uint16 and widened to float32 on read, like the torch path (NumPy has no bfloat16).
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}
_TORCH_DTYPE_NAMES = frozenset(_NP_DTYPES) | {"float", "double", "half", "long", "int", "short", "bfloat16"}


class NotLazy(Exception):  # noqa: N818 - a signal to fall back, not an error
    """The archive holds something only torch.load can represent; the caller falls back to it."""


class _Refused(Exception):  # noqa: N818 - caught inside this module
    """A global outside the allowlist: the pickle would import code."""


# -- the archive ---------------------------------------------------------------------------------------------------


class TorchZip:
    """The central directory of one torch zip archive and access to its storage members.

    ``fh`` must be seekable. A local file (one with a ``fileno``) is memory-mapped once and closed again: tensors
    are views of that map. Any other file object is kept, and each storage costs one ranged read: through
    ``ranged(start, end) -> bytes`` when given (exact byte ranges, no read-ahead, no lock), else by seeking ``fh``.
    """

    def __init__(self, fh: IO[bytes], *, path: Path, local: bool,
                 ranged: Callable[[int, int], bytes] | None = None,
                 ranged_many: Callable[[list[tuple[int, int]]], list[bytes]] | None = None) -> None:
        self.path = path
        self._ranged = None if local else ranged
        self._ranged_many = None if local else ranged_many
        self._small: dict[str, bytes] = {}  # prefetched small members (see prefetch_small)
        self._lock = threading.Lock()
        try:
            self._zf = zipfile.ZipFile(fh)
            infos = self._zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as exc:
            raise CorruptCheckpointError(f"cannot read the zip directory ({str(exc)[:120]})", hint=_HINT,
                                         path=path) from exc
        if not infos:
            raise CorruptCheckpointError("the zip archive is empty", hint=_HINT, path=path)
        # torch names every record "<prefix>/…", the prefix being the first record's top folder.
        self.prefix = infos[0].filename.split("/", 1)[0]
        self._infos = {i.filename: i for i in infos}
        if f"{self.prefix}/data.pkl" not in self._infos:
            raise NotLazy("no data.pkl")  # TorchScript / torch.export archives and others: not ours
        self._fh: IO[bytes] | None = fh
        self._starts: dict[str, int] = {}
        self._mm: mmap.mmap | None = None
        order = self._infos.get(f"{self.prefix}/byteorder")
        self.big_endian = False
        if order is not None:
            self.big_endian = self._member(order, max_bytes=64).strip() == b"big"
        if local:
            try:
                size = os.fstat(fh.fileno()).st_size
                self._mm = _map(fh.fileno()) if size else None
            except (OSError, ValueError, io.UnsupportedOperation):
                self._mm = None

    @property
    def mapped(self) -> bool:
        return self._mm is not None

    def pickle_bytes(self) -> bytes:
        return self._member(self._infos[f"{self.prefix}/data.pkl"])

    def _member(self, info: zipfile.ZipInfo, max_bytes: int | None = None) -> bytes:
        """A whole small member (data.pkl, byteorder), within the size limits of docs/security.md."""
        limit = {} if max_bytes is None else {"max_bytes": max_bytes}
        if self._ranged is None or info.compress_type != zipfile.ZIP_STORED:
            return zip_member_bytes(self._zf, info, path=self.path, **limit)
        # Remotely: one exact ranged read (header + data), not the file object's read-ahead past it.
        check_zip_member(info, path=self.path, **limit)
        data = self._span(info, 0, info.file_size)
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise CorruptCheckpointError(f"archive member {info.filename!r} is damaged (size or CRC-32 differs "
                                         "from the zip directory)", hint=_HINT, path=self.path)
        return data

    def storage_member(self, key: str) -> zipfile.ZipInfo:
        info = self._infos.get(f"{self.prefix}/data/{key}")
        if info is None:
            raise CorruptCheckpointError(f"storage {key!r} named by data.pkl is missing from the archive",
                                         hint=_HINT, path=self.path)
        return info

    def release_file(self) -> None:
        """Drop the file object once mapped (the map keeps its own reference to the file)."""
        if self._mm is not None and self._fh is not None:
            if any(i.compress_type != zipfile.ZIP_STORED for i in self._infos.values()):
                self._zf = zipfile.ZipFile(_MapFile(self._mm))  # deflated members: inflated from the map
            self._fh.close()
            self._fh = None

    def read_storage(self, key: str, dtype: np.dtype[Any], numel: int, lo: int, hi: int) -> np.ndarray:
        """Elements ``lo:hi`` of the storage (``numel`` elements) as a 1-D array: a view of the memory map where
        there is one, else one ranged read of just those bytes."""
        info = self.storage_member(key)
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise CorruptCheckpointError(f"storage {key!r} holds {info.file_size} bytes, data.pkl says {nbytes}",
                                         hint=_HINT, path=self.path)
        if info.compress_type != zipfile.ZIP_STORED:  # torch never compresses; a re-zipped archive might
            with self._lock:
                raw = zip_member_bytes(self._zf, info, path=self.path)
            return np.frombuffer(raw, dtype=dtype, count=numel)[lo:hi].copy()
        if self._mm is not None:
            start = self._data_start(info)
            if start + nbytes > len(self._mm):
                raise CorruptCheckpointError(f"storage {key!r} runs past the end of the file", hint=_HINT,
                                             path=self.path)
            return np.frombuffer(self._mm, dtype=dtype, count=hi - lo, offset=start + lo * dtype.itemsize)
        nbytes = (hi - lo) * dtype.itemsize
        data = bytearray(self._span(info, lo * dtype.itemsize, hi * dtype.itemsize))  # writable, as torch's are
        if len(data) != nbytes:
            raise CorruptCheckpointError(f"storage {key!r} runs past the end of the file", hint=_HINT,
                                         path=self.path)
        return np.frombuffer(data, dtype=dtype, count=hi - lo)

    def _span(self, info: zipfile.ZipInfo, lo: int, hi: int) -> bytes:
        """Bytes ``lo:hi`` of a stored member's data. Remotely, the first read of a member fetches its local header
        together with the data in one request (the header's length is known only once read: torch pads the extra
        field to align the data, so a little more is asked for and the surplus dropped)."""
        small = self._small.get(info.filename)
        if small is not None:
            return small[lo:hi]
        start = self._starts.get(info.filename)
        if start is not None or self._ranged is None or lo > _HEADER_SLACK:
            return self._read_at(self._data_start(info) + lo, hi - lo)
        guess = 30 + len(info.filename.encode("utf-8")) + _HEADER_SLACK
        blob = self._read_at(info.header_offset, guess + hi)
        rel = self._header_length(info, blob[:30])
        self._starts[info.filename] = int(info.header_offset) + rel
        if rel + hi <= len(blob):
            return blob[rel + lo:rel + hi]
        return self._read_at(int(info.header_offset) + rel + lo, hi - lo)  # a longer extra field than guessed

    def prefetch_small(self, keys: list[str]) -> None:
        """Fetch the small stored storages ``keys`` (scalars such as Adam's ``step`` counters, one per parameter)
        concurrently, each with its local header, and keep them: one by one they would cost a round trip each."""
        if self._ranged_many is None:
            return
        todo = [i for i in (self.storage_member(k) for k in dict.fromkeys(keys))
                if i.compress_type == zipfile.ZIP_STORED and i.filename not in self._small][:_SMALL_MAX]
        if not todo:
            return
        spans = [(int(i.header_offset), int(i.header_offset) + 30 + len(i.filename.encode("utf-8")) + _HEADER_SLACK
                  + int(i.file_size)) for i in todo]
        for info, blob in zip(todo, self._ranged_many(spans), strict=True):
            rel = self._header_length(info, blob[:30])
            self._starts[info.filename] = int(info.header_offset) + rel
            data = blob[rel:rel + info.file_size]
            if len(data) == info.file_size:  # else read again when asked for (and reported as damaged there)
                self._small[info.filename] = data

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        got = self._starts.get(info.filename)
        if got is None:
            got = self._starts[info.filename] = self._read_data_start(info)
        return got

    def _read_data_start(self, info: zipfile.ZipInfo) -> int:
        # Local header: 30 fixed bytes, then the name and an extra field (torch pads it to align the data).
        return int(info.header_offset) + self._header_length(info, self._read_at(info.header_offset, 30))

    def _header_length(self, info: zipfile.ZipInfo, head: bytes) -> int:
        # Local header: 30 fixed bytes, then the name and an extra field.
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise CorruptCheckpointError(f"archive member {info.filename!r} has a damaged local header",
                                         hint=_HINT, path=self.path)
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        return 30 + int(name_len) + int(extra_len)

    def _read_at(self, offset: int, size: int) -> bytes:
        if self._mm is not None:
            return bytes(self._mm[offset:offset + size])
        if self._ranged is not None:
            return self._ranged(offset, offset + size) if size > 0 else b""
        with self._lock:
            if self._fh is None:
                raise CorruptCheckpointError("the archive was closed", hint=_HINT, path=self.path)
            self._fh.seek(offset)
            return self._fh.read(size)

    def close(self) -> None:
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # NumPy views still alive: the map goes when they do
                self._mm.close()
        if self._fh is not None:
            self._fh.close()


def _map(fd: int) -> mmap.mmap:
    # Private and copy-on-write, like torch.load(mmap=True)'s: arrays are writable as torch's were (torch.from_numpy
    # downstream) and a write never reaches the file; measure/stream.py drops the resident pages of private file
    # mappings once a checkpoint is done.
    return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)


class _MapFile(io.RawIOBase):
    """A read-only seekable file over a memory map (so the file descriptor can be closed)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm, self._pos = mm, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else len(self._mm) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b: Any) -> int:
        chunk = self._mm[self._pos:self._pos + len(b)]
        b[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


# -- lazy tensors --------------------------------------------------------------------------------------------------


class Storage:
    """One storage record of data.pkl: ``numel`` elements of ``dtype`` in member ``data/<key>``."""

    __slots__ = ("archive", "dtype", "key", "numel")

    def __init__(self, archive: TorchZip, key: str, dtype: str, numel: int) -> None:
        self.archive, self.key, self.dtype, self.numel = archive, key, dtype, numel

    def span(self, lo: int, hi: int) -> np.ndarray:
        """Elements ``lo:hi``, native byte order (bfloat16 as raw uint16); nothing is cached, so a remote
        checkpoint never holds more than the tensors being read."""
        dt = _NP_DTYPES[self.dtype]
        if self.archive.big_endian and dt.itemsize > 1:
            return self.archive.read_storage(self.key, dt.newbyteorder(">"), self.numel, lo, hi).astype(dt)
        return self.archive.read_storage(self.key, dt, self.numel, lo, hi)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return tuple(reversed(out))


class LazyTensor:
    """A tensor record of data.pkl; the parts of the ``torch.Tensor`` API the readers use, data read on demand."""

    __slots__ = ("_stride", "is_parameter", "offset", "shape", "storage")

    def __init__(self, storage: Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self._stride = storage, offset, shape, stride
        self.is_parameter = False

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def stride(self) -> tuple[int, ...]:
        return self._stride

    def storage_offset(self) -> int:
        return self.offset

    def element_size(self) -> int:
        return _NP_DTYPES[self.dtype].itemsize

    def is_floating_point(self) -> bool:
        return self.dtype in ("float64", "float32", "float16", "bfloat16")

    def is_complex(self) -> bool:
        return self.dtype.startswith("complex")

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"

    def numpy(self) -> np.ndarray:
        """The data as NumPy: a view for contiguous tensors, a copy for strided ones; bfloat16 → float32."""
        n = self.numel()
        if n == 0:
            arr = np.empty(self.shape, dtype=_NP_DTYPES[self.dtype])
        else:
            extent = 1 + sum((d - 1) * s for d, s in zip(self.shape, self._stride, strict=True))
            base = self.storage.span(self.offset, self.offset + extent)  # exactly the elements it spans
            dims = [(d, s) for d, s in zip(self.shape, self._stride, strict=True) if d != 1]
            if [s for _, s in dims] == list(_contiguous_strides(tuple(d for d, _ in dims))):
                arr = base.reshape(self.shape)
            else:
                arr = np.lib.stride_tricks.as_strided(
                    base, shape=self.shape, strides=tuple(s * base.itemsize for s in self._stride),
                    writeable=False).copy()
        if self.dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return arr

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def item(self) -> Any:
        if self.numel() != 1:
            raise ValueError(f"a tensor with {self.numel()} elements cannot be converted to a scalar")
        return self.numpy().reshape(-1)[0].item()


# -- stand-ins for the allowed globals ---------------------------------------------------------------------------


def _check_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> tuple[Storage, int, tuple[int, ...],
                                                                             tuple[int, ...]]:
    if not isinstance(storage, Storage):
        raise NotLazy("tensor without a plain storage")
    try:
        shape = tuple(int(d) for d in size)
        strides = tuple(int(s) for s in stride)
        off = int(offset)
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError("a tensor record in data.pkl is malformed", hint=_HINT,
                                     path=storage.archive.path) from exc
    if len(shape) != len(strides) or off < 0 or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise CorruptCheckpointError("a tensor record in data.pkl has an invalid shape or stride", hint=_HINT,
                                     path=storage.archive.path)
    if math.prod(shape) and off + sum((d - 1) * s for d, s in zip(shape, strides, strict=True)) >= storage.numel:
        raise CorruptCheckpointError("a tensor in data.pkl reaches past the end of its storage", hint=_HINT,
                                     path=storage.archive.path)
    return storage, off, shape, strides


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> LazyTensor:
    return LazyTensor(*_check_tensor(storage, storage_offset, size, stride))


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> LazyTensor:
    if metadata:  # conj/neg bits or other flags this reader does not apply
        raise NotLazy("tensor metadata")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None,
                       state: Any = None) -> LazyTensor:
    if not isinstance(data, LazyTensor):
        raise NotLazy("parameter without a plain tensor")
    data.is_parameter = True
    return data


class _TensorType:
    """``torch.Tensor`` / ``nn.Parameter`` named as the target type of ``_rebuild_from_type_v2``."""

    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Python attributes set on a tensor (``state``) are dropped: only the data matters here.
    if not isinstance(new_type, _TensorType) or func not in _REBUILDS or not isinstance(args, tuple):
        raise NotLazy("tensor subclass")
    ret = func(*args)
    if new_type.name == "Parameter" and isinstance(ret, LazyTensor):
        ret.is_parameter = True
    return ret


class TorchDevice:
    """A ``torch.device`` pickled as data; not a ``str``, so it is not taken for text metadata."""

    __slots__ = ("spec",)

    def __init__(self, *spec: Any) -> None:
        self.spec = spec

    def __str__(self) -> str:
        return ":".join(str(x) for x in self.spec)

    def __repr__(self) -> str:
        return f"device({str(self)!r})"


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class TorchDType:
    """A ``torch.<dtype>`` object pickled as data; not a ``str``, so it is not taken for text metadata."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDType) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def _encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles spell ``bytes`` as _codecs.encode(str, "latin1"); only text codecs are allowed.
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise _Refused("_codecs.encode")
    return codecs.encode(obj, encoding, errors)


_REBUILDS: set[Callable[..., Any]] = {_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """NumPy globals HF Trainer's rng_state.pth & co. pickle (same set as _torchutil.numpy_safe_globals)."""
    core = getattr(np, "_core", None) or getattr(np, "core")  # noqa: B009 - NumPy 1 vs 2
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = core.multiarray._reconstruct
        out[(mod, "scalar")] = core.multiarray.scalar
    for t in (np.uint32, np.int64, np.int32, np.float64, np.float32, np.bool_, np.uint8):
        cls = type(np.dtype(t))
        out[(cls.__module__, cls.__name__)] = cls
    return out


def _allowed() -> dict[tuple[str, str], Any]:
    rc: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TensorType("Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
        ("torch", "Size"): tuple,
        ("torch", "device"): TorchDevice,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "Counter"): collections.Counter,
        ("_codecs", "encode"): _encode,
        ("builtins", "set"): set,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        # _torchutil.DATA_GLOBALS: data-only classes, audited in tests/test_hostile.py (docs/security.md).
        ("argparse", "Namespace"): argparse.Namespace,
        ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.WindowsPath, ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    }
    for name, dt in _STORAGE_DTYPES.items():
        rc[("torch", name)] = _StorageType(dt)
    for name in _TORCH_DTYPE_NAMES:
        rc[("torch", name)] = TorchDType(name)
    rc.update(_numpy_globals())
    return rc


_ALLOWED = _allowed()
# Allowed by torch.load(weights_only=True) but not by this reader: not refused, handed to torch.
_TORCH_ONLY_PREFIX = "torch"


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 spellings protocol-2 pickles use (``__builtin__.set``) → Python 3 ones, as pickle itself maps them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: TorchZip) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._archive = archive
        self._storages: dict[str, Storage] = {}

    def storages(self) -> list[Storage]:
        return list(self._storages.values())

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_name(module, name)
        got = _ALLOWED.get((module, name))
        if got is not None:
            return got
        if module == _TORCH_ONLY_PREFIX or module.startswith(_TORCH_ONLY_PREFIX + "."):
            raise NotLazy(f"{module}.{name}")  # torch decides: its allowlist, its rebuild functions
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise NotLazy("unknown persistent id")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise NotLazy("untyped or unsupported storage")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise CorruptCheckpointError("a storage record in data.pkl is malformed", hint=_HINT,
                                         path=self._archive.path)
        st = self._storages.get(key)
        if st is None:
            info = self._archive.storage_member(key)
            if info.file_size < numel * _NP_DTYPES[stype.dtype].itemsize:
                raise CorruptCheckpointError(f"storage {key!r} is shorter than data.pkl says", hint=_HINT,
                                             path=self._archive.path)
            st = self._storages[key] = Storage(self._archive, key, stype.dtype, numel)
        elif st.dtype != stype.dtype:
            raise NotLazy("one storage viewed as two dtypes")
        return st


# -- naming every global without running any ----------------------------------------------------------------------


class _Stub:
    """Stands in for anything while listing globals: accepts every call, BUILD, APPENDS and SETITEMS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _Lister(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.found: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_name(module, name)
        self.found.append(f"{module}.{name}")
        return type("Stub", (_Stub,), {})

    def persistent_load(self, pid: Any) -> Any:
        return _Stub()


def globals_in(data: bytes) -> list[str]:
    """``module.name`` of every global the pickle names, in order, found by unpickling onto stubs (nothing runs)."""
    lister = _Lister(data)
    with contextlib.suppress(Exception):  # a damaged stream: the names seen so far are all there is
        lister.load()
    return list(dict.fromkeys(lister.found))


def _unsafe(found: list[str]) -> list[str]:
    bad = [g for g in found if tuple(g.rsplit(".", 1)) not in _ALLOWED]
    return [g for g in bad if not g.startswith("numpy.")] or bad or ["(an unlisted global)"]


# -- entry point ---------------------------------------------------------------------------------------------------


def load(fh: IO[bytes], *, path: Path, local: bool = False, trust: bool = False,
         what: str = "PyTorch checkpoint", ranged: Callable[[int, int], bytes] | None = None,
         ranged_many: Callable[[list[tuple[int, int]]], list[bytes]] | None = None) -> Any:
    """The object ``torch.save`` wrote, with :class:`LazyTensor` for every tensor.

    Raises UnsafePickleError (a global outside the allowlist; with ``trust`` NotLazy instead, so the caller uses
    torch.load), NotLazy (something only torch.load represents) or CorruptCheckpointError.
    """
    archive = TorchZip(fh, path=path, local=local, ranged=ranged, ranged_many=ranged_many)
    data = archive.pickle_bytes()
    unpickler = _Unpickler(data, archive)
    try:
        obj = unpickler.load()
    except _Refused as exc:
        found = globals_in(data)
        if any(g.startswith(_TORCH_ONLY_PREFIX + ".") and tuple(g.rsplit(".", 1)) not in _ALLOWED for g in found):
            raise NotLazy("torch globals beside refused ones: torch names them") from exc
        if trust:
            raise NotLazy("trusted pickle") from exc
        raise UnsafePickleError(path, _unsafe(found) if found else [str(exc)]) from exc
    except (NotLazy, CorruptCheckpointError, UnsafePickleError):
        raise
    except RecursionError as exc:
        raise CorruptCheckpointError(f"the {what} nests too deeply to read", hint=_HINT, path=path) from exc
    except Exception as exc:
        raise CorruptCheckpointError(f"cannot unpickle the {what} ({type(exc).__name__}: {str(exc)[:120]})",
                                     hint=_HINT, path=path) from exc
    archive.release_file()
    archive.prefetch_small([st.key for st in unpickler.storages()
                            if st.numel * _NP_DTYPES[st.dtype].itemsize <= _SMALL_BYTES])
    return obj


def load_path(path: Path, *, trust: bool = False, what: str = "PyTorch checkpoint") -> Any:
    """:func:`load` on a local file, memory-mapped (the file descriptor is closed again at once)."""
    fh = path.open("rb")
    try:
        return load(fh, path=path, local=True, trust=trust, what=what)
    except BaseException:
        fh.close()
        raise

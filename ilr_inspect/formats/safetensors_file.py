"""A single ``.safetensors`` file, and the lazy source shared with sharded HF folders (docs/formats.md).

``safe_open`` parses and validates only the JSON header. Tensors of a dtype NumPy has are then returned as
zero-copy views of a private (copy-on-write) memory map of the file, at the offsets the header gives: reading
costs no copy, and writing into an array never reaches the file. Other dtypes (bfloat16, float8) are read
through torch and widened to float32.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, HParams, TensorInfo, TensorKind, WdMode, guess_kind
from ..errors import CorruptCheckpointError, InputError
from . import OpenOptions

NAME = "safetensors"
EXTRA = None
REMOTE = True  # URLs are read with ranged requests (RemoteSafetensorsSource), never downloaded whole

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool", "C64": "complex64",
}
_NUMPY_OK = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64"}
_LE = {k: np.dtype(_DTYPES[k]).newbyteorder("<") for k in _NUMPY_OK}  # the format is little-endian
_HEADER_MAX = 100_000_000  # safetensors' own limit on the JSON header


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """Where the data starts, and the header (already validated by safe_open; the offsets are checked again
    against the mapping in :meth:`SafetensorsSource._view`)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _HEADER_MAX:
            raise ValueError(f"header length {n} exceeds the limit")
        return 8 + n, json.loads(fh.read(n))


# A mapping holds a file descriptor (CPython keeps one per mmap), and a tensor-major pass over a long series
# touches every file in turn: keep the most recent few mapped. A dropped mapping lives on while arrays use it.
_MAX_MAPS = 64
_MAPS: OrderedDict[tuple[int, Path], mmap.mmap] = OrderedDict()
_MAPS_LOCK = threading.Lock()
_TOKENS = itertools.count()


def _mapping(token: int, path: Path) -> mmap.mmap:
    with _MAPS_LOCK:
        mm = _MAPS.pop((token, path), None)
        if mm is None:
            with path.open("rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
        _MAPS[(token, path)] = mm
        while len(_MAPS) > _MAX_MAPS:
            _MAPS.popitem(last=False)
        return mm


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors" and path.is_file()


def _info(name: str, st_dtype: str, shape: Any) -> TensorInfo:
    """A header entry as a TensorInfo: integer and bool tensors are buffers whatever their name."""
    dtype = _DTYPES.get(st_dtype, st_dtype.lower())
    kind: TensorKind = guess_kind(name)
    if not dtype.startswith(("float", "bfloat", "complex")):
        kind = "buffer"
    return TensorInfo(name, tuple(int(d) for d in shape), dtype, kind)


def _check_index(weight_map: Mapping[str, Any] | None, where: Mapping[str, Any], files: Sequence[Any]) -> None:
    if weight_map is None:
        return
    missing = sorted(set(weight_map) - set(where))
    if missing:
        raise CorruptCheckpointError(
            f"the index names {len(missing)} tensors no shard holds (e.g. {missing[0]})",
            hint="a shard is missing or was overwritten; re-save the model", path=files[0].parent)


class SafetensorsSource:
    """TensorSource over one or more safetensors files (shards), header-only until a tensor is read."""

    def __init__(self, files: Sequence[Path], weight_map: Mapping[str, Path] | None = None) -> None:
        from safetensors import safe_open

        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._infos: list[TensorInfo] = []
        self._framework: dict[Path, str] = {}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}
        self._token = next(_TOKENS)
        self.metadata: dict[str, str] = {}
        for f in files:
            try:
                h: Any = safe_open(str(f), framework="np")
            except Exception as exc:  # SafetensorError, OSError, JSON errors from a damaged header
                raise CorruptCheckpointError(f"cannot read the safetensors header ({str(exc)[:200]})",
                                             hint="the file is truncated or not a safetensors file; re-save it",
                                             path=f) from exc
            self._handles[f] = h
            self.metadata.update(h.metadata() or {})
            framework = "np"
            for name in h.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if weight_map is not None and weight_map.get(name, f) != f:
                    continue
                sl = h.get_slice(name)
                st_dtype = sl.get_dtype()
                if st_dtype not in _NUMPY_OK:
                    framework = "pt"
                self._infos.append(_info(name, st_dtype, sl.get_shape()))
                self._where[name] = f
            if framework == "pt":  # NumPy lacks bfloat16/float8: read through torch and widen
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            self._framework[f] = framework
        _check_index(weight_map, self._where, files)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        f = self._where[name]
        try:
            view = self._view(f, name)
            if view is not None:
                return view
            t = self._handles[f].get_tensor(name)
        except Exception as exc:
            raise CorruptCheckpointError(f"cannot read tensor {name!r} ({str(exc)[:200]})",
                                         hint="the file is truncated; re-save it", path=f) from exc
        if self._framework[f] == "pt":
            from ._torchutil import to_numpy

            return to_numpy(t)
        return np.asarray(t)

    def _view(self, f: Path, name: str) -> np.ndarray | None:
        """The tensor as a view of the file's memory map, or None for a dtype NumPy lacks."""
        if f not in self._headers:
            self._headers[f] = _header(f)
        start, header = self._headers[f]
        entry = header[name]
        dtype = _LE.get(entry["dtype"])
        if dtype is None:
            return None
        shape = tuple(int(d) for d in entry["shape"])
        lo, hi = (int(x) for x in entry["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        mm = _mapping(self._token, f)
        if not 0 <= lo <= hi <= len(mm) - start or hi - lo != count * dtype.itemsize:
            raise ValueError(f"data offsets {lo}..{hi} do not fit shape {list(shape)} in a {len(mm)}-byte file")
        return np.frombuffer(mm, dtype=dtype, count=count, offset=start + lo).reshape(shape)

    def close(self) -> None:
        # Arrays already handed out keep their mapping alive; it is unmapped when the last one is freed.
        self._handles.clear()
        self._headers.clear()
        with _MAPS_LOCK:
            for key in [k for k in _MAPS if k[0] == self._token]:
                del _MAPS[key]


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "C64": 8}


def remote_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Where the data starts and the validated header of a remote safetensors object, from ranged reads: the first
    64 KiB (8-byte length + most headers), then the rest of a longer header. No tensor data is fetched."""
    from ..safety import load_json
    from ..storage import HEAD_BYTES, read_range

    size = path.stat().st_size
    if size < 8:
        raise CorruptCheckpointError(f"the file is too short to be safetensors ({size} bytes)",
                                     hint="the save was probably interrupted; remove or re-save it", path=path)
    head = read_range(path, 0, min(size, HEAD_BYTES))
    (n,) = struct.unpack("<Q", head[:8])
    bad = "the file is truncated or not a safetensors file; re-save it"
    if n > _HEADER_MAX or 8 + n > size:
        raise CorruptCheckpointError(f"cannot read the safetensors header (length {n} in a {size}-byte file)",
                                     hint=bad, path=path)
    raw = head[8:8 + n] if 8 + n <= len(head) else head[8:] + read_range(path, len(head), 8 + n)
    header = load_json(raw, max_bytes=_HEADER_MAX, path=path, what="safetensors header")
    if not isinstance(header, dict):
        raise CorruptCheckpointError("the safetensors header is not a JSON object", hint=bad, path=path)
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CorruptCheckpointError("__metadata__ must map strings to strings", hint=bad, path=path)
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
            ok = dtype in _ITEMSIZE and all(d >= 0 for d in shape) and 0 <= int(lo) <= int(hi)
            ok = ok and int(hi) - int(lo) == math.prod(shape) * _ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptCheckpointError(f"bad header entry for tensor {name!r}", hint=bad, path=path)
        end = max(end, int(hi))
    if 8 + n + end > size:
        raise CorruptCheckpointError(f"the header needs {8 + n + end} bytes, the file has {size}", hint=bad,
                                     path=path)
    return 8 + n, header


class RemoteSafetensorsSource:
    """TensorSource over safetensors objects in remote storage: headers from ranged reads; ``read(name)`` is one
    ranged read of that tensor's bytes (docs/scale-out.md)."""

    def __init__(self, files: Sequence[Path], weight_map: Mapping[str, Path] | None = None) -> None:
        self._where: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        self._infos: list[TensorInfo] = []
        self.metadata: dict[str, str] = {}
        for f in files:
            start, header = remote_header(f)
            self.metadata.update(header.get("__metadata__") or {})
            for name in sorted(k for k in header if k != "__metadata__"):  # safe_open's order (sorted)
                if weight_map is not None and weight_map.get(name, f) != f:
                    continue
                entry = header[name]
                self._infos.append(_info(name, entry["dtype"], entry["shape"]))
                self._where[name] = (f, start, entry)
        _check_index(weight_map, self._where, files)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        from ..storage import read_range

        f, start, entry = self._where[name]
        lo, hi = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
        # A writable buffer, as the local (copy-on-write mmap) reader gives: callers may scale arrays in place.
        data = bytearray(read_range(f, start + lo, start + hi)) if hi > lo else bytearray()
        if len(data) != hi - lo:
            raise CorruptCheckpointError(f"cannot read tensor {name!r} (got {len(data)} of {hi - lo} bytes)",
                                         hint="the object changed or is truncated; re-save it", path=f)
        st = entry["dtype"]
        if st in _LE:
            return np.frombuffer(data, dtype=_LE[st]).reshape(shape)
        if st == "BF16":  # the upper half of a float32: widen exactly, as the local reader does through torch
            bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(shape)
        try:
            import ml_dtypes  # float8 types (installed with JAX)
        except ImportError as exc:
            raise InputError(f"tensor {name!r} is {st}, which needs ml_dtypes to read remotely",
                             hint="pip install ml_dtypes, or copy the file locally", path=f) from exc
        kind = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[st]
        return np.frombuffer(data, dtype=kind).astype(np.float32).reshape(shape)

    def close(self) -> None:
        return None


def make_source(files: Sequence[Path], weight_map: Mapping[str, Path] | None = None) -> Any:
    """The safetensors TensorSource for local files (memory-mapped) or remote objects (ranged reads)."""
    from ..storage import is_remote

    if files and is_remote(files[0]):
        return RemoteSafetensorsSource(files, weight_map)
    return SafetensorsSource(files, weight_map)


def step_from_metadata(meta: Mapping[str, str]) -> int | None:
    for k in ("step", "global_step", "ss_steps"):
        v = meta.get(k)
        if v is not None and str(v).strip().lstrip("-").isdigit():
            return int(v)
    return None


# ``__metadata__`` keys scripts use for hyperparameters (lower-cased, kohya's ``ss_`` prefix stripped).
_META_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning_rate", "base_lr"),
    "weight_decay": ("weight_decay", "wd"),
    "momentum": ("momentum", "beta1", "adam_beta1"),
    "beta2": ("beta2", "adam_beta2"),
    "eps": ("eps", "adam_epsilon", "epsilon"),
    "optimizer": ("optimizer", "optimizer_name", "optimizer_type", "optim", "opt"),
}
# Optimizer family → (name shown, how weight decay is applied); see docs/formats.md "Hyperparameters".
_FAMILIES: dict[str, tuple[str, WdMode]] = {
    "adamw": ("AdamW", "decoupled"), "adam": ("Adam", "coupled"), "sgdw": ("SGDW", "decoupled"),
    "sgd": ("SGD", "coupled"), "lion": ("Lion", "decoupled"), "rmsprop": ("RMSprop", "coupled"),
    "adagrad": ("Adagrad", "coupled"),
}
_KWARG = re.compile(r"(\w+)\s*=\s*(\([^)]*\)|\[[^\]]*\]|[^,()\s]+)")


def _num(text: Any) -> float | None:
    try:
        v = float(str(text).strip())
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pair(text: Any) -> tuple[float | None, float | None]:
    """``"[0.9, 0.999]"`` (JSON) or ``"(0.9, 0.999)"`` → (β1, β2)."""
    parts = [p for p in re.split(r"[\s,()\[\]]+", str(text)) if p]
    if len(parts) != 2:
        return None, None
    return _num(parts[0]), _num(parts[1])


def optimizer_mode(name: str) -> tuple[str, WdMode | None]:
    """``torch.optim.AdamW`` / ``adamw_torch`` / ``SGD`` → (display name, weight-decay mode or None)."""
    leaf = name.strip().split("(", 1)[0].rsplit(".", 1)[-1].strip().lower()
    for fam in ("adamw", "adam", "sgdw", "sgd", "lion", "rmsprop", "adagrad"):
        if leaf.startswith(fam) or leaf.endswith(fam):
            return _FAMILIES[fam]
    return name.strip().split("(", 1)[0].rsplit(".", 1)[-1].strip() or name, None


def hparams_from_metadata(meta: Mapping[str, str]) -> HParams | None:
    """Hyperparameters a training script stored as ``__metadata__`` strings (``lr``, ``weight_decay``/``wd``,
    ``momentum``, ``betas`` as a JSON list, ``beta1``/``beta2``, ``optimizer``, kohya's ``ss_*``), or None."""
    flat = {k.lower().removeprefix("ss_"): v for k, v in meta.items() if isinstance(v, str)}
    values: dict[str, Any] = {}
    for fld, keys in _META_KEYS.items():
        raw = next((flat[k] for k in keys if k in flat), None)
        if raw is not None:
            values[fld] = raw.strip() if fld == "optimizer" else _num(raw)
    if "betas" in flat:
        b1, b2 = _pair(flat["betas"])
        values.setdefault("momentum", b1)
        values.setdefault("beta2", b2)
    name = values.get("optimizer")
    family: tuple[str | None, WdMode | None] = optimizer_mode(name) if name else (None, None)
    if name and "(" in name:  # "torch.optim.AdamW(weight_decay=0.01,betas=(0.9,0.999))"
        for raw_key, val in _KWARG.findall(name.split("(", 1)[1]):
            key = str(raw_key).lower()
            if key == "betas":
                b1, b2 = _pair(val)
                values.setdefault("momentum", b1)
                values.setdefault("beta2", b2)
            else:
                target = next((f for f, ks in _META_KEYS.items() if key in ks and f != "optimizer"), None)
                if target is not None and values.get(target) is None:
                    values[target] = _num(val)
    if not any(values.get(f) is not None for f in ("lr", "weight_decay", "momentum", "beta2", "optimizer")):
        return None
    return HParams(lr=values.get("lr"), weight_decay=values.get("weight_decay"), momentum=values.get("momentum"),
                   beta2=values.get("beta2"), eps=values.get("eps"), optimizer=family[0], wd_mode=family[1],
                   source="safetensors:metadata", lr_timing="next")


def metadata_hparams(meta: Mapping[str, str], infos: list[TensorInfo]) -> dict[str, HParams]:
    """The metadata hyperparameters for every trainable parameter (they name no parameter groups)."""
    hp = hparams_from_metadata(meta)
    return {} if hp is None else {i.name: hp for i in infos if i.kind == "parameter"}


def epoch_from_metadata(meta: Mapping[str, str]) -> int | float | None:
    for k in ("epoch", "ss_epoch"):
        v = _num(meta.get(k)) if meta.get(k) is not None else None
        if v is not None:
            return int(v) if v.is_integer() else v
    return None


def open(path: Path, options: OpenOptions) -> Checkpoint:
    if path.is_dir():
        raise InputError("is a folder, not a safetensors file", hint="pass the .safetensors file", path=path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror})", hint="check its permissions", path=path) from exc
    if size < 8:
        raise CorruptCheckpointError(f"the file is too short to be safetensors ({size} bytes)",
                                     hint="the save was probably interrupted; remove or re-save it", path=path)
    source = make_source([path])
    meta: dict[str, Any] = {"safetensors_metadata": dict(source.metadata)}
    step = step_from_metadata(source.metadata)
    epoch = epoch_from_metadata(source.metadata)
    if epoch is not None:
        meta["epoch"] = epoch
    hparams = metadata_hparams(source.metadata, source.infos())
    return Checkpoint(path=path, format=NAME, source=source, step=step,
                      step_source="contents" if step is not None else "order", hparams=hparams,
                      hparams_source="safetensors:metadata" if hparams else None, metadata=meta)

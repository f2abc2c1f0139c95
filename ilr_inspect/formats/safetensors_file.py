"""A single ``.safetensors`` file, and the lazy source shared with sharded HF folders (formats.md §2.1.5).

``safe_open`` parses only the JSON header; each tensor is copied out of the memory map when read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, TensorKind, guess_kind
from ..errors import CorruptCheckpointError, InputError
from . import OpenOptions

NAME = "safetensors"
EXTRA = None

_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool", "C64": "complex64",
}
_NUMPY_OK = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "C64"}


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors" and path.is_file()


class SafetensorsSource:
    """TensorSource over one or more safetensors files (shards), header-only until a tensor is read."""

    def __init__(self, files: Sequence[Path], weight_map: Mapping[str, Path] | None = None) -> None:
        from safetensors import safe_open

        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._infos: list[TensorInfo] = []
        self._framework: dict[Path, str] = {}
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
                dtype = _DTYPES.get(st_dtype, st_dtype.lower())
                kind: TensorKind = guess_kind(name)
                if not dtype.startswith(("float", "bfloat", "complex")):
                    kind = "buffer"
                self._infos.append(TensorInfo(name, tuple(int(d) for d in sl.get_shape()), dtype, kind))
                self._where[name] = f
            if framework == "pt":  # NumPy lacks bfloat16/float8: read through torch and widen
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            self._framework[f] = framework
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise CorruptCheckpointError(
                    f"the index names {len(missing)} tensors no shard holds (e.g. {missing[0]})",
                    hint="a shard is missing or was overwritten; re-save the model", path=files[0].parent)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        f = self._where[name]
        try:
            t = self._handles[f].get_tensor(name)
        except Exception as exc:
            raise CorruptCheckpointError(f"cannot read tensor {name!r} ({str(exc)[:200]})",
                                         hint="the file is truncated; re-save it", path=f) from exc
        if self._framework[f] == "pt":
            from ._torchutil import to_numpy

            return to_numpy(t)
        return np.asarray(t)

    def close(self) -> None:
        self._handles.clear()


def step_from_metadata(meta: Mapping[str, str]) -> int | None:
    for k in ("step", "global_step"):
        v = meta.get(k)
        if v is not None and str(v).strip().lstrip("-").isdigit():
            return int(v)
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
    source = SafetensorsSource([path])
    meta: dict[str, Any] = {"safetensors_metadata": dict(source.metadata)}
    step = step_from_metadata(source.metadata)
    return Checkpoint(path=path, format=NAME, source=source, step=step,
                      step_source="contents" if step is not None else "order", metadata=meta)

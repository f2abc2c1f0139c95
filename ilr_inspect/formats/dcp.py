"""``torch.distributed.checkpoint`` folders: ``.metadata`` + ``*.distcp`` (docs/formats.md).

Headers come from the ``.metadata`` file without touching tensor data; each tensor is loaded on demand with
``no_dist=True`` (no process group), and nothing is written into the folder. Optimizer state saved with
``get_optimizer_state_dict`` is keyed by FQN, so its shapes come from the metadata, not the data.

Safety: torch reads ``.metadata`` with plain ``pickle.load`` and non-tensor entries with
``torch.load(weights_only=False)``. We read ``.metadata`` with an unpickler restricted to DCP's own data
classes, and the small entries with ``weights_only=True``; anything else needs ``trust_pickle``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, HParams, TensorInfo, TensorKind, guess_kind
from ..errors import CorruptCheckpointError, InputError, UnsafePickleError
from . import OpenOptions

NAME = "dcp"
EXTRA = None
_WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "module")
_OPTIM_KEYS = ("optim", "optimizer", "optimizer_state_dict", "opt")


def sniff(path: Path) -> bool:
    try:
        return path.is_dir() and (path / ".metadata").is_file() and any(path.glob("*.distcp"))
    except OSError:
        return False


# Exact (module, name) pairs, never module prefixes: a dotted name like ``metadata.os.system`` resolves through
# the module's own imports, so "anything in torch.distributed.checkpoint.metadata" would allow os.system.
# Each entry is a data-only class or pure lookup; docs/security.md says why none can run code.
_DCP_MD = "torch.distributed.checkpoint.metadata"
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "ChunkStorageMetadata"), (_DCP_MD, "TensorProperties"), (_DCP_MD, "MetadataIndex"),
    (_DCP_MD, "StorageMeta"), (_DCP_MD, "_MEM_FORMAT_ENCODING"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
})


def torch_dtype_global(module: str, name: str) -> Any:
    """``torch.<dtype>`` when (module, name) names a dtype object exactly, else None."""
    import torch

    if module != "torch" or "." in name:
        return None
    obj = getattr(torch, name, None)
    return obj if isinstance(obj, torch.dtype) else None


class _MetadataUnpickler(pickle.Unpickler):
    """Restricting globals (Python docs, pickle "Restricting Globals"): DCP's data classes and torch dtypes only."""

    def __init__(self, fh: Any, trust: bool) -> None:
        super().__init__(fh)
        self.trust = trust
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if self.trust:
            return super().find_class(module, name)
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        dtype = torch_dtype_global(module, name)
        if dtype is not None:
            return dtype
        self.refused.append(f"{module}.{name}")
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _read_metadata(path: Path, trust: bool) -> Any:
    f = path / ".metadata"
    try:
        with f.open("rb") as fh:
            up = _MetadataUnpickler(fh, trust)
            try:
                return up.load()
            except pickle.UnpicklingError as exc:
                if up.refused:
                    raise UnsafePickleError(f, up.refused) from exc
                raise
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError) as exc:
        raise CorruptCheckpointError(f"cannot read the DCP .metadata ({str(exc)[:200]})",
                                     hint="the folder is incomplete or written by an incompatible torch", path=path
                                     ) from exc


def _validate(path: Path, md: Any) -> None:
    """The metadata's types, shapes and file references, before any of it is used (docs/security.md)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    from ..safety import check_shape, ensure_inside, special_file

    bad = "the DCP .metadata is not a torch.distributed.checkpoint Metadata"
    hint = "the folder is incomplete or written by an incompatible torch"
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, Mapping):
        raise CorruptCheckpointError(bad, hint=hint, path=path)
    for k, v in md.state_dict_metadata.items():
        if isinstance(v, TensorStorageMetadata):
            check_shape(v.size, name=str(k), path=path)
            for chunk in v.chunks:
                check_shape(chunk.offsets, name=str(k), path=path)
                check_shape(chunk.sizes, name=str(k), path=path)
    storage = md.storage_data if md.storage_data is not None else {}
    if not isinstance(storage, Mapping):
        raise CorruptCheckpointError(bad, hint=hint, path=path)
    for info in storage.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            raise CorruptCheckpointError(bad, hint=hint, path=path)
        data_file = ensure_inside(path / info.relative_path, path, what="data file")
        if special_file(data_file):  # a FIFO/device would block the reader (docs/security.md)
            raise InputError(f"data file {info.relative_path!r} is not a regular file", hint=hint, path=path)
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise CorruptCheckpointError(f"negative offset or length for {info.relative_path!r}", hint=hint,
                                         path=path)


def _reader(path: Path, md: Any) -> Any:
    """A FileSystemReader that reuses the metadata we already read safely (torch's would pickle.load it again)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return md

    return _Reader(str(path))


class DcpSource:
    def __init__(self, path: Path, md: Any, entries: dict[str, tuple[str, Any]], infos: list[TensorInfo]) -> None:
        self._path = path
        self._md = md
        self._entries = entries  # name → (flat DCP key, TensorStorageMetadata)
        self._infos = infos

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        import torch
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_loader import load

        from ._torchutil import to_numpy

        key, md = self._entries[name]
        buf = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                load(buf, storage_reader=_reader(self._path, self._md), no_dist=True)
            except (Exception, CheckpointException) as exc:  # CheckpointException wraps per-rank I/O errors
                raise CorruptCheckpointError(f"cannot read tensor {name!r} ({_root_cause(exc)})",
                                             hint="a .distcp file is missing or truncated", path=self._path) from exc
        return to_numpy(buf[key])

    def close(self) -> None:
        self._entries.clear()


def _load_bytes(path: Path, md: Any, keys: list[str], trust: bool) -> dict[str, Any]:
    """Non-tensor entries (step, param_groups) as a nested dict, unpickled with weights_only unless trusted."""
    if not keys:
        return {}
    import torch
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from ._torchutil import allowed_globals

    class _Planner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                with torch.serialization.safe_globals(allowed_globals()):
                    obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                if not trust:
                    value.seek(0)
                    try:
                        needed = torch.serialization.get_unsafe_globals_in_checkpoint(value)
                    except Exception:  # not a torch.save payload: name the entry instead
                        needed = [f"entry {read_item.dest_index.fqn}"]
                    raise UnsafePickleError(path, needed) from exc
                value.seek(0)
                obj = torch.load(value, weights_only=False)
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)

    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            _load_state_dict(out, storage_reader=_reader(path, md), planner=_Planner(keys=keys),  # type: ignore[no-untyped-call]
                             no_dist=True)
        except UnsafePickleError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException (a BaseException) wraps item errors
            inner = [e for e in _causes(exc) if isinstance(e, UnsafePickleError)]
            if inner:
                raise inner[0] from exc
            raise CorruptCheckpointError(f"cannot read the non-tensor entries ({_root_cause(exc)})",
                                         hint="a .distcp file is missing or truncated", path=path) from exc
    return out


def _root_cause(exc: BaseException) -> str:
    """The innermost error's first line: CheckpointException's own text embeds per-rank tracebacks."""
    inner = [e for e in _causes(exc) if type(e).__name__ != "CheckpointException"]
    e = inner[-1] if inner else exc
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def _causes(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        out.append(e)
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, Mapping):
            for f in failures.values():
                f = f[0] if isinstance(f, tuple) and f else f
                if isinstance(f, BaseException):
                    stack.append(f)
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    return out


def open(path: Path, options: OpenOptions) -> Checkpoint:
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ._torchutil import dtype_name, find_step

    if not path.is_dir():
        raise InputError("is not a folder", hint="pass the folder holding .metadata and *.distcp", path=path)
    md = _read_metadata(path, options.trust_pickle)
    _validate(path, md)
    smd: Mapping[str, Any] = md.state_dict_metadata
    pdata = md.planner_data if isinstance(md.planner_data, Mapping) else {}
    paths: dict[str, tuple[Any, ...]] = {k: tuple(pdata.get(k, (k,))) for k in smd}
    tops = {p[0] for p in paths.values() if len(p) > 1}
    if options.key is not None:
        if options.key not in tops:
            raise InputError(f"no entry {options.key!r}; entries: {', '.join(sorted(map(str, tops)))}",
                             hint="pick one with --key", path=path)
        wkey: str | None = options.key
    else:
        wkey = next((k for k in _WEIGHT_KEYS if k in tops), None)
        if wkey is None and tops - set(_OPTIM_KEYS):
            sizes = {t: sum(int(np.prod(v.size)) for k, v in smd.items()
                            if paths[k][0] == t and isinstance(v, TensorStorageMetadata))
                     for t in tops - set(_OPTIM_KEYS)}
            wkey = max(sizes, key=lambda t: sizes[t])
    entries: dict[str, tuple[str, Any]] = {}
    infos: list[TensorInfo] = []
    for k, v in smd.items():
        if not isinstance(v, TensorStorageMetadata):
            continue
        p = paths[k]
        if wkey is not None and (p[0] != wkey or len(p) < 2):
            continue
        if wkey is None and p[0] in _OPTIM_KEYS:
            continue
        name = ".".join(str(x) for x in (p[1:] if wkey is not None else p))
        dtype: torch.dtype = v.properties.dtype
        kind: TensorKind = guess_kind(name)
        if not (dtype.is_floating_point or dtype.is_complex):
            kind = "buffer"
        entries[name] = (k, v)
        infos.append(TensorInfo(name, tuple(int(d) for d in v.size), dtype_name(dtype), kind))  # checked
    if not infos:
        raise InputError("no model tensors in this DCP checkpoint", hint="name the entry with --key", path=path)

    small = _load_bytes(path, md, [k for k, v in smd.items() if not isinstance(v, TensorStorageMetadata)],
                        options.trust_pickle)
    meta: dict[str, Any] = {"weights_key": wkey}
    step = find_step(small)
    for k, val in small.items():
        if isinstance(val, (int, float, str, bool)):
            meta.setdefault(k, val)
    hparams: dict[str, HParams] = {}
    hsrc = None
    okey = next((k for k in _OPTIM_KEYS if isinstance(small.get(k), Mapping) and "param_groups" in small[k]), None)
    if okey is not None:
        from ._torchutil import map_optimizer

        # Optimizer state tensors as shape-only meta tensors: mapping needs shapes, not data.
        state: dict[Any, dict[str, Any]] = {}
        for k, v in smd.items():
            p = paths[k]
            if isinstance(v, TensorStorageMetadata) and len(p) == 4 and p[0] == okey and p[1] == "state":
                state.setdefault(p[2], {})[str(p[3])] = torch.empty(tuple(v.size), device="meta")
        osd = {"param_groups": small[okey]["param_groups"], "state": state}
        hparams, err = map_optimizer(osd, infos, label=f"DCP entry '{okey}'", path=path)
        meta["optimizer_key"] = okey
        if err:
            meta["hparams_error"] = err
        else:
            hsrc = "optimizer"
    return Checkpoint(path=path, format=NAME, source=DcpSource(path, md, entries, infos), step=step,
                      step_source="contents" if step is not None else "order",
                      hparams=hparams, hparams_source=hsrc, metadata=meta)

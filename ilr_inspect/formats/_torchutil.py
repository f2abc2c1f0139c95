"""Shared helpers for the PyTorch-family readers: safe loading, tensor → NumPy, state-dict selection.

Imports torch only where a function needs it: the helpers accept both ``torch.Tensor`` and the torch-free
``_torchzip.LazyTensor``, so a torch zip series read by :func:`load_lazy` never imports torch.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..checkpoint import HParams, TensorInfo, TensorKind, guess_kind
from ..errors import CorruptCheckpointError, HParamsError, InputError, UnsafePickleError
from . import ZIP_MAGIC  # one definition for every zip-based reader
from ._torchzip import LazyTensor

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CORRUPT_HINT = "the file may be truncated or not written by torch.save; re-save or remove it"


def file_kind(path: Path) -> str:
    """``zip`` (torch ≥1.6 archive), ``pickle`` (legacy torch.save), ``text``, ``empty`` or ``binary``."""
    return classify(read_head(path))


def read_head(path: Path) -> bytes:
    if path.is_dir():
        raise InputError("is a folder, not a PyTorch file",
                         hint="pass the checkpoint file inside it, or a folder of checkpoints as a series", path=path)
    try:
        with path.open("rb") as fh:
            return fh.read(512)
    except OSError as exc:
        raise InputError(f"cannot read the file ({exc.strerror or exc})", hint="check its permissions",
                         path=path) from exc


def classify(head: bytes) -> str:
    if not head:
        return "empty"
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head[0] == 0x80:
        return "pickle"
    try:  # incremental: a multi-byte character cut at the 512-byte boundary is still text
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "binary"
    return "text" if b"\x00" not in head else "binary"


def numpy_safe_globals() -> list[Any]:
    """HF Trainer's allowlist for NumPy scalars/arrays in rng_state.pth and friends (docs/formats.md)."""
    out: list[Any] = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    if core is not None:
        out += [core.multiarray._reconstruct, core.multiarray.scalar]
    out += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.int32, np.float64, np.float32, np.bool_, np.uint8)]
    return out


# Data-only classes real checkpoints pickle beside tensors, allowed by exact (module, name) — never by module
# prefix. docs/security.md says why constructing each (NEWOBJ/REDUCE + BUILD) cannot run code;
# tests/test_hostile.py audits every entry.
DATA_GLOBALS: tuple[tuple[str, str], ...] = (
    ("argparse", "Namespace"),  # timm CheckpointSaver stores the training `args`
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # paths inside saved args/configs
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
)


def data_globals() -> list[Any]:
    import importlib

    return [getattr(importlib.import_module(m), n) for m, n in DATA_GLOBALS]


def allowed_globals() -> list[Any]:
    """Everything ``torch.load(weights_only=True)`` may resolve beyond torch's own defaults."""
    return numpy_safe_globals() + data_globals()


def _unsafe_globals(src: Path | IO[bytes], exc: BaseException) -> list[str]:
    import torch

    try:
        if not isinstance(src, Path):
            src.seek(0)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(src)
    except Exception:  # legacy (non-zip) files: the pickle stream's own GLOBAL opcodes, else torch's message
        found = re.findall(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc)) or (
            _scan_globals(src) if isinstance(src, Path) else [])
    allowed = {f"{m}.{n}" for m, n in DATA_GLOBALS}
    found = [g for g in dict.fromkeys(found) if g not in allowed]
    return [g for g in found if not g.startswith("numpy.")] or found or ["(an unlisted global)"]


def _scan_globals(path: Path, limit: int = 64 * 1024 * 1024) -> list[str]:
    """``module.name`` of every GLOBAL/STACK_GLOBAL in the first pickle of ``path`` — opcodes only, nothing run."""
    import pickletools

    try:
        with path.open("rb") as fh:
            data = fh.read(limit)
        out: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL" and isinstance(arg, str):
                out.append(arg.replace(" ", "."))
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                out.append(f"{strings[-2]}.{strings[-1]}")
        return out
    except Exception:  # damaged stream: whatever torch's message says is all there is
        return []


def load(path: Path, *, trust: bool, what: str = "PyTorch checkpoint") -> Any:
    """Load a torch.save file without executing code unless trusted; every failure becomes a typed error."""
    kind = _checked_kind(read_head(path), path, what)
    return _torch_load(path, path, trust=trust, what=what, mmap=kind == "zip")  # mmap needs the zip layout


def _checked_kind(head: bytes, path: Path, what: str) -> str:
    """``zip`` or ``pickle``; an empty, text or other file is a typed error."""
    kind = classify(head)
    if kind == "empty":
        raise CorruptCheckpointError("the file is empty (0 bytes)",
                                     hint="the save was probably interrupted; remove or re-save it", path=path)
    if kind in ("text", "binary"):
        lfs = head.startswith(b"version https://git-lfs")
        raise CorruptCheckpointError(
            f"not a {what}: the file is {'text' if kind == 'text' else 'neither a zip archive nor a pickle'}",
            hint="this is a Git LFS pointer: fetch the real file with `git lfs pull`" if lfs
            else "check that this is the file torch.save wrote", path=path)
    return kind


def _torch_load(src: Path | IO[bytes], path: Path, *, trust: bool, what: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True and the data-only allowlist; with ``trust`` a refused file is loaded again
    with weights_only=False (code runs: only on --trust-pickle); every failure becomes a typed error. ``src`` is
    the local path or a seekable file object (a remote file); ``path`` names it in messages."""
    import torch

    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(src, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CorruptCheckpointError(f"cannot unpickle the {what} ({_short(exc)})", hint=_CORRUPT_HINT,
                                         path=path) from exc
        needed = _unsafe_globals(src, exc)
        if not trust:
            raise UnsafePickleError(path, needed) from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CorruptCheckpointError(f"cannot read the {what} ({_short(exc)})", hint=_CORRUPT_HINT,
                                     path=path) from exc
    except Exception as exc:  # damaged pickles reach torch internals (AttributeError, TypeError, …)
        raise CorruptCheckpointError(f"cannot read the {what} ({type(exc).__name__}: {_short(exc)})",
                                     hint=_CORRUPT_HINT, path=path) from exc
    if not isinstance(src, Path):
        src.seek(0)
    return _load_trusted(src, path, mmap, needed, what)


def _load_trusted(src: Path | IO[bytes], path: Path, mmap: bool, needed: list[str], what: str) -> Any:
    import torch

    try:
        return torch.load(src, map_location="cpu", weights_only=False, mmap=mmap)
    except (ModuleNotFoundError, ImportError, AttributeError) as exc:
        missing = getattr(exc, "name", None) or _short(exc)
        raise InputError(
            f"the {what} pickles objects whose class cannot be imported here ({missing}); it needs: "
            + ", ".join(needed[:12]),
            hint="install the package that defines these classes (the training code), or re-save the weights "
                 "as a plain state_dict / safetensors",
            path=path,
        ) from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"cannot read the {what} ({_short(exc)})", hint=_CORRUPT_HINT,
                                     path=path) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    return msg.split(". ")[0][:200]  # torch appends long advice after the first sentence


def lazy_enabled() -> bool:
    """The torch-free reader is the default for torch zip files; ILR_INSPECT_TORCHZIP=0 restores torch.load."""
    return os.environ.get("ILR_INSPECT_TORCHZIP", "1") != "0"


def load_lazy(path: Path, *, trust: bool, what: str = "PyTorch checkpoint") -> Any:
    """Like :func:`load`, with :class:`LazyTensor` leaves for a torch zip archive (no torch import); legacy pickles
    and whatever the lazy reader cannot represent go through :func:`load` unchanged."""
    from . import _torchzip

    if lazy_enabled() and classify(read_head(path)) == "zip":
        try:
            return _torchzip.load_path(path, trust=trust, what=what)
        except _torchzip.NotLazy:
            pass
        except OSError as exc:
            raise InputError(f"cannot read the file ({exc.strerror or exc})", hint="check its permissions",
                             path=path) from exc
    return load(path, trust=trust, what=what)


def _ranged_readers(path: Path) -> dict[str, Any]:
    """_torchzip's readers of exact byte ranges of a remote file: one range, and several at once."""
    from ..storage import read_range, read_ranges

    return {"ranged": lambda a, b: read_range(path, a, b), "ranged_many": lambda spans: read_ranges(path, spans)}


def _load_stream(fh: IO[bytes], path: Path, *, trust: bool, what: str, remote: bool) -> Any:
    from . import _torchzip

    head = fh.read(len(ZIP_MAGIC))
    fh.seek(0)
    if head == ZIP_MAGIC and lazy_enabled():
        try:
            return _torchzip.load(fh, path=path, local=False, trust=trust, what=what,
                                  **(_ranged_readers(path) if remote else {}))
        except _torchzip.NotLazy:
            fh.seek(0)
    return _torch_load(fh, path, trust=trust, what=what)


# A remote torch file up to this size is fetched whole in one request: cheaper than a request per tensor.
WHOLE_BELOW = 1 << 20
# Read-ahead of a bigger remote torch zip's file object, which reads only its zip directory (data.pkl and the
# tensors are fetched by exact ranges).
ZIP_BLOCK = 32 * 1024


def load_file(path: Path, *, trust: bool, what: str = "PyTorch checkpoint") -> Any:
    """:func:`load_lazy` for a local path. For a URL (ilr_inspect.storage): a small file in one request; a bigger
    torch zip by ranged reads — its zip directory and data.pkl, then each tensor when it is read, never the whole
    file first (docs/scale-out.md). Same allowlist and errors as locally."""
    from ..storage import is_remote, open_binary, read_range
    from . import _torchzip

    if not is_remote(path):
        return load_lazy(path, trust=trust, what=what)
    if path.is_dir():
        read_head(path)  # the same "is a folder" error as locally
    size = path.stat().st_size
    if size <= WHOLE_BELOW:
        data = read_range(path, 0, size) if size else b""
        _checked_kind(data[:512], path, what)
        return _load_stream(io.BytesIO(data), path, trust=trust, what=what, remote=False)
    kind = _checked_kind(read_range(path, 0, 64), path, what)
    if kind == "zip" and lazy_enabled():
        fh = open_binary(path, ZIP_BLOCK)
        try:
            return _torchzip.load(fh, path=path, local=False, trust=trust, what=what, **_ranged_readers(path))
        except BaseException as exc:
            fh.close()
            if not isinstance(exc, _torchzip.NotLazy):
                raise
    # torch.load reads the whole file (a legacy pickle, or what only torch represents): large read-ahead blocks
    return _torch_load(open_binary(path, 8 << 20), path, trust=trust, what=what)


def is_tensor(v: Any) -> bool:
    """A ``torch.Tensor`` or a :class:`LazyTensor` (no torch import: without torch loaded there are none)."""
    if isinstance(v, LazyTensor):
        return True
    torch_mod = sys.modules.get("torch")
    return torch_mod is not None and isinstance(v, torch_mod.Tensor)


def is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and any(is_tensor(v) for v in obj.values()) and all(
        isinstance(k, str) for k in obj)


def tensors_only(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Drop non-tensor entries (``_extra_state``, None placeholders) of a state dict."""
    return {k: v for k, v in obj.items() if is_tensor(v)}


def strip_wrappers(sd: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes shared by every key."""
    stripped = ""
    changed = True
    while changed and sd:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped += p
                changed = True
    # torch.compile on a submodule leaves ``._orig_mod.`` inside names.
    if any("._orig_mod." in k for k in sd):
        sd = {k.replace("._orig_mod.", "."): v for k, v in sd.items()}
        stripped += "(inner)._orig_mod."
    return sd, stripped


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def to_numpy(t: Any) -> np.ndarray:
    """A CPU NumPy view (mmap-backed where possible); dtypes NumPy lacks are widened to float32."""
    if isinstance(t, LazyTensor):
        return t.numpy()
    import torch

    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16 or (t.is_floating_point() and t.element_size() == 1):
        t = t.float()
    elif t.dtype == torch.complex32:
        t = t.to(torch.complex64)
    arr: np.ndarray = t.numpy()
    return arr


def kind_of(name: str, t: Any) -> TensorKind:
    if guess_kind(name) == "buffer" or not (t.is_floating_point() or t.is_complex()):
        return "buffer"
    return "parameter"


class TorchDictSource:
    """TensorSource over a loaded (memory-mapped) torch state dict; tied aliases are listed once."""

    def __init__(self, tensors: Mapping[str, Any], kinds: Mapping[str, TensorKind] | None = None) -> None:
        self._t: dict[str, Any] = {}
        self.tied: dict[str, str] = {}
        seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], str], str] = {}
        for name, t in tensors.items():
            key = (_storage_ptr(t), int(t.storage_offset()), tuple(t.shape), tuple(t.stride()), str(t.dtype))
            if t.numel() > 0 and key[0] != 0 and key in seen:
                self.tied[name] = seen[key]  # same storage: state_dict() lists tied weights twice
                continue
            seen.setdefault(key, name)
            self._t[name] = t
        self._kinds = dict(kinds or {})

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(n, tuple(int(d) for d in t.shape), dtype_name(t.dtype), self._kinds.get(n, kind_of(n, t)))
            for n, t in self._t.items()
        ]

    def read(self, name: str) -> np.ndarray:
        return to_numpy(self._t[name])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(int(d) for d in t.shape) for n, t in self._t.items()}

    def close(self) -> None:
        self._t.clear()


def _storage_ptr(t: Any) -> int:
    if isinstance(t, LazyTensor):
        return id(t.storage)
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return 0


STEP_KEYS = ("step", "global_step", "iteration", "iter")


def find_step(obj: Mapping[str, Any], keys: tuple[str, ...] = STEP_KEYS) -> int | None:
    for k in keys:
        v: Any = obj.get(k)
        if is_tensor(v) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
    return None


def scalar_meta(obj: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Top-level plain values worth carrying into metadata (epoch, loss, versions, …)."""
    for k, v in obj.items():
        if is_tensor(v) and v.numel() == 1:
            yield str(k), v.item()
        elif isinstance(v, (int, float, str, bool)) or v is None:
            yield str(k), v


def map_optimizer(
    opt_sd: Any, infos: list[TensorInfo], *, label: str, path: Path,
    names_ordered: bool = True, source: str = "optimizer",
) -> tuple[dict[str, HParams], str | None]:
    """hparams for the trainable parameters, or ({}, reason) when the optimizer state cannot be mapped; a partial
    mapping (groups decided for some parameters only) comes with a note saying what is ambiguous."""
    from ..optim_state import map_optimizer_groups

    if not isinstance(opt_sd, Mapping) or "param_groups" not in opt_sd:
        return {}, f"{label} is not a torch optimizer state_dict"
    params = [i.name for i in infos if i.kind == "parameter"]
    shapes = {i.name: i.shape for i in infos}
    try:
        got = map_optimizer_groups(opt_sd, params, shapes, source=source, names_ordered=names_ordered, path=path)
        return got.hparams, (f"{label}: {got.note}" if got.note else None)
    except HParamsError as exc:
        return {}, f"{label}: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "")

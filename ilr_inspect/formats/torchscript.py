"""TorchScript archives (``torch.jit.save``): a zip with ``code/`` and ``constants.pkl`` beside the weights.

Parameters and buffers keep their module names; ``metadata["graph"] = "torchscript"`` and ``metadata["loader"]``
point to :func:`load_scripted` for graph-based unit detection.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorKind, guess_kind
from ..errors import CorruptCheckpointError, IlrError, InputError, UnsafePickleError
from . import ZIP_MAGIC, OpenOptions

NAME = "torchscript"
EXTRA = None
_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit", ".zip")


def sniff(path: Path) -> bool:
    if path.suffix.lower() not in _SUFFIXES or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            if fh.read(4) != ZIP_MAGIC:
                return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_scripted(path: str | Path) -> Any:
    """The ``torch.jit.ScriptModule`` in ``path``, on the CPU. Loading compiles and runs the archive's TorchScript
    (``__setstate__``), so this is only for a file the user named with ``--model`` (docs/security.md)."""
    import torch

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # the user's file is TorchScript
            return torch.jit.load(str(p), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:  # RuntimeError from a damaged archive or unknown ops
        raise CorruptCheckpointError(f"cannot load the TorchScript module ({str(exc).splitlines()[0][:200]})",
                                     hint="re-save it with torch.jit.save, or export it with torch.export", path=p
                                     ) from exc


_HINT = "re-save it with torch.jit.save, or save the state_dict as safetensors"
# torch.jit's pickler writes these helpers (pure list/tensor builders) beside tensors and __torch__ objects.
_LIST_BUILDERS = frozenset({"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"})
_STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_CLASS_RE = re.compile(r"^class (\w+)\(", re.M)
_DECL_RE = re.compile(r"^  (__parameters__|__buffers__) = \[(.*?)\]", re.M)


class _ScriptObject:
    """Inert stand-in for a ``__torch__`` class: holds the pickled state, runs no TorchScript."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _bad(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"not a readable TorchScript archive: {why}", hint=_HINT, path=path)


class _WeightsUnpickler(pickle.Unpickler):
    """Reads ``data.pkl`` with exact (module, name) globals; ``__torch__`` classes become :class:`_ScriptObject`."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path = zf, prefix, path
        self._stubs: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module.startswith("__torch__"):  # never imported: the class only names a stub
            qual = f"{module}.{name}"
            if qual not in self._stubs:
                self._stubs[qual] = type("ScriptObject", (_ScriptObject,), {"qualname": qual})
            return self._stubs[qual]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if module == "torch" and name in _STORAGES:
            return getattr(torch, _STORAGES[name])
        raise UnsafePickleError(self._path, [f"{module}.{name}"])

    def persistent_load(self, pid: Any) -> Any:
        import torch

        from ..safety import zip_member_bytes

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _bad(self._path, "unexpected persistent id in data.pkl")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _bad(self._path, "malformed storage reference in data.pkl")
        try:
            data = zip_member_bytes(self._zf, f"{self._prefix}data/{key}", path=self._path)
        except KeyError as exc:
            raise _bad(self._path, f"storage data/{key} is missing") from exc
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(data) != numel * itemsize:
            raise _bad(self._path, f"storage data/{key} holds {len(data)} bytes, not {numel} x {itemsize}")
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return flat


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> Any:
    import torch

    from ..safety import check_shape

    if not isinstance(storage, torch.Tensor):
        raise ValueError("tensor without storage")
    size_t = check_shape(size, name="tensor")
    stride_t = check_shape(stride, name="tensor")
    if not isinstance(offset, int) or offset < 0 or len(size_t) != len(stride_t):
        raise ValueError("bad tensor geometry")
    if 0 in size_t:
        return torch.empty(size_t, dtype=storage.dtype)
    last = offset + sum((a - 1) * b for a, b in zip(size_t, stride_t, strict=True))
    if last >= storage.numel():
        raise ValueError("tensor reaches past its storage")
    return torch.as_strided(storage, size_t, stride_t, offset)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _declarations(zf: zipfile.ZipFile, prefix: str, qual: str) -> tuple[list[str], list[str]] | None:
    """``__parameters__``/``__buffers__`` of one class, read as text from its code file (nothing compiled)."""
    from ..safety import zip_member_bytes

    module, _, cls = qual.rpartition(".")
    member = f"{prefix}code/{module.replace('.', '/')}.py"
    try:
        text = zip_member_bytes(zf, member, max_bytes=16 * 1024 * 1024).decode("utf-8", "replace")
    except (KeyError, InputError):
        return None
    starts = [(m.start(), m[1]) for m in _CLASS_RE.finditer(text)]
    for i, (pos, name) in enumerate(starts):
        if name != cls:
            continue
        block = text[pos: starts[i + 1][0] if i + 1 < len(starts) else len(text)]
        found = {m[1]: re.findall(r'"([^"]*)"', m[2]) for m in _DECL_RE.finditer(block)}
        return found.get("__parameters__", []), found.get("__buffers__", [])
    return None


def _walk(obj: _ScriptObject, prefix: str, zf: zipfile.ZipFile, root: str, seen: set[int],
          tensors: dict[str, Any], kinds: dict[str, TensorKind], skipped: list[str]) -> None:
    """state_dict order: the module's parameters, then buffers, then submodules (as ``Module.state_dict``)."""
    import torch

    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):  # a custom __getstate__ (e.g. packed quantized params): named, not dropped
        skipped.append(f"{prefix.rstrip('.') or '(root)'} ({obj.qualname}) has custom pickled state; "
                       "its tensors are not read")
        return
    decl = _declarations(zf, root, obj.qualname)
    if decl is None:  # class source not found: every tensor attribute, kind guessed from its name (noted)
        found = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        decl = ([k for k in found if guess_kind(k) == "parameter"], [k for k in found if guess_kind(k) != "parameter"])
        if found:
            skipped.append(f"{prefix.rstrip('.') or '(root)'} ({obj.qualname}): class source not found; "
                           "parameter/buffer kinds guessed from names")
    params, buffers = decl
    for names, kind in ((params, "parameter"), (buffers, "buffer")):
        for n in names:
            t = state.get(n)
            if isinstance(t, torch.Tensor):
                tensors[prefix + n] = t
                kinds[prefix + n] = "parameter" if kind == "parameter" else "buffer"
    for key, value in state.items():
        if isinstance(value, _ScriptObject):
            _walk(value, f"{prefix}{key}.", zf, root, seen, tensors, kinds, skipped)


def open(path: Path, options: OpenOptions) -> Checkpoint:
    """Weights of a TorchScript archive read from ``data.pkl`` with a restricted unpickler and the raw storages;
    ``torch.jit.load`` is never called here (it compiles and runs the archive's code; docs/security.md)."""
    from ._torchutil import TorchDictSource

    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise _bad(path, "not a zip file") from exc
    with zf:
        from ..safety import zip_member_bytes

        pkl = next((n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")), None)
        if pkl is None:
            raise _bad(path, "no <archive>/data.pkl member")
        root = pkl[: -len("data.pkl")]
        try:
            top = _WeightsUnpickler(zip_member_bytes(zf, pkl, max_bytes=256 * 1024 * 1024, path=path), zf, root,
                                    path).load()
        except (IlrError, RecursionError, MemoryError):
            raise
        except Exception as exc:  # truncated or hostile pickle stream
            raise _bad(path, f"data.pkl cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from exc
        if not isinstance(top, _ScriptObject):
            raise _bad(path, "data.pkl does not hold a scripted module")
        tensors: dict[str, Any] = {}
        kinds: dict[str, TensorKind] = {}
        skipped: list[str] = []
        _walk(top, "", zf, root, set(), tensors, kinds, skipped)
    if not tensors:
        raise _bad(path, "no parameters or buffers found" + (f" ({skipped[0]})" if skipped else ""))
    meta: dict[str, Any] = {"graph": "torchscript", "loader": f"{__name__}:load_scripted"}
    if skipped:
        meta["warnings"] = skipped
    return Checkpoint(path=path, format=NAME, source=TorchDictSource(tensors, kinds), metadata=meta)

"""Format registry: one module per on-disk format, each exposing ``NAME``, ``EXTRA``, ``sniff`` and ``open``.

``sniff(path) -> bool`` must be cheap (names, magic bytes, a directory listing) and must not import a framework;
``open(path, options) -> Checkpoint`` reads headers and hyperparameters, leaving tensor data on disk.
The registry is ordered most specific first: a Lightning ``.ckpt`` is also a torch zip, a Trainer
``checkpoint-N/`` folder also holds safetensors.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Protocol, cast

from ..checkpoint import Checkpoint
from ..errors import CorruptCheckpointError, IlrError, InputError, UnknownFormatError

# Every zip-based format (torch.save, TorchScript, torch.export, .keras, .npz) starts with this local-header magic.
ZIP_MAGIC = b"PK\x03\x04"

# Module names under ilr_inspect.formats, in sniffing order.
REGISTRY: tuple[str, ...] = (
    "hf_folder",
    "dcp",
    "orbax",
    "torch_export",
    "torchscript",
    "lightning",
    "torch_pickle",
    "safetensors_file",
    "onnx_file",
    "keras",
    "flax_msgpack",
    "npz",
)


@dataclass(frozen=True)
class OpenOptions:
    """Choices that change how a file is read (never how it is interpreted later)."""

    trust_pickle: bool = False
    key: str | None = None  # which entry of a training checkpoint holds the weights (e.g. "state_dict")
    ema: bool = False  # read the EMA weights (timm state_dict_ema, model_ema) as the series


class FormatModule(Protocol):
    NAME: str
    EXTRA: str | None

    def sniff(self, path: Path) -> bool: ...

    def open(self, path: Path, options: OpenOptions) -> Checkpoint: ...


def load_format(module_name: str) -> FormatModule:
    mod: ModuleType = importlib.import_module(f"{__name__}.{module_name}")
    return cast(FormatModule, mod)


def available() -> list[FormatModule]:
    return [load_format(m) for m in REGISTRY]


class _Staged:
    """A format without a ranged reader, for a remote path: the checkpoint is copied into a private temporary
    folder (ilr_inspect.storage.stage) and read there by the local reader; the checkpoint keeps its URL."""

    def __init__(self, fmt: FormatModule) -> None:
        self.NAME = fmt.NAME
        self.EXTRA = fmt.EXTRA
        self._fmt = fmt

    def sniff(self, path: Path) -> bool:
        return self._fmt.sniff(path)

    def open(self, path: Path, options: OpenOptions) -> Checkpoint:
        from ..storage import stage

        note: list[str] = []
        local = stage(path, note)
        ckpt = detect(local).open(local, options)
        ckpt.metadata.setdefault("warnings", []).extend(note)
        ckpt.metadata["staged_copy"] = str(local)
        ckpt.path = path
        return ckpt


def _remote_sniff(fmt: FormatModule, path: Path) -> bool:
    try:
        return fmt.sniff(path)
    except IlrError:
        raise
    except Exception:  # a sniffer that needs a local file (zipfile on a path): the staged copy decides
        return False


def detect(path: Path) -> FormatModule:
    """The first registered format that recognises ``path``. For a remote path (ilr_inspect.storage), a format
    whose module sets ``REMOTE = True`` reads it with ranged requests; any other is staged (:class:`_Staged`)."""
    from ..storage import is_remote

    if is_remote(path):
        if not path.exists():
            raise InputError("no such object or prefix", hint="check the URL", path=path)
        if path.is_file() and path.stat().st_size == 0:
            raise CorruptCheckpointError("the file is empty (0 bytes)",
                                         hint="the save was probably interrupted; remove or re-save it", path=path)
        for fmt in available():
            if _remote_sniff(fmt, path):
                return fmt if getattr(fmt, "REMOTE", False) else cast(FormatModule, _Staged(fmt))
        raise UnknownFormatError("not a checkpoint format ilr-inspect can read",
                                 hint="supported: " + ", ".join(m.NAME for m in available())
                                 + "; see `ilr-inspect formats`", path=path)
    if not path.exists():
        raise InputError("no such file or folder", hint="check the path", path=path)
    from ..safety import special_file

    if special_file(path):  # reading a FIFO or device would block or never end (docs/security.md)
        raise InputError("not a regular file (FIFO, device or socket)", hint="point at a checkpoint file",
                         path=path)
    if path.is_file():
        try:
            size = path.stat().st_size
            with path.open("rb"):
                pass
        except OSError as exc:
            raise InputError(f"cannot read the file ({exc.strerror})", hint="check its permissions", path=path) from exc
        if size == 0:
            raise CorruptCheckpointError(
                "the file is empty (0 bytes)", hint="the save was probably interrupted; remove or re-save it", path=path
            )
    for fmt in available():
        if fmt.sniff(path):
            return fmt
    raise UnknownFormatError(
        "not a checkpoint format ilr-inspect can read",
        hint="supported: " + ", ".join(m.NAME for m in available()) + "; see `ilr-inspect formats`",
        path=path,
    )


def sniffed(path: Path) -> str | None:
    """The NAME of the first registered format that recognises ``path``, or None — the one detection every caller
    (series, model discovery) shares. No checks, no errors: for deciding, not for reading."""
    from ..storage import is_remote

    for fmt in available():
        try:
            if fmt.sniff(path):
                return fmt.NAME
        except OSError:
            return None
        except Exception:
            if not is_remote(path):
                raise
    return None


def open_checkpoint(path: str | Path, options: OpenOptions | None = None) -> Checkpoint:
    """Open one checkpoint file or folder with the reader that recognises it."""
    from ..storage import to_path

    p = to_path(path)  # a URL (s3://...) becomes a remote path
    fmt = detect(p)
    return fmt.open(p, options or OpenOptions())

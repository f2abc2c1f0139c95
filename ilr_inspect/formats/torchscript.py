"""TorchScript archives (``torch.jit.save``): a zip with ``code/`` and ``constants.pkl`` beside the weights.

Parameters and buffers keep their module names; ``metadata["graph"] = "torchscript"`` and ``metadata["loader"]``
point to :func:`load_scripted` for graph-based unit detection.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorKind
from ..errors import CorruptCheckpointError
from . import OpenOptions

NAME = "torchscript"
EXTRA = None
_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit", ".zip")


def sniff(path: Path) -> bool:
    if path.suffix.lower() not in _SUFFIXES or not path.is_file():
        return False
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_scripted(path: str | Path) -> Any:
    """The ``torch.jit.ScriptModule`` in ``path`` (TorchScript IR, no Python pickle), on the CPU."""
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


def open(path: Path, options: OpenOptions) -> Checkpoint:
    from ._torchutil import TorchDictSource

    module = load_scripted(path)
    params = {name for name, _ in module.named_parameters()}
    # state_dict() keeps the module's own order (parameters and buffers interleaved, as torch.save would)
    tensors: dict[str, Any] = {n: t.detach() for n, t in module.state_dict().items()}
    kinds: dict[str, TensorKind] = {n: "parameter" if n in params else "buffer" for n in tensors}
    meta = {"graph": "torchscript", "loader": f"{__name__}:load_scripted"}
    return Checkpoint(path=path, format=NAME, source=TorchDictSource(tensors, kinds), metadata=meta)

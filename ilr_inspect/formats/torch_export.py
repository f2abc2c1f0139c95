"""``torch.export.save`` archives (``.pt2``): weights plus an ATen graph that needs no user code (formats.md §2.1.14).

``metadata["graph"] = "torch.export"`` and ``metadata["loader"]`` tell graph-based unit detection how to get the
program back (:func:`load_exported`). AOTInductor packages are also ``.pt2`` but carry no graph; they are refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, TensorKind
from ..errors import CorruptCheckpointError, InputError
from . import OpenOptions

NAME = "torch.export"
EXTRA = None


def _members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return []


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".pt2" and path.is_file()


def load_exported(path: str | Path) -> Any:
    """The ``torch.export.ExportedProgram`` stored in ``path`` (no pickle, no user code)."""
    import torch

    p = Path(path)
    names = _members(p)
    if not names:
        raise CorruptCheckpointError("not a torch.export archive (not a readable zip file)",
                                     hint="re-save it with torch.export.save", path=p)
    if not any(n.endswith("models/model.json") or n.endswith("serialized_exported_program.json") for n in names):
        raise InputError("this .pt2 holds no exported program (an AOTInductor package has no graph or names)",
                         hint="save with torch.export.save(ep, path) to keep the graph", path=p)
    try:
        return torch.export.load(str(p))
    except Exception as exc:  # serde errors from a damaged or version-mismatched archive
        raise CorruptCheckpointError(f"cannot load the exported program ({str(exc)[:200]})",
                                     hint="re-export it with this torch version", path=p) from exc


def open(path: Path, options: OpenOptions) -> Checkpoint:
    from ._torchutil import TorchDictSource

    ep = load_exported(path)
    sig = ep.graph_signature
    tensors: dict[str, Any] = {}
    kinds: dict[str, TensorKind] = {}
    for name in sig.parameters:
        tensors[name], kinds[name] = ep.state_dict[name], "parameter"
    for name in sig.buffers:
        t = ep.state_dict[name] if name in ep.state_dict else ep.constants.get(name)
        if t is not None:
            tensors[name], kinds[name] = t, "buffer"
    meta = {"graph": "torch.export", "loader": f"{__name__}:load_exported"}
    return Checkpoint(path=path, format=NAME, source=TorchDictSource(tensors, kinds), metadata=meta)

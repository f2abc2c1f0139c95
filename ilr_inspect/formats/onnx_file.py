"""ONNX models (``.onnx``): graph initializers as tensors, external data read lazily from the model's folder.

The graph tells us which initializers feed normalizers. A trap worth warning about: torch's default (dynamo)
export of an eval-mode model folds BatchNorm into the preceding Conv and keeps the conv's initializer name, so
that "weight" is not the trained tensor and no BatchNormalization node remains (docs/formats.md §2.1.12).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, TensorKind
from ..errors import CorruptCheckpointError, InputError, require
from . import OpenOptions
from .flax_msgpack import widen

NAME = "onnx"
EXTRA: str | None = "onnx"

NORMALIZER_OPS = frozenset({"BatchNormalization", "LayerNormalization", "GroupNormalization", "InstanceNormalization"})
_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_FLOAT_KINDS = "fc"


def sniff(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".onnx"


def _onnx() -> Any:
    return require("onnx", "onnx", "reading ONNX models")


def load_graph(path: Path) -> Any:
    """The ``onnx.ModelProto`` with its graph; external tensor data is left on disk (not loaded)."""
    onnx = _onnx()
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises ValueError/OSError
        raise CorruptCheckpointError(
            f"cannot parse the ONNX model ({type(exc).__name__}: {exc})",
            hint="the file may be truncated or not an ONNX model",
            path=path,
        ) from exc


def _external_location(tensor: Any) -> str | None:
    for entry in tensor.external_data:
        if entry.key == "location":
            return str(entry.value)
    return None


def _check_external(path: Path, tensor: Any) -> None:
    """External data must be a file inside the model's folder (never an absolute path or ``..`` escape)."""
    location = _external_location(tensor)
    folder = path.parent.resolve()
    target = (folder / location).resolve() if location else None
    if location is None or os.path.isabs(location) or target is None or not target.is_relative_to(folder):
        raise InputError(
            f"initializer {tensor.name!r} points to external data outside the model's folder ({location!r})",
            hint="keep the external data file next to the .onnx file",
            path=path,
        )
    if not target.is_file():
        raise CorruptCheckpointError(
            f"external data file {location!r} for initializer {tensor.name!r} is missing",
            hint="copy the .data file that was saved with the model next to it",
            path=path,
        )


class OnnxSource:
    def __init__(self, path: Path, model: Any) -> None:
        self.path = path
        self._onnx = _onnx()
        self._tensors: dict[str, Any] = {t.name: t for t in model.graph.initializer}
        buffers = _buffer_names(model)
        self._infos: list[TensorInfo] = []
        helper = self._onnx.helper
        for t in model.graph.initializer:
            if t.data_location == self._onnx.TensorProto.EXTERNAL:
                _check_external(path, t)
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
            except (KeyError, TypeError, ValueError) as exc:
                raise CorruptCheckpointError(
                    f"initializer {t.name!r} has unknown data type {t.data_type}", hint="re-export the model", path=path
                ) from exc
            # Shape constants and indices (int64 initializers) are not trainable; neither are BN statistics.
            kind: TensorKind = "buffer" if t.name in buffers or dtype.kind not in _FLOAT_KINDS else "parameter"
            self._infos.append(TensorInfo(t.name, tuple(int(d) for d in t.dims), dtype.name, kind))

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        # Copy the (data-less) proto so loading external bytes does not pin them inside the model afterwards.
        tensor = self._onnx.TensorProto()
        tensor.CopyFrom(self._tensors[name])
        try:
            arr = self._onnx.numpy_helper.to_array(tensor, base_dir=str(self.path.parent))
        except (OSError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"cannot read initializer {name!r} ({exc})", hint="the model or its data file may be truncated",
                path=self.path,
            ) from exc
        return widen(np.asarray(arr))

    def close(self) -> None:
        self._tensors.clear()


def _buffer_names(model: Any) -> set[str]:
    """Running mean/variance inputs of BatchNormalization nodes (inputs 3 and 4)."""
    out: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            out.update(n for n in list(node.input)[3:5] if n)
    return out


def graph_summary(model: Any) -> dict[str, Any]:
    """Normalizer op counts and the folded-BatchNorm warning (see module docstring)."""
    ops = [n.op_type for n in model.graph.node]
    normalizers = {op: ops.count(op) for op in sorted(NORMALIZER_OPS) if op in ops}
    convs = sum(ops.count(op) for op in _CONV_OPS)
    warnings: list[str] = []
    if convs and not normalizers:
        warnings.append(
            f"the graph has {convs} Conv node(s) but no normalization node: an eval-mode export (torch's default) "
            "folds BatchNorm into the preceding Conv while keeping the conv's initializer name, so those weights "
            "are not the trained checkpoint's; export in training mode with do_constant_folding=False to keep BN"
        )
    return {
        "has_normalizers": bool(normalizers),
        "normalizers": normalizers,
        "conv_nodes": convs,
        "nodes": len(ops),
        "opset": {o.domain or "ai.onnx": int(o.version) for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "warnings": warnings,
    }


def open(path: Path, options: OpenOptions) -> Checkpoint:
    model = load_graph(path)
    source = OnnxSource(path, model)
    metadata = graph_summary(model)
    # Keep the graph structure (cheap without tensor data) out of the Checkpoint; load_graph(path) gives it back.
    return Checkpoint(path=path, format=NAME, source=source, metadata=metadata)

"""The data model every reader produces: a lazy checkpoint with tensor headers and per-parameter hyperparameters.

Readers (``ilr_inspect.formats.*``) build a :class:`Checkpoint` from a :class:`TensorSource`; nothing here imports
a framework. Tensor data is read only when asked for, as NumPy arrays (bfloat16 and other types NumPy lacks are
widened to float32 by the reader).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

TensorKind = Literal["parameter", "buffer"]
StepSource = Literal["contents", "name", "order"]
WdMode = Literal["coupled", "decoupled", "unscaled"]

_DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
    "complex64": 8, "complex128": 16,
}

# Names that are state, not trainable parameters, in every framework we read (running stats, counters).
_BUFFER_SUFFIXES = (
    "running_mean", "running_var", "num_batches_tracked", "moving_mean", "moving_variance",
    "batch_stats", "mean", "var",
)


def guess_kind(name: str) -> TensorKind:
    """Tell buffers from parameters by name when the format does not record it."""
    leaf = name.replace("/", ".").rsplit(".", 1)[-1]
    return "buffer" if leaf in _BUFFER_SUFFIXES or "batch_stats" in name else "parameter"


def dtype_bytes(dtype: str) -> int:
    return _DTYPE_BYTES.get(dtype, 4)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Header of one stored tensor: enough to plan work without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: TensorKind = "parameter"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)


@dataclass(frozen=True, slots=True)
class HParams:
    """Optimizer hyperparameters in effect for one parameter at one checkpoint, with where they came from.

    ``lr`` is the value the optimizer would use for its *next* update when it comes from saved optimizer state
    (``lr_timing="next"``); values read from training logs are usually the one *used* at that step
    (``lr_timing="used"``). ``momentum`` is SGD momentum or Adam's β1.
    """

    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    beta2: float | None = None
    optimizer: str | None = None
    wd_mode: WdMode | None = None
    source: str = "unknown"
    lr_timing: Literal["next", "used"] = "next"
    nesterov: bool = False
    dampening: float = 0.0
    eps: float | None = None

    def merged(self, other: HParams) -> HParams:
        """Fill this record's missing fields from ``other`` (self wins); sources are joined."""
        updates: dict[str, Any] = {}
        used_other = False
        for f in ("lr", "weight_decay", "momentum", "beta2", "optimizer", "wd_mode", "eps"):
            if getattr(self, f) is None and getattr(other, f) is not None:
                updates[f] = getattr(other, f)
                used_other = True
        if used_other:
            updates["source"] = self.source if self.source == other.source else f"{self.source}+{other.source}"
            if self.lr is None and other.lr is not None:
                updates["lr_timing"] = other.lr_timing
        return replace(self, **updates) if updates else self


class TensorSource(Protocol):
    """What a format module implements: headers up front, data on demand."""

    def infos(self) -> list[TensorInfo]:
        """Every tensor, in storage order, with framework spelling of names."""
        ...

    def read(self, name: str) -> np.ndarray:
        """One tensor's data as a NumPy array (a view into a memory map where the format allows)."""
        ...

    def close(self) -> None: ...


@dataclass
class Checkpoint:
    """One checkpoint of a series: headers, step, hyperparameters; tensor data read lazily from ``source``."""

    path: Path
    format: str
    source: TensorSource
    step: int | None = None
    step_source: StepSource = "order"
    hparams: dict[str, HParams] = field(default_factory=dict)
    hparams_source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    _infos: dict[str, TensorInfo] | None = field(default=None, repr=False)
    # Zero-argument loader of the saved optimizer state (measure.step_angle.SavedOptimizerState), or None when
    # none was saved; readers set it without reading the state, which is converted only when called.
    optimizer_state: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        if self._infos is None:
            self._infos = {t.name: t for t in self.source.infos()}
        return self._infos

    @property
    def parameters(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.kind == "parameter"]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            from .errors import InputError

            raise InputError(f"no tensor named {name!r} in this checkpoint", path=self.path)
        return self.source.read(name)

    def iter_arrays(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, array) in storage order, one tensor alive at a time on the caller's side."""
        wanted = set(self.tensors) if names is None else set(names)
        for name in self.tensors:
            if name in wanted:
                yield name, self.source.read(name)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DictSource:
    """A TensorSource over arrays already in memory (small formats, tests, converted optimizer-free files)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], kinds: Mapping[str, TensorKind] | None = None) -> None:
        self._arrays = dict(arrays)
        self._kinds = dict(kinds or {})

    def infos(self) -> list[TensorInfo]:
        return [
            TensorInfo(n, tuple(int(d) for d in a.shape), str(a.dtype), self._kinds.get(n, guess_kind(n)))
            for n, a in self._arrays.items()
        ]

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def close(self) -> None:
        self._arrays.clear()

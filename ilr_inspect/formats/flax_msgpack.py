"""Flax msgpack files (``flax.serialization.to_bytes`` / ``msgpack_serialize``; HF ``flax_model.msgpack``).

Decoded with the ``msgpack`` package alone: Flax encodes each array as msgpack ext type 1 holding a nested msgpack
``(shape, dtype name, row-major bytes)`` (ext 3 = NumPy scalar, 2 = complex), and splits arrays above 1 GiB into
``{"__msgpack_chunked_array__": True, "shape": …, "chunks": …}`` (flax/serialization.py). Nothing is unpickled.
msgpack has no index, so the whole file is decoded once at open; arrays are built from their bytes on ``read``.

Also holds the pytree naming rules shared with the Orbax reader.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, HParams, TensorInfo, TensorKind, guess_kind
from ..errors import CorruptCheckpointError, require
from . import OpenOptions

NAME = "flax-msgpack"
EXTRA: str | None = "jax"

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
# Top-level pytree entries that hold optimizer state (flax TrainState, common training loops), not the model.
OPTIMIZER_KEYS = frozenset({"opt_state", "optimizer", "opt", "optimizer_state", "tx_state"})
# Float types NumPy lacks; readers widen them to float32 (checkpoint.py contract).
_NONNATIVE_FLOATS = ("bfloat16", "float8", "float4", "float6")


def widen(arr: np.ndarray) -> np.ndarray:
    """bfloat16/float8 arrays (ml_dtypes) as float32; everything else unchanged."""
    if arr.dtype.name.startswith(_NONNATIVE_FLOATS):
        return arr.astype(np.float32)
    return arr


def sniff(path: Path) -> bool:
    if not path.is_file() or path.suffix.lower() != ".msgpack":
        return False
    with path.open("rb") as f:
        first = f.read(1)
    # A Flax state dict is a msgpack map: fixmap (0x80-0x8f), map16 (0xde) or map32 (0xdf).
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


@dataclass(frozen=True, slots=True)
class _Leaf:
    """One array's header and undecoded bytes (or its chunks)."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes | tuple[_Leaf, ...]

    def array(self) -> np.ndarray:
        if isinstance(self.data, tuple):
            return np.concatenate([c.array().reshape(-1) for c in self.data]).reshape(self.shape)
        if self.dtype == "bfloat16":  # no NumPy dtype: take the upper 16 bits of a float32
            u16 = np.frombuffer(self.data, dtype="<u2")
            return (u16.astype(np.uint32) << 16).view(np.float32).reshape(self.shape)
        return widen(np.frombuffer(self.data, dtype=_np_dtype(self.dtype)).reshape(self.shape))


def _np_dtype(name: str) -> np.dtype[Any]:
    try:
        return np.dtype(name)
    except TypeError:
        ml_dtypes: Any = require("ml_dtypes", "jax", f"reading {name} arrays")
        dtype: np.dtype[Any] = np.dtype(getattr(ml_dtypes, name))
        return dtype


def _checked_leaf(shape: Any, dtype: Any, buf: Any) -> _Leaf:
    """An array header from untrusted bytes: ValueError (reported with the file) unless shape, dtype and data size
    agree — negative/overflowing shapes and unknown dtypes are errors, never silent drops (docs/security.md)."""
    from ..errors import InputError
    from ..safety import check_shape

    if not isinstance(shape, list | tuple) or not isinstance(dtype, bytes) or not isinstance(buf, bytes):
        raise ValueError("malformed array header")
    try:
        dims = check_shape(shape, name="array")
    except InputError as exc:
        raise ValueError(exc.message) from exc
    name = dtype.decode("ascii", "replace")
    if name == "bfloat16":
        itemsize = 2
    else:
        try:
            np_dtype = _np_dtype(name)
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"unknown dtype {name!r}") from exc
        if np_dtype.kind not in "biufc" or np_dtype.names is not None:
            raise ValueError(f"array dtype {name!r} is not numeric")
        itemsize = np_dtype.itemsize
    if len(buf) != int(np.prod(dims, dtype=np.float64)) * itemsize:
        raise ValueError(f"array data holds {len(buf)} bytes, not shape {list(dims)} x {name}")
    return _Leaf(dims, name, bytes(buf))


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
        shape, dtype, buf = msgpack.unpackb(data, raw=True)
        return _checked_leaf(shape, dtype, buf)
    if code == _EXT_COMPLEX:
        re, im = msgpack.unpackb(data)
        return complex(re, im)
    return msgpack.ExtType(code, data)


def _unchunk(node: Mapping[str, Any]) -> _Leaf:
    shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
    chunks = tuple(node["chunks"][str(i)] for i in range(len(node["chunks"])))
    if not chunks or not all(isinstance(c, _Leaf) for c in chunks):
        raise ValueError("malformed chunked array")
    return _Leaf(shape, chunks[0].dtype, chunks)


def flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(name, leaf) pairs of a nested dict/list, names joined with '/' in storage order."""
    if isinstance(tree, Mapping):
        if tree.get(_CHUNKED) is True:
            yield prefix, _unchunk(tree)
            return
        items: Any = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        yield prefix, tree
        return
    for k, v in items:
        key = k.decode() if isinstance(k, bytes) else str(k)
        yield from flatten(v, f"{prefix}/{key}" if prefix else key)


def pytree_kind(name: str, has_params_collection: bool) -> TensorKind | None:
    """Kind of one flattened pytree leaf; None for optimizer state (not a model tensor).

    With a Flax ``params`` collection at the top, only ``params/...`` are trainable; ``batch_stats`` and other
    collections are state. Without one (a bare params dict, HF ``flax_model.msgpack``), fall back to names.
    """
    top = name.split("/", 1)[0]
    if top in OPTIMIZER_KEYS:
        return None
    if has_params_collection:
        return "parameter" if top == "params" else "buffer"
    return guess_kind(name)


def stored_step(value: Any) -> int | None:
    """An integer step counter stored as a Python int or a 0-d integer array."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iu":
        return int(value)
    return None


# optax.inject_hyperparams keeps its hyperparameters in the optimizer state: ``…/hyperparams/<name>``.
_OPTAX_FIELDS = {"learning_rate": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "b1": "momentum",
                 "b2": "beta2", "eps": "eps"}


def is_optax_hyperparam(name: str) -> bool:
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "hyperparams" and parts[-1] in _OPTAX_FIELDS


def optax_hparams(values: Mapping[str, float]) -> HParams | None:
    """Hyperparameters stored by ``optax.inject_hyperparams`` (the first such transform in a chain wins).

    optax evaluates a scheduled value at the state's count and stores it with the update that used it, so the
    learning rate is the one *used* by the last step. Which optimizer (and so the weight-decay mode) is not stored.
    """
    fields: dict[str, float] = {}
    for name, value in values.items():
        if is_optax_hyperparam(name):
            fields.setdefault(_OPTAX_FIELDS[name.rsplit("/", 1)[-1]], float(value))
    if not fields:
        return None
    return HParams(lr=fields.get("lr"), weight_decay=fields.get("weight_decay"), momentum=fields.get("momentum"),
                   beta2=fields.get("beta2"), eps=fields.get("eps"), source="optax:inject_hyperparams",
                   lr_timing="used")


class FlaxMsgpackSource:
    def __init__(self, path: Path, leaves: dict[str, _Leaf], kinds: dict[str, TensorKind]) -> None:
        self.path = path
        self._leaves = leaves
        self._infos = [TensorInfo(n, leaf.shape, leaf.dtype, kinds[n]) for n, leaf in leaves.items()]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        try:
            return self._leaves[name].array()
        except ValueError as exc:  # byte count does not match shape × dtype
            raise CorruptCheckpointError(
                f"array {name!r} is malformed ({exc})", hint="the file may be truncated; re-save it", path=self.path
            ) from exc

    def close(self) -> None:
        self._leaves.clear()


def _decode(path: Path) -> Any:
    msgpack: Any = require("msgpack", "jax", "reading Flax msgpack checkpoints")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # One pass over the mapped file; ext payloads are copied out, so the map can close afterwards.
        return msgpack.unpackb(mm, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def open(path: Path, options: OpenOptions) -> Checkpoint:
    try:
        tree = _decode(path)
        flat = list(flatten(tree))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:  # msgpack raises ValueError subclasses
        raise CorruptCheckpointError(
            f"not a valid Flax msgpack file ({type(exc).__name__}: {exc})",
            hint="the file may be truncated; Flax writes these with flax.serialization.to_bytes",
            path=path,
        ) from exc
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(
            "the msgpack file does not hold a state dict (top level is not a map)", hint="check the file", path=path
        )
    has_params = isinstance(tree.get("params"), Mapping)
    leaves: dict[str, _Leaf] = {}
    kinds: dict[str, TensorKind] = {}
    optimizer: list[str] = []
    opt_leaves: dict[str, Callable[[], np.ndarray]] = {}  # read only if the step angle is asked for
    hyper: dict[str, float] = {}
    for name, value in flat:
        if not isinstance(value, _Leaf):
            continue
        kind = pytree_kind(name, has_params)
        if kind is None:
            optimizer.append(name)
            opt_leaves[name] = value.array
            if value.shape == () and is_optax_hyperparam(name):
                hyper[name] = float(value.array())
            continue
        if name == "step" and value.shape == ():
            continue  # the step counter, reported as the checkpoint's step
        leaves[name] = value
        kinds[name] = kind
    raw_step = tree.get("step")
    step = stored_step(raw_step.array() if isinstance(raw_step, _Leaf) else raw_step)
    metadata: dict[str, Any] = {"layout": "flax params collection" if has_params else "bare state dict"}
    if optimizer:
        metadata["optimizer_tensors"] = len(optimizer)
    hp = optax_hparams(hyper)
    return Checkpoint(
        path=path,
        format=NAME,
        source=FlaxMsgpackSource(path, leaves, kinds),
        step=step,
        step_source="contents" if step is not None else "order",
        hparams={n: hp for n, k in kinds.items() if k == "parameter"} if hp else {},
        hparams_source=hp.source if hp else None,
        metadata=metadata,
        optimizer_state=_optimizer_loader(opt_leaves, [n for n, k in kinds.items() if k == "parameter"], hp),
    )


def _optimizer_loader(leaves: dict[str, Callable[[], np.ndarray]], params: list[str], hp: HParams | None) -> Any:
    from ..measure.step_angle import optax_tree_loader

    return optax_tree_loader(leaves, params, hp)

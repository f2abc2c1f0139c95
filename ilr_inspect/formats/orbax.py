"""Orbax checkpoint step folders (``CheckpointManager``: ``<root>/<step>/<item>/``), read with tensorstore, no JAX.

Each PyTree item folder holds ``_METADATA`` (JSON: the tree's key paths and value types) and the arrays, stored as
zarr (v2, or zarr3 when ``use_zarr3``) inside an OCDBT key-value store (``manifest.ocdbt`` + ``d/``) or, in old
checkpoints, as one zarr directory per array. Orbax names each array by its key path joined with '.'
(orbax/checkpoint/_src/metadata/tree.py) and opens it with a ``zarr`` spec over an ``ocdbt`` kvstore whose base is
the item folder (orbax/checkpoint/_src/serialization/tensorstore_utils.py, ``ArrayReadSpec``). We build the same
spec here; shapes and dtypes come from the zarr headers, data only on ``read``.

Nothing in ``_METADATA`` is used as a file path: the kvstore base is always the item folder, and for non-OCDBT
checkpoints a key path that would resolve outside it is refused (a crafted ``_METADATA`` must not read
arbitrary files).

The step is the folder's number (what ``CheckpointManager`` records); it counts as read from the contents only when
the tree itself stores the same ``step`` (e.g. a Flax ``TrainState``).

Hyperparameters, each field from the first of (docs/formats.md): an optimizer item (``opt_state``, ``optimizer``…)
or ``opt_state`` subtree whose ``optax.inject_hyperparams`` state keeps ``hyperparams/learning_rate`` etc. (the
values the last update used); the step's ``_CHECKPOINT_METADATA`` ``custom_metadata`` (``save(...,
custom_metadata=...)``); the run's ``<root>/metadata/_ROOT_METADATA`` ``custom_metadata``
(``CheckpointManager(..., metadata=...)``). Metadata keys are matched like sidecar files (``lr``/
``learning_rate``, ``weight_decay``/``wd``, ``momentum``/``b1``, ``optimizer``…); an optimizer name sets the
weight-decay mode (optax ``adamw`` decays decoupled, ``add_decayed_weights`` before ``sgd`` is coupled).
``metadata['hparam_sources']`` names the source of each field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import safety
from ..checkpoint import Checkpoint, HParams, StepSource, TensorInfo, TensorKind
from ..errors import CorruptCheckpointError, IlrError, InputError, require
from . import OpenOptions
from .flax_msgpack import OPTIMIZER_KEYS, is_optax_hyperparam, optax_hparams, pytree_kind, stored_step, widen

NAME = "orbax"
EXTRA: str | None = "jax"

_ARRAY_TYPES = frozenset({"np.ndarray", "jax.Array", "scalar"})
_TMP_MARK = ".orbax-checkpoint-tmp"
_STEP_NAME = re.compile(r"^(?:.*?_)?(\d+)$")


def _is_item(folder: Path) -> bool:
    return (folder / "_METADATA").is_file()


def sniff(path: Path) -> bool:
    """A step folder (or a single PyTree item folder); False for the root that holds step folders."""
    if not path.is_dir() or _TMP_MARK in path.name:
        return False
    if (path / "_CHECKPOINT_METADATA").is_file() or _is_item(path):
        return True
    try:
        return any(child.is_dir() and _is_item(child) for child in path.iterdir())
    except OSError:
        return False


class OrbaxSource:
    def __init__(self, path: Path, arrays: dict[str, Any], infos: list[TensorInfo]) -> None:
        self.path = path
        self._arrays = arrays
        self._infos = infos

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        try:
            arr = self._arrays[name].read().result()
        except ValueError as exc:  # tensorstore reports missing/corrupt chunks as ValueError
            raise CorruptCheckpointError(
                f"cannot read array {name!r} ({exc})", hint="the checkpoint's data files may be incomplete",
                path=self.path,
            ) from exc
        return widen(np.asarray(arr))

    def close(self) -> None:
        self._arrays.clear()


def _item_folders(path: Path) -> list[Path]:
    if _is_item(path):
        return [path]
    return sorted(c for c in path.iterdir() if c.is_dir() and _is_item(c))


def _load_metadata(item: Path) -> Mapping[str, Any]:
    try:
        from ..safety import load_json  # size/nesting limits (docs/security.md)

        meta = load_json(item / "_METADATA", what="_METADATA")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"cannot read {item.name}/_METADATA ({exc})", hint="the checkpoint may be incomplete", path=item
        ) from exc
    if not isinstance(meta, Mapping):
        raise CorruptCheckpointError("_METADATA is not a JSON object", hint="check the checkpoint", path=item)
    return meta


def _leaves(item: Path, meta: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(key path, value type) of every array leaf, in the order _METADATA lists them."""
    tree = meta.get("tree_metadata")
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(
            "_METADATA has no tree_metadata (an Orbax version this reader does not know)",
            hint="restore with orbax and re-save, or report the Orbax version",
            path=item,
        )
    out: list[tuple[tuple[str, ...], str]] = []
    for entry in tree.values():
        try:
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            value = entry.get("value_metadata") or {}
            vtype = str(value.get("value_type", ""))
            skip = bool(value.get("skip_deserialize", False))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"malformed _METADATA entry ({exc})", hint="the checkpoint may be corrupt", path=item
            ) from exc
        if vtype in _ARRAY_TYPES and not skip and keys:
            out.append((keys, vtype))
    return out


def _spec(item: Path, param: str, use_ocdbt: bool, use_zarr3: bool) -> dict[str, Any]:
    base = str(item.resolve()) + "/"
    if use_ocdbt:
        # An OCDBT key is not a file path: whatever `param` says, data comes from this item's own manifest.
        kvstore: dict[str, Any] = {"driver": "ocdbt", "base": {"driver": "file", "path": base}, "path": param}
    else:
        target = (item / param).resolve()
        if Path(param).is_absolute() or not target.is_relative_to(item.resolve()):
            raise InputError(
                f"_METADATA names an array outside the checkpoint folder ({param!r}); refusing to read it",
                hint="this checkpoint was crafted or corrupted; do not trust it",
                path=item,
            )
        kvstore = {"driver": "file", "path": str(target) + "/"}
    return {"driver": "zarr3" if use_zarr3 else "zarr", "kvstore": kvstore, "recheck_cached_data": False,
            "recheck_cached_metadata": False}


def _step_from_name(path: Path) -> int | None:
    m = _STEP_NAME.match(path.name)
    return int(m.group(1)) if m else None


def open(path: Path, options: OpenOptions) -> Checkpoint:
    ts: Any = require("tensorstore", "jax", "reading Orbax checkpoints")
    items = _item_folders(path)
    if not items:
        raise InputError(
            "an Orbax step folder without any PyTree item (no */_METADATA)",
            hint="point at a step folder such as ckpts/100, or the root holding them",
            path=path,
        )
    context = ts.Context()
    # (display name, name inside its tree, kind, open future); all opens run concurrently.
    pending: list[tuple[str, str, TensorKind | None, Any]] = []
    single = len(items) == 1
    skipped_items = sorted(c.name for c in path.iterdir() if c.is_dir() and c not in items) if path not in items \
        else []
    for item in items:
        meta = _load_metadata(item)
        use_ocdbt = bool(meta.get("use_ocdbt", (item / "manifest.ocdbt").is_file()))
        use_zarr3 = bool(meta.get("use_zarr3", False))
        leaves = _leaves(item, meta)
        has_params = any(keys[0] == "params" for keys, _ in leaves)
        optimizer_item = item.name in OPTIMIZER_KEYS  # Composite(..., opt_state=StandardSave(opt_state))
        for keys, _vtype in leaves:
            tree_name = "/".join(keys)
            display = tree_name if single else f"{item.name}/{tree_name}"
            spec = _spec(item, ".".join(keys), use_ocdbt, use_zarr3)
            future = ts.open(spec, read=True, context=context)
            kind = None if optimizer_item else pytree_kind(tree_name, has_params)
            pending.append((display, tree_name, kind, future))
    arrays: dict[str, Any] = {}
    infos: list[TensorInfo] = []
    optimizer = 0
    hyper: dict[str, float] = {}
    stored: int | None = None
    for display, tree_name, kind, future in pending:
        try:
            handle = future.result()
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"cannot open array {display!r} ({exc})", hint="the checkpoint's data files may be incomplete",
                path=path,
            ) from exc
        shape = tuple(int(d) for d in handle.shape)
        if kind is None:
            optimizer += 1
            if shape == () and is_optax_hyperparam(tree_name):
                hyper[tree_name] = float(np.asarray(handle.read().result()))
            continue
        if tree_name == "step" and shape == ():
            stored = stored_step(np.asarray(handle.read().result()))
            continue
        arrays[display] = handle
        infos.append(TensorInfo(display, shape, str(np.dtype(handle.dtype.numpy_dtype).name), kind))
    metadata: dict[str, Any] = {"items": [i.name for i in items] if path not in items else ["."]}
    if skipped_items:
        metadata["other_items"] = skipped_items
    if optimizer:
        metadata["optimizer_tensors"] = optimizer
    step = _step_from_name(path)
    step_source: StepSource = "name" if step is not None else "order"
    metadata["step_from"] = "folder name" if step is not None else "none"
    if stored is not None:
        metadata["stored_step"] = stored
        if step is None:
            step, step_source, metadata["step_from"] = stored, "contents", "stored step"
        elif stored == step:
            step_source, metadata["step_from"] = "contents", "folder name, confirmed by the stored step"
        else:
            metadata.setdefault("warnings", []).append(
                f"the folder says step {step} but the tree stores step {stored}; using the folder's"
            )
    hp = _combine(optax_hparams(hyper), _custom_hparams(path, metadata), metadata)
    return Checkpoint(path=path, format=NAME, source=OrbaxSource(path, arrays, infos), step=step,
                      step_source=step_source, metadata=metadata,
                      hparams={t.name: hp for t in infos if t.kind == "parameter"} if hp else {},
                      hparams_source=hp.source if hp else None)


def _custom_metadata(file: Path, what: str, metadata: dict[str, Any]) -> Mapping[str, Any] | None:
    if not safety.regular_file(file):
        return None
    try:
        data = safety.load_json(file, what=what)
    except IlrError as exc:  # weights stay readable; the note says why these values are missing
        metadata.setdefault("warnings", []).append(f"{what} not read: {exc.message}")
        return None
    custom = data.get("custom_metadata") if isinstance(data, Mapping) else None
    return custom if isinstance(custom, Mapping) and custom else None


def _custom_hparams(path: Path, metadata: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Canonical hyperparameters from the step's and the run's Orbax custom metadata, most specific first."""
    from ..logs import sidecar

    found: list[tuple[str, dict[str, Any]]] = []
    for source, file, what in (
        ("orbax:step_metadata", path / "_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA"),
        ("orbax:root_metadata", path.parent / "metadata" / "_ROOT_METADATA", "metadata/_ROOT_METADATA"),
    ):
        custom = _custom_metadata(file, what, metadata)
        if custom is None:
            continue
        metadata[source.split(":", 1)[1]] = dict(custom)
        values, _notes = sidecar.extract(dict(custom))
        if source == "orbax:step_metadata" and isinstance(custom.get("epoch"), int):
            metadata.setdefault("epoch", custom["epoch"])
        if values:
            found.append((source, values))
    return found


_FIELDS = ("lr", "weight_decay", "momentum", "beta2", "eps")


def _combine(optax: HParams | None, custom: list[tuple[str, dict[str, Any]]],
             metadata: dict[str, Any]) -> HParams | None:
    """Each field from the first source that has it: inject_hyperparams, then step, then run metadata."""
    from ..logs.tags import optimizer_family, wd_mode_of

    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if optax is not None:
        for f in _FIELDS:
            if getattr(optax, f) is not None:
                values[f], origin[f] = getattr(optax, f), optax.source
    for source, found in custom:
        for f in (*_FIELDS, "optimizer"):
            v = found.get(f)
            if f not in values and v is not None and (f == "optimizer" or isinstance(v, int | float)):
                values[f], origin[f] = (str(v) if f == "optimizer" else float(v)), source
    if not values:
        return None
    family = optimizer_family(values["optimizer"]) if "optimizer" in values else None
    mode = wd_mode_of(family)
    metadata["hparam_sources"] = dict(origin)
    if mode is not None:
        metadata["hparam_sources"]["wd_mode"] = origin["optimizer"]
    sources = list(dict.fromkeys(origin.values()))
    return HParams(
        lr=values.get("lr"), weight_decay=values.get("weight_decay"), momentum=values.get("momentum"),
        beta2=values.get("beta2"), eps=values.get("eps"), optimizer=values.get("optimizer"), wd_mode=mode,
        source="+".join(sources), lr_timing="used",
    )

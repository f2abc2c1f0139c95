"""Keras 3 ``.keras`` archives and ``.weights.h5`` files, read with ``zipfile`` + ``h5py`` (no TensorFlow/Keras).

Keras 3 (keras/src/saving/saving_lib.py, ``H5IOStore``) writes each saveable's variables by position under
``<h5 path>/vars/0, 1, …``; the ``vars`` group carries the object's ``name`` attribute, and the h5 path uses the
snake-cased class name for list items (``layers/conv2d_1``) or the attribute name (``…/query_dense``). Variable
names are not stored, so roles (kernel, bias, gamma, …) come from each layer's class and config in
``config.json``, or, for a bare ``.weights.h5``, from the class name in the h5 path and the shapes. Tensor names
join the names of the layers below the model with the role (``block/dense/kernel``): Keras' ``Variable.path``
for Functional models (a Sequential model's paths also start with the model's own name; ours do not, so a
``.keras`` and a ``.weights.h5`` of one model give the same names).

The optimizer, when saved, sits under ``optimizer/vars``: ``0`` = iteration count, ``1`` = learning rate (unless it
is a schedule), then slot variables. Keras applies weight decay in ``BaseOptimizer._apply_weight_decay`` as
``w -= w * wd * lr`` for every optimizer (SGD and AdamW alike): decoupled from the gradient, scaled by the lr.
Legacy Keras 2 ``.h5`` files (``layer_names``/``weight_names`` attributes) are read too, without hyperparameters.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import Checkpoint, HParams, TensorInfo, TensorKind, guess_kind
from ..errors import CorruptCheckpointError, InputError, require
from . import ZIP_MAGIC, OpenOptions
from .flax_msgpack import widen

NAME = "keras"
EXTRA: str | None = "keras"

_ZIP_MAGIC = ZIP_MAGIC
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_WEIGHTS_MEMBER = "model.weights.h5"
_BUFFER_ROLES = frozenset({"moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev",
                           "mean", "variance", "count", "seed_generator_state"})


def sniff(path: Path) -> bool:
    if not path.is_file():
        return False
    name = path.name.lower()
    with path.open("rb") as f:
        head = f.read(8)
    if name.endswith(".keras"):
        return head[:4] == _ZIP_MAGIC
    return name.endswith((".h5", ".hdf5")) and head == _HDF5_MAGIC


# ---------------------------------------------------------------------------------------------- variable roles

def _kb(cfg: Mapping[str, Any] | None, n: int) -> list[str] | None:
    roles = ["kernel", "bias"] if cfg is None or cfg.get("use_bias", True) else ["kernel"]
    return roles[:n] if cfg is None else roles


def _norm(cfg: Mapping[str, Any] | None, n: int, stats: list[str]) -> list[str] | None:
    if cfg is not None:
        affine = (["gamma"] if cfg.get("scale", True) else []) + (["beta"] if cfg.get("center", True) else [])
        return affine + stats
    # Without a config, gamma/beta are unambiguous only when both or neither are stored; a lone one keeps its index.
    return {0: stats, 1: ["0", *stats], 2: ["gamma", "beta", *stats]}.get(n - len(stats))


def _fixed(*roles: str) -> Callable[[Mapping[str, Any] | None, int], list[str] | None]:
    return lambda cfg, n: list(roles)[:n] if n <= len(roles) else None


def _sep(cfg: Mapping[str, Any] | None, n: int) -> list[str] | None:
    roles = ["depthwise_kernel", "pointwise_kernel", "bias"]
    return roles[:n] if cfg is None else roles[: 3 if cfg.get("use_bias", True) else 2]


_RULES: dict[str, Callable[[Mapping[str, Any] | None, int], list[str] | None]] = {
    **{c: _kb for c in ("Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                        "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D")},
    "SeparableConv1D": _sep,
    "SeparableConv2D": _sep,
    "BatchNormalization": lambda cfg, n: _norm(cfg, n, ["moving_mean", "moving_variance"]),
    "LayerNormalization": lambda cfg, n: _norm(cfg, n, []),
    "GroupNormalization": lambda cfg, n: _norm(cfg, n, []),
    "RMSNormalization": _fixed("scale"),
    "Embedding": _fixed("embeddings"),
    "PReLU": _fixed("alpha"),
    "LSTMCell": _fixed("kernel", "recurrent_kernel", "bias"),
    "GRUCell": _fixed("kernel", "recurrent_kernel", "bias"),
    "SimpleRNNCell": _fixed("kernel", "recurrent_kernel", "bias"),
    "Normalization": _fixed("mean", "variance", "count"),
    "SeedGenerator": _fixed("seed_generator_state"),
}
_SNAKE = {re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "_", c).lower(): c for c in _RULES}
_SNAKE.update({"conv1d": "Conv1D", "conv2d": "Conv2D", "conv3d": "Conv3D", "depthwise_conv2d": "DepthwiseConv2D",
               "separable_conv2d": "SeparableConv2D", "cell": "LSTMCell", "seed_generator": "SeedGenerator"})


def _class_from_segment(segment: str) -> str | None:
    """Class of a list item from its h5 group name (``batch_normalization_3`` → BatchNormalization)."""
    base = re.sub(r"_\d+$", "", segment)
    return _SNAKE.get(base) or _SNAKE.get(segment)


def _shape_roles(shapes: list[tuple[int, ...]]) -> list[str] | None:
    """Unknown class: a lone matrix is a kernel; a tensor plus a bias over its trailing axes is kernel + bias."""
    if len(shapes) == 1 and len(shapes[0]) >= 2:
        return ["kernel"]
    if (len(shapes) == 2 and len(shapes[0]) >= 2 and 0 < len(shapes[1]) < len(shapes[0])
            and shapes[0][-len(shapes[1]):] == shapes[1]):
        return ["kernel", "bias"]
    return None


# ------------------------------------------------------------------------------------------------- file access

class _Window(io.RawIOBase):
    """A read-only view of ``[start, start+size)`` of a file: a stored zip member h5py can seek in cheaply
    (``ZipExtFile`` re-reads from the member's start on every backward seek)."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._f = path.open("rb")
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _member_stream(path: Path, zf: zipfile.ZipFile, member: str) -> io.IOBase:
    info = zf.getinfo(member)
    if info.compress_type == zipfile.ZIP_STORED:  # Keras' own writer stores members uncompressed
        with path.open("rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if local[:4] != _ZIP_MAGIC:
            raise CorruptCheckpointError(f"bad zip entry for {member}", hint="re-save the model", path=path)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return _Window(path, info.header_offset + 30 + name_len + extra_len, info.file_size)
    from ..safety import zip_member_bytes  # declared size and ratio checked before inflating (zip bombs)

    return io.BytesIO(zip_member_bytes(zf, member, path=path))  # recompressed by some tool: needs it in memory


class _H5Source:
    def __init__(self, path: Path, h5: Any, datasets: dict[str, str], infos: list[TensorInfo],
                 stream: io.IOBase | None) -> None:
        self.path, self._h5, self._datasets, self._infos, self._stream = path, h5, datasets, infos, stream

    def infos(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> np.ndarray:
        ds = self._h5[self._datasets[name]]
        try:
            if ds.attrs.get("dtype") == "bfloat16":  # Keras writes bfloat16 as 2-byte opaque data plus this attribute
                u16 = np.frombuffer(ds[()].tobytes(), dtype="<u2")
                return (u16.astype(np.uint32) << 16).view(np.float32).reshape(ds.shape)
            return widen(np.asarray(ds[()]))
        except OSError as exc:
            raise CorruptCheckpointError(
                f"cannot read {name!r} ({exc})", hint="the file may be truncated; re-save it", path=self.path
            ) from exc

    def close(self) -> None:
        self._h5.close()
        if self._stream is not None:
            self._stream.close()


# ------------------------------------------------------------------------------------------------- Keras 3

def _config_layers(cfg: Any, prefix: str = "") -> Iterator[tuple[str, str, Mapping[str, Any], bool]]:
    """(full name, class, config, trainable) for every layer in a model config, nested models included."""
    for layer in (cfg or {}).get("layers", []) if isinstance(cfg, Mapping) else []:
        if not isinstance(layer, Mapping) or not isinstance(layer.get("config"), Mapping):
            continue
        lcfg = layer["config"]
        name = str(lcfg.get("name", layer.get("name", "")))
        full = f"{prefix}/{name}" if prefix else name
        yield full, str(layer.get("class_name", "")), lcfg, bool(lcfg.get("trainable", True))
        if "layers" in lcfg:
            yield from _config_layers(lcfg, full)


def _vars_groups(h5: Any) -> list[str]:
    found: list[str] = []
    h5.visit(lambda n: found.append(n) if n == "vars" or n.endswith("/vars") else None)
    return found


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_keras3(h5: Any, config: Mapping[str, Any] | None) -> tuple[
        dict[str, str], list[TensorInfo], dict[str, Any], list[str]]:
    layers_cfg = {full: (cls, cfg, tr) for full, cls, cfg, tr in _config_layers((config or {}).get("config"))}
    order = {full: i for i, full in enumerate(layers_cfg)}
    groups = [g for g in _vars_groups(h5) if g != "vars" and not g.startswith("optimizer/")]
    owner = {g[: -len("/vars")]: g for g in groups}  # layer h5 path → its vars group

    def full_name(layer_path: str) -> str:
        if not layer_path:  # the model's own variables (a subclassed model's add_weight): under the model's name
            attr = h5["vars"].attrs.get("name", "model")
            return attr.decode() if isinstance(attr, bytes) else str(attr)
        parts: list[str] = []
        segs = layer_path.split("/")
        for i in range(1, len(segs) + 1):
            prefix = "/".join(segs[:i])
            if prefix in owner:
                attr = h5[owner[prefix]].attrs.get("name")
                parts.append(attr.decode() if isinstance(attr, bytes) else str(attr or segs[i - 1]))
        return "/".join(parts)

    owner_all = {"": "vars", **owner} if "vars" in h5 else owner
    entries: list[tuple[str, str, list[str]]] = []  # (full name, vars group, dataset keys)
    for layer_path, group in owner_all.items():
        keys = sorted((k for k in h5[group] if k.isdigit()), key=int)
        if keys:
            entries.append((full_name(layer_path), group, keys))

    def position(full: str) -> int:  # sublayers (attention projections) sort with their nearest configured ancestor
        segs = full.split("/")
        return next((order[p] for i in range(len(segs), 0, -1) if (p := "/".join(segs[:i])) in order), len(order))

    entries.sort(key=lambda e: (position(e[0]), _natural(e[0])))

    datasets: dict[str, str] = {}
    infos: list[TensorInfo] = []
    inferred: list[str] = []
    frozen: list[str] = []
    for full, group, keys in entries:
        shapes = [tuple(int(d) for d in h5[f"{group}/{k}"].shape) for k in keys]
        cls, cfg, trainable = layers_cfg.get(full, (None, None, True))
        if cls is None:
            cls = _class_from_segment(group.split("/")[-2]) if "/" in group else None
            cfg = None
        rule = _RULES.get(cls) if cls else None
        roles = rule(cfg, len(keys)) if rule else None
        if roles is None or len(roles) != len(keys):
            roles = _shape_roles(shapes) if cfg is None else None
        if cfg is None:
            inferred.append(full)
        # Any ancestor layer frozen freezes this one.
        trainable = trainable and all(layers_cfg.get(full[:i], (0, 0, True))[2]
                                      for i in range(len(full)) if full[i:i + 1] == "/")
        for i, (k, shape) in enumerate(zip(keys, shapes, strict=True)):
            role = roles[i] if roles is not None else k
            name = f"{full}/{role}" if full else role
            dsname = f"{group}/{k}"
            dtype = _dtype_name(h5[dsname])
            kind: TensorKind = (
                "buffer" if role in _BUFFER_ROLES or guess_kind(name) == "buffer" or not _is_float(dtype)
                else "parameter"
            )
            if name in datasets:  # two objects with one name (should not happen in a valid model)
                name = f"{name}#{i}"
            if not trainable and kind == "parameter":  # a frozen layer's weights are state, as Keras counts them
                frozen.append(name)
                kind = "buffer"
            datasets[name] = dsname
            infos.append(TensorInfo(name, shape, dtype, kind))
    meta: dict[str, Any] = {
        "roles": "config.json" if layers_cfg else "inferred from layer paths and shapes (no config.json)",
    }
    if layers_cfg and inferred:
        meta["roles_inferred_for"] = inferred
    return datasets, infos, meta, frozen


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex"))


def _dtype_name(ds: Any) -> str:
    if ds.attrs.get("dtype") == "bfloat16":
        return "bfloat16"
    return str(np.dtype(ds.dtype).name)


def _optimizer(h5: Any, compile_cfg: Mapping[str, Any] | None) -> tuple[dict[str, Any], int | None, HParams | None]:
    """Iteration count, current lr and the hyperparameters Keras applies to every trainable variable."""
    meta: dict[str, Any] = {}
    ocfg = (compile_cfg or {}).get("optimizer") if isinstance(compile_cfg, Mapping) else None
    # A LossScaleOptimizer (mixed precision) wraps the real one; its own iteration/lr variables stay at 0.
    opt_path = "optimizer"
    while isinstance(ocfg, Mapping) and ocfg.get("class_name") == "LossScaleOptimizer":
        meta["wrapped_by"] = "LossScaleOptimizer"
        ocfg = ocfg.get("config", {}).get("inner_optimizer")
    while f"{opt_path}/inner_optimizer/vars" in h5:
        opt_path += "/inner_optimizer"
    cls = str(ocfg.get("class_name")) if isinstance(ocfg, Mapping) else None
    conf: Mapping[str, Any] = ocfg.get("config", {}) if isinstance(ocfg, Mapping) else {}
    step: int | None = None
    lr: float | None = None
    group = h5.get(f"{opt_path}/vars")
    if group is not None:
        attr = group.attrs.get("name")
        meta["optimizer_name"] = attr.decode() if isinstance(attr, bytes) else attr
        meta["optimizer_variables"] = len(group)
        if "0" in group and group["0"].shape == () and np.dtype(group["0"].dtype).kind in "iu":
            step = int(group["0"][()])
            accumulate = conf.get("gradient_accumulation_steps")
            if isinstance(accumulate, int) and accumulate > 1:
                step //= accumulate  # Keras' own `iterations` property does the same
        lr_is_schedule = isinstance(conf.get("learning_rate"), Mapping)
        if not lr_is_schedule and "1" in group and group["1"].shape == () and np.dtype(group["1"].dtype).kind == "f":
            lr = float(group["1"][()])
            meta["lr_from_state"] = True
    if isinstance(conf.get("learning_rate"), Mapping):
        meta["learning_rate_schedule"] = conf["learning_rate"]
    if cls is None and group is None:
        return meta, step, None
    if lr is None and isinstance(conf.get("learning_rate"), int | float):
        lr = float(conf["learning_rate"])
    wd = conf.get("weight_decay") if cls is not None else None
    adam_like = "beta_1" in conf
    hp = HParams(
        lr=lr,
        weight_decay=(float(wd) if wd is not None else 0.0) if cls is not None else None,
        momentum=_f(conf.get("beta_1") if adam_like else conf.get("momentum")),
        beta2=_f(conf.get("beta_2")),
        optimizer=cls or meta.get("optimizer_name"),
        # BaseOptimizer._apply_weight_decay: w -= w * wd * lr, outside the gradient, for every Keras optimizer.
        wd_mode="decoupled" if cls is not None else None,
        source="keras:compile_config" if cls is not None else "keras:optimizer_state",
        lr_timing="next",
        nesterov=bool(conf.get("nesterov", False)),
        eps=_f(conf.get("epsilon")),
    )
    if cls is not None:
        meta["optimizer_config"] = dict(conf)
        meta["weight_decay_note"] = "variables excluded with optimizer.exclude_from_weight_decay() are not recorded"
    return meta, step, hp


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _epoch_from_name(path: Path, step: int | None) -> int | None:
    """The epoch ModelCheckpoint put in the name (``weights.{epoch:02d}.weights.h5``): the one number in it, when
    the stored iteration count is a multiple of it (a number equal to the step is the step, not an epoch)."""
    nums = re.findall(r"\d+", path.name.removesuffix(".weights.h5").removesuffix(".keras").removesuffix(".h5"))
    if step is None or len(nums) != 1:
        return None
    n = int(nums[0])
    return n if 0 < n != step and step % n == 0 else None


_NON_OPTIMIZER_KEYS = frozenset({"name", "learning_rate"})


def _run_compile_config(path: Path, h5: Any, metadata: dict[str, Any]) -> Mapping[str, Any] | None:
    """The compile config of the run's ``.keras`` beside the weight file or one folder up (``model.save`` at the
    end of a run that checkpointed with ``save_weights_only=True``), when it describes this model and optimizer.

    A bare ``.weights.h5`` holds the iteration count and the current lr, not momentum or weight decay. Accepted only
    when the archive's layers are this file's layers and its optimizer has this file's optimizer name; several
    candidates that disagree on the optimizer config are not used (noted).
    """
    from .. import safety

    opt_group = h5.get("optimizer/vars")
    want_name = opt_group.attrs.get("name") if opt_group is not None else None
    want_name = want_name.decode() if isinstance(want_name, bytes) else want_name
    layers = set()
    if "layers" in h5:
        for g in h5["layers"].values():
            attr = g["vars"].attrs.get("name") if "vars" in g else None
            if attr is not None and "vars" in g and len(g["vars"]):
                layers.add(attr.decode() if isinstance(attr, bytes) else str(attr))
    for folder in (path.parent, path.parent.parent):
        if folder == path.parent.parent and folder == path.parent:
            break
        found: list[tuple[str, Mapping[str, Any]]] = []
        try:
            candidates = sorted(folder.glob("*.keras"))[:20]
        except OSError:
            continue
        for cand in candidates:
            if not safety.regular_file(cand):
                continue
            try:
                with zipfile.ZipFile(cand) as zf:
                    cfg = safety.load_json(safety.zip_member_bytes(zf, "config.json", path=cand), path=cand)
            except Exception:  # an unreadable neighbour is no reason to fail this checkpoint
                continue
            ccfg = cfg.get("compile_config") if isinstance(cfg, Mapping) else None
            ocfg = ccfg.get("optimizer") if isinstance(ccfg, Mapping) else None
            conf = ocfg.get("config") if isinstance(ocfg, Mapping) else None
            if not isinstance(ccfg, Mapping) or not isinstance(conf, Mapping) or (
                    want_name is not None and conf.get("name") != want_name):
                continue
            names = {full.rsplit("/", 1)[-1] for full, _, _, _ in _config_layers(cfg.get("config"))}
            if layers and not layers <= names:
                continue
            found.append((cand.name if folder == path.parent else f"../{cand.name}", ccfg))
        if not found:
            continue
        strip = [{k: v for k, v in c["optimizer"]["config"].items() if k not in _NON_OPTIMIZER_KEYS} for _, c in found]
        if any(x != strip[0] for x in strip[1:]):
            metadata.setdefault("warnings", []).append(
                "several .keras files next to the weights describe this model with different optimizer settings ("
                + ", ".join(n for n, _ in found) + "); momentum and weight decay not taken from any")
            return None
        metadata["compile_config_from"] = found[0][0]
        return found[0][1]
    return None


# ------------------------------------------------------------------------------------------------- Keras 2

def _strs(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_keras2(h5: Any) -> tuple[dict[str, str], list[TensorInfo]]:
    root = h5.get("model_weights", h5)
    datasets: dict[str, str] = {}
    infos: list[TensorInfo] = []
    for layer in _strs(root.attrs["layer_names"]):
        g = root[layer]
        for wname in _strs(g.attrs.get("weight_names", [])):
            ds = g[wname]
            name = wname.removesuffix(":0")
            dtype = _dtype_name(ds)
            kind: TensorKind = "buffer" if guess_kind(name) == "buffer" or not _is_float(dtype) else "parameter"
            datasets[name] = ds.name
            infos.append(TensorInfo(name, tuple(int(d) for d in ds.shape), dtype, kind))
    return datasets, infos


# ------------------------------------------------------------------------------------------------- open

def _json_member(path: Path, zf: zipfile.ZipFile, member: str) -> Any:
    if member not in zf.namelist():
        return None
    from ..safety import load_json, zip_member_bytes  # declared-size, ratio and nesting limits (docs/security.md)

    return load_json(zip_member_bytes(zf, member, max_bytes=64 * 1024 * 1024, path=path), path=path,
                     what=f"archive member {member}", max_depth=256)


def open(path: Path, options: OpenOptions) -> Checkpoint:
    h5py: Any = require("h5py", "keras", "reading Keras checkpoints")
    config: Any = None
    metadata: dict[str, Any] = {}
    stream: io.IOBase | None = None
    try:
        if path.name.lower().endswith(".keras"):
            with zipfile.ZipFile(path) as zf:
                if _WEIGHTS_MEMBER not in zf.namelist():
                    raise InputError(
                        f"the .keras archive has no {_WEIGHTS_MEMBER}",
                        hint="sharded (.weights.json) and TF-format weights are not supported; re-save with "
                        "model.save('x.keras')",
                        path=path,
                    )
                config = _json_member(path, zf, "config.json")
                kmeta = _json_member(path, zf, "metadata.json")
                stream = _member_stream(path, zf, _WEIGHTS_MEMBER)
            if isinstance(kmeta, Mapping):
                metadata.update({k: kmeta[k] for k in ("keras_version", "date_saved") if k in kmeta})
            h5 = h5py.File(stream, "r")
        else:
            h5 = h5py.File(path, "r")
    except (OSError, zipfile.BadZipFile) as exc:
        if stream is not None:
            stream.close()
        raise CorruptCheckpointError(
            f"cannot open the Keras file ({exc})", hint="the file may be truncated; re-save it", path=path
        ) from exc
    try:
        return _open_h5(path, h5, config, metadata, stream)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # h5py on damaged object headers
        h5.close()
        if stream is not None:
            stream.close()
        why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CorruptCheckpointError(f"cannot read the Keras file ({why})",
                                     hint="the file may be truncated or damaged; re-save it", path=path) from exc
    except BaseException:
        h5.close()
        if stream is not None:
            stream.close()
        raise


def _open_h5(path: Path, h5: Any, config: Any, metadata: dict[str, Any], stream: io.IOBase | None) -> Checkpoint:
    from ..safety import check_hdf5

    check_hdf5(h5, path)  # no external links / external storage / virtual datasets (docs/security.md)
    legacy_root = h5.get("model_weights", h5)
    if "layer_names" in legacy_root.attrs:
        datasets, infos = _read_keras2(h5)
        metadata["layout"] = "keras2-h5"
        return Checkpoint(path=path, format=NAME, source=_H5Source(path, h5, datasets, infos, stream),
                          metadata=metadata)
    if not any(k in h5 for k in ("layers", "vars", "optimizer")):
        raise InputError(
            "an HDF5 file, but not Keras weights (no layers/ or vars/ groups, no layer_names attribute)",
            hint="ilr-inspect reads Keras 3 .keras/.weights.h5 and Keras 2 .h5 weight files",
            path=path,
        )
    datasets, infos, meta, frozen = _read_keras3(h5, config if isinstance(config, Mapping) else None)
    metadata.update(meta)
    metadata["layout"] = "keras3"
    compile_cfg = config.get("compile_config") if isinstance(config, Mapping) else None
    if compile_cfg is None and config is None and "optimizer" in h5:
        compile_cfg = _run_compile_config(path, h5, metadata)
    opt_meta, step, hp = _optimizer(h5, compile_cfg)
    metadata.update(opt_meta)
    if hp is not None and metadata.get("compile_config_from"):
        # Which file each value came from: iterations and the current lr are the weight file's own optimizer
        # variables; momentum / weight decay / the optimizer class only exist in the run's .keras.
        src = f"keras:compile_config({metadata['compile_config_from']})"
        hp = replace(hp, source=f"keras:optimizer_state+{src}")
        metadata["hparam_sources"] = {"lr": "keras:optimizer_state" if opt_meta.get("lr_from_state") else src,
                                      "weight_decay": src, "momentum": src, "optimizer": src}
    epoch = _epoch_from_name(path, step)
    if epoch is not None and step is not None:
        metadata["epoch"], metadata["steps_per_epoch"] = epoch, step // epoch
    if frozen:
        metadata["frozen"] = frozen
    hparams = {}
    if hp is not None:
        hparams = {t.name: hp for t in infos if t.kind == "parameter"}
    return Checkpoint(
        path=path,
        format=NAME,
        source=_H5Source(path, h5, datasets, infos, stream),
        step=step,
        step_source="contents" if step is not None else "order",
        hparams=hparams,
        hparams_source=hp.source if hp is not None else None,
        metadata=metadata,
        optimizer_state=_optimizer_loader(h5, infos, hp),
    )


def _optimizer_loader(h5: Any, infos: list[TensorInfo], hp: HParams | None) -> Any:
    from ..measure.step_angle import keras_h5_loader

    return keras_h5_loader(h5, infos, hp)

"""Hugging Face model folders and Trainer ``checkpoint-N/`` folders (docs/formats.md).

Weights: ``model.safetensors`` (or shards + index), ``adapter_model.safetensors``, ``pytorch_model.bin`` (or
shards + index). Trainer extras: ``trainer_state.json`` (step, logged lr), ``optimizer.pt`` (per-group lr/wd/betas,
mapped with the Trainer's decay/no-decay rule), ``scheduler.pt``. ``training_args.bin`` is a pickle of
TrainingArguments and is read only with ``trust_pickle``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, HParams, TensorSource
from ..errors import CorruptCheckpointError, IlrError, InputError
from . import OpenOptions

NAME = "hf"
EXTRA = None
REMOTE = True  # a URL's weights and optimizer/scheduler state are read with ranged requests (_torchzip)

SAFE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER = ("adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_FILES = (SAFE, SAFE_INDEX, BIN, BIN_INDEX, *ADAPTER)


def _shards(path: Path, stem: str, ext: str) -> list[Path]:
    return sorted(path.glob(f"{stem}-*-of-*.{ext}"))


def sniff(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        return any((path / n).is_file() for n in _WEIGHT_FILES) or bool(_shards(path, "model", "safetensors"))
    except OSError:
        return False


def _read_json(p: Path) -> Any:
    from ..safety import load_json  # size and nesting limits (docs/security.md)

    return load_json(p, what=p.name)


def _weight_map(index: Path) -> dict[str, Path]:
    data = _read_json(index)
    wm = data.get("weight_map") if isinstance(data, Mapping) else None
    if not isinstance(wm, Mapping) or not wm:
        raise CorruptCheckpointError("the index has no weight_map", hint="re-save the model", path=index)
    from ..safety import ensure_inside

    for v in dict.fromkeys(map(str, wm.values())):  # a shard leaving the folder is refused (docs/security.md)
        ensure_inside(index.parent / v, index.parent, what="shard")
    return {str(k): index.parent / str(v) for k, v in wm.items()}


def _open_weights(path: Path, options: OpenOptions) -> tuple[TensorSource, bool, dict[str, Any]]:
    """The weights source, whether its names are in named_parameters order, and metadata."""
    from .safetensors_file import make_source as SafetensorsSource  # local mmap, or ranged reads for a URL

    meta: dict[str, Any] = {}
    if (path / SAFE_INDEX).is_file():
        wm = _weight_map(path / SAFE_INDEX)
        files = list(dict.fromkeys(wm.values()))
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CorruptCheckpointError(f"shard {absent[0]} named by the index is missing",
                                         hint="copy the missing shard or re-save the model", path=path)
        meta["weights_files"] = [f.name for f in files]
        return SafetensorsSource(files, wm), False, meta
    for name in (SAFE, ADAPTER[0]):
        if (path / name).is_file():
            meta["weights_files"] = [name]
            src = SafetensorsSource([path / name])
            meta["safetensors_metadata"] = dict(src.metadata)
            return src, False, meta
    shards = _shards(path, "model", "safetensors")
    if shards:
        meta["weights_files"] = [f.name for f in shards]
        return SafetensorsSource(shards), False, meta
    # pickled weights: shards in index order keep state_dict order
    from . import _torchutil as tu

    if (path / BIN_INDEX).is_file():
        files = list(dict.fromkeys(_weight_map(path / BIN_INDEX).values()))
    else:
        files = [path / n for n in (BIN, ADAPTER[1]) if (path / n).is_file()][:1]
    if not files:
        raise InputError("no model weights in this folder (looked for " + ", ".join(_WEIGHT_FILES) + ")",
                         hint="pass a folder written by save_pretrained or a Trainer checkpoint-N folder", path=path)
    sd: dict[str, Any] = {}
    for f in files:
        obj = tu.load_file(f, trust=options.trust_pickle)  # torch-free for zip archives; ranged reads for a URL
        if not tu.is_tensor_dict(obj):
            raise InputError("is not a state dict", hint="re-save it with save_pretrained", path=f)
        sd.update(tu.tensors_only(obj))
    sd, stripped = tu.strip_wrappers(sd)
    if stripped:
        meta["stripped_prefix"] = stripped
    meta["weights_files"] = [f.name for f in files]
    tsrc = tu.TorchDictSource(sd)
    if tsrc.tied:
        meta["tied"] = dict(tsrc.tied)
    return tsrc, True, meta


def _trainer_state(path: Path, meta: dict[str, Any]) -> int | None:
    p = path / "trainer_state.json"
    if not p.is_file():
        return None
    state = _read_json(p)
    if not isinstance(state, Mapping):
        return None
    step = state.get("global_step")
    step = int(step) if isinstance(step, int) and not isinstance(step, bool) else None
    if "epoch" in state:
        meta["epoch"] = state["epoch"]
    logs = [r for r in state.get("log_history", []) if isinstance(r, Mapping)]
    meta["log_history_entries"] = len(logs)
    at_step = [r["learning_rate"] for r in logs if r.get("step") == step and "learning_rate" in r]
    if at_step:
        meta["log_lr"] = float(at_step[-1])  # the lr the Trainer logged for the update at this step (used)
    return step


def _hparams(path: Path, options: OpenOptions, src: TensorSource, ordered: bool,
             meta: dict[str, Any]) -> tuple[dict[str, HParams], Any]:
    """The hyperparameters from ``optimizer.pt`` (and the loaded state dict, for the step-angle loader)."""
    from . import _torchutil as tu
    from .torch_pickle import step_from_optimizer_state

    opt = optimizer_file(path)
    if not opt.is_file():
        return {}, None
    try:
        # Lazy: the param groups and tensor records from the zip directory + data.pkl; a remote file is not
        # downloaded (each tensor is one ranged read, and only the "step" counters are read here).
        osd = tu.load_file(opt, trust=options.trust_pickle, what="optimizer state")
    except IlrError as exc:  # weights stay readable; say why the hyperparameters are missing
        meta["hparams_error"] = f"{exc.render()}" + (f" (hint: {exc.hint})" if exc.hint else "")
        return {}, None
    got, err = tu.map_optimizer(osd, src.infos(), label=opt.name, path=opt, names_ordered=ordered)
    if err:
        meta["hparams_error"] = err
    updates = step_from_optimizer_state(osd)
    if updates is not None:
        meta["optimizer_updates"] = updates
    sched = scheduler_file(path)
    if sched.is_file():
        try:
            s = tu.load_file(sched, trust=False, what="scheduler state")
            if isinstance(s, Mapping) and "_last_lr" in s:
                meta["scheduler_last_lr"] = [float(x) for x in s["_last_lr"]]
            if isinstance(s, Mapping) and isinstance(s.get("last_epoch"), int):
                meta["scheduler_last_epoch"] = int(s["last_epoch"])  # scheduler.step() calls
        except IlrError as exc:
            meta["scheduler_error"] = exc.render()
    return got, osd


def optimizer_file(path: Path) -> Path:
    """The Trainer's ``optimizer.pt``, else Accelerate ``save_state``'s ``optimizer.bin``."""
    return next((path / n for n in ("optimizer.pt", "optimizer.bin") if (path / n).is_file()), path / "optimizer.pt")


def scheduler_file(path: Path) -> Path:
    return next((path / n for n in ("scheduler.pt", "scheduler.bin") if (path / n).is_file()), path / "scheduler.pt")


def _training_args(path: Path, options: OpenOptions, meta: dict[str, Any]) -> None:
    p = path / "training_args.bin"
    if not p.is_file():
        return
    if not options.trust_pickle:
        meta["training_args"] = "not read: a pickle of TrainingArguments (pass trust_pickle to read it)"
        return
    from . import _torchutil as tu

    try:
        args = tu.load_file(p, trust=True, what="training_args.bin")
    except IlrError as exc:
        meta["training_args"] = f"unreadable: {exc.message}"
        return
    keep = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_type",
            "warmup_steps", "warmup_ratio", "optim", "max_steps", "num_train_epochs", "per_device_train_batch_size",
            "gradient_accumulation_steps", "seed")
    meta["training_args"] = {k: getattr(args, k) for k in keep if hasattr(args, k)}
    for k in ("optim", "lr_scheduler_type"):
        if k in meta["training_args"]:
            meta["training_args"][k] = str(getattr(meta["training_args"][k], "value", meta["training_args"][k]))


def open(path: Path, options: OpenOptions) -> Checkpoint:
    if not path.is_dir():
        raise InputError("is not a folder", hint="pass a Hugging Face model folder or checkpoint-N folder", path=path)
    from ..storage import is_remote

    src, ordered, meta = _open_weights(path, options)
    if (path / "config.json").is_file():
        cfg = _read_json(path / "config.json")
        if isinstance(cfg, Mapping):
            meta["model_type"] = cfg.get("model_type")
            meta["architectures"] = cfg.get("architectures")
            meta["config"] = dict(cfg)
    from .safetensors_file import epoch_from_metadata, metadata_hparams, step_from_metadata

    step = _trainer_state(path, meta)
    st_meta = meta.get("safetensors_metadata", {})
    if step is None:
        step = step_from_metadata(st_meta)
    if "epoch" not in meta and epoch_from_metadata(st_meta) is not None:
        meta["epoch"] = epoch_from_metadata(st_meta)
    hparams, osd = _hparams(path, options, src, ordered, meta)
    if step is None and meta.get("optimizer_updates") is not None:
        # Accelerate save_state keeps no step: Adam-family optimizers count their updates.
        step = int(meta["optimizer_updates"])
        meta["step_from"] = f"{optimizer_file(path).name} (number of optimizer updates)"
    elif step is None and meta.get("scheduler_last_epoch") is not None and meta["scheduler_last_epoch"] > 0:
        step = int(meta["scheduler_last_epoch"])
        meta["step_from"] = f"{scheduler_file(path).name} last_epoch (scheduler steps)"
        meta.setdefault("warnings", []).append(
            f"step {step} read from {scheduler_file(path).name} (the number of scheduler.step() calls): "
            "right when the scheduler steps once per optimizer update, as Accelerate's prepared schedulers do")
    from_meta = metadata_hparams(st_meta, src.infos())
    if from_meta:  # the optimizer state wins field by field; the metadata fills what it lacks
        hparams = {n: hparams[n].merged(hp) if n in hparams else hp for n, hp in from_meta.items()}
    _training_args(path, options, meta)
    return Checkpoint(path=path, format=NAME, source=src, step=step,
                      step_source="contents" if step is not None else "order",
                      hparams=hparams, hparams_source=next(iter(hparams.values())).source if hparams else None,
                      metadata=meta,
                      optimizer_state=_optimizer_loader(path, options, src, ordered,
                                                        osd if is_remote(path) else None))


def _optimizer_loader(path: Path, options: OpenOptions, src: TensorSource, ordered: bool, loaded: Any) -> Any:
    from ..measure.step_angle import torch_file_loader

    # A remote optimizer state already opened for the hyperparameters is reused (its zip directory and data.pkl
    # are not fetched again); a local one is reopened (memory-mapped) when the loader is called.
    return torch_file_loader(optimizer_file(path), src.infos(), scheduler_file=scheduler_file(path),
                             names_ordered=ordered, trust=options.trust_pickle, loaded=loaded)

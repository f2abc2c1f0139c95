"""``torch.save`` files: bare state dicts and full training checkpoints (docs/formats.md)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import InputError
from . import OpenOptions

NAME = "torch"
EXTRA = None
REMOTE = True  # URLs: zip directory + data.pkl by ranged reads, each tensor one ranged read (_torchzip)
SUFFIXES = (".pt", ".pth", ".bin", ".tar")

WEIGHT_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "model_ema_state_dict")
OPTIM_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
SCHED_KEYS = ("lr_scheduler", "scheduler", "lr_scheduler_state_dict", "scheduler_state_dict")


def sniff(path: Path) -> bool:
    # Accept any file with a torch extension so that a broken one gets a clear error from ``open``.
    return path.suffix.lower() in SUFFIXES


def open(path: Path, options: OpenOptions) -> Checkpoint:
    from . import _torchutil as tu

    # Torch-free for zip archives (see _torchzip); a URL by exact ranged reads (directory, data.pkl, each tensor).
    obj = tu.load_file(path, trust=options.trust_pickle)
    return checkpoint_from_object(obj, path, options, format_name=NAME)


def _module_state(obj: Any) -> Any:
    """A whole pickled nn.Module (torch.save(model), only loadable with trust) → its state dict."""
    torch = sys.modules.get("torch")  # no module can have been unpickled without torch loaded
    return obj.state_dict() if torch is not None and isinstance(obj, torch.nn.Module) else obj


def select_weights(obj: Any, path: Path, options: OpenOptions) -> tuple[Mapping[str, Any], str | None]:
    """The state dict inside a loaded object and the key it came from (None for a bare state dict)."""
    from . import _torchutil as tu

    obj = _module_state(obj)
    if not isinstance(obj, Mapping):
        raise InputError(f"holds a {type(obj).__name__}, not a state dict or a training checkpoint",
                         hint="save model.state_dict() (or a dict containing it)", path=path)
    if options.key is not None:
        cur: Any = obj
        for part in options.key.split("/"):
            if not isinstance(cur, Mapping) or part not in cur:
                raise InputError(f"no entry {options.key!r}; top-level keys: {', '.join(map(str, obj))[:300]}",
                                 hint="pick one of the keys listed with --key", path=path)
            cur = _module_state(cur[part])
        if not tu.is_tensor_dict(cur):
            raise InputError(f"entry {options.key!r} is not a dict of tensors", hint="pick another --key", path=path)
        return cur, options.key
    if options.ema:
        for k in EMA_KEYS:
            if tu.is_tensor_dict(_module_state(obj.get(k))):
                return _module_state(obj[k]), k
        raise InputError("no EMA weights in this checkpoint (looked for " + ", ".join(EMA_KEYS) + ")",
                         hint="drop --ema, or name the entry with --key", path=path)
    if tu.is_tensor_dict(obj) and not any(tu.is_tensor_dict(v) for v in obj.values()):
        return obj, None
    for k in WEIGHT_KEYS:
        if tu.is_tensor_dict(_module_state(obj.get(k))):
            return _module_state(obj[k]), k
    # Otherwise the largest dict of tensors that is not optimizer state or EMA.
    best: tuple[int, str] | None = None
    for k, v in obj.items():
        if k in EMA_KEYS or k in OPTIM_KEYS or not tu.is_tensor_dict(v):
            continue
        size = sum(t.numel() for t in tu.tensors_only(v).values())
        if best is None or size > best[0]:
            best = (size, str(k))
    if best is None:
        raise InputError("found no dict of tensors (no model weights) in this file; top-level keys: "
                         + ", ".join(map(str, obj))[:300], hint="name the entry holding the weights with --key",
                         path=path)
    return obj[best[1]], best[1]


def step_from_optimizer_state(opt_sd: Any) -> int | None:
    """The number of optimizer updates a torch optimizer state dict records (Adam-family ``state[i]["step"]``),
    or None when it keeps no counter (SGD) or the counters disagree beyond parameters skipped for lack of grads
    (the largest is the number of steps)."""
    state = opt_sd.get("state") if isinstance(opt_sd, Mapping) else None
    if not isinstance(state, Mapping):
        return None
    counts: list[float] = []
    for entry in state.values():
        v = entry.get("step") if isinstance(entry, Mapping) else None
        if v is None:
            continue
        try:
            v = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError, RuntimeError):
            continue
        if v >= 0 and v.is_integer():
            counts.append(v)
    return int(max(counts)) if counts else None


def checkpoint_from_object(obj: Any, path: Path, options: OpenOptions, *, format_name: str) -> Checkpoint:
    from . import _torchutil as tu

    weights, key = select_weights(obj, path, options)
    sd, stripped = tu.strip_wrappers(tu.tensors_only(weights))
    source = tu.TorchDictSource(sd)
    infos = source.infos()
    meta: dict[str, Any] = {"weights_key": key}
    if stripped:
        meta["stripped_prefix"] = stripped
    if source.tied:
        meta["tied"] = dict(source.tied)
    step = None
    hparams: dict[str, Any] = {}
    hsrc = None
    if isinstance(obj, Mapping) and key is not None:
        step = tu.find_step(obj)
        for k, v in tu.scalar_meta(obj):
            meta.setdefault(k, v)
        ema = [k for k in EMA_KEYS if k != key and tu.is_tensor_dict(_module_state(obj.get(k)))]
        if ema:
            meta["ema_key"] = ema[0]
        for k in SCHED_KEYS:
            sched = obj.get(k)
            if isinstance(sched, Mapping) and "_last_lr" in sched:
                meta["scheduler_last_lr"] = [float(x) for x in sched["_last_lr"]]
        args = obj.get("args")
        if args is not None and hasattr(args, "__dict__"):  # timm's argparse.Namespace (trusted loads only)
            meta["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        for k in OPTIM_KEYS:
            if isinstance(obj.get(k), Mapping) and "param_groups" in obj[k]:
                hparams, err = tu.map_optimizer(obj[k], infos, label=f"optimizer state '{k}'", path=path)
                meta["optimizer_key"] = k
                if step is None:  # timm & co. store the epoch, not the step: Adam counts its own updates
                    step = step_from_optimizer_state(obj[k])
                    if step is not None:
                        meta["step_from"] = f"optimizer state '{k}' (number of updates)"
                if err:  # a partial mapping keeps what is determined, with the note
                    meta["hparams_error"] = err
                if hparams:
                    hsrc = "optimizer"
                break
    return Checkpoint(
        path=path, format=format_name, source=source, step=step,
        step_source="contents" if step is not None else "order",
        hparams=hparams, hparams_source=hsrc, metadata=meta,
        optimizer_state=_optimizer_loader(obj, meta.get("optimizer_key"), infos, path),
    )


def _optimizer_loader(obj: Any, key: str | None, infos: Any, path: Path) -> Any:
    from ..measure.step_angle import torch_object_loader

    return torch_object_loader(obj, key, infos, path=path)

"""PyTorch Lightning ``.ckpt`` files (docs/formats.md).

Names keep the LightningModule attribute path (``model.0.weight``); the optimizer mapping tries both the whole
module and each top-level attribute, so ``SGD(self.model.parameters())`` maps as well as ``self.parameters()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint import Checkpoint, HParams
from ..errors import InputError
from . import OpenOptions

NAME = "lightning"
EXTRA = None
REMOTE = True  # URLs: zip directory + data.pkl by ranged reads, each tensor one ranged read (_torchzip)


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".ckpt"


def open(path: Path, options: OpenOptions) -> Checkpoint:
    from . import _torchutil as tu

    # Torch-free for zip archives (see _torchzip); a URL by exact ranged reads (directory, data.pkl, each tensor).
    obj = tu.load_file(path, trust=options.trust_pickle, what="Lightning checkpoint")
    return checkpoint_from_object(obj, path, options)


def checkpoint_from_object(obj: Any, path: Path, options: OpenOptions) -> Checkpoint:
    from . import _torchutil as tu
    from . import torch_pickle

    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        if isinstance(obj, Mapping) and options.key is None:
            # A .ckpt that is a plain torch training checkpoint: read it the generic way.
            return torch_pickle.checkpoint_from_object(obj, path, options, format_name=NAME)
        if not isinstance(obj, Mapping):
            raise InputError(f"holds a {type(obj).__name__}, not a Lightning checkpoint",
                             hint="pass a file written by Trainer.save_checkpoint / ModelCheckpoint", path=path)
    if options.key is not None or options.ema:
        return torch_pickle.checkpoint_from_object(obj, path, options, format_name=NAME)

    sd, stripped = tu.strip_wrappers(tu.tensors_only(obj["state_dict"]))
    source = tu.TorchDictSource(sd)
    infos = source.infos()
    meta: dict[str, Any] = {"weights_key": "state_dict"}
    if stripped:
        meta["stripped_prefix"] = stripped
    if source.tied:
        meta["tied"] = dict(source.tied)
    for k in ("epoch", "global_step", "pytorch-lightning_version", "hparams_name"):
        if k in obj:
            meta[k] = obj[k]
    hp = obj.get("hyper_parameters")
    if isinstance(hp, Mapping):
        meta["hyper_parameters"] = {str(k): v for k, v in hp.items() if isinstance(v, (int, float, str, bool))}
    scheds = obj.get("lr_schedulers")
    if isinstance(scheds, list):
        meta["scheduler_last_lr"] = [
            [float(x) for x in s["_last_lr"]] for s in scheds if isinstance(s, Mapping) and "_last_lr" in s
        ]
    step = tu.find_step(obj, ("global_step", "step"))

    hparams: dict[str, HParams] = {}
    errors: list[str] = []
    clash = False
    opts = obj.get("optimizer_states")
    if isinstance(opts, list):
        for i, osd in enumerate(opts):
            got, err = tu.map_optimizer(osd, infos, label=f"optimizer_states[{i}]", path=path,
                                        source="optimizer" if len(opts) == 1 else f"optimizer[{i}]")
            if err:
                errors.append(err)
            overlap = set(got) & set(hparams)
            if overlap:
                errors.append(f"optimizer_states[{i}] claims parameters another optimizer holds: "
                              + ", ".join(sorted(overlap)[:5]))
                clash = True
            hparams.update(got)
    if errors:  # a partial mapping keeps what is determined; clashing optimizers keep nothing
        meta["hparams_error"] = "; ".join(errors)
        if clash:
            hparams = {}
    return Checkpoint(
        path=path, format=NAME, source=source, step=step,
        step_source="contents" if step is not None else "order",
        hparams=hparams, hparams_source="optimizer" if hparams else None, metadata=meta,
        optimizer_state=_optimizer_loader(obj, infos, path),
    )


def _optimizer_loader(obj: Any, infos: Any, path: Path) -> Any:
    from ..measure.step_angle import torch_lightning_loader

    return torch_lightning_loader(obj, infos, path=path)

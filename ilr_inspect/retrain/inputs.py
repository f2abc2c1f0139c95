"""What an ``ilr.toml`` points at: the model, the data arrays, the start checkpoints, the SI tensors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ModelError, ProbeError, UsageError
from .config import Config

_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")
_SPLITS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_probe: np.ndarray


@dataclass(frozen=True)
class Start:
    label: str
    path: Path
    step: int


def build(cfg: Config) -> nn.Module:
    from ..models import build_model

    return build_model(cfg.model, base_dir=cfg.base_dir)


def _arrays(obj: Any, where: Path) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping):
        d = {k: np.asarray(obj[k]) for k in _SPLITS if k in obj}
    elif isinstance(obj, (tuple, list)) and len(obj) == 4:
        d = dict(zip(_SPLITS, (np.asarray(v) for v in obj), strict=True))
    else:
        raise InputError("the data must be a mapping with x_train, y_train, x_test, y_test (or a 4-tuple)",
                         path=where)
    missing = [k for k in _SPLITS if k not in d]
    if missing:
        raise InputError(f"the data lacks {', '.join(missing)}", hint="provide train and test splits", path=where)
    return d


def load_data(cfg: Config) -> Data:
    if cfg.data_npz is not None:
        with np.load(cfg.data_npz, allow_pickle=False) as z:
            d = _arrays({k: z[k] for k in z.files}, cfg.data_npz)
        where = cfg.data_npz
    elif cfg.data_split is not None:
        d = {}
        for split, f in zip(("train", "test"), cfg.data_split, strict=True):
            with np.load(f, allow_pickle=False) as z:
                if "x" not in z.files or "y" not in z.files:
                    raise InputError(f"the {split} split needs arrays named 'x' and 'y'", path=f)
                d[f"x_{split}"], d[f"y_{split}"] = z["x"], z["y"]
        where = cfg.data_split[0]
    else:
        from ..models import resolve_callable

        assert cfg.data_factory is not None
        fn = resolve_callable(cfg.data_factory, base_dir=cfg.base_dir, what="data")
        where = cfg.path
        try:
            obj = fn()
        except Exception as exc:
            raise InputError(f"the data factory {cfg.data_factory!r} failed: {type(exc).__name__}: {exc}",
                             path=where) from None
        d = _arrays(obj, where)
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.ndim < 2 or len(x) != len(y) or len(x) == 0:
            raise InputError(f"x_{split} {x.shape} and y_{split} {y.shape} do not pair up", path=where)
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
            raise InputError(f"y_{split} must hold integer class labels (1-D), got {y.dtype} {y.shape}", path=where)
    if d["x_train"].shape[1:] != d["x_test"].shape[1:]:
        raise InputError(f"train and test inputs differ in shape: {d['x_train'].shape[1:]} vs {d['x_test'].shape[1:]}",
                         path=where)
    probe = d["x_test"]
    if cfg.probe is not None:
        with np.load(cfg.probe, allow_pickle=False) as z:
            key = "x" if "x" in z.files else (z.files[0] if len(z.files) == 1 else None)
            if key is None:
                raise ProbeError("the probe .npz needs an array named 'x'", path=cfg.probe)
            probe = z[key]
        if probe.shape[1:] != d["x_train"].shape[1:]:
            raise ProbeError(f"probe inputs {probe.shape[1:]} do not match the data {d['x_train'].shape[1:]}",
                             path=cfg.probe)
    f32 = np.float32
    x_test = d["x_test"].astype(f32)
    # Without a probe file the test inputs are the probe (same object: predictions are computed once).
    x_probe = x_test if probe is d["x_test"] else probe.astype(f32)
    return Data(d["x_train"].astype(f32), d["y_train"].astype(np.int64), x_test, d["y_test"].astype(np.int64),
                x_probe)


def _step_of(path: Path, regex: str | None) -> int | None:
    if regex is not None:
        m = re.search(regex, path.name)
        return int(m.group(1)) if m else None
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else None


def find_starts(cfg: Config) -> list[Start]:
    """The selected checkpoints of every listed run, labelled ``step_N`` (``<run>:step_N`` for several runs)."""
    starts: list[Start] = []
    for folder in cfg.checkpoints:
        files = [p for p in folder.iterdir() if p.suffix in _CKPT_SUFFIXES] if folder.is_dir() else [folder]
        stepped = sorted((s, p) for p in files if (s := _step_of(p, cfg.step_regex)) is not None)
        if not stepped:
            raise InputError("no checkpoint with a step number in its name", path=folder,
                             hint="name them like step_000100.pt or set starts.step_regex")
        by_step = dict(stepped)
        for sel in cfg.select:
            if sel == "first":
                step = stepped[0][0]
            elif sel == "last":
                step = stepped[-1][0]
            else:
                step = int(sel)
                if step not in by_step:
                    raise UsageError(f"[starts.select] no checkpoint for step {step} in {folder}",
                                     hint="steps there: " + ", ".join(str(s) for s, _ in stepped[:20]),
                                     path=cfg.path)
            prefix = f"{folder.name}:" if len(cfg.checkpoints) > 1 else ""
            starts.append(Start(f"{prefix}step_{step}", by_step[step], step))
    labels = [s.label for s in starts]
    if len(set(labels)) != len(labels):
        raise UsageError("[starts.select] selects the same checkpoint twice", path=cfg.path)
    return starts


def start_state(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors keyed by the model's state-dict names (read through the format registry)."""
    from ..formats import open_checkpoint
    from ..models import checkpoint_tensors

    ckpt = open_checkpoint(path)
    try:
        tensors = checkpoint_tensors(model, ckpt)
    finally:
        ckpt.close()
    own = model.state_dict()
    missing = [n for n, _ in model.named_parameters() if n not in tensors]
    if missing:
        raise ModelError(f"the checkpoint lacks parameters of the model: {', '.join(missing[:5])}", path=path,
                         hint="check [model] spec against the checkpoints")
    return {n: t for n, t in tensors.items() if n in own}


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.LayerNorm)
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def si_tensors(model: nn.Module) -> tuple[list[str], str]:
    """Weights of linear maps whose only consumer is a normalizer (conv→BN), found on the model's fx graph.

    Returns (names, note). The common conv→BN pattern is all the retraining needs to track norms; the full
    detection (residual joint units, functional check) lives in ``ilr_inspect.invariance``.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        return [], f"fx tracing failed ({type(exc).__name__}); norms of scale-invariant weights not tracked"
    mods = dict(gm.named_modules())
    out: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _LINEAR):
            continue
        users = list(node.users)
        if users and all(u.op == "call_module" and isinstance(mods.get(u.target), _NORMS) for u in users):
            out.append(f"{node.target}.weight")
    return out, "graph: linear map feeding a normalizer only"

"""Hyperparameter files saved next to checkpoints: Lightning ``hparams.yaml``, ``hparams.json``, ``args.json``/
``args.yaml`` (timm, argparse dumps), ``config.json``/``config.yaml`` (training configs; W&B ``config.yaml``).

Files are flattened to dotted keys; a canonical hyperparameter is the shallowest key whose leaf name is one of
the known spellings (``lr``/``learning_rate``/``base_lr``, ``weight_decay``/``wd``, ``momentum``/``beta1``/
``betas``, ``optimizer``/``opt``…). YAML is read with a safe loader that turns Python object tags into plain
data, so nothing is ever imported or executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import safety
from ..errors import IlrError

READER = "sidecar"
NAMES = frozenset(
    f"{stem}.{ext}"
    for stem in ("hparams", "args", "config", "training_args", "hyperparameters")
    for ext in ("yaml", "yml", "json")
)
# Canonical field → leaf spellings, most specific first.
_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning_rate", "base_lr", "init_lr", "initial_lr"),
    "weight_decay": ("weight_decay", "wd"),
    "momentum": ("momentum", "beta1", "adam_beta1", "b1"),
    "beta2": ("beta2", "adam_beta2", "b2"),
    "eps": ("eps", "adam_epsilon", "epsilon"),
    "nesterov": ("nesterov",),
    "optimizer": ("optimizer", "opt", "optim", "optimizer_name", "optimizer_type", "optimizer_class"),
}
_CLASS_KEYS = ("class_path", "_target_", "name", "type", "class_name")


def load(path: Path) -> dict[str, Any]:
    """Parse a sidecar into a dict; raises ValueError (the log reader's "skip with a warning") when it is not a
    mapping or breaks a parsing limit of :mod:`ilr_inspect.safety` (size, depth, YAML aliases)."""
    try:
        data = (safety.load_json(path, max_bytes=safety.MAX_YAML_BYTES, what="sidecar") if path.suffix == ".json"
                else safety.load_yaml(path, what="sidecar"))
    except IlrError as exc:
        raise ValueError(exc.message) from exc
    if not isinstance(data, dict):
        raise ValueError("not a mapping of hyperparameters")
    return data


def _flatten(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(data, dict):
        # W&B config.yaml wraps each value as {value: x, desc: ...}.
        if "value" in data and set(data) <= {"value", "desc"}:
            return _flatten(data["value"], prefix)
        out: list[tuple[tuple[str, ...], Any]] = []
        for k, v in data.items():
            out.extend(_flatten(v, (*prefix, str(k))))
        return out
    return [(prefix, data)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _optimizer_name(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict):
        for key in _CLASS_KEYS:
            if isinstance(value.get(key), str):
                return str(value[key])
    return None


def extract(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Canonical hyperparameters found in a parsed sidecar, plus notes about conflicting values."""
    found: dict[str, Any] = {}
    depth: dict[str, int] = {}
    notes: list[str] = []

    def offer(field: str, value: Any, key: tuple[str, ...]) -> None:
        if value is None:
            return
        d = len(key)
        if field not in found or d < depth[field]:
            found[field], depth[field] = value, d
        elif d == depth[field] and found[field] != value:
            notes.append(f"{'.'.join(key)}={value!r} differs from the {field}={found[field]!r} already taken")

    # Optimizer given as a mapping (LightningCLI class_path/init_args, Hydra _target_).
    for top, value in data.items():
        if str(top) in _KEYS["optimizer"] and isinstance(value, dict):
            offer("optimizer", _optimizer_name(value), (str(top),))
    for key, value in _flatten(data):
        leaf = key[-1] if key else ""
        if leaf == "betas" and isinstance(value, list | tuple) and len(value) == 2:
            offer("momentum", _number(value[0]), key)
            offer("beta2", _number(value[1]), key)
            continue
        for field, spellings in _KEYS.items():
            if leaf not in spellings:
                continue
            if field == "optimizer":
                offer(field, _optimizer_name(value), key)
            elif field == "nesterov":
                offer(field, value if isinstance(value, bool) else None, key)
            else:
                offer(field, _number(value), key)
    return found, notes

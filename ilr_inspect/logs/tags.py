"""Which logged tags carry hyperparameters, how authoritative each is, and when its value was used.

Timing convention. A checkpoint at step ``N`` holds the weights after ``N`` optimizer updates. The lr *used* at
step ``N`` is the one of the update that produced it (update ``N``, 1-based); the *next* lr at ``N`` is the one
update ``N+1`` will use (what a saved torch optimizer holds). Each logged lr row carries ``timing``:

- ``"next"``: the value logged at step ``k`` was used by update ``k+1``. Lightning's ``LearningRateMonitor``
  logs in ``on_train_batch_start`` with ``step=_batches_that_stepped`` (updates done so far), so its
  ``lr-<Optimizer>[/pgN]`` tags have this timing (verified in tests/test_logs.py against the optimizer's
  ``param_groups`` inside ``optimizer_step``, lightning 2.6). Hugging Face Trainer before 4.51 logged
  ``scheduler.get_last_lr()`` after ``scheduler.step()`` — also "next".
- ``"used"``: the value logged at step ``k`` was used by update ``k``. Hugging Face Trainer >= 4.51
  (huggingface/transformers#36973, "Log the correct learning rate") reads the lr before ``scheduler.step()`` and
  logs it at the incremented ``global_step``: ``learning_rate`` in ``trainer_state.json`` and
  ``train/learning_rate`` in TensorBoard (verified in tests/test_logs.py with transformers 5.24 against the
  optimizer's lr in ``on_pre_optimizer_step``). The version comes from ``transformers_version`` in the
  ``config.json`` next to ``trainer_state.json``; unknown → assumed >= 4.51, with a warning.
- Generic CSV/JSONL/TensorBoard ``lr`` columns (a user's own ``writer.add_scalar("lr", …)``) cannot be checked;
  they are assumed "used".

With sparse logging, the value at a step is the one at the nearest logged step at or before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Field = Literal["lr", "weight_decay", "momentum"]
Timing = Literal["used", "next"]


@dataclass(frozen=True)
class ColumnMap:
    """User-given column/tag names for logs whose names we cannot guess (``--log-step-col``, ``--log-lr-col``…)."""

    step: str | None = None
    lr: str | None = None
    weight_decay: str | None = None
    momentum: str | None = None
    loss: str | None = None
    accuracy: str | None = None


@dataclass(frozen=True)
class HpTag:
    """A logged tag that carries a hyperparameter. Lower ``rank`` = more authoritative."""

    field: Field
    rank: int
    group: str | None  # "pg1"… (Lightning, 1-based), a param-group name, or None (applies to every group)
    optimizer: str | None = None
    family: str = "generic"  # lightning | hf | generic | user


# lr-<Optimizer>[-<dup>][/<group>][-momentum|-weight_decay] (lightning/pytorch/callbacks/lr_monitor.py).
_LIGHTNING = re.compile(
    r"^lr-(?P<opt>[A-Za-z_][A-Za-z0-9_]*?)(?:-(?P<dup>\d+))?(?:/(?P<pg>[^/]+?))?(?:-(?P<kind>momentum|weight_decay))?$"
)
_HF_LR = {"learning_rate", "train/learning_rate"}
_GENERIC = {
    "lr": ("lr", "train/lr", "train_lr", "optimizer/lr", "lr/train", "learning-rate", "learning_rate/train"),
    "weight_decay": ("weight_decay", "wd", "train/weight_decay", "optimizer/weight_decay"),
    "momentum": ("momentum", "train/momentum", "optimizer/momentum", "beta1"),
}
_GENERIC_LOOKUP = {name: f for f, names in _GENERIC.items() for name in names}

# Which reader to trust when two files log the same tag: JSON/CSV keep float64, TensorBoard stores float32.
READER_PRIORITY = {"user": 0, "hf-trainer-state": 1, "csv": 2, "jsonl": 2, "mlflow": 3, "tensorboard": 4}


def classify(tag: str, columns: ColumnMap | None = None) -> HpTag | None:
    """The hyperparameter a tag carries, or None for loss/accuracy/anything else."""
    if columns is not None:
        for f in ("lr", "weight_decay", "momentum"):
            if getattr(columns, f) == tag:
                return HpTag(f, 0, None, family="user")
    m = _LIGHTNING.match(tag)
    if m is not None:
        kind = m["kind"] or "lr"
        # A second optimizer of the same class (GANs: lr-Adam-1) is not the main one.
        rank = 1 if m["dup"] is None else 5
        return HpTag(kind, rank, m["pg"], optimizer=m["opt"], family="lightning")  # type: ignore[arg-type]
    if tag in _HF_LR:
        return HpTag("lr", 2, None, family="hf")
    generic = _GENERIC_LOOKUP.get(tag)
    if generic is not None:
        return HpTag(generic, 3, None)  # type: ignore[arg-type]
    return None


def timing_of(hp: HpTag, reader: str, hf_next: bool) -> Timing:
    """When a logged value of this tag was used (see the module docstring)."""
    if hp.family == "lightning":
        return "next"
    if hp.family == "hf" and reader in ("hf-trainer-state", "tensorboard") and hf_next:
        return "next"
    return "used"


def group_key(group: int | str | None) -> str | None:
    """Lightning names param groups pg1, pg2… (1-based); callers use 0-based indices."""
    if group is None or isinstance(group, str):
        return group
    return f"pg{group + 1}"


MetricKind = Literal["loss", "accuracy", "lr", "other"]


def metric_kind(tag: str, columns: ColumnMap | None = None) -> MetricKind:
    """Coarse kind of a logged curve, for the report's training-curve panel."""
    hp = classify(tag, columns)
    if hp is not None and hp.field == "lr":
        return "lr"
    if columns is not None and tag == columns.loss:
        return "loss"
    if columns is not None and tag == columns.accuracy:
        return "accuracy"
    low = tag.lower()
    if "loss" in low or "perplexity" in low or low.endswith("ppl"):
        return "loss"
    if "acc" in low or "top1" in low or "top5" in low or "top-1" in low:
        return "accuracy"
    return "other"


def optimizer_family(name: str) -> str:
    """Normalise an optimizer spelling (torch.optim.SGD, 'adamw_torch_fused', AdamW) to a family name."""
    leaf = name.strip().rsplit(".", 1)[-1].lower()
    for family in ("adamw", "adam", "sgdw", "sgd", "lion", "lamb", "lars", "adafactor", "rmsprop", "adagrad"):
        if leaf.startswith(family):
            return family
    return leaf


def wd_mode_of(family: str | None) -> Literal["coupled", "decoupled"] | None:
    """torch SGD/Adam add λθ to the gradient (coupled); AdamW/SGDW decay θ by lr·λ (decoupled, lr-scaled)."""
    if family in ("sgd", "adam", "rmsprop", "adagrad"):
        return "coupled"
    if family in ("adamw", "sgdw"):
        return "decoupled"
    return None

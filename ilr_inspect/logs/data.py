"""``LogData``: every scalar found in training logs, the constants from sidecar files, and lookups on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..checkpoint import HParams
from .tags import READER_PRIORITY, ColumnMap, HpTag, Timing, classify, group_key, metric_kind, optimizer_family
from .tags import wd_mode_of as _wd_mode_of

if TYPE_CHECKING:
    import pandas as pd

SCALAR_COLUMNS = ("step", "tag", "value", "wall_time", "source", "reader", "timing")


class LogFormatError(ValueError):
    """A file that is not a step-indexed log (reported as a warning in ``LogData.warnings``, never raised)."""


def empty_scalars() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {
            "step": pd.Series([], dtype="int64"),
            "tag": pd.Series([], dtype=str),
            "value": pd.Series([], dtype="float64"),
            "wall_time": pd.Series([], dtype="float64"),
            "source": pd.Series([], dtype=str),
            "reader": pd.Series([], dtype=str),
            "timing": pd.Series([], dtype=str),
        }
    )


@dataclass
class LogData:
    """Scalars from training logs and constants from sidecar files, each with the file it came from.

    ``scalars`` has one row per (file, tag, logged step): ``step`` (int, as logged), ``tag`` (as logged, e.g.
    ``train/loss``, ``lr-SGD/pg1``, ``learning_rate``), ``value`` (float), ``wall_time`` (float or NaN),
    ``source`` (path relative to the search root), ``reader`` (tensorboard, csv, jsonl, hf-trainer-state) and
    ``timing`` for hyperparameter tags (``used``/``next``, see :mod:`ilr_inspect.logs.tags`; empty otherwise).
    ``constants`` maps canonical names (lr, weight_decay, momentum, beta2, eps, nesterov, optimizer) to values;
    ``constant_sources`` names the sidecar each came from.
    """

    scalars: pd.DataFrame = field(default_factory=empty_scalars)
    constants: dict[str, Any] = field(default_factory=dict)
    constant_sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    columns: ColumnMap | None = None
    # Rows of epoch-indexed logs (Keras CSVLogger): ``step`` holds *epochs completed*; logs.map_epochs moves them
    # into ``scalars`` once the checkpoints tell the steps per epoch (never a step invented from an epoch alone).
    epoch_scalars: pd.DataFrame = field(default_factory=empty_scalars)
    # Memo of _frame results, keyed also by id(scalars) so that replacing the table invalidates it.
    _memo: dict[tuple[Any, ...], tuple[pd.DataFrame, HpTag | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def sources(self) -> list[str]:
        return sorted(set(self.scalars["source"].tolist()) | set(self.constant_sources.values()))

    # -- hyperparameter series -------------------------------------------------------------------------------
    def _best_tags(self, fld: str, group: int | str | None) -> list[tuple[str, HpTag]]:
        """The most authoritative tags for a field and group (several files may log the same tag)."""
        cands = [(t, hp) for t in self.scalars["tag"].unique() if (hp := classify(str(t), self.columns))]
        cands = [(str(t), hp) for t, hp in cands if hp.field == fld]
        if not cands:
            return []
        want = group_key(group)
        if want is None:
            # The global value: an ungrouped tag, else the first param group.
            matched = [c for c in cands if c[1].group is None] or [c for c in cands if c[1].group == "pg1"]
        else:
            # A tag for that group, else an ungrouped tag (one logged lr applies to every group).
            matched = [c for c in cands if c[1].group == want] or [c for c in cands if c[1].group is None]
        if not matched:
            return []
        best = min(hp.rank for _, hp in matched)
        chosen = sorted((c for c in matched if c[1].rank == best), key=lambda c: c[0])
        # Two Lightning optimizers (lr-Adam, lr-SGD) are two schedules: keep the first, never interleave them.
        first_opt = chosen[0][1].optimizer
        return [c for c in chosen if c[1].optimizer == first_opt]

    def _frame(self, fld: str, group: int | str | None, timing: Timing) -> tuple[pd.DataFrame, HpTag | None]:
        """Rows of the chosen tags re-indexed by the checkpoint step they apply to under ``timing``."""
        key = (id(self.scalars), len(self.scalars), fld, group, timing)
        if key not in self._memo:
            self._memo[key] = self._build_frame(fld, group, timing)
        return self._memo[key]

    def _build_frame(self, fld: str, group: int | str | None, timing: Timing) -> tuple[pd.DataFrame, HpTag | None]:
        import pandas as pd

        tags = self._best_tags(fld, group)
        if not tags:
            return pd.DataFrame(columns=["step", "value", "source", "tag"]), None
        rows = self.scalars[self.scalars["tag"].isin([t for t, _ in tags])].copy()
        # Step at which the value was "used": a "next" value logged at k was used by update k+1.
        used = rows["step"] + (rows["timing"] == "next").astype("int64")
        rows["step"] = used if timing == "used" else used - 1
        rows["_prio"] = rows["reader"].map(READER_PRIORITY).fillna(9)
        rows = rows.sort_values(["step", "_prio"], kind="stable").drop_duplicates("step", keep="first")
        return rows[["step", "value", "source", "tag"]].reset_index(drop=True), tags[0][1]

    def lr_series(self, group: int | str | None = None, timing: Timing = "used") -> pd.Series | None:
        """Learning rate by checkpoint step, from the most authoritative lr tag, or None when none was logged.

        ``timing="used"``: value at step N = lr of the update that produced step N (what logs usually mean);
        ``timing="next"``: lr the update after step N will use (what a saved torch optimizer holds).
        ``group`` is a 0-based param-group index (Lightning ``lr-SGD/pg{group+1}``) or a param-group name.
        """
        import pandas as pd

        frame, hp = self._frame("lr", group, timing)
        if hp is None or frame.empty:
            return None
        series = pd.Series(frame["value"].to_numpy(), index=pd.Index(frame["step"].to_numpy(), name="step"))
        series.name = str(frame["tag"].iloc[0])
        series.attrs["sources"] = sorted(set(frame["source"].tolist()))
        series.attrs["timing"] = timing
        return series

    def _at(self, fld: str, step: int, group: int | str | None, timing: Timing) -> tuple[float, str, HpTag] | None:
        frame, hp = self._frame(fld, group, timing)
        if hp is None:
            return None
        # Nearest logged step at or before ``step`` (frame is sorted by step, one row per step).
        i = int(np.searchsorted(frame["step"].to_numpy(), step, side="right")) - 1
        if i < 0:
            return None
        return float(frame["value"].to_numpy(dtype="float64")[i]), str(frame["source"].iat[i]), hp

    def hparams_at(
        self, step: int, group: int | str | None = None, *, timing: Timing = "used", use_constants: bool = True
    ) -> HParams:
        """Hyperparameters in effect at a checkpoint step, from logs (nearest logged step at or before), then
        sidecar constants. ``source`` names each file used (``log:<path>``, ``sidecar:<path>``, joined by +)."""
        values: dict[str, Any] = {}
        sources: list[str] = []
        optimizer: str | None = None
        for fld in ("lr", "weight_decay", "momentum"):
            hit = self._at(fld, step, group, timing)
            if hit is not None:
                values[fld] = hit[0]
                sources.append(f"log:{hit[1]}")
                optimizer = optimizer or hit[2].optimizer
        if use_constants:
            for fld in ("lr", "weight_decay", "momentum", "beta2", "eps", "optimizer"):
                if fld not in values and fld in self.constants:
                    values[fld] = self.constants[fld]
                    sources.append(f"sidecar:{self.constant_sources[fld]}")
        family = optimizer_family(str(values.get("optimizer") or optimizer)) if (
            values.get("optimizer") or optimizer
        ) else None
        nesterov = self.constants.get("nesterov") if use_constants else None
        unique = list(dict.fromkeys(sources))
        return HParams(
            lr=_float(values.get("lr")),
            weight_decay=_float(values.get("weight_decay")),
            momentum=_float(values.get("momentum")),
            beta2=_float(values.get("beta2")),
            eps=_float(values.get("eps")),
            optimizer=family,
            wd_mode=_wd_mode_of(family),
            source="+".join(unique) if unique else "unknown",
            lr_timing=timing,
            nesterov=bool(nesterov) if isinstance(nesterov, bool) else False,
        )

    # -- curves for the report -------------------------------------------------------------------------------
    def curves(self) -> pd.DataFrame:
        """Every logged scalar with a ``metric`` kind (loss, accuracy, lr, other), one row per (tag, step).

        ``step`` is aligned to checkpoint steps for hyperparameter rows: an lr row sits at the step its update
        produced (``logged_step`` keeps the step as logged); other rows keep the logged step. When several files
        log the same tag, JSON/CSV beat TensorBoard (which stores float32).
        """
        import pandas as pd

        frame = self.scalars.copy()
        if frame.empty:
            return frame.assign(metric=pd.Series([], dtype=str), logged_step=pd.Series([], dtype="int64"))
        frame["logged_step"] = frame["step"]
        frame["step"] = frame["step"] + (frame["timing"] == "next").astype("int64")
        kinds = {t: metric_kind(str(t), self.columns) for t in frame["tag"].unique()}
        frame["metric"] = frame["tag"].map(kinds)
        frame["_prio"] = frame["reader"].map(READER_PRIORITY).fillna(9)
        frame = frame.sort_values(["tag", "step", "_prio"], kind="stable").drop_duplicates(["tag", "step"])
        return frame.drop(columns="_prio").reset_index(drop=True)


def _float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None

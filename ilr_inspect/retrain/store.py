"""The results folder: written incrementally and atomically so that ``--resume`` loses at most one evaluation.

Layout::

    OUT/run.json                       resolved config fingerprint (a resume must match it)
    OUT/arms/<arm>/eval_00012.npz      one file per evaluation (metrics, probe predictions, disagreements)
    OUT/arms/<arm>/state.pt            engine state (weights, BN statistics, optimizer state) at the last evaluation
    OUT/arms/<arm>/summary.json        the arm's result row, once the arm is finished
    OUT/equilibrium.json, OUT/curves.csv   the final tables

Order of writes per evaluation: the record first, then the state; on resume only records up to the state's
evaluation count are trusted, so a crash between the two just recomputes that evaluation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..output import atomic_write, atomic_write_text

RUN_FILE = "run.json"


class Store:
    def __init__(self, root: Path, fingerprint: dict[str, Any], *, resume: bool) -> None:
        self.root = Path(root)
        run = self.root / RUN_FILE
        if run.exists():
            if not resume:
                raise UsageError("this results folder already holds a run", path=self.root,
                                 hint="pass --resume to continue it, or choose another --out")
            saved = json.loads(run.read_text(encoding="utf-8"))
            if saved != json.loads(json.dumps(fingerprint)):
                diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != json.loads(
                    json.dumps(fingerprint.get(k))))
                raise UsageError(f"--resume: the settings differ from the interrupted run ({', '.join(diff)})",
                                 path=run, hint="use the same ilr.toml and options, or another --out")
        elif self.root.exists() and any(self.root.iterdir()):
            raise UsageError("the results folder is not empty and holds no run", path=self.root,
                             hint="choose an empty or new --out folder")
        else:
            atomic_write_text(run, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")

    def arm_dir(self, arm: str) -> Path:
        d = self.root / "arms" / arm
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_eval(self, arm: str, index: int, record: dict[str, np.ndarray]) -> None:
        def write(fh: Any) -> None:
            buf = io.BytesIO()
            np.savez(buf, **record)  # type: ignore[arg-type]
            fh.write(buf.getvalue())

        atomic_write(self.arm_dir(arm) / f"eval_{index:05d}.npz", write)

    def load_evals(self, arm: str, upto: int) -> list[dict[str, np.ndarray]]:
        out = []
        for i in range(upto):
            path = self.arm_dir(arm) / f"eval_{i:05d}.npz"
            try:
                with np.load(path, allow_pickle=False) as z:
                    out.append({k: z[k] for k in z.files})
            except (OSError, ValueError, EOFError) as exc:  # missing, truncated or not an .npz
                raise InputError(f"cannot read this saved evaluation ({type(exc).__name__}: {exc})", path=path,
                                 hint="the results folder is damaged; rerun without --resume into a new --out"
                                 ) from None
        return out

    def save_state(self, arm: str, state: dict[str, Any]) -> None:
        def write(fh: Any) -> None:
            buf = io.BytesIO()
            torch.save(state, buf)
            fh.write(buf.getvalue())

        atomic_write(self.arm_dir(arm) / "state.pt", write)

    def state_path(self, arm: str) -> Path:
        return self.root / "arms" / arm / "state.pt"

    def load_state(self, arm: str) -> dict[str, Any] | None:
        p = self.state_path(arm)
        if not p.exists():
            return None
        hint = "the results folder is damaged; rerun without --resume into a new --out"
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file (pickle, zip, EOF, runtime)
            raise InputError(f"cannot read the saved engine state ({type(exc).__name__})", path=p, hint=hint) from None
        if not isinstance(state, dict) or "engine" not in state or "evals" not in state:
            raise InputError("the saved engine state lacks 'engine'/'evals'", path=p, hint=hint)
        return state

    def save_summary(self, arm: str, row: dict[str, Any]) -> None:
        atomic_write_text(self.arm_dir(arm) / "summary.json", json.dumps(row, indent=2) + "\n")

    def load_summary(self, arm: str) -> dict[str, Any] | None:
        p = self.root / "arms" / arm / "summary.json"
        if not p.exists():
            return None
        row: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
        return row

"""Series written by real trainers (fixtures/*, see fixtures/README.md) must come back in order, with the step the
framework stored, the weights it saved, and the lr / weight decay / momentum its optimizer actually used.

The truth is each folder's ``truth.json``, recorded by fixtures/make_fixtures.py from the *live* model and
optimizer at save time (torch ``param_groups``, Lightning ``on_save_checkpoint``, HF ``on_save``, Keras
``on_epoch_end``, the optax schedule), independent of every reader.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ilr_inspect.checkpoint import Checkpoint
from ilr_inspect.formats import OpenOptions
from ilr_inspect.series import Series, open_series

FIX = Path(__file__).resolve().parents[1] / "fixtures"
# Series truth files (schema: open/series/checkpoints). units_matrix/ and step_angle/ keep truths of another kind,
# checked by tests/test_units_from_files.py and tests/test_step_angle.py.
TRUTHS = sorted(p for p in FIX.rglob("truth.json")
                if not {"reference", "units_matrix", "step_angle"} & set(p.relative_to(FIX).parts))
IDS = [p.parent.relative_to(FIX).as_posix() for p in TRUTHS]


def _norm(name: str) -> str:
    return re.sub(r"[./]+", "/", name).strip("/")


def _lookup(ckpt: Checkpoint, truth: dict[str, Any], name: str) -> str:
    aliases = truth.get("aliases", {}).get(name, [name])
    by_norm: dict[str, list[str]] = {}
    for n in ckpt.tensors:
        by_norm.setdefault(_norm(n), []).append(n)
    hits = sorted({n for a in aliases for n in by_norm.get(_norm(a), [])})
    assert len(hits) == 1, f"{ckpt.path}: expected one tensor named like {aliases}, found {hits}"
    return hits[0]


def _open(truth_path: Path, **extra: Any) -> tuple[dict[str, Any], Series]:
    truth = json.loads(truth_path.read_text())
    options = OpenOptions(**{**truth["open"], **extra})
    return truth, open_series(truth_path.parent / truth["series"], options)


@pytest.fixture(scope="module", params=TRUTHS, ids=IDS)
def case(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, Any], Series]]:
    truth, series = _open(request.param)
    yield truth, series
    series.close()


def test_every_series_folder_has_a_truth_file() -> None:
    assert {"digits", "lightning", "hf_trainer", "keras", "flax", "orbax", "torch_other/dcp",
            "torch_other/safetensors", "torch_other/hf_sharded", "torch_other/timm"} <= set(IDS)


def test_order_steps_and_step_source(case: tuple[dict[str, Any], Series]) -> None:
    truth, series = case
    want = truth["checkpoints"]
    assert len(series) == len(want)
    assert [c.path.name for c in series] == [t["file"] for t in want]
    assert [c.step for c in series] == [t["step"] for t in want]
    for ckpt in series:
        assert ckpt.step_source in truth["step_source"], (ckpt.path, ckpt.step_source)


def test_weights_match_what_was_saved(case: tuple[dict[str, Any], Series]) -> None:
    truth, series = case
    for ckpt, want in zip(series, truth["checkpoints"], strict=True):
        for name, norm in want["norms"].items():
            got = np.linalg.norm(np.asarray(ckpt.read(_lookup(ckpt, truth, name)), dtype=np.float64).ravel())
            assert got == pytest.approx(norm, rel=1e-6, abs=1e-9), (ckpt.path, name)


def test_hyperparameters_equal_the_live_optimizer(case: tuple[dict[str, Any], Series]) -> None:
    truth, series = case
    for ckpt, want in zip(series, truth["checkpoints"], strict=True):
        got = series.hparams_for(ckpt)
        if want.get("hparams_none"):
            # Nothing on disk says what the optimizer used: the tool must not invent values.
            assert all(h.lr is None and h.weight_decay is None for h in got.values()), ckpt.path
            continue
        names = {_lookup(ckpt, truth, n): n for n in want["hparams"]}
        assert set(got) == set(names), (ckpt.path, sorted(set(got) ^ set(names)))
        for reader_name, truth_name in names.items():
            hp, exp = got[reader_name], want["hparams"][truth_name]
            open_fields = want.get("undetermined", {}).get(truth_name, [])  # the files cannot decide these
            for field in ("lr", "weight_decay", "momentum"):
                if field in open_fields:
                    assert getattr(hp, field) is None, (ckpt.path, reader_name, field, hp)
                    continue
                assert getattr(hp, field) == pytest.approx(exp[field], rel=1e-6, abs=1e-12), (
                    ckpt.path, reader_name, field, hp)
            if "nesterov" in exp:
                assert hp.nesterov == exp["nesterov"], (ckpt.path, reader_name, hp)
            if "beta2" in exp:
                assert hp.beta2 == pytest.approx(exp["beta2"], rel=1e-9), (ckpt.path, reader_name)
            if truth.get("optimizer"):
                assert hp.optimizer is None or hp.optimizer.lower() == truth["optimizer"].lower(), hp
            if truth.get("wd_mode") and hp.wd_mode is not None:
                assert hp.wd_mode == truth["wd_mode"], (ckpt.path, reader_name, hp)


TIMM = FIX / "torch_other" / "timm" / "truth.json"


def test_timm_ema_is_its_own_series() -> None:
    truth, series = _open(TIMM, ema=True)
    with series:
        assert [c.step for c in series] == [t["step"] for t in truth["checkpoints"]]
        for ckpt, want in zip(series, truth["checkpoints"], strict=True):
            for name, norm in want["ema_norms"].items():
                got = np.linalg.norm(np.asarray(ckpt.read(_lookup(ckpt, truth, name)), dtype=np.float64).ravel())
                assert got == pytest.approx(norm, rel=1e-6, abs=1e-9), (ckpt.path, name)
            # EMA weights differ from the live ones: the reader really switched tensors.
            assert any(want["ema_norms"][n] != pytest.approx(want["norms"][n], rel=1e-4)
                       for n in want["norms"] if n.endswith("weight"))


def test_timm_args_namespace_loads_without_trust() -> None:
    # argparse.Namespace is an allowlisted data-only class (docs/security.md): timm's files open without
    # --trust-pickle, and the series is exactly the checkpoints the trainer saved.
    truth = json.loads(TIMM.read_text())
    with open_series(TIMM.parent / truth["series"], OpenOptions(trust_pickle=False)) as series:
        assert [c.path.name for c in series] == [Path(c["file"]).name for c in truth["checkpoints"]]

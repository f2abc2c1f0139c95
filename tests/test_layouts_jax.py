"""Real folder layouts (fixtures/make_layouts_jax.py): Orbax CheckpointManager metadata + optax inject_hyperparams,
Keras ModelCheckpoint(save_weights_only=True) + the run's .keras + CSVLogger, and unnamed optimizer groups in a
non-model order. The CLI is pointed at the folder a user would type; every value is checked against truth.json,
recorded from the live optimizer (and, for the groups, an enumeration of every shape-consistent assignment).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from ilr_inspect.cli import app

LAYOUTS = Path(__file__).resolve().parents[1] / "fixtures" / "layouts"
FIELDS = ("lr", "weight_decay", "momentum")


def _truth(name: str) -> dict[str, Any]:
    return json.loads((LAYOUTS / name / "truth.json").read_text())


def _hparams(folder: Path, *extra: str) -> tuple[pd.DataFrame, str]:
    """`ilr-inspect hparams FOLDER -f csv` as a table, plus what went to stderr."""
    result = CliRunner().invoke(app, ["hparams", str(folder), "-f", "csv", *extra])
    assert result.exit_code == 0, result.output
    return pd.read_csv(io.StringIO(result.stdout)), result.stderr


def _norm(name: str) -> str:
    return name.replace(".", "/").split("params/", 1)[-1]


def _check_against_truth(table: pd.DataFrame, truth: dict[str, Any]) -> None:
    assert sorted(set(table["step"])) == [c["step"] for c in truth["checkpoints"]]
    for ck in truth["checkpoints"]:
        rows = table[table["step"] == ck["step"]]
        rows = rows.set_index(rows["parameter"].map(_norm))
        assert set(rows.index) == {_norm(n) for n in ck["hparams"]}, ck["file"]
        for name, exp in ck["hparams"].items():
            row = rows.loc[_norm(name)]
            open_fields = ck.get("undetermined", {}).get(name, [])
            for f in FIELDS:
                if f in open_fields:
                    assert pd.isna(row[f]), (ck["file"], name, f)  # never one group's guess
                else:
                    assert row[f] == pytest.approx(exp[f], rel=1e-6, abs=1e-12), (ck["file"], name, f)
        assert set(rows["wd_mode"].dropna()) <= {truth["wd_mode"]}
        assert {str(o).lower() for o in rows["optimizer"].dropna()} <= {truth["optimizer"].lower()}


# ------------------------------------------------------------------------------------------------ orbax
def test_orbax_manager_inject_hyperparams_and_run_metadata() -> None:
    truth = _truth("orbax_manager")
    table, _ = _hparams(LAYOUTS / "orbax_manager" / "ckpts")
    _check_against_truth(table, truth)
    assert set(table["wd_mode"]) == {"decoupled"}  # optimizer 'adamw' from CheckpointManager(metadata=...)
    assert set(table["lr_source"]) == {"optax:inject_hyperparams"}
    assert set(table["wd_source"]) == {"optax:inject_hyperparams"}
    assert set(table["lr_timing"]) == {"used"}


def test_orbax_without_opt_state_falls_back_to_step_and_run_metadata(tmp_path: Path) -> None:
    truth = _truth("orbax_manager")
    ckpts = shutil.copytree(LAYOUTS / "orbax_manager" / "ckpts", tmp_path / "ckpts")
    for step_dir in ckpts.iterdir():
        if step_dir.name.isdigit():
            shutil.rmtree(step_dir / "opt_state")
    table, _ = _hparams(ckpts)
    meta = truth["root_metadata"]
    for ck in truth["checkpoints"]:
        rows = table[table["step"] == ck["step"]]
        lr_used = next(iter(ck["hparams"].values()))["lr"]
        assert rows["lr"].tolist() == pytest.approx([lr_used] * len(rows), rel=1e-6)  # step custom_metadata
        assert set(rows["lr_source"]) == {"orbax:step_metadata"}
        assert rows["weight_decay"].tolist() == pytest.approx([meta["weight_decay"]] * len(rows))
        assert rows["momentum"].tolist() == pytest.approx([meta["b1"]] * len(rows))
        assert set(rows["wd_source"]) == {"orbax:root_metadata"}
        assert set(rows["wd_mode"]) == {"decoupled"}


# ------------------------------------------------------------------------------------------------ keras
def test_keras_weights_only_uses_the_runs_keras_compile_config() -> None:
    truth = _truth("keras_weights_only")
    table, _ = _hparams(LAYOUTS / "keras_weights_only" / "ckpts")
    _check_against_truth(table, truth)
    assert set(table["wd_mode"]) == {"decoupled"}
    assert set(table["lr_source"]) == {"keras:optimizer_state"}
    assert set(table["wd_source"]) == {"keras:compile_config(../model.keras)"}


def test_keras_csvlogger_epochs_become_steps() -> None:
    from ilr_inspect.series import open_series

    truth = _truth("keras_weights_only")
    spe = truth["steps_per_epoch"]
    with open_series(LAYOUTS / "keras_weights_only" / "ckpts") as series:
        assert series.logs is not None
        lr = series.logs.lr_series()
        assert lr is not None
        # CSVLogger row `epoch` e (0-based) is written after epoch e+1 ends: step (e+1)*spe, the lr that epoch used.
        want = {ck["step"]: next(iter(ck["hparams"].values()))["lr"] for ck in truth["checkpoints"]}
        assert {int(k): float(v) for k, v in lr.items()} == pytest.approx(want, rel=1e-6)
        assert any(f"{spe} steps per epoch" in w for w in series.warnings)


def test_keras_weights_without_the_keras_file_leave_momentum_and_wd_empty(tmp_path: Path) -> None:
    truth = _truth("keras_weights_only")
    shutil.copytree(LAYOUTS / "keras_weights_only" / "ckpts", tmp_path / "ckpts")
    shutil.copy(LAYOUTS / "keras_weights_only" / "training.log", tmp_path)
    table, _ = _hparams(tmp_path / "ckpts")
    assert table["momentum"].isna().all() and table["weight_decay"].isna().all()
    first = truth["checkpoints"][0]
    rows = table[table["step"] == first["step"]]
    assert rows["lr"].tolist() == pytest.approx([next(iter(first["hparams"].values()))["lr"]] * len(rows))


# ------------------------------------------------------------------------------------------------ groups
def test_unnamed_groups_report_what_the_state_shapes_determine() -> None:
    truth = _truth("torch_groups")
    table, err = _hparams(LAYOUTS / "torch_groups" / "ckpts")
    _check_against_truth(table, truth)
    undetermined = truth["checkpoints"][0]["undetermined"]
    assert undetermined and len(undetermined) < len(truth["checkpoints"][0]["hparams"])  # a real partial case
    flat = " ".join(err.split())
    for name in undetermined:
        assert name in flat
    assert "leave lr open" in flat and "--lr" in flat


def test_resolve_param_ids_maps_only_the_determined_ids() -> None:
    import torch

    from ilr_inspect.optim_state import resolve_param_ids

    truth = _truth("torch_groups")
    ck = truth["checkpoints"][-1]
    obj = torch.load(LAYOUTS / "torch_groups" / "ckpts" / ck["file"], weights_only=True)
    shapes = {n: tuple(t.shape) for n, t in obj["model"].items()}
    names = [n for n in shapes if n in ck["hparams"]]
    got = resolve_param_ids(obj["optimizer"], names, shapes)
    live = {int(k): v for k, v in ck["param_ids"].items()}
    assert got and all(live[pid] == name for pid, name in got.items())
    # Every id whose parameter has a shape no other parameter has is determined; the rest are not.
    unique = {pid for pid, n in live.items() if list(shapes.values()).count(shapes[n]) == 1}
    assert set(got) == unique


# ------------------------------------------------------------------------------------------------ edge cases
def test_steps_per_epoch_needs_one_whole_ratio() -> None:
    from ilr_inspect.logs import steps_per_epoch

    assert steps_per_epoch(iter([(3, 1), (6, 2), (9, 3)])) == 3
    assert steps_per_epoch([(3, 1), (7, 2)]) is None  # two ratios: the epochs are not what they seem
    assert steps_per_epoch([(5, 2)]) is None  # not a whole number of steps
    assert steps_per_epoch([(None, 1), (4, None)]) is None


def test_epoch_log_without_epochs_in_the_checkpoints_is_not_used(tmp_path: Path) -> None:
    from ilr_inspect.series import open_series

    src = LAYOUTS / "keras_weights_only"
    (tmp_path / "ckpts").mkdir()
    for i, f in enumerate(sorted((src / "ckpts").iterdir())):
        shutil.copy(f, tmp_path / "ckpts" / f"{'abc'[i]}.weights.h5")  # no epoch in the names
    shutil.copy(src / "training.log", tmp_path)
    with open_series(tmp_path / "ckpts") as series:
        assert series.logs is not None and series.logs.lr_series() is None
        assert any("logged by epoch" in w and "not used" in w for w in series.warnings)


def test_two_keras_files_that_disagree_are_not_used(tmp_path: Path) -> None:
    import zipfile

    src = LAYOUTS / "keras_weights_only"
    shutil.copytree(src / "ckpts", tmp_path / "ckpts")
    shutil.copy(src / "model.keras", tmp_path)
    with zipfile.ZipFile(src / "model.keras") as zin, zipfile.ZipFile(tmp_path / "other.keras", "w") as zout:
        for item in zin.namelist():
            data = zin.read(item)
            if item == "config.json":
                cfg = json.loads(data)
                cfg["compile_config"]["optimizer"]["config"]["momentum"] = 0.5
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    table, err = _hparams(tmp_path / "ckpts")
    assert table["momentum"].isna().all() and table["weight_decay"].isna().all()
    assert "different optimizer settings" in " ".join(err.split())


def test_orbax_unreadable_run_metadata_is_a_warning(tmp_path: Path) -> None:
    truth = _truth("orbax_manager")
    ckpts = shutil.copytree(LAYOUTS / "orbax_manager" / "ckpts", tmp_path / "ckpts")
    (ckpts / "metadata" / "_ROOT_METADATA").write_text("{not json")
    table, err = _hparams(ckpts)
    _check_against_truth(table, truth)  # inject_hyperparams still gives lr / wd / β1
    assert table["wd_mode"].isna().all()  # the optimizer name (adamw) was only in the run metadata
    assert "_ROOT_METADATA not read" in " ".join(err.split())


def test_keras_run_root_is_the_series_below_with_the_final_save_named() -> None:
    # The folder a user types is the run's root: ckpts/ (ModelCheckpoint) plus model.save()'s model.keras.
    truth = _truth("keras_weights_only")
    table, err = _hparams(LAYOUTS / "keras_weights_only")
    assert sorted(table["step"].unique()) == sorted(c["step"] for c in truth["checkpoints"])
    assert "model.keras: a single file beside the series below it" in err
    _check_against_truth(table, truth)

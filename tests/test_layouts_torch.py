"""Real PyTorch-family output folders (fixtures/layouts/*, written by fixtures/make_layouts_torch.py with each
framework's own save path): the CLI pointed at the folder a user would type must list the right checkpoints with the
right steps, report other names of one checkpoint as aliases, and give per-parameter lr / weight decay / momentum
equal to what the live optimizer held (``truth.json``). Missing data is a note and an empty cell, never exit 1.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ilr_inspect.cli import app

LAYOUTS = Path(__file__).resolve().parents[1] / "fixtures" / "layouts"


def _truth(name: str) -> dict[str, Any]:
    return json.loads((LAYOUTS / name / "truth.json").read_text())


def _cli(*args: str) -> tuple[Any, str]:
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result, result.stderr


def _ls(path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    result, err = _cli("ls", str(path), "--format", "json", *extra)
    return json.loads(result.stdout), err


def _hparams(path: Path, *extra: str) -> tuple[pd.DataFrame, str]:
    result, err = _cli("hparams", str(path), "--format", "csv", *extra)
    return pd.read_csv(io.StringIO(result.stdout), keep_default_na=True), err


def _check_hparams(frame: pd.DataFrame, truth: dict[str, Any], source: str) -> None:
    """Every (checkpoint, parameter) row equals the live optimizer's group values at save time."""
    rows = {(Path(r.checkpoint).name, r.parameter): r for r in frame.itertuples()}
    n = 0
    for ck in truth["checkpoints"]:
        for param, want in ck["hparams"].items():
            got = rows[(ck["file"], param)]
            for col in ("lr", "weight_decay", "momentum"):
                assert getattr(got, col) == pytest.approx(want[col], rel=1e-9, abs=1e-15), (ck["file"], param, col)
            if "beta2" in want:
                assert got.beta2 == pytest.approx(want["beta2"], rel=1e-9)
            assert got.optimizer.lower() == truth["optimizer"].lower() and got.wd_mode == truth["wd_mode"]
            assert got.lr_source == got.wd_source == got.momentum_source == source
            n += 1
    assert n == len(frame) > 0  # no row the truth does not cover


# ------------------------------------------------------------------------------------- HF Trainer + save_model
def test_hf_trainer_output_dir_with_final_save() -> None:
    root = LAYOUTS / "hf_trainer_final"
    truth = _truth("hf_trainer_final")
    assert (root / "model.safetensors").is_file() and (root / "training_args.bin").is_file()
    doc, err = _ls(root)
    rows = doc["rows"]
    assert [Path(r["checkpoint"]).name for r in rows] == [c["file"] for c in truth["checkpoints"]]
    assert [r["step"] for r in rows] == [c["step"] for c in truth["checkpoints"]] == [10, 20]
    assert [r["epoch"] for r in rows] == [c["epoch"] for c in truth["checkpoints"]]  # fractional epochs: no crash
    # The top level is the final save: reported with its step and as the same checkpoint as checkpoint-20.
    final = truth["final"]
    assert f"identical to {final['same_as']} at step {final['step']}" in " ".join(err.split())
    assert "hf_trainer_final (final save" in rows[-1]["aliases"]
    frame, _ = _hparams(root)
    _check_hparams(frame, truth, "optimizer")


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(LAYOUTS / name, dst, symlinks=True)
    return dst


def _perturb_top(root: Path) -> None:
    """Re-save the top-level weights slightly changed (a final save that is no checkpoint's copy)."""
    from safetensors.numpy import load_file, save_file

    sd = load_file(root / "model.safetensors")
    sd = {k: (v * 1.01 if v.dtype.kind == "f" else v) for k, v in sd.items()}
    save_file(sd, root / "model.safetensors", metadata={"format": "pt"})


def test_hf_final_save_with_its_own_step_is_a_point(tmp_path: Path) -> None:
    root = _copy("hf_trainer_final", tmp_path)
    _perturb_top(root)
    state = json.loads((root / "trainer_state.json").read_text())
    state["global_step"] = 25  # training went on after the last checkpoint
    (root / "trainer_state.json").write_text(json.dumps(state))
    doc, err = _ls(root)
    assert [r["step"] for r in doc["rows"]] == [10, 20, 25]
    assert Path(doc["rows"][-1]["checkpoint"]).name == root.name
    assert "included at step 25" in " ".join(err.split())


def test_hf_final_save_without_step_is_left_out_with_a_reason(tmp_path: Path) -> None:
    root = _copy("hf_trainer_final", tmp_path)
    _perturb_top(root)
    (root / "trainer_state.json").unlink()
    doc, err = _ls(root)
    assert [r["step"] for r in doc["rows"]] == [10, 20]
    assert "left out: its step is unknown" in " ".join(err.split())


def test_hf_final_save_equal_to_an_earlier_checkpoint(tmp_path: Path) -> None:
    root = _copy("hf_trainer_final", tmp_path)  # load_best_model_at_end: the final save is checkpoint-10's model
    shutil.copyfile(root / "checkpoint-10" / "model.safetensors", root / "model.safetensors")
    doc, err = _ls(root)
    assert [r["step"] for r in doc["rows"]] == [10, 20]
    assert "identical to checkpoint-10 at step 10" in " ".join(err.split())


def test_missing_steps_and_fractional_epochs_never_crash_the_table() -> None:
    from ilr_inspect.inventory import whole_or_float

    assert whole_or_float(pd.Series([10, None, 30], dtype=object)).tolist() == [10, pd.NA, 30]
    col = whole_or_float(pd.Series([0.5, None, 2], dtype=object))
    assert col.dtype == "float64" and col.iloc[0] == 0.5 and np.isnan(col.iloc[1])


# ------------------------------------------------------------------------------------- safetensors __metadata__
@pytest.mark.parametrize("name", ["safetensors_meta", "safetensors_meta_sgd"])
def test_safetensors_metadata_hyperparameters(name: str) -> None:
    truth = _truth(name)
    doc, _ = _ls(LAYOUTS / name)
    assert [r["step"] for r in doc["rows"]] == [c["step"] for c in truth["checkpoints"]]
    assert {r["hparams_source"] for r in doc["rows"]} == {"safetensors:metadata"}
    frame, err = _hparams(LAYOUTS / name)
    _check_hparams(frame, truth, "safetensors:metadata")
    assert "no intrinsic LR" not in err


def test_metadata_spellings_and_optimizer_modes() -> None:
    from ilr_inspect.formats.safetensors_file import hparams_from_metadata

    kohya = hparams_from_metadata({"ss_learning_rate": "0.0001", "ss_steps": "500",
                                   "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9,0.99))"})
    assert kohya is not None
    assert (kohya.lr, kohya.weight_decay, kohya.momentum, kohya.beta2) == (1e-4, 0.01, 0.9, 0.99)
    assert (kohya.optimizer, kohya.wd_mode, kohya.source) == ("AdamW", "decoupled", "safetensors:metadata")
    adam = hparams_from_metadata({"learning_rate": "3e-4", "beta1": "0.8", "beta2": "0.9", "optimizer": "adam"})
    assert adam is not None and (adam.momentum, adam.beta2, adam.optimizer, adam.wd_mode) == (0.8, 0.9, "Adam",
                                                                                             "coupled")
    assert hparams_from_metadata({"format": "pt", "step": "3"}) is None  # nothing invented


# -------------------------------------------------------------------------------------------------------- timm
def test_timm_adamw_steps_from_the_optimizer_and_aliases() -> None:
    truth = _truth("timm")
    doc, _ = _ls(LAYOUTS / "timm")  # no --trust-pickle: args is an argparse.Namespace (data only)
    rows = doc["rows"]
    assert [Path(r["checkpoint"]).name for r in rows] == [c["file"] for c in truth["checkpoints"]]
    # N in checkpoint-N.pth.tar is the epoch; the step is Adam's update count, equal to the live run's.
    assert [r["step"] for r in rows] == [c["global_step"] for c in truth["checkpoints"]] == [8, 16, 24]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and doc["meta"]["axis"] == "step"
    aliases = {Path(a["path"]).name: (Path(a["same_as"]).name, a["how"]) for a in doc["meta"]["aliases"]}
    for alias, target in truth["alias_files"].items():  # hard links, or copies after a git checkout
        assert aliases[alias][0] == target and aliases[alias][1] in ("hard link", "identical bytes")
    frame, _ = _hparams(LAYOUTS / "timm")
    _check_hparams(frame, truth, "optimizer")
    assert set(frame.loc[frame.weight_decay == 0, "parameter"]) == {"bn1.weight", "bn1.bias", "bn2.weight",
                                                                   "bn2.bias", "fc.bias"}  # timm's no-decay split


def test_timm_sgd_has_no_steps_the_axis_is_epochs() -> None:
    truth = _truth("timm_sgd")
    doc, err = _ls(LAYOUTS / "timm_sgd")
    rows = doc["rows"]
    assert [r["step"] for r in rows] == [None, None, None]  # never invented from the epoch in the name
    assert [r["epoch"] for r in rows] == [c["epoch"] for c in truth["checkpoints"]]
    assert doc["meta"]["axis"] == "epoch" and "the series axis is epochs" in " ".join(err.split())
    assert len(rows) == 3  # last / model_best are not extra points
    frame, _ = _hparams(LAYOUTS / "timm_sgd")
    _check_hparams(frame, truth, "optimizer")


# -------------------------------------------------------------------------------------------------- accelerate
class _Marker:
    """Unpickling this writes a file: proof that a pickle was (not) loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_accelerate_save_state_project_folder(tmp_path: Path) -> None:
    truth = _truth("accelerate")
    root = _copy("accelerate", tmp_path)
    marker = tmp_path / "unpickled"
    for ck in (root / "checkpoints").iterdir():  # random_states_*.pkl must never be unpickled without trust
        (ck / "random_states_0.pkl").write_bytes(pickle.dumps(_Marker(str(marker))))
    doc, _ = _ls(root)  # the project folder a user types; the checkpoints sit two levels down
    assert [Path(r["checkpoint"]).name for r in doc["rows"]] == [c["file"] for c in truth["checkpoints"]]
    assert [r["step"] for r in doc["rows"]] == [c["step"] for c in truth["checkpoints"]] == [8, 16]
    frame, _ = _hparams(root)
    _check_hparams(frame, truth, "optimizer")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------- aliases
def test_symlinks_copies_and_hard_links_are_counted_once(tmp_path: Path) -> None:
    truth = _truth("aliases")
    root = _copy("aliases", tmp_path)
    assert (root / "latest.pt").is_symlink()
    os.link(root / "step_000010.pt", root / "best.pt")
    doc, err = _ls(root)
    assert [Path(r["checkpoint"]).name for r in doc["rows"]] == ["step_000010.pt", "step_000020.pt"]
    assert [r["step"] for r in doc["rows"]] == [c["step"] for c in truth["checkpoints"]]
    how = {Path(a["path"]).name: (Path(a["same_as"]).name, a["how"]) for a in doc["meta"]["aliases"]}
    assert how == {"latest.pt": ("step_000020.pt", "symlink"), "final.pt": ("step_000020.pt", "identical bytes"),
                   "best.pt": ("step_000010.pt", "hard link")}
    assert "counted once" in err
    frame, _ = _hparams(root)
    _check_hparams(frame, truth, "optimizer")


def test_same_size_different_checkpoints_are_not_aliases(tmp_path: Path) -> None:
    from ilr_inspect.layout import find_aliases

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    data = bytearray(os.urandom(100_000))
    a.write_bytes(bytes(data))
    data[54_321] ^= 1  # one bit in the middle, outside every sampled block
    b.write_bytes(bytes(data))
    keep, aliases = find_aliases([a, b])
    assert keep == [a, b] and aliases == []


# ------------------------------------------------------------------------------------------------ missing data
def test_missing_hyperparameters_one_note_with_the_flags() -> None:
    plain = LAYOUTS.parent / "torch_other" / "safetensors"  # weights and step only
    frame, err = _hparams(plain)
    notes = [ln for ln in err.splitlines() if "no intrinsic LR" in ln]
    assert len(notes) == 1
    for flag in ("--lr", "--wd", "--optimizer"):
        assert flag in notes[0]
    assert frame["lr"].isna().all() and frame["weight_decay"].isna().all() and (frame["lr_source"].isna().all())
    frame, err = _hparams(plain, "--lr", "0.1", "--wd", "1e-4", "--momentum", "0.9", "--optimizer", "sgd")
    assert "no intrinsic LR" not in err
    assert (frame["lr"] == 0.1).all() and (frame["wd_source"] == "cli").all()


def test_partial_hyperparameters_name_only_the_missing_flag(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    for step in (1, 2):
        save_file({"w": np.full((3, 3), float(step), np.float32)}, tmp_path / f"step_{step}.safetensors",
                  metadata={"step": str(step), "lr": "0.1", "optimizer": "SGD", "momentum": "0.9"})
    frame, err = _hparams(tmp_path)
    note = next(ln for ln in err.splitlines() if "no intrinsic LR" in ln)
    assert "--wd" in note and "--lr" not in note
    assert (frame["lr"] == 0.1).all() and frame["weight_decay"].isna().all()

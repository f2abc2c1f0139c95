"""Series assembly: step parsing from names, ordering, step sources, architecture checks, empty inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ilr_inspect.errors import ArchitectureMismatchError, EmptySeriesError, InputError, UsageError
from ilr_inspect.series import natural_key, open_series, step_from_name


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step_000100.pt", 100),
        ("epoch=0-step=100.ckpt", 100),
        ("epoch=12-step=4500.ckpt", 4500),
        ("checkpoint-500", 500),
        ("global_step500", 500),
        ("epoch3_iter150.pth", 150),
        ("model_step-7.safetensors", 7),
        ("best.pt", None),
        ("1200", 1200),
        ("checkpoint-3.pth.tar", 3),
    ],
)
def test_step_from_name(name: str, step: int | None) -> None:
    assert step_from_name(Path(name)) == step


def test_step_regex_override() -> None:
    assert step_from_name(Path("run-a-it0042.pt"), r"it(\d+)") == 42


def test_natural_sort() -> None:
    names = ["ckpt-10.pt", "ckpt-9.pt", "ckpt-100.pt"]
    assert sorted(names, key=natural_key) == ["ckpt-9.pt", "ckpt-10.pt", "ckpt-100.pt"]


def _write(path: Path, scale: float, metadata: dict[str, str] | None = None, width: int = 4) -> dict[str, np.ndarray]:
    arrays = {
        "conv.weight": np.full((width, 3, 3, 3), scale, dtype=np.float32),
        "bn.weight": np.ones(width, dtype=np.float32),
        "bn.running_mean": np.zeros(width, dtype=np.float32),
    }
    save_file(arrays, str(path), metadata=metadata)
    return arrays


def test_orders_by_name_step_not_lexically(tmp_path: Path) -> None:
    for s in (900, 1000, 50):
        _write(tmp_path / f"step_{s}.safetensors", s)
    with open_series([tmp_path], read_logs=False) as series:
        assert series.steps == [50, 900, 1000]
        assert {c.step_source for c in series} == {"name"}
        np.testing.assert_array_equal(series[0].read("conv.weight"), np.full((4, 3, 3, 3), 50, np.float32))


def test_step_inside_wins_over_name(tmp_path: Path) -> None:
    _write(tmp_path / "a_step_1.safetensors", 1, {"step": "300"})
    _write(tmp_path / "b_step_2.safetensors", 2, {"step": "200"})
    with open_series([tmp_path], read_logs=False) as series:
        assert series.steps == [200, 300]
        assert [c.step_source for c in series] == ["contents", "contents"]


def test_natural_order_without_steps(tmp_path: Path) -> None:
    for n in ("w10", "w9", "w100"):  # distinct contents: byte-identical files are one checkpoint (aliases)
        _write(tmp_path / f"{n}.safetensors", int(n[1:]))
    with open_series([tmp_path], read_logs=False) as series:
        assert [c.path.name for c in series] == ["w9.safetensors", "w10.safetensors", "w100.safetensors"]
        assert {c.step_source for c in series} == {"order"}
        assert series.steps == [None, None, None]


def test_glob_and_explicit_files(tmp_path: Path) -> None:
    for s in (1, 2, 3):
        _write(tmp_path / f"step_{s}.safetensors", s)
    with open_series([str(tmp_path / "step_*.safetensors")], read_logs=False) as series:
        assert series.steps == [1, 2, 3]
    with open_series([tmp_path / "step_3.safetensors", tmp_path / "step_1.safetensors"], read_logs=False) as s2:
        assert s2.steps == [1, 3]


def test_mixed_architecture_stop_and_skip(tmp_path: Path) -> None:
    for s in (1, 2, 3):
        _write(tmp_path / f"step_{s}.safetensors", s)
    _write(tmp_path / "step_4.safetensors", 4, width=8)
    with pytest.raises(ArchitectureMismatchError) as err:
        open_series([tmp_path], read_logs=False)
    assert "step_4.safetensors" in str(err.value) and "--on-mismatch skip" in (err.value.hint or "")
    with open_series([tmp_path], on_mismatch="skip", read_logs=False) as series:
        assert series.steps == [1, 2, 3]
        assert any("step_4.safetensors" in w for w in series.warnings)


def test_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(EmptySeriesError) as err:
        open_series([tmp_path], read_logs=False)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(InputError):
        open_series([tmp_path / "nope"], read_logs=False)
    with pytest.raises(EmptySeriesError):
        open_series([str(tmp_path / "*.pt")], read_logs=False)


def test_bad_step_regex(tmp_path: Path) -> None:
    _write(tmp_path / "a.safetensors", 1)
    with pytest.raises(UsageError):
        open_series([tmp_path], step_regex="no-group", read_logs=False)
    with pytest.raises(UsageError):
        open_series([tmp_path], step_regex="(", read_logs=False)


def test_nested_lightning_layout(tmp_path: Path) -> None:
    ck = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    ck.mkdir(parents=True)
    for s in (5, 10):
        _write(ck / f"epoch=0-step={s}.safetensors", s)
    with open_series([tmp_path], read_logs=False) as series:
        assert series.steps == [5, 10]


def test_overrides_fill_hparams_and_name_the_cli(tmp_path: Path) -> None:
    from ilr_inspect.measure.theory import dynamics
    from ilr_inspect.series import with_overrides

    _write(tmp_path / "step_1.safetensors", 1)
    hp_over = with_overrides(lr=0.01, wd=0.1, optimizer="decoupledadamw")
    with open_series([tmp_path], overrides=hp_over, read_logs=False) as series:
        hp = series.hparams_for(series[0])["conv.weight"]
    assert (hp.lr, hp.weight_decay, hp.optimizer, hp.wd_mode, hp.source) == (0.01, 0.1, "DecoupledAdamW", "unscaled",
                                                                              "cli")
    # Composer's DecoupledAdamW shrinks by λ per step, not ηλ (docs/theory.md §4).
    assert dynamics(hp).intrinsic_lr == 0.1
    adamw = with_overrides(lr=0.01, wd=0.1, optimizer="adamw")
    assert adamw is not None
    assert abs((dynamics(adamw).intrinsic_lr or 0) - 1e-3) < 1e-15
    with pytest.raises(UsageError):
        with_overrides(optimizer="nadam-ish")

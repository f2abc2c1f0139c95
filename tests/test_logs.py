"""Training logs and sidecars, written by the real loggers, read back and checked against the optimizer's own lr.

Each writer runs a few real steps; a hook records ``param_groups[g]["lr"]`` for every update, and that record is
the reference for what the logs mean (``used`` = lr of the update that produced step N).
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from ilr_inspect.logs import ColumnMap, discover, read_logs


def _by_step(series: pd.Series) -> dict[int, float]:
    return dict(zip(series.index.astype("int64").tolist(), series.astype("float64").tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Lightning: CSVLogger + TensorBoardLogger + LearningRateMonitor, SGD with two param groups and a StepLR schedule
# ---------------------------------------------------------------------------------------------------------------

LR0, LR1, WD, MOMENTUM, STEPS = 0.1, 0.03, 1e-4, 0.9, 8


def _train_lightning(out: Path) -> dict[int, list[float]]:
    """Run Trainer.fit; return {step N: [lr of group g used by the update that produced step N]}."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    used: dict[int, list[float]] = {}

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 1)
            self.save_hyperparameters({"lr": LR0, "weight_decay": WD, "optimizer": "SGD"})

        def training_step(self, batch: Any, _: int) -> Any:
            x, y = batch
            loss = ((self.b(self.a(x)) - y) ** 2).mean()
            self.log("train/loss", loss)
            return loss

        def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
            opt = self.optimizers().optimizer  # type: ignore[union-attr]
            # global_step = updates done so far; this update produces step global_step + 1.
            used[self.trainer.global_step + 1] = [float(g["lr"]) for g in opt.param_groups]
            super().optimizer_step(*args, **kwargs)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(
                [{"params": self.a.parameters(), "lr": LR0}, {"params": self.b.parameters(), "lr": LR1}],
                momentum=MOMENTUM,
                weight_decay=WD,
            )
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    trainer = L.Trainer(
        max_steps=STEPS,
        logger=[CSVLogger(out), TensorBoardLogger(out, name="tb")],
        callbacks=[LearningRateMonitor("step", log_momentum=True)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Model(), torch.utils.data.DataLoader(data, batch_size=4))
    return used


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, list[float]]]:
    pytest.importorskip("lightning")
    out = tmp_path_factory.mktemp("pl")
    with warnings.catch_warnings():  # the writer's own deprecation/dataloader warnings are not under test
        warnings.simplefilter("ignore")
        used = _train_lightning(out)
    return out, used


def test_lightning_csv_lr_is_the_lr_the_optimizer_used(lightning_run: tuple[Path, dict[int, list[float]]]) -> None:
    out, used = lightning_run
    assert sorted(used) == list(range(1, STEPS + 1))
    assert used[1] != used[STEPS]  # the schedule really changed
    data = read_logs([out / "lightning_logs" / "version_0"], root=out)
    assert data.warnings == []
    for g in (0, 1):
        series = data.lr_series(group=g)
        assert series is not None
        assert series.name == f"lr-SGD/pg{g + 1}"
        # CSV keeps float64: exact equality with the optimizer's value.
        assert _by_step(series) == {n: lrs[g] for n, lrs in used.items()}
        for n in range(1, STEPS + 1):
            hp = data.hparams_at(n, group=g)
            assert hp.lr == used[n][g]
            assert hp.lr_timing == "used"
            assert hp.momentum == MOMENTUM  # logged by LearningRateMonitor(log_momentum=True)
            assert hp.optimizer == "sgd"
            assert hp.wd_mode == "coupled"
            assert hp.weight_decay == WD  # from hparams.yaml
            assert hp.source == (
                "log:lightning_logs/version_0/metrics.csv+sidecar:lightning_logs/version_0/hparams.yaml"
            )
        # "next" = what the optimizer will use for the update after step N (what optimizer state would say).
        for n in range(0, STEPS):
            assert data.hparams_at(n, group=g, timing="next").lr == used[n + 1][g]
    # Before any update there is no used lr in the log; only the sidecar's configured value.
    assert data.hparams_at(0, use_constants=False).lr is None
    assert data.hparams_at(0).source == "sidecar:lightning_logs/version_0/hparams.yaml"
    # The global value is the first param group's.
    assert data.hparams_at(5).lr == used[5][0]


def test_lightning_tensorboard_lr_matches_in_float32(lightning_run: tuple[Path, dict[int, list[float]]]) -> None:
    out, used = lightning_run
    events = sorted((out / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    data = read_logs(events, root=out)
    assert data.warnings == []
    for g in (0, 1):
        series = data.lr_series(group=g)
        assert series is not None
        expected = np.array([used[n][g] for n in sorted(used)], dtype=np.float32)
        np.testing.assert_array_equal(series.loc[sorted(used)].to_numpy(dtype=np.float32), expected)
    assert data.scalars["wall_time"].notna().all()
    assert set(data.scalars["reader"]) == {"tensorboard"}


def test_lightning_discover_and_curves(lightning_run: tuple[Path, dict[int, list[float]]]) -> None:
    out, used = lightning_run
    found = {p.relative_to(out).as_posix() for p in discover(out)}
    assert "lightning_logs/version_0/metrics.csv" in found
    assert "lightning_logs/version_0/hparams.yaml" in found
    assert any(f.startswith("tb/version_0/events.out.tfevents.") for f in found)
    data = read_logs(discover(out), root=out)
    # CSV (float64) wins over TensorBoard (float32) for the same tag.
    series = data.lr_series(group=0)
    assert series is not None
    assert series.attrs["sources"] == ["lightning_logs/version_0/metrics.csv"]
    assert series.loc[STEPS] == used[STEPS][0]
    curves = data.curves()
    kinds = dict(zip(curves["tag"], curves["metric"], strict=False))
    assert kinds["train/loss"] == "loss"
    assert kinds["lr-SGD/pg1"] == "lr"
    assert kinds["epoch"] == "other"
    assert not curves.duplicated(["tag", "step"]).any()
    lr_curve = curves[curves["tag"] == "lr-SGD/pg2"].set_index("step")["value"]
    assert _by_step(lr_curve) == {n: lrs[1] for n, lrs in used.items()}


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Trainer: trainer_state.json in every checkpoint-N, TensorBoard via report_to
# ---------------------------------------------------------------------------------------------------------------

HF_STEPS = 7


def _train_hf(out: Path) -> dict[int, float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    used: dict[int, float] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            used[state.global_step + 1] = float(optimizer.param_groups[0]["lr"])

    class Tokens(torch.utils.data.Dataset[dict[str, Any]]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, Any]:
            x = torch.randint(0, 16, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0)
    args = TrainingArguments(
        str(out), max_steps=HF_STEPS, per_device_train_batch_size=4, logging_steps=1, save_steps=3,
        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01,
        report_to=["tensorboard"], use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=Tokens(), callbacks=[Capture()]).train()
    (out / "training_args.json").write_text(args.to_json_string())  # type: ignore[no-untyped-call]
    return used


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, float]]:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        used = _train_hf(out)
    return out, used


def test_hf_trainer_state_lr_is_the_lr_used_by_that_step(hf_run: tuple[Path, dict[int, float]]) -> None:
    out, used = hf_run
    assert sorted(used) == list(range(1, HF_STEPS + 1))
    found = {p.relative_to(out).as_posix() for p in discover(out)}
    # Only the newest of the per-checkpoint copies.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-7"]
    assert "checkpoint-7/trainer_state.json" in found
    assert "checkpoint-6/trainer_state.json" not in found
    assert "training_args.json" in found
    assert not any(f.endswith("config.json") for f in found)
    data = read_logs(discover(out), root=out)
    assert data.warnings == []
    series = data.lr_series()
    assert series is not None
    assert series.name == "learning_rate"
    assert _by_step(series) == used
    for n in range(1, HF_STEPS + 1):
        hp = data.hparams_at(n)
        assert hp.lr == used[n]
        assert hp.lr_timing == "used"
        assert hp.source == "log:checkpoint-7/trainer_state.json+sidecar:training_args.json"
    # A logged lr applies to every param group (HF: decay and no-decay groups share it).
    assert data.hparams_at(4, group=1).lr == used[4]


def test_hf_sources_and_sidecar(hf_run: tuple[Path, dict[int, float]]) -> None:
    out, used = hf_run
    data = read_logs(discover(out), root=out)
    hp = data.hparams_at(HF_STEPS, use_constants=False)
    assert (hp.lr, hp.weight_decay, hp.source) == (used[HF_STEPS], None, "log:checkpoint-7/trainer_state.json")
    hp = data.hparams_at(HF_STEPS)
    assert hp.source == "log:checkpoint-7/trainer_state.json+sidecar:training_args.json"
    args = json.loads((out / "training_args.json").read_text())
    assert hp.weight_decay == args["weight_decay"] == 0.01
    assert hp.momentum == args["adam_beta1"]
    assert hp.beta2 == args["adam_beta2"]
    assert hp.eps == args["adam_epsilon"]
    assert hp.optimizer == "adamw"
    assert hp.wd_mode == "decoupled"


def test_hf_tensorboard_tag_and_copies_merge(hf_run: tuple[Path, dict[int, float]], tmp_path: Path) -> None:
    out, used = hf_run
    events = sorted(out.rglob("events.out.tfevents.*"))
    data = read_logs(events, root=out)
    series = data.lr_series()
    assert series is not None
    assert series.name == "train/learning_rate"
    np.testing.assert_array_equal(
        series.loc[sorted(used)].to_numpy(np.float32), np.array([used[n] for n in sorted(used)], np.float32)
    )
    assert any("version unknown" in w for w in data.warnings)  # no trainer_state.json given: timing assumed
    # Two copies of the history: rows of the newer copy win, and none are duplicated.
    states = [out / "checkpoint-3" / "trainer_state.json", out / "checkpoint-6" / "trainer_state.json"]
    merged = read_logs(states, root=out)
    lr = merged.scalars[merged.scalars["tag"] == "learning_rate"]
    assert sorted(lr["step"]) == list(range(1, 7))
    assert set(lr["source"]) == {"checkpoint-6/trainer_state.json"}


def test_hf_before_451_logged_the_next_lr(hf_run: tuple[Path, dict[int, float]], tmp_path: Path) -> None:
    """transformers < 4.51 logged get_last_lr() after scheduler.step() (huggingface/transformers#36973)."""
    out, _ = hf_run
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(out / "checkpoint-6", ckpt, ignore=shutil.ignore_patterns("*.safetensors", "*.pt", "*.pth"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["transformers_version"] = "4.45.2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    logged = {e["step"]: e["learning_rate"] for e in json.loads((ckpt / "trainer_state.json").read_text())[
        "log_history"] if "learning_rate" in e}
    data = read_logs([ckpt / "trainer_state.json"], root=tmp_path)
    series = data.lr_series()
    assert series is not None
    assert _by_step(series) == {k + 1: v for k, v in logged.items()}
    assert data.hparams_at(4, timing="next").lr == logged[4]


# ---------------------------------------------------------------------------------------------------------------
# Plain torch SummaryWriter, generic CSV/JSONL with a column mapping, bad files, sidecars, discovery bounds
# ---------------------------------------------------------------------------------------------------------------


def test_summary_writer_generic_lr_sparse(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    lrs = {0: 0.5, 5: 0.25, 10: 0.125}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = SummaryWriter(str(tmp_path / "runs"))
        for step, lr in lrs.items():
            writer.add_scalar("lr", lr, step)
        for step in range(11):
            writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        writer.close()
    data = read_logs(discover(tmp_path), root=tmp_path)
    assert data.warnings == []
    # Nearest logged step at or before: step 7 uses the value logged at 5 (exact in float32: powers of two).
    assert data.hparams_at(7).lr == 0.25
    assert data.hparams_at(10).lr == 0.125
    assert data.hparams_at(4).lr == 0.5
    assert data.hparams_at(7).source.startswith("log:runs/events.out.tfevents.")
    loss = data.curves().query("metric == 'loss'")
    np.testing.assert_allclose(loss.sort_values("step")["value"], [1.0 / (s + 1) for s in range(11)], rtol=1e-6)


def test_generic_csv_and_jsonl_with_column_map(tmp_path: Path) -> None:
    steps = np.arange(0, 50, 10)
    lrs = 0.1 * 0.5 ** np.arange(5)
    pd.DataFrame({"it": steps, "LR": lrs, "decay": 5e-4, "xent": np.linspace(2, 1, 5), "note": "x"}).to_csv(
        tmp_path / "progress.csv", index=False
    )
    cols = ColumnMap(step="it", lr="LR", weight_decay="decay", loss="xent")
    data = read_logs([tmp_path / "progress.csv"], columns=cols, root=tmp_path)
    assert data.warnings == []
    series = data.lr_series()
    assert series is not None
    assert list(series.index) == list(steps)
    np.testing.assert_array_equal(series.to_numpy(), lrs)
    hp = data.hparams_at(25)
    assert (hp.lr, hp.weight_decay, hp.source) == (lrs[2], 5e-4, "log:progress.csv")
    assert set(data.curves().set_index("tag")["metric"].items()) == {("LR", "lr"), ("decay", "other"),
                                                                       ("xent", "loss")}
    # Without the mapping the file has no recognisable step: a warning, not a crash.
    plain = read_logs([tmp_path / "progress.csv"], root=tmp_path)
    assert plain.lr_series() is None
    assert plain.warnings == ["progress.csv: skipped, no step column (name it with --log-step-col)"]

    lines = [json.dumps({"step": int(s), "lr": float(v), "loss": 1.0}) for s, v in zip(steps, lrs, strict=True)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 50, "lr": 0.0')  # torn last line
    jl = read_logs([tmp_path / "metrics.jsonl"], root=tmp_path)
    assert jl.warnings == []
    series = jl.lr_series()
    assert series is not None
    np.testing.assert_array_equal(series.to_numpy(), lrs)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("metrics.csv", b"\x00\xff\xfe garbage \x00" * 50),
        ("metrics.csv", b"a,b\n1,2\n3,4,5,6\n"),
        ("metrics.csv", b""),
        ("metrics.csv", b"step,name\n1,foo\n2,bar\n"),
        ("events.out.tfevents.123.host", b"not a tfrecord at all" * 10),
        ("trainer_state.json", b"{not json"),
        ("hparams.yaml", b"lr: [unclosed\n"),
        ("config.json", b"[1, 2, 3]"),
    ],
)
def test_malformed_files_give_warnings(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    data = read_logs([tmp_path / name], root=tmp_path)
    assert data.scalars.empty
    assert data.lr_series() is None
    assert len(data.warnings) == 1
    assert data.warnings[0].startswith(f"{name}: skipped, ")


def test_sidecar_yaml_with_python_tags_is_read_safely(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    hparams = {
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "betas": (0.9, 0.95),
                                                                       "weight_decay": 0.05}},
        "namespace": argparse.Namespace(seed=1),
    }
    text = yaml.dump(hparams)  # real PyYAML output: !!python/tuple, !!python/object:argparse.Namespace
    assert "!!python/tuple" in text
    text += f"evil: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "hparams.yaml").write_text(text)
    data = read_logs([tmp_path / "hparams.yaml"], root=tmp_path)
    assert not marker.exists()
    assert data.warnings == []
    hp = data.hparams_at(100)
    assert (hp.lr, hp.momentum, hp.beta2, hp.weight_decay) == (3e-4, 0.9, 0.95, 0.05)
    assert (hp.optimizer, hp.wd_mode, hp.source) == ("adamw", "decoupled", "sidecar:hparams.yaml")


def test_discover_stays_within_the_parent(tmp_path: Path) -> None:
    run = tmp_path / "exp" / "run1"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "step_100.pt").write_bytes(b"")
    for p in (run / "metrics.csv", run / "hparams.yaml", tmp_path / "exp" / "metrics.csv",
              run / "sibling" / "metrics.csv", run / "lightning_logs" / "version_0" / "metrics.csv",
              ckpts / "global_step100" / "config.json", ckpts / "train.csv"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("step,lr\n0,0.1\n")
    found = {p.relative_to(tmp_path).as_posix() for p in discover(ckpts)}
    assert found == {"exp/run1/metrics.csv", "exp/run1/hparams.yaml", "exp/run1/lightning_logs/version_0/metrics.csv"}
    # A single checkpoint file searches like its folder.
    assert {p.relative_to(tmp_path).as_posix() for p in discover(ckpts / "step_100.pt")} == found


def test_missing_tbparse_is_a_warning_naming_the_extra(
    lightning_run: tuple[Path, dict[int, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    out, used = lightning_run
    monkeypatch.setitem(sys.modules, "tbparse", None)  # makes `import tbparse` raise ImportError
    data = read_logs(discover(out), root=out)
    assert len(data.warnings) == 1
    assert data.warnings[0].startswith("tb/version_0/events.out.tfevents.")
    assert "pip install 'ilr-inspect[tensorboard]'" in data.warnings[0]
    assert data.hparams_at(STEPS).lr == used[STEPS][0]  # the CSV log still answers

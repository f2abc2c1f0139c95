"""PyTorch-family readers on files written by the real save functions, checked against the in-memory objects.

References: the model's own ``state_dict()`` tensors (names, shapes, values), the live optimizer's
``param_groups`` (which group holds each parameter object → lr / wd / momentum), and the trainers' own records
(Lightning's global_step, HF ``trainer.state.log_history``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ilr_inspect.checkpoint import Checkpoint
from ilr_inspect.errors import UnsafePickleError
from ilr_inspect.formats import (
    OpenOptions,
    dcp,
    hf_folder,
    lightning,
    safetensors_file,
    torch_export,
    torch_pickle,
    torchscript,
)

SNIFFERS = (hf_folder, dcp, torch_export, torchscript, lightning, torch_pickle, safetensors_file)


def bn_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3,
          sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def reference_hparams(model: nn.Module, opt: torch.optim.Optimizer, prefix: str = "") -> dict[str, tuple[Any, ...]]:
    by_id = {id(p): prefix + n for n, p in model.named_parameters()}
    out = {}
    for g in opt.param_groups:
        mom = g["betas"][0] if "betas" in g else g.get("momentum")
        for p in g["params"]:
            out[by_id[id(p)]] = (g["lr"], g["weight_decay"], mom)
    return out


def assert_hparams(ckpt: Checkpoint, ref: dict[str, tuple[Any, ...]]) -> None:
    assert set(ckpt.hparams) == set(ref), ckpt.metadata.get("hparams_error")
    for name, (lr, wd, mom) in ref.items():
        h = ckpt.hparams[name]
        assert (h.lr, h.weight_decay, h.momentum) == pytest.approx((lr, wd, mom)), name
        assert h.lr_timing == "next"


def assert_weights(ckpt: Checkpoint, sd: dict[str, torch.Tensor], prefix: str = "", bn: str | None = None,
                   ordered: bool = True) -> None:
    """Names (in order), shapes, values and kinds; ``bn`` is the name prefix of the BN-CNN inside ``sd``."""
    if ordered:
        assert list(ckpt.tensors) == [prefix + k for k in sd]
    else:
        assert sorted(ckpt.tensors) == sorted(prefix + k for k in sd)
    for k, t in sd.items():
        info = ckpt.tensors[prefix + k]
        assert info.shape == tuple(t.shape)
        arr = ckpt.read(prefix + k)
        np.testing.assert_array_equal(arr, t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    kinds = {n: i.kind for n, i in ckpt.tensors.items()}
    prefix = prefix if bn is None else bn
    assert kinds[prefix + "1.running_mean"] == "buffer" and kinds[prefix + "1.num_batches_tracked"] == "buffer"
    assert kinds[prefix + "1.weight"] == "parameter" and kinds[prefix + "0.weight"] == "parameter"


def only_sniffer(path: Path) -> str:
    """The first registered reader (in REGISTRY order, among the torch ones) that claims ``path``."""
    return next(m.NAME for m in SNIFFERS if m.sniff(path))


# --- plain torch.save files -------------------------------------------------------------------------------------


def test_bare_state_dict(tmp_path: Path) -> None:
    m = bn_cnn()
    train(m, torch.optim.SGD(m.parameters(), lr=0.1), steps=1)
    p = tmp_path / "weights.pth"
    torch.save(m.state_dict(), p)
    assert only_sniffer(p) == "torch"
    with torch_pickle.open(p, OpenOptions()) as ck:
        assert_weights(ck, m.state_dict())
        assert (ck.step, ck.step_source, ck.hparams) == (None, "order", {})


def test_training_checkpoint_sgd_two_groups_different_wd(tmp_path: Path) -> None:
    m = bn_cnn()
    no_decay = [p for p in m.parameters() if p.ndim <= 1]
    decay = [p for p in m.parameters() if p.ndim > 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(m, opt, steps=3, sched=sched)
    p = tmp_path / "ckpt_000003.pt"
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": 1, "step": 3}, p)
    ck = torch_pickle.open(p, OpenOptions())
    assert_weights(ck, m.state_dict())
    assert (ck.step, ck.step_source, ck.metadata["epoch"]) == (3, "contents", 1)
    assert_hparams(ck, reference_hparams(m, opt))
    assert ck.hparams["0.weight"].lr == pytest.approx(0.01)  # after the StepLR boundary: the next update's lr
    assert ck.hparams["0.weight"].weight_decay == pytest.approx(5e-4) and ck.hparams["1.weight"].weight_decay == 0
    assert ck.hparams["0.weight"].optimizer == "SGD" and ck.hparams["0.weight"].wd_mode == "coupled"
    assert ck.metadata["scheduler_last_lr"] == pytest.approx(sched.get_last_lr())
    assert ck.hparams_source == "optimizer"


def test_adamw_checkpoint_tutorial_keys_and_ddp_prefix(tmp_path: Path) -> None:
    m = bn_cnn()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.8, 0.95))
    train(m, opt, steps=2)
    sd = {"module." + k: v for k, v in m.state_dict().items()}  # what DDP's state_dict() looks like
    p = tmp_path / "epoch2.tar"
    torch.save({"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 2, "loss": 0.5}, p)
    ck = torch_pickle.open(p, OpenOptions())
    assert ck.metadata["stripped_prefix"] == "module." and ck.metadata["weights_key"] == "model_state_dict"
    assert_weights(ck, m.state_dict())
    # No step key, but AdamW counts its updates: that count is the step (never the epoch).
    updates = max(int(st["step"]) for st in opt.state_dict()["state"].values())
    assert ck.step == updates == 2 and ck.step_source == "contents" and ck.metadata["epoch"] == 2
    assert_hparams(ck, reference_hparams(m, opt))
    h = ck.hparams["8.weight"]
    assert (h.optimizer, h.wd_mode, h.beta2) == ("AdamW", "decoupled", 0.95)


def test_torch_compile_prefix_and_named_optimizer(tmp_path: Path) -> None:
    m = bn_cnn()
    # torch.compile's OptimizedModule registers the model as submodule ``_orig_mod``; the same wrapper without
    # importing dynamo (slow, and it warns on import) gives identical state_dict and named_parameters names.
    compiled = nn.Module()
    compiled.add_module("_orig_mod", m)
    opt = torch.optim.SGD(compiled.named_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    train(m, opt, steps=1)
    p = tmp_path / "c.pt"
    torch.save({"state_dict": compiled.state_dict(), "optimizer": opt.state_dict(), "global_step": 1}, p)
    ck = torch_pickle.open(p, OpenOptions())
    assert ck.metadata["stripped_prefix"] == "_orig_mod."
    assert_weights(ck, m.state_dict())
    assert ck.step == 1
    assert_hparams(ck, reference_hparams(m, opt))


def test_ema_series_key_override_and_largest_dict(tmp_path: Path) -> None:
    m, ema = bn_cnn(), bn_cnn()
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    p = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": m.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 4}, p)
    base = torch_pickle.open(p, OpenOptions())
    assert base.metadata["ema_key"] == "state_dict_ema"
    assert_weights(base, m.state_dict())
    assert_weights(torch_pickle.open(p, OpenOptions(ema=True)), ema.state_dict())
    assert_weights(torch_pickle.open(p, OpenOptions(key="state_dict_ema")), ema.state_dict())
    q = tmp_path / "odd.pt"
    torch.save({"weights": m.state_dict(), "extra": {"scale": torch.ones(1)}, "iteration": 12}, q)
    ck = torch_pickle.open(q, OpenOptions())
    assert ck.metadata["weights_key"] == "weights" and ck.step == 12
    assert_weights(ck, m.state_dict())


def test_tied_weights_listed_once(tmp_path: Path) -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    p = tmp_path / "tied.bin"
    torch.save(model.state_dict(), p)
    ck = torch_pickle.open(p, OpenOptions())
    assert list(ck.tensors) == ["emb.weight"] and ck.metadata["tied"] == {"head.weight": "emb.weight"}


def test_legacy_format_and_bfloat16(tmp_path: Path) -> None:
    m = bn_cnn()
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    p = tmp_path / "legacy.pt"
    torch.save(sd, p, _use_new_zipfile_serialization=False)
    ck = torch_pickle.open(p, OpenOptions())
    assert ck.tensors["0.weight"].dtype == "bfloat16"
    arr = ck.read("0.weight")
    assert arr.dtype == np.float32
    assert_weights(ck, sd)


def test_numpy_scalars_and_namespace_do_not_need_trust(tmp_path: Path) -> None:
    m = bn_cnn()
    p = tmp_path / "np.pt"
    torch.save({"state_dict": m.state_dict(), "metric": np.float64(0.75), "hist": np.arange(3)}, p)
    assert torch_pickle.open(p, OpenOptions()).metadata["weights_key"] == "state_dict"
    # timm's args Namespace is allowlisted as data-only (docs/security.md); a foreign class still needs trust.
    q = tmp_path / "timm_args.pth"
    args = argparse.Namespace(lr=0.4, weight_decay=2e-5, momentum=0.9, opt="sgd")
    torch.save({"state_dict": m.state_dict(), "args": args, "epoch": 1}, q)
    assert torch_pickle.open(q, OpenOptions()).metadata["args"] == vars(args)
    import decimal

    r = tmp_path / "foreign.pth"
    torch.save({"state_dict": m.state_dict(), "best": decimal.Decimal("0.5")}, r)
    with pytest.raises(UnsafePickleError) as ei:
        torch_pickle.open(r, OpenOptions())
    assert ei.value.globals_needed == ["decimal.Decimal"] and ei.value.path == r
    assert torch_pickle.open(r, OpenOptions(trust_pickle=True)).metadata["weights_key"] == "state_dict"


# --- Lightning --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.1, wd: float = 5e-4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = bn_cnn()
            self.temperature = nn.Parameter(torch.ones(()))  # outside the optimizer on purpose

        def training_step(self, batch: Any, _i: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> Any:
            ps = list(self.model.parameters())
            opt = torch.optim.SGD([{"params": [p for p in ps if p.ndim > 1], "weight_decay": self.hparams.wd},
                                   {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0}],
                                  lr=self.hparams.lr, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Record(Callback):
        def __init__(self) -> None:
            self.seen: dict[int, dict[str, Any]] = {}

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            opt = trainer.optimizers[0]
            self.seen[trainer.global_step] = {
                "hparams": reference_hparams(pl_module, opt),
                "state": copy.deepcopy(pl_module.state_dict()),
            }

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g))
    root = tmp_path_factory.mktemp("lightning")
    rec = Record()
    trainer = L.Trainer(max_steps=3, enable_progress_bar=False, logger=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=1, save_top_k=-1), rec])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        trainer.fit(Module(), torch.utils.data.DataLoader(ds, batch_size=4))
    return {"dir": root / "ckpts", "seen": rec.seen}


@pytest.mark.slow  # the fixture imports Lightning and trains 3 steps (~5 s once per module)
def test_lightning_checkpoints(lightning_run: dict[str, Any]) -> None:
    files = sorted(lightning_run["dir"].glob("*.ckpt"))
    assert len(files) == 3
    for f in files:
        assert only_sniffer(f) == "lightning"
        ck = lightning.open(f, OpenOptions())
        assert ck.step_source == "contents"
        assert f.name.endswith(f"step={ck.step}.ckpt")
        seen = lightning_run["seen"][ck.step]
        assert_weights(ck, seen["state"], bn="model.")
        assert_hparams(ck, seen["hparams"])
        assert "temperature" not in ck.hparams and "temperature" in ck.tensors
        assert ck.metadata["hyper_parameters"] == {"lr": 0.1, "wd": 5e-4}
        assert ck.metadata["scheduler_last_lr"][0][0] == pytest.approx(ck.hparams["model.0.weight"].lr)
    # the lr really moved between checkpoints (StepLR per step), so the per-step comparison above had teeth
    lrs = [lightning.open(f, OpenOptions()).hparams["model.0.weight"].lr for f in files]
    assert len(set(lrs)) == 3


@pytest.mark.slow
def test_lightning_checkpoint_needing_weights_only_false(lightning_run: dict[str, Any], tmp_path: Path) -> None:
    # Lightning ≥2.5 checkpoints whose hyper_parameters pickle objects (here a loss module) fail weights_only loads.
    src = sorted(lightning_run["dir"].glob("*.ckpt"))[-1]
    obj = torch.load(src, weights_only=True)
    obj["hyper_parameters"]["loss_fn"] = nn.CrossEntropyLoss()
    p = tmp_path / "epoch=1-step=3.ckpt"
    torch.save(obj, p)
    with pytest.raises(UnsafePickleError) as ei:
        lightning.open(p, OpenOptions())
    assert "torch.nn.modules.loss.CrossEntropyLoss" in ei.value.globals_needed
    ck = lightning.open(p, OpenOptions(trust_pickle=True))
    assert ck.step == obj["global_step"] and set(ck.hparams) == set(lightning.open(src, OpenOptions()).hparams)


# --- safetensors / Hugging Face -----------------------------------------------------------------------------------


def test_safetensors_file_metadata_step_and_bf16(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    m = bn_cnn()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd["0.weight"] = sd["0.weight"].to(torch.bfloat16)
    p = tmp_path / "step_42.safetensors"
    save_file(sd, p, metadata={"step": "42", "note": "x"})
    assert only_sniffer(p) == "safetensors"
    ck = safetensors_file.open(p, OpenOptions())
    assert (ck.step, ck.step_source) == (42, "contents")
    assert ck.metadata["safetensors_metadata"]["note"] == "x"
    assert sorted(ck.tensors) == sorted(sd)  # safetensors stores keys sorted
    for k, t in sd.items():
        np.testing.assert_array_equal(ck.read(k), t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    assert ck.tensors["1.num_batches_tracked"].kind == "buffer" and ck.tensors["0.weight"].dtype == "bfloat16"


def _tiny_bert() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def test_hf_save_pretrained_sharded_and_bin(tmp_path: Path) -> None:
    model = _tiny_bert()
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert only_sniffer(out) == "hf"
    ck = hf_folder.open(out, OpenOptions())
    sd = model.state_dict()
    assert set(ck.tensors) == set(sd)
    for k in ck.tensors:
        np.testing.assert_array_equal(ck.read(k), sd[k].numpy())
    assert ck.metadata["model_type"] == "bert" and len(ck.metadata["weights_files"]) > 1
    assert ck.step is None
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(sd, binary / "pytorch_model.bin")
    (binary / "config.json").write_text(model.config.to_json_string())
    ck2 = hf_folder.open(binary, OpenOptions())
    assert list(ck2.tensors) == list(sd)  # torch files keep named_parameters order
    np.testing.assert_array_equal(ck2.read("classifier.weight"), sd["classifier.weight"].numpy())


@pytest.fixture(scope="module")
def hf_trainer_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class DS(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 16

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)}

    class Record(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.seen: dict[int, dict[str, Any]] = {}

        def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kw: Any) -> None:
            self.seen[state.global_step] = {"hparams": reference_hparams(model, optimizer),
                                            "state": copy.deepcopy(model.state_dict())}

    out = tmp_path_factory.mktemp("hf") / "out"
    model = _tiny_bert()
    rec = Record()
    args = TrainingArguments(output_dir=str(out), max_steps=3, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, weight_decay=0.1, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=DS(), callbacks=[rec])
    trainer.train()
    return {"out": out, "seen": rec.seen, "log": trainer.state.log_history}


@pytest.mark.slow  # the fixture imports transformers and runs a real 3-step Trainer (~6 s once)
def test_hf_trainer_checkpoints(hf_trainer_run: dict[str, Any]) -> None:
    out = hf_trainer_run["out"]
    dirs = sorted(out.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    assert [d.name for d in dirs] == ["checkpoint-2", "checkpoint-3"]
    for d in dirs:
        before = sorted(os.listdir(d))
        assert only_sniffer(d) == "hf"
        ck = hf_folder.open(d, OpenOptions())
        n = int(d.name.split("-")[1])
        assert (ck.step, ck.step_source) == (n, "contents")
        seen = hf_trainer_run["seen"][n]
        assert set(ck.tensors) == set(seen["state"])
        for k in ck.tensors:
            np.testing.assert_array_equal(ck.read(k), seen["state"][k].numpy())
        assert_hparams(ck, seen["hparams"])
        # two groups with different wd: LayerNorm/bias at 0, matrices at 0.1
        assert ck.hparams["bert.embeddings.LayerNorm.weight"].weight_decay == 0.0
        assert ck.hparams["bert.encoder.layer.0.attention.self.query.weight"].weight_decay == pytest.approx(0.1)
        assert ck.hparams["classifier.weight"].optimizer == "AdamW"
        logged = [r["learning_rate"] for r in hf_trainer_run["log"] if r.get("step") == n and "learning_rate" in r]
        assert ck.metadata["log_lr"] == pytest.approx(logged[-1])
        assert isinstance(ck.metadata["training_args"], str)  # not unpickled without trust
        assert sorted(os.listdir(d)) == before  # nothing written into the checkpoint folder
    trusted = hf_folder.open(dirs[-1], OpenOptions(trust_pickle=True))
    assert trusted.metadata["training_args"]["weight_decay"] == pytest.approx(0.1)
    assert trusted.metadata["training_args"]["learning_rate"] == pytest.approx(1e-3)


def test_hf_optimizer_written_like_trainer_with_bin_weights(tmp_path: Path) -> None:
    # Same decay rule via transformers' own helper, but pickled weights (ordered names) and an SGD optimizer.
    from transformers.trainer_pt_utils import get_parameter_names

    model = _tiny_bert()
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    opt = torch.optim.SGD([
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ], lr=0.1, momentum=0.9)
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        opt.step()
    d = tmp_path / "checkpoint-2"
    d.mkdir()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 2, "epoch": 0.5, "log_history": []}))
    ck = hf_folder.open(d, OpenOptions())
    assert ck.step == 2
    assert_hparams(ck, reference_hparams(model, opt))


# --- DCP, torch.export, TorchScript -----------------------------------------------------------------------------


def test_dcp_without_process_group(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as tdcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    m = bn_cnn()
    opt = torch.optim.AdamW([{"params": [p for p in m.parameters() if p.ndim > 1], "weight_decay": 0.1},
                             {"params": [p for p in m.parameters() if p.ndim <= 1], "weight_decay": 0.0}], lr=1e-3)
    train(m, opt, steps=2)
    d = tmp_path / "step-7"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        tdcp.save({"model": m.state_dict(), "optim": get_optimizer_state_dict(m, opt), "step": 7},
                  checkpoint_id=str(d))
    before = sorted(os.listdir(d))
    assert only_sniffer(d) == "dcp"
    ck = dcp.open(d, OpenOptions())
    assert (ck.step, ck.step_source) == (7, "contents")
    assert_weights(ck, m.state_dict())
    assert_hparams(ck, reference_hparams(m, opt))
    assert sorted(os.listdir(d)) == before
    flat = tmp_path / "flat"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        tdcp.save(m.state_dict(), checkpoint_id=str(flat))
    assert_weights(dcp.open(flat, OpenOptions()), m.state_dict())


def test_torch_export_pt2(tmp_path: Path) -> None:
    m = bn_cnn()
    train(m, torch.optim.SGD(m.parameters(), lr=0.1), steps=1)
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    p = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(m, (x,)), p)
    assert only_sniffer(p) == "torch.export"
    ck = torch_export.open(p, OpenOptions())
    assert_weights(ck, m.state_dict(), ordered=False)  # the program lists parameters, then buffers
    assert ck.metadata["graph"] == "torch.export"
    ep = torch_export.load_exported(p)
    torch.testing.assert_close(ep.module()(x), m(x))


def test_torchscript(tmp_path: Path) -> None:
    m = bn_cnn()
    train(m, torch.optim.SGD(m.parameters(), lr=0.1), steps=1)
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    p = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.trace(m, x), p)
    assert only_sniffer(p) == "torchscript"
    assert not torchscript.sniff(tmp_path / "missing.pt")
    ck = torchscript.open(p, OpenOptions())
    assert_weights(ck, m.state_dict())
    assert ck.metadata["graph"] == "torchscript"
    torch.testing.assert_close(torchscript.load_scripted(p)(x), m(x))

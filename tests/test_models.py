"""Model building from every spec form, checkpoint-name matching (prefixes, tied weights, counters), the
mismatch report, and probe loading."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ilr_inspect.checkpoint import Checkpoint, DictSource
from ilr_inspect.errors import MissingExtraError, ModelError, ProbeError
from ilr_inspect.models import build_model, checkpoint_tensors, load_weights, match_keys
from ilr_inspect.probe import load_probe


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _ckpt(sd: dict[str, torch.Tensor], path: Path = Path("mem.pt")) -> Checkpoint:
    return Checkpoint(path, "test", DictSource({k: v.detach().numpy().copy() for k, v in sd.items()}))


def _trained_state() -> dict[str, torch.Tensor]:
    """A state dict different from a fresh model's (random weights and non-trivial running stats)."""
    src = _net()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
        src.train()
        src(torch.randn(16, 1, 8, 8))
    return src.state_dict()


X = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _expected(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    ref = _net()
    ref.load_state_dict(sd)
    ref.eval()
    with torch.no_grad():
        return ref(X)


def _functional(model: nn.Module, ckpt: Checkpoint) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.func.functional_call(model, checkpoint_tensors(model, ckpt), (X,))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("prefix", "transform"),
    [("", "names as stored"), ("module.", "names as stored"), ("_orig_mod.", "names as stored"),
     ("module._orig_mod.", "names as stored"),
     ("model.", "stripped prefix 'model.' (equally good: stripped prefix 'ema.')")],
)
def test_prefixes_are_normalised(prefix: str, transform: str) -> None:
    sd = _trained_state()
    stored = {prefix + k: v for k, v in sd.items()}
    if prefix == "model.":  # a Lightning module with an EMA copy under another attribute
        stored.update({"ema." + k: v * 0 for k, v in sd.items()})
    ckpt = _ckpt(stored)
    model = _net()
    rep = match_keys(model, ckpt)
    assert rep.transform == transform
    assert set(rep.mapping) == set(sd)
    if prefix == "model.":
        assert len(rep.ignored) == len(sd) and all(n.startswith("ema.") for n in rep.ignored)
    torch.testing.assert_close(_functional(model, ckpt), _expected(sd), rtol=0, atol=0)
    # The module's own tensors are untouched by functional_call: one instance serves every checkpoint.
    assert not torch.equal(model.state_dict()["0.weight"], sd["0.weight"])


def test_added_prefix_and_missing_counter() -> None:
    sd = _trained_state()
    stored = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    wrapper = nn.Module()
    wrapper.net = _net()  # keys "net.0.weight", …
    wrapper.forward = wrapper.net.forward  # type: ignore[method-assign]
    rep = match_keys(wrapper, _ckpt(stored))
    assert rep.transform == "added prefix 'net.'"
    assert rep.kept == ["net.1.num_batches_tracked"]
    load_weights(wrapper, _ckpt(stored))
    wrapper.eval()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(X), _expected(sd), rtol=0, atol=0)


def test_tied_weights_need_one_alias() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids))  # type: ignore[no-any-return]

    w = torch.randn(7, 4)
    model = Tied()
    rep = match_keys(model, _ckpt({"emb.weight": w}))
    assert rep.kept == ["head.weight"]
    ids = torch.tensor([[1, 2, 3]])
    out = torch.func.functional_call(model, checkpoint_tensors(model, _ckpt({"emb.weight": w})), (ids,))
    torch.testing.assert_close(out, (w[ids] @ w.T))


def test_mismatch_lists_every_key() -> None:
    sd = _trained_state()
    stored = dict(sd)
    stored["4.weight"] = torch.zeros(3, 100)  # wrong shape
    del stored["1.running_var"]  # missing
    stored["2.weight"] = torch.zeros(4)  # not in the model
    stored["extra.bias"] = torch.zeros(2)  # not in the model
    with pytest.raises(ModelError) as err:
        match_keys(_net(), _ckpt(stored, Path("run/step_5.pt")))
    msg = str(err.value)
    assert msg.startswith("run/step_5.pt: ")
    assert "1 missing from the checkpoint: 1.running_var" in msg
    assert "2 not in the model: 2.weight, extra.bias" in msg
    assert "4.weight (model (3, 144), checkpoint (3, 100))" in msg


# ----------------------------------------------------------------------------------------------- spec forms


def test_build_from_file_module_export_and_torchscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "helper.py").write_text("WIDTH = 4\n")
    (tmp_path / "mynet.py").write_text(
        "import torch.nn as nn\nfrom helper import WIDTH\n"
        "def build():\n    return nn.Sequential(nn.Linear(3, WIDTH), nn.BatchNorm1d(WIDTH), nn.Linear(WIDTH, 2))\n"
        "def not_a_module():\n    return 42\n"
    )
    from_file = build_model(f"{tmp_path}/mynet.py:build")
    assert isinstance(from_file, nn.Sequential) and not from_file.training
    monkeypatch.syspath_prepend(str(tmp_path))
    from_pkg = build_model("mynet:build")
    assert [tuple(p.shape) for p in from_pkg.parameters()] == [tuple(p.shape) for p in from_file.parameters()]
    with pytest.raises(ModelError, match=r"gave a int, not a torch\.nn\.Module"):
        build_model("mynet:not_a_module")
    with pytest.raises(ModelError, match="no callable named 'nope'"):
        build_model("mynet:nope")

    x = torch.randn(6, 3)
    net = from_file
    expected = net(x)
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "net.pt2")
    exported = build_model(str(tmp_path / "net.pt2"))
    torch.testing.assert_close(exported(x), expected)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(torch.jit.trace(net, (x,)), str(tmp_path / "net.ts"))  # type: ignore[no-untyped-call]
    scripted = build_model(str(tmp_path / "net.ts"))
    torch.testing.assert_close(scripted(x), expected)
    # A plain torch.save file is a checkpoint, not a model.
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="not a model file"):
        build_model(str(tmp_path / "weights.pt"))


def test_factory_that_raises_keeps_its_message(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def build():\n    raise ValueError('depth must be 6n+2, got 7')\n")
    with pytest.raises(ModelError) as err:
        build_model(f"{tmp_path}/m.py:build")
    assert "ValueError: depth must be 6n+2, got 7" in str(err.value)
    (tmp_path / "syntax.py").write_text("def build(:\n")
    with pytest.raises(ModelError, match="SyntaxError"):
        build_model(f"{tmp_path}/syntax.py:build")


@pytest.mark.parametrize("lib", ["timm", "torchvision"])
def test_named_architectures_need_their_package(lib: str) -> None:
    if importlib.util.find_spec(lib) is not None:
        model = build_model(f"{lib}:resnet18")
        assert sum(p.numel() for p in model.parameters()) > 10_000_000
    else:
        with pytest.raises(MissingExtraError, match=f"'{lib}'"):
            build_model(f"{lib}:resnet18")


def test_huggingface_folder_from_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=3)
    cfg.save_pretrained(tmp_path)
    model = build_model(str(tmp_path))
    assert type(model).__name__ == "ResNetForImageClassification"
    out = model(torch.randn(2, 1, 16, 16))
    assert tuple(out.logits.shape) == (2, 3)


# ---------------------------------------------------------------------------------------------------- probes


def test_probe_npz_and_pt(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(7, 2, 3)).astype(np.float64)
    y = np.arange(7) % 3
    np.savez(tmp_path / "a.npz", inputs=x, targets=y)
    p = load_probe(tmp_path / "a.npz")
    assert p.inputs.dtype == torch.float32 and p.labels is not None and p.labels.dtype == torch.int64
    np.testing.assert_array_equal(p.inputs.numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(p.labels.numpy(), y)
    assert "inputs='inputs'" in p.source and "labels='targets'" in p.source
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), tmp_path / "t.pt")
    q = load_probe(tmp_path / "t.pt")
    assert q.labels is not None and torch.equal(q.labels, p.labels)
    torch.save({"x": torch.arange(12).reshape(4, 3)}, tmp_path / "ids.pt")
    r = load_probe(tmp_path / "ids.pt")
    assert r.inputs.dtype == torch.int64 and r.labels is None
    np.savez(tmp_path / "bad.npz", a=x, b=x)
    with pytest.raises(ProbeError, match="cannot tell which entry holds the inputs"):
        load_probe(tmp_path / "bad.npz")
    np.savez(tmp_path / "n.npz", x=x, y=y[:5])
    with pytest.raises(ProbeError, match=r"expected \(7,\)"):
        load_probe(tmp_path / "n.npz")


def test_probe_image_folder(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    pixels = {}
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            arr = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
            image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
            pixels[(cls, i)] = arr
    p = load_probe(tmp_path)
    assert tuple(p.inputs.shape) == (4, 3, 5, 4)
    assert p.labels is not None and p.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(p.inputs[2].numpy(), pixels[("dog", 0)].transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_probe_factory(tmp_path: Path) -> None:
    (tmp_path / "data.py").write_text(
        "import numpy as np\n"
        "def load():\n    return {'x': np.ones((3, 2)), 'labels': np.array([0, 1, 1])}\n"
        "def bad():\n    raise OSError('dataset shard 3 is missing')\n"
    )
    p = load_probe(f"{tmp_path}/data.py:load")
    assert tuple(p.inputs.shape) == (3, 2) and p.labels is not None
    with pytest.raises(ProbeError, match="dataset shard 3 is missing"):
        load_probe(f"{tmp_path}/data.py:bad")
    assert not any(k.startswith("_ilr_user_data") and "bad" in k for k in sys.modules)

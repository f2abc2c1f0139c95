"""Oracle tests over the format registry: one reference model saved in every format (fixtures/reference, written by
the frameworks' own save functions via fixtures/make_fixtures.py) must read back with the same names, shapes,
values and hyperparameters.

The reference values come from ``state_dict.pt`` loaded with ``torch.load`` (the framework's own loader); the
name mapping and layout transposes (Flax/Keras kernels are HWIO, dense kernels (in, out)) are in
``expected.json``, recorded by the generator after checking that the Flax and Keras copies compute the same
logits as the torch network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ilr_inspect.checkpoint import Checkpoint
from ilr_inspect.formats import REGISTRY, OpenOptions, detect, load_format, open_checkpoint

REF = Path(__file__).resolve().parents[1] / "fixtures" / "reference"
EXPECTED: dict[str, Any] = json.loads((REF / "expected.json").read_text())
FILES: dict[str, dict[str, Any]] = EXPECTED["files"]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    import torch

    sd = torch.load(REF / "state_dict.pt", map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in sd.items()}


def _norm(name: str) -> str:
    """Compare names across '/'- and '.'-joined spellings (Flax/Orbax/Keras paths)."""
    return re.sub(r"[./]+", "/", name).strip("/")


def _lookup(ckpt: Checkpoint, aliases: list[str]) -> str:
    """The reader's name for a reference tensor: the one stored name that matches one of the expected spellings."""
    by_norm: dict[str, list[str]] = {}
    for n in ckpt.tensors:
        by_norm.setdefault(_norm(n), []).append(n)
    hits = sorted({n for a in aliases for n in by_norm.get(_norm(a), [])})
    assert len(hits) == 1, f"expected exactly one tensor named like {aliases}, found {hits} in {list(ckpt.tensors)}"
    return hits[0]


def _open(rel: str) -> Checkpoint:
    return open_checkpoint(REF / rel, OpenOptions(trust_pickle=bool(FILES[rel].get("trust_pickle", False))))


def test_every_registered_format_has_a_reference_file() -> None:
    covered = {spec["module"] for spec in FILES.values()}
    assert set(REGISTRY) <= covered, f"formats with no reference file: {sorted(set(REGISTRY) - covered)}"


def test_every_file_in_the_reference_folder_is_checked() -> None:
    listed = {rel.split("/")[0] for rel in FILES}
    present = {p.name for p in REF.iterdir() if p.name not in ("expected.json", "README.md")}
    assert present == listed


@pytest.mark.parametrize("rel", sorted(FILES))
def test_detected_format(rel: str) -> None:
    module = FILES[rel]["module"]
    assert detect(REF / rel) is load_format(module)
    with _open(rel) as ckpt:
        assert ckpt.format == load_format(module).NAME


@pytest.mark.parametrize("rel", sorted(FILES))
def test_names_shapes_values(rel: str, reference: dict[str, np.ndarray]) -> None:
    spec = FILES[rel]
    with _open(rel) as ckpt:
        mapped: dict[str, str] = {}
        for ref_name, t in spec["tensors"].items():
            name = _lookup(ckpt, t["names"])
            mapped[ref_name] = name
            want = reference[ref_name] if t["transpose"] is None else np.transpose(reference[ref_name], t["transpose"])
            info = ckpt.tensors[name]
            assert info.shape == want.shape, (ref_name, name)
            expected_kind = "parameter" if ref_name in EXPECTED["parameters"] else "buffer"
            assert info.kind == expected_kind, (ref_name, name, info.kind)
            if not t.get("check_values", True):
                continue
            got = np.asarray(ckpt.read(name))
            assert got.shape == want.shape, (ref_name, name)
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{rel}: {name}")
        # No model parameter may go missing, and nothing else may pose as a trainable parameter.
        params = {mapped[n] for n in EXPECTED["parameters"]}
        assert set(ckpt.parameters) == params, sorted(set(ckpt.parameters) ^ params)


@pytest.mark.parametrize("rel", sorted(r for r, s in FILES.items() if s.get("hparams")))
def test_hyperparameters(rel: str) -> None:
    spec = FILES[rel]
    with _open(rel) as ckpt:
        for ref_name, want in spec["hparams"].items():
            name = _lookup(ckpt, spec["tensors"][ref_name]["names"])
            hp = ckpt.hparams.get(name)
            assert hp is not None, f"{rel}: no hyperparameters for {name}"
            for field in ("lr", "weight_decay", "momentum"):
                got = getattr(hp, field)
                assert got is not None and got == pytest.approx(want[field], rel=1e-6), (rel, name, field, got)


@pytest.mark.parametrize("rel", sorted(r for r, s in FILES.items() if "step" in s))
def test_stored_step(rel: str) -> None:
    with _open(rel) as ckpt:
        assert ckpt.step == FILES[rel]["step"]
        assert ckpt.step_source in FILES[rel].get("step_source", ["contents"])

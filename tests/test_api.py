"""The public library API: every function takes a path, a list of paths or an open Series, and closes only what it
opened (regression tests for the string-iterated-as-characters and leaked-memory-map bugs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import ilr_inspect as ilr
from ilr_inspect.formats import safetensors_file

DIGITS = Path(__file__).resolve().parents[1] / "fixtures" / "digits"


def _safetensors_series(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    saved: dict[int, dict[str, np.ndarray]] = {}
    for step in (0, 10, 20):
        tensors = {"norm.weight": rng.normal(size=6).astype(np.float32),
                   "fc.weight": rng.normal(size=(6, 5)).astype(np.float32)}
        save_file(tensors, str(folder / f"step_{step}.safetensors"))
        saved[step] = tensors
    return saved


@pytest.mark.parametrize("as_arg", [str, Path, lambda p: [str(p)]])
def test_norms_from_paths_closes_its_memory_maps(tmp_path: Path, as_arg: object) -> None:
    saved = _safetensors_series(tmp_path)
    result = ilr.norms(as_arg(tmp_path))  # type: ignore[operator]
    # Regression: a series opened from a path was never closed, leaving its maps in the process-wide cache.
    assert not safetensors_file._MAPS
    rows = result.rows.set_index(["step", "unit"])
    for step, tensors in saved.items():
        for unit, name in (("norm", "norm.weight"), ("fc", "fc.weight")):
            want = float(np.linalg.norm(tensors[name].astype(np.float64)))
            # float32 storage; the accumulation precision itself is tested in test_measure.py
            assert rows.loc[(step, unit), "norm"] == pytest.approx(want, rel=1e-6)


def test_borrowed_series_stays_open(tmp_path: Path) -> None:
    saved = _safetensors_series(tmp_path)
    with ilr.open_series(tmp_path, read_logs=False) as series:
        ilr.norms(series)
        ilr.angles(series)
        ilr.units(series)
        assert safetensors_file._MAPS  # the caller's series is still usable ...
        first = series.checkpoints[0].read("fc.weight")
        np.testing.assert_array_equal(np.asarray(first), saved[0]["fc.weight"])
    assert not safetensors_file._MAPS  # ... and closed by the caller, not by the library


def test_borrow_closes_only_what_it_opened(tmp_path: Path) -> None:
    from ilr_inspect.series import borrow

    _safetensors_series(tmp_path)
    with borrow(str(tmp_path / "step_*.safetensors"), read_logs=False) as s:
        assert [c.step for c in s] == [0, 10, 20]
        s[0].read("fc.weight")
    assert not safetensors_file._MAPS
    with ilr.open_series(tmp_path, read_logs=False) as mine:
        with borrow(mine) as same:
            assert same is mine
        mine[0].read("fc.weight")
        with borrow(mine.checkpoints) as wrapped:
            assert wrapped.checkpoints == mine.checkpoints
        assert safetensors_file._MAPS  # neither borrow closed the caller's checkpoints


def test_distance_accepts_a_folder_string() -> None:
    """Regression: ``ilr.distance("…/ckpts", …)`` iterated the string and failed with "f: no such file"."""
    folder = DIGITS / "ckpts"
    model = f"{DIGITS / 'model.py'}:build"
    from_string = ilr.distance(str(folder), model, DIGITS / "probe.npz", bn_mode="eval")
    with ilr.open_series(folder, read_logs=False) as series:
        from_series = ilr.distance(series, model, DIGITS / "probe.npz", bn_mode="eval")
    assert len(from_string.rows) == len(series.checkpoints) - 1 >= 2
    cols = ["step_a", "step_b", "disagreement", "tv", "kl_ab", "kl_ba"]
    a = from_string.rows[cols].to_numpy(dtype=float)
    b = from_series.rows[cols].to_numpy(dtype=float)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    from ilr_inspect.schema import columns

    assert set(from_string.rows.columns) <= set(columns("distance"))


def test_import_is_light_and_typed() -> None:
    import subprocess
    import sys

    code = ("import sys, ilr_inspect, ilr_inspect.cli, ilr_inspect.evidence, ilr_inspect.schema; "
            "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert set(ilr.__all__) - {"__version__"} == set(ilr._API)
    import importlib

    for name, module in ilr._API.items():  # each public name is the real object, as the TYPE_CHECKING imports say
        assert getattr(ilr, name) is getattr(importlib.import_module(module), name)


def test_every_column_is_described_and_json_carries_the_schema(tmp_path: Path) -> None:
    import json

    from ilr_inspect import schema
    from ilr_inspect.output import serialize
    from ilr_inspect.series import with_overrides

    _safetensors_series(tmp_path)
    hp = with_overrides(lr=0.1, wd=5e-4, momentum=0.9, optimizer="sgd")
    with ilr.open_series(tmp_path, overrides=hp, read_logs=False) as series:
        results = [ilr.ls(series), ilr.hparams(series), ilr.units(series), ilr.norms(series),
                   ilr.norms(series, per_tensor=True), ilr.angles(series), ilr.angles(series, per_tensor=True)]
    for result in results:
        described = schema.columns(result.kind)
        missing = [c for c in result.rows.columns if c not in described]
        assert not missing, f"{result.kind}: columns without a schema line in ilr_inspect/schema.py: {missing}"
        obj = json.loads(serialize(result, "json"))
        assert [c["name"] for c in obj["columns"]] == list(result.rows.columns)
        assert all(c["type"] in ("int", "float", "str", "bool") and c["doc"] for c in obj["columns"])
        # The declared type matches the values written.
        pytypes: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}
        for row in obj["rows"]:
            for col in obj["columns"]:
                v = row[col["name"]]
                assert v is None or isinstance(v, pytypes[col["type"]]), (result.kind, col["name"], v)


def test_schema_doc_is_current() -> None:
    from ilr_inspect.schema import render_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
    assert doc.read_text() == render_markdown(), "run: python -m ilr_inspect.schema > docs/schema.md"


def test_formats_detection_table_is_current() -> None:
    from ilr_inspect.cli.docgen import FORMATS_DOC, formats_doc

    text = FORMATS_DOC.read_text()
    assert formats_doc(text) == text, "run: python -m ilr_inspect.cli.docgen --formats"


def test_model_detection_uses_the_format_registry(tmp_path: Path) -> None:
    """models.py asks the registry instead of re-detecting: a TorchScript archive is one, a state dict is not."""
    import warnings

    import torch

    from ilr_inspect.formats import sniffed
    from ilr_inspect.models import is_torch_export, is_torchscript

    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # TorchScript is deprecated, still saved
        torch.jit.save(torch.jit.script(net), str(tmp_path / "net.pt"))  # type: ignore[no-untyped-call]
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    assert sniffed(tmp_path / "net.pt") == "torchscript" and is_torchscript(tmp_path / "net.pt")
    assert sniffed(tmp_path / "weights.pt") == "torch" and not is_torchscript(tmp_path / "weights.pt")
    assert not is_torch_export(tmp_path / "net.pt")


def test_one_keyword_set_for_opening_a_series(tmp_path: Path) -> None:
    """Every table function opens paths with the same keywords as :func:`ilr_inspect.series.borrow`."""
    _safetensors_series(tmp_path)
    for name in ("ls", "hparams", "units", "norms", "angles"):
        result = getattr(ilr, name)(str(tmp_path), step_regex=r"step_(\d+)", on_mismatch="stop", read_logs=False)
        steps = result.rows["step"].dropna().astype(int).unique().tolist() if "step" in result.rows else None
        assert steps in (None, [0, 10, 20]), (name, steps)
        assert not safetensors_file._MAPS, name
    with pytest.raises(TypeError):
        ilr.norms(str(tmp_path), open_kwargs={})  # the old per-function spelling is gone, not silently ignored


def _imports(path: Path, module: str) -> set[str]:
    """What a file imports from ``ilr_inspect`` anywhere (module level, function level, TYPE_CHECKING blocks), as
    absolute dotted names: ``import m`` gives m, ``from m import x`` gives m.x; relative imports are resolved as
    Python does for ``module``."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("ilr_inspect")}


def _package_imports(name: str) -> dict[str, set[str]]:
    root = Path(ilr.__file__).parent / name
    found = {}
    for f in root.rglob("*.py"):
        module = "ilr_inspect." + ".".join(f.relative_to(root.parent).with_suffix("").parts)
        found[module] = _imports(f, module.removesuffix(".__init__"))
    return found


def test_imports_resolve_as_python_does() -> None:
    root = Path(ilr.__file__).parent
    got = _imports(root / "measure" / "__init__.py", "ilr_inspect.measure")
    assert {"ilr_inspect.invariance.unit.Unit", "ilr_inspect.measure.stream.stream_stats",
            "ilr_inspect.measure.theory", "ilr_inspect.checkpoint.HParams"} <= got
    assert "ilr_inspect.checkpoint.HParams" in _imports(root / "measure" / "theory.py", "ilr_inspect.measure.theory")
    got = _imports(root / "invariance" / "__init__.py", "ilr_inspect.invariance")
    assert {"ilr_inspect.invariance.rules.name_rule_units", "ilr_inspect.errors.ModelError"} <= got


def test_measure_and_invariance_do_not_import_each_other() -> None:
    """measure/ takes units and never detects; invariance/ detects and never measures; ilr_inspect.api joins them.
    Only the Unit record (ilr_inspect.invariance.unit) is shared."""
    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for module, names in _package_imports("measure").items():
        bad = {n for n in names if within(n, "ilr_inspect.invariance") and not within(n, "ilr_inspect.invariance.unit")}
        assert not bad, f"{module} imports {sorted(bad)}"
    for module, names in _package_imports("invariance").items():
        bad = {n for n in names if within(n, "ilr_inspect.measure")}
        assert not bad, f"{module} imports {sorted(bad)}"
    import subprocess
    import sys

    code = ("import sys, ilr_inspect.invariance; print('ilr_inspect.measure' in sys.modules); "
            "import ilr_inspect.measure; print('ilr_inspect.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_one_keyword_set_for_detection() -> None:
    """units, norms and angles take the same detection keywords (keyword-only, same defaults and annotations), as
    explicit parameters rather than a dict, plus the same shared ones."""
    import inspect

    from ilr_inspect import api
    from ilr_inspect.invariance import detect_units

    sigs = {name: inspect.signature(getattr(ilr, name)) for name in ("units", "norms", "angles")}
    det = inspect.signature(detect_units).parameters
    shared = (*api.DETECT_KEYWORDS, "quiet", "settings")
    for name, sig in sigs.items():
        params = sig.parameters
        assert "detect_kwargs" not in params, name
        assert list(params)[-1] == "series_kwargs" and params["series_kwargs"].kind is inspect.Parameter.VAR_KEYWORD
        for key in shared:
            p = params[key]
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, key)
            ref = sigs["units"].parameters[key]
            assert (p.default, p.annotation) == (ref.default, ref.annotation), (name, key)
        for key in api.DETECT_KEYWORDS:  # the same names and defaults as the detector they are passed to
            assert params[key].default == det[key].default, (name, key)
    assert sigs["norms"] == sigs["angles"]
    run_params = inspect.signature(api.run).parameters
    assert set(api.DETECT_KEYWORDS) <= set(run_params)


def test_detection_keywords_reach_the_detector(tmp_path: Path) -> None:
    """A units file given to norms/angles decides the units exactly as it does for units (one shared path)."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    _safetensors_series(ckpts)
    ufile = tmp_path / "units.toml"
    ufile.write_text('both = ["norm.weight", "fc.weight"]\n')
    got = {name: getattr(ilr, name)(str(ckpts), units_file=ufile, read_logs=False) for name in
           ("units", "norms", "angles")}
    assert got["units"].rows["unit"].tolist() == ["both"]
    assert set(got["norms"].rows["unit"]) == {"both"} == set(got["angles"].rows["unit"])
    with ilr.open_series(ckpts, read_logs=False) as series:
        a = series.checkpoints[0].read("norm.weight")
        b = series.checkpoints[0].read("fc.weight")
        want = float(np.sqrt(np.sum(np.asarray(a, np.float64) ** 2) + np.sum(np.asarray(b, np.float64) ** 2)))
    rows = got["norms"].rows.set_index("step")
    assert rows.loc[0, "norm"] == pytest.approx(want, rel=1e-6)

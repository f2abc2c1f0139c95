"""The report: page contents and size, numbers consistent with the input tables, downsampling that keeps the end
of a run, --fail-if gates (parsing, evaluation, exit code 3), exports, golden files and output safety.

Synthetic tables follow closed forms (norm relaxation under weight decay, the SGD equilibrium angle
sqrt(2ηλ/(1+μ))) so every expected number is recomputed here with NumPy, never taken from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ilr_inspect.errors import InputError, UsageError
from ilr_inspect.output import Result, serialize
from ilr_inspect.reporting import ReportTables, build_report, load_equilibrium
from ilr_inspect.reporting.downsample import aggregate, pick_steps, top_units
from ilr_inspect.reporting.gates import compute_metrics, evaluate, parse
from ilr_inspect.reporting.page import strip_bundle

GOLDEN = Path(__file__).parent / "golden"
FIXED_META: dict[str, Any] = {
    "tool": "ilr-inspect", "version": "0.1.0", "created": "2026-01-01T00:00:00+00:00", "command": None,
    "packages": {"ilr-inspect": "0.1.0", "python": "3.11"},
    "inputs": [{"path": "ckpts/step_000000.pt", "bytes": 10, "sha256": "ab" * 32, "hash_scope": "full"}],
    "settings": {"max_units": 12},
}


def synthetic_tables(n_ckpt: int = 100, n_units: int = 30, every: int = 100, seed: int = 0,
                     logs: bool = True) -> ReportTables:
    """SGD (μ=0.9, λ=5e-4) with lr 0.1 → 0.01 at 60 % of the run; every tenth unit is not scale-invariant."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n_ckpt) * every
    lr = np.where(steps < steps[-1] * 0.6, 0.1, 0.01)
    wd, mom = 5e-4, 0.9
    names = [f"layer{i // 3}.{i % 3}.conv.weight" for i in range(n_units)]
    numel = [int(144 * 2 ** (i % 5) * 16 + i) for i in range(n_units)]
    si = [i % 10 != 9 for i in range(n_units)]
    tau = np.concatenate([[0.0], np.cumsum((lr * wd)[:-1] * every)])
    rows, arows = [], []
    for u, name in enumerate(names):
        n0, ninf = 2.0 + u * 0.1, 0.6 + 0.02 * u
        norm = ninf + (n0 - ninf) * np.exp(-2 * tau)
        for k, s in enumerate(steps):
            rows.append({"step": int(s), "checkpoint": f"ckpts/step_{s:06d}.pt", "unit": name, "members": name,
                         "scale_invariant": si[u], "evidence": "name-rule", "numel": numel[u], "norm": norm[k],
                         "lr": lr[k], "weight_decay": wd, "momentum": mom, "optimizer": "sgd", "wd_mode": "coupled",
                         "intrinsic_lr": lr[k] * wd, "effective_lr": lr[k] / norm[k] ** 2, "intrinsic_time": tau[k]})
        for k in range(n_ckpt - 1):
            pred = math.sqrt(2 * lr[k] * wd / (1 + mom))
            aps = pred * (1 + 0.3 * math.exp(-tau[k] * 4) + 0.05 * rng.standard_normal())
            arows.append({"step_from": int(steps[k]), "step_to": int(steps[k + 1]), "steps": every, "unit": name,
                          "cosine": math.cos(aps * every), "angle": aps * every, "angle_per_step": aps,
                          "angle_per_sqrt_step": aps * math.sqrt(every), "relative_update": aps,
                          "predicted_angle_per_step": pred, "ratio": aps / pred})
    regimes = [("equilibrium" if i % 4 else "approaching") if si[i] else "undetermined" for i in range(n_units)]
    units = pd.DataFrame({"unit": names, "members": names, "kind": "tensor", "scale_invariant": si,
                          "evidence": "name-rule", "reason": "followed by BatchNorm2d", "regime": regimes,
                          "regime_detail": "synthetic"})
    ckpts = [f"ckpts/step_{s:06d}.pt" for s in steps]
    ls = pd.DataFrame({"step": steps, "step_source": "name", "checkpoint": ckpts, "format": "torch",
                       "tensors": 2 * n_units, "bytes": 10_000, "hparams_source": "optimizer-state"})
    hp = pd.DataFrame([{"step": int(s), "checkpoint": ckpts[k], "parameter": name, "lr": lr[k], "weight_decay": wd,
                        "momentum": mom, "beta2": None, "optimizer": "sgd", "wd_mode": "coupled",
                        "source": "optimizer-state"} for k, s in enumerate(steps) for name in names])
    curves = None
    if logs:
        cs = np.arange(0, steps[-1] + 1, 10)
        curves = pd.DataFrame({"step": np.concatenate([cs, cs]),
                               "tag": ["train/loss"] * len(cs) + ["val/acc"] * len(cs),
                               "value": np.concatenate([np.exp(-cs / 3000) + 0.05 * rng.random(len(cs)),
                                                        1 - np.exp(-cs / 3000)]),
                               "metric": ["loss"] * len(cs) + ["accuracy"] * len(cs)})
    return ReportTables(norms=pd.DataFrame(rows), angles=pd.DataFrame(arows), units=units, ls=ls, hparams=hp,
                        curves=curves, meta=dict(FIXED_META), title="synthetic run")


def frames(t: ReportTables) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """norms, angles and units of a synthetic table set (all present)."""
    assert t.norms is not None and t.angles is not None and t.units is not None
    return t.norms, t.angles, t.units


def si_names(units: pd.DataFrame) -> set[str]:
    return set(units[units["scale_invariant"].astype(bool)]["unit"])


def page_data(html: str) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """The datasets and chart specs embedded in a report page."""
    def block(name: str) -> Any:
        m = re.search(rf'<script type="application/json" id="{name}">(.*?)</script>', html, re.S)
        assert m is not None, name
        return json.loads(m.group(1))

    return block("ilr-data"), block("ilr-charts")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportTables, Any, str]:
    out = tmp_path_factory.mktemp("big") / "report.html"
    tables = synthetic_tables()
    result = build_report(tables, out, summary_md=out.with_suffix(".md"))
    return tables, result, out.read_text(encoding="utf-8")


def test_page_size_and_single_bundle(big: tuple[ReportTables, Any, str]) -> None:
    _, result, html = big
    beyond_js = len(strip_bundle(html).encode())
    assert beyond_js < 3_000_000, beyond_js  # the 100-checkpoint × 30-unit budget
    assert result.html_bytes - result.bundle_bytes < 3_000_000
    assert html.count("window.vegaEmbed=") == 1  # Vega, Vega-Lite and vega-embed inlined exactly once
    # Nothing outside the library bundle names a remote resource (no CDN, no fonts, no schema URL).
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", strip_bundle(html), re.I)
    assert "Content-Security-Policy" in html and "connect-src 'none'" in html


def test_many_units_stay_under_budget(tmp_path: Path) -> None:
    result = build_report(synthetic_tables(n_ckpt=100, n_units=300), tmp_path / "r.html")
    assert result.html_bytes - result.bundle_bytes < 3_000_000
    data, _ = page_data((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert len({r["unit"] for r in data["norms"]}) == 12 and len({r["unit"] for r in data["angles_heat"]}) == 150
    assert max(r["step_to"] for r in data["angles_heat"]) == 9900  # thinning keeps the end of the run


def test_every_section_and_chart_present(big: tuple[ReportTables, Any, str]) -> None:
    _, result, html = big
    assert set(result.figures) == {"norms_vs_step", "norms_vs_intrinsic_time", "angles_vs_prediction",
                                   "angle_ratio_heatmap", "hparams_timeline", "training_curves"}
    for section in ("summary", "units", "dynamics", "hyperparameters", "logs", "function", "provenance"):
        assert f'<section id="{section}">' in html
    _, charts = page_data(html)
    for c in charts:
        assert f'id="chart-{c["name"]}"' in html
    # Every figure has a one-line caption.
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert len(captions) == len(charts) and all(cap and "\n" not in cap for cap in captions)
    assert "lines for the 12 of 27 units with the most parameters" in html
    assert "No function-space results" in html  # absent tables are named, not silently skipped
    assert "sha256 (first 16)" in html and "abababababababab" in html  # provenance footer


def test_chart_numbers_match_the_tables(big: tuple[ReportTables, Any, str]) -> None:
    tables, _, html = big
    data, _ = page_data(html)
    assert tables.norms is not None and tables.angles is not None
    ref = tables.norms.set_index(["unit", "step"])
    for rec in data["norms"]:
        row = ref.loc[(rec["unit"], rec["step"])]
        np.testing.assert_allclose(rec["norm"], row["norm"], rtol=1e-5)
        np.testing.assert_allclose(rec["effective_lr"], row["lr"] / row["norm"] ** 2, rtol=1e-5)
    aref = tables.angles.set_index(["unit", "step_to"])
    for rec in data["angles"]:
        row = aref.loc[(rec["unit"], rec["step_to"])]
        np.testing.assert_allclose(rec["ratio"], row["angle_per_step"] / row["predicted_angle_per_step"], rtol=1e-5)
    # The prediction line is the closed form sqrt(2ηλ/(1+μ)) at the lr in force over the interval.
    for rec in data["angles_pred"]:
        lr = 0.1 if rec["step_to"] - 100 < 0.6 * 9900 else 0.01
        np.testing.assert_allclose(rec["predicted_angle_per_step"], math.sqrt(2 * lr * 5e-4 / 1.9), rtol=1e-5)
    # The range band covers every scale-invariant unit, not just the drawn ones.
    si = tables.norms[tables.norms["scale_invariant"]]
    band = pd.DataFrame(data["norms_band"]).set_index("step")
    np.testing.assert_allclose(band["norm_min"], si.groupby("step")["norm"].min().loc[band.index], rtol=1e-5)
    np.testing.assert_allclose(band["norm_max"], si.groupby("step")["norm"].max().loc[band.index], rtol=1e-5)
    assert [r["step"] for r in data["schedule"]] == [6000.0]


def test_markdown_summary_facts(big: tuple[ReportTables, Any, str], tmp_path: Path) -> None:
    tables, result, _ = big
    md = Path(result.summary_md).read_text(encoding="utf-8")
    assert "| Checkpoints | 100 (steps 0 … 9900) |" in md
    assert "| Learning rate | 0.1 → 0.01 |" in md
    assert "27 scale-invariant" in md
    _, angles, units = frames(tables)
    si_last = angles[angles["step_to"] == 9900]
    si_last = si_last[si_last["unit"].isin(si_names(units))]
    expected = float(np.median(si_last["angle_per_step"] / si_last["predicted_angle_per_step"]))
    assert f"| `final_angle_ratio` | {expected:.6g} |" in md


def test_long_series_is_thinned_but_keeps_first_last_and_changes(tmp_path: Path) -> None:
    tables = synthetic_tables(n_ckpt=1500, n_units=3, every=7, logs=False)
    result = build_report(tables, tmp_path / "r.html", max_points=100)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    data, _ = page_data(html)
    steps = sorted({r["step"] for r in data["norms"]})
    change = [r["step"] for r in data["schedule"]]
    assert len(change) == 1
    assert steps[0] == 0 and steps[-1] == 1499 * 7 and change[0] in steps
    assert len(steps) <= 101
    assert max(r["step_to"] for r in data["angles"]) == 1499 * 7
    assert "of 1500 checkpoints charted" in html
    assert result.html_bytes - result.bundle_bytes < 400_000


def test_pick_steps_and_aggregate_against_numpy() -> None:
    assert pick_steps(list(range(10)), 20) == list(range(10))
    picked = pick_steps(list(range(1000)), 10, keep=[500])
    assert picked[0] == 0 and picked[-1] == 999 and 500 in picked and len(picked) == 11
    frame = pd.DataFrame({"g": "a", "x": np.arange(1000), "y": np.arange(1000.0) ** 2})
    agg, done = aggregate(frame, "x", "y", "g", 10)
    assert done and len(agg) == 10
    ref = (np.arange(1000.0) ** 2).reshape(10, 100)
    np.testing.assert_allclose(agg["y"], ref.mean(axis=1))
    np.testing.assert_allclose(agg["y_min"], ref.min(axis=1))
    np.testing.assert_allclose(agg["y_max"], ref.max(axis=1))
    assert agg["x"].iloc[-1] == 999  # the run's end is the last bin's edge


def test_top_units_picks_largest_scale_invariant() -> None:
    frame = pd.DataFrame({"unit": [f"u{i}" for i in range(130)], "numel": list(range(130)),
                          "scale_invariant": [i != 129 for i in range(130)], "step": 0})
    shown, total = top_units(frame, 5)
    assert total == 129 and shown == ["u128", "u127", "u126", "u125", "u124"]


# --- gates -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["max_angle_ratio", "max_angle_ratio>>1", "nope>1", "max_angle_ratio>abc",
                                  "regime>periodic", "regime==sideways", "max_angle_ratio>nan", ">1", ""])
def test_malformed_gate_is_a_usage_error(expr: str) -> None:
    with pytest.raises(UsageError):
        parse(expr)


def test_malformed_gate_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        build_report(synthetic_tables(n_ckpt=5, n_units=2), tmp_path / "r.html", fail_if=["bogus<1"])
    assert not (tmp_path / "r.html").exists()


def test_gates_hold_exactly_at_the_threshold() -> None:
    tables = synthetic_tables(n_ckpt=20, n_units=6, logs=False)
    metrics = compute_metrics(tables)
    norms, a, units = frames(tables)
    true_max = float((a["angle_per_step"] / a["predicted_angle_per_step"])[a["unit"].isin(si_names(units))].max())
    si_norm = norms[norms["scale_invariant"]]["norm"]
    cases = [(f"max_angle_ratio>{true_max * 0.999}", True), (f"max_angle_ratio>{true_max * 1.001}", False),
             (f"max_angle_ratio >= {true_max * 1.001}", False), (f"min_norm<{si_norm.min() * 1.001}", True),
             (f"min_norm<{si_norm.min() * 0.999}", False), ("checkpoints==20", True), ("si_units!=6", False),
             ("regime==periodic", False), ("regime==approaching", True), ("regime!=equilibrium", True),
             ("regime==unstable", False)]
    outcomes = evaluate([parse(e) for e, _ in cases], metrics)
    assert [o.held for o in outcomes] == [h for _, h in cases]
    units.loc[0, "regime"] = "periodic"
    again = evaluate([parse("regime==periodic"), parse("regime==unstable"), parse("periodic_units>0")],
                     compute_metrics(tables))
    assert [o.held for o in again] == [True, True, True]


def test_gate_on_missing_table_is_not_evaluated() -> None:
    outcome = evaluate([parse("max_disagreement>0.1")], compute_metrics(synthetic_tables(n_ckpt=5, n_units=2)))[0]
    assert outcome.held is None and "--model and --probe" in outcome.observed


# --- equilibrium results ---------------------------------------------------------------------------------------


def _equilibrium_dir(tmp_path: Path) -> Path:
    lam = np.array([1e-5, 2e-5, 4e-5, 8e-5])
    rows = pd.DataFrame({"arm": [f"a{i}" for i in range(4)], "start": "s0,s1", "lr": lam / 5e-4,
                         "weight_decay": 5e-4, "momentum": 0.9, "intrinsic_lr": lam, "seeds": 3,
                         "t_eq_steps": 0.5 / lam * np.array([1.05, 0.97, 1.02, 0.99]),
                         "t_eq_intrinsic": 0.5 * np.array([1.05, 0.97, 1.02, 0.99]), "noise_floor": 0.02})
    folder = tmp_path / "eq"
    folder.mkdir()
    (folder / "equilibrium.json").write_bytes(serialize(Result("equilibrium", rows, {"exponent": 1.013}), "json"))
    t = np.linspace(0, 2, 40)
    curves = pd.DataFrame([{"arm": f"a{i}", "intrinsic_lr": lam[i], "step": int(tt / lam[i]), "intrinsic_time": tt,
                            "start": "s0", "distance_between": 0.02 + 0.3 * np.exp(-4 * tt), "noise_floor": 0.02}
                           for i in range(4) for tt in t])
    curves.to_csv(folder / "curves.csv", index=False)
    return folder


def test_equilibrium_results_with_exponent(tmp_path: Path) -> None:
    rows, meta, curves = load_equilibrium(_equilibrium_dir(tmp_path))
    tables = synthetic_tables(n_ckpt=6, n_units=3, logs=False)
    tables.equilibrium, tables.equilibrium_meta, tables.equilibrium_curves = rows, meta, curves
    result = build_report(tables, tmp_path / "r.html", fail_if=["equilibrium_exponent<0.8"])
    assert {"equilibrium_scaling", "equilibrium_curves"} <= set(result.figures)
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "λ_e^−1.01" in html and "k = 1.01" in html
    assert result.gates[0].held is False and result.metrics["equilibrium_exponent"] == pytest.approx(1.013)
    data, _ = page_data(html)
    fit = pd.DataFrame(data["equilibrium_fit"])
    # The drawn line has the stored slope in log-log space.
    slope = np.diff(np.log(fit["t_fit"])) / np.diff(np.log(fit["intrinsic_lr"]))
    np.testing.assert_allclose(slope, -1.013, rtol=1e-4)


def test_equilibrium_folder_without_results(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        load_equilibrium(tmp_path)
    (tmp_path / "equilibrium.json").write_text("{not json")
    with pytest.raises(InputError):
        load_equilibrium(tmp_path)


# --- exports, determinism, golden files ------------------------------------------------------------------------


def test_svg_export_every_chart(tmp_path: Path) -> None:
    result = build_report(synthetic_tables(n_ckpt=8, n_units=4), tmp_path / "r.html", svg_dir=tmp_path / "svg")
    names = sorted(p.stem for p in (tmp_path / "svg").iterdir())
    assert names == sorted(result.figures)
    for p in (tmp_path / "svg").iterdir():
        text = p.read_text(encoding="utf-8")
        assert text.startswith("<svg") and 'class="mark-' in text
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # atomic writes leave no temporary files


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ILR_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"missing golden file {path}; run with ILR_UPDATE_GOLDEN=1 and review the diff"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed; review and regenerate with ILR_UPDATE_GOLDEN=1"


def test_golden_summary_and_page(tmp_path: Path) -> None:
    outs = []
    for i in range(2):  # deterministic: two runs give identical bytes
        tables = synthetic_tables(n_ckpt=6, n_units=4, every=50)
        folder = tmp_path / str(i)
        build_report(tables, folder / "report.html", summary_md=folder / "summary.md",
                     fail_if=["max_angle_ratio>1.2", "regime==periodic"], timestamp="2026-01-01T00:00:00+00:00")
        outs.append(((folder / "report.html").read_text(encoding="utf-8"),
                     (folder / "summary.md").read_text(encoding="utf-8")))
    assert outs[0] == outs[1]
    _check_golden("report_summary.md", outs[0][1])
    _check_golden("report_page.html", strip_bundle(outs[0][0]))


# --- the command on a real (tiny) training run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BN CNN trained with SGD (momentum, weight decay) on random data; lr drops ×10 at step 30."""
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("tiny") / "ckpts"
    folder.mkdir()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    for step in range(61):
        if step % 10 == 0:
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step},
                       folder / f"step_{step:04d}.pt")
        if step == 30:
            for g in opt.param_groups:
                g["lr"] = 0.01
        idx = torch.randint(0, 64, (16,))
        loss = torch.nn.functional.cross_entropy(net(x[idx] + 0.1 * torch.randn(16, 1, 8, 8)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return folder


def test_cli_exit_code_3_exactly_when_the_gate_holds(tiny_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ilr_inspect.api import angles
    from ilr_inspect.cli import app

    rows = angles(str(tiny_run)).rows  # the library's angles table, computed independently of the report
    si = rows[rows["unit"].isin(_si_units_of(tiny_run))]
    top = float(si["ratio"].max())
    runner = CliRunner()
    for factor, code in ((0.99, 3), (1.01, 0)):
        out = tmp_path / f"r{code}.html"
        res = runner.invoke(app, ["report", str(tiny_run), "-o", str(out), "--no-distance", "-q",
                                  "--summary-md", str(tmp_path / f"s{code}.md"),
                                  "--fail-if", f"max_angle_ratio>{top * factor!r}"])
        assert res.exit_code == code, res.output
        assert out.is_file() and (tmp_path / f"s{code}.md").is_file()  # written before the exit
        data, _ = page_data(out.read_text(encoding="utf-8"))
        ref = rows.set_index(["unit", "step_to"])
        for rec in data["angles"]:  # every charted angle is the angles table's number
            want = ref.loc[(rec["unit"], rec["step_to"]), "angle_per_step"]
            np.testing.assert_allclose(rec["angle_per_step"], want, rtol=1e-5)
        # Step 30 was saved before the lr drop: 40 is the first checkpoint that stores the new lr.
        assert [r["step"] for r in data["schedule"]] == [40.0]
    res = runner.invoke(app, ["report", str(tiny_run), "--fail-if", "max_angle_ratio>>2"])
    assert res.exit_code == 2 and "is not a number" in res.output
    res = runner.invoke(app, ["report", str(tiny_run), "-o", str(tmp_path / "n.html"), "--no-distance", "-q",
                              "--fail-if", "max_disagreement>0.5"])
    assert res.exit_code == 2 and "not evaluated" in res.output and (tmp_path / "n.html").is_file()


def _si_units_of(folder: Path) -> set[str]:
    from ilr_inspect.api import units

    frame = units(str(folder), measure_regime=False).rows
    return set(frame.loc[frame["scale_invariant"].astype(bool), "unit"])


def test_default_output_never_lands_in_the_checkpoint_folder(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ilr_inspect.cli import app

    monkeypatch.chdir(tiny_run)
    before = sorted(p.name for p in tiny_run.iterdir())
    res = CliRunner().invoke(app, ["report", ".", "--no-distance", "-q"])
    assert res.exit_code == 2 and "-o FILE" in res.output
    assert sorted(p.name for p in tiny_run.iterdir()) == before

"""Theory predictions and measurements against the oracles of docs/theory.md §6 (numbers quoted from there).

The random-walk toy of docs/theory.md §6 is re-implemented here in NumPy (small: d = 256, a few thousand steps) with
PyTorch optimizer semantics; its trajectory is fed to the library as a checkpoint series.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ilr_inspect.checkpoint import Checkpoint, DictSource, HParams
from ilr_inspect.invariance.unit import Unit
from ilr_inspect.measure import measure
from ilr_inspect.measure import theory as th


class _Series:
    def __init__(self, cks: list[Checkpoint]) -> None:
        self.checkpoints = cks

    def hparams_for(self, ck: Checkpoint) -> dict[str, HParams]:
        return ck.hparams


def _dyn(opt: str, lr: float, wd: float, mom: float, beta2: float | None = None,
         mode: str | None = None) -> th.Dynamics:
    return th.dynamics(HParams(lr=lr, weight_decay=wd, momentum=mom, beta2=beta2, optimizer=opt,
                               wd_mode=mode))  # type: ignore[arg-type]


# ------------------------------------------------------------------ closed forms, docs/theory.md §6–§8
@pytest.mark.parametrize(("opt", "lr", "wd", "mom", "beta2", "expected", "rel"), [
    ("sgd", 0.1, 5e-4, 0.0, None, 0.0100000, 1e-5),
    ("sgd", 0.1, 5e-4, 0.9, None, 7.2548e-3, 1e-4),
    ("sgd", 0.1, 5e-3, 0.9, None, 2.2942e-2, 1e-4),
    ("adamw", 1e-3, 1e-2, 0.9, 0.999, 1.0260e-3, 1e-4),
    ("adamw", 1e-3, 0.1, 0.9, 0.999, 3.2444e-3, 1e-4),
    ("adamw", 6e-4, 0.1, 0.9, 0.999, 2.5131e-3, 1e-4),
    ("adamw", 3e-4, 0.1, 0.9, 0.999, 1.7770e-3, 1e-4),
    ("lion", 1e-4, 1.0, 0.9, 0.99, 2.1025e-3, 1e-4),
])
def test_equilibrium_angle_matches_theory_table(opt: str, lr: float, wd: float, mom: float, beta2: float | None,
                                                expected: float, rel: float) -> None:
    got = th.equilibrium_angle(_dyn(opt, lr, wd, mom, beta2))
    assert got == pytest.approx(expected, rel=rel)


def test_intrinsic_lr_per_optimizer_family() -> None:
    assert _dyn("sgd", 0.1, 5e-4, 0.0).intrinsic_lr == pytest.approx(5e-5)
    assert _dyn("sgd", 0.1, 5e-4, 0.9).intrinsic_lr == pytest.approx(5e-4)  # ηλ/(1−μ), coupled
    assert _dyn("sgdw", 0.1, 5e-4, 0.9).intrinsic_lr == pytest.approx(5e-5)  # decoupled: ηλ
    assert _dyn("adamw", 1e-3, 0.1, 0.9).intrinsic_lr == pytest.approx(1e-4)
    assert _dyn("lion", 1e-4, 1.0, 0.9).intrinsic_lr == pytest.approx(1e-4)
    assert _dyn("adamw", 1e-3, 1e-4, 0.9, mode="unscaled").intrinsic_lr == pytest.approx(1e-4)  # s = λ
    assert _dyn("adam", 1e-3, 1e-4, 0.9).intrinsic_lr is None  # Adam + L2: no closed form


@pytest.mark.parametrize(("mom", "r0", "expected", "tol"), [
    (0.0, 0.2, 8416, 1.0), (0.0, 5.0, 39855, 1.0), (0.9, 0.2, 842, 1.0), (0.9, 5.0, 3985, 1.0),
])
def test_relaxation_steps_match_section_11_4(mom: float, r0: float, expected: float, tol: float) -> None:
    assert th.steps_to_within(_dyn("sgd", 0.1, 5e-4, mom), r0, 0.05) == pytest.approx(expected, abs=tol)


@pytest.mark.parametrize(("opt", "lr", "wd", "mom", "k", "expected"), [
    ("sgd", 0.1, 5e-4, 0.0, 100, 0.9950), ("sgd", 0.1, 5e-4, 0.0, 1000, 0.9512),
    ("sgd", 0.1, 5e-4, 0.9, 1000, 0.6065), ("adamw", 1e-3, 0.1, 0.9, 1000, 0.9048),
])
def test_checkpoint_decorrelation_section_11_5(opt: str, lr: float, wd: float, mom: float, k: int,
                                               expected: float) -> None:
    # The library keeps the finite-k momentum correlation term (exact at k = 1: Δ*), which the §11.5 leading
    # order e^{−λ_e k} drops; at k = 1000 the two differ by < 0.5 %.
    pred = th.predicted_angle(_dyn(opt, lr, wd, mom), k)
    assert pred is not None
    assert math.cos(pred) == pytest.approx(expected, abs=3.5e-3)
    one = th.predicted_angle(_dyn(opt, lr, wd, mom), 1)
    assert one == pytest.approx(th.equilibrium_angle(_dyn(opt, lr, wd, mom)), rel=1e-4)


def test_adamw_equilibrium_norm_closed_form() -> None:
    # sqrt(ηC/(2λ)) with η=1e-3, λ=0.1, C=256 (docs/theory.md §7)
    assert th.equilibrium_norm_closed_form(_dyn("adamw", 1e-3, 0.1, 0.9), 256) == pytest.approx(math.sqrt(1.28))


# ------------------------------------------------------------------ the §11.8 toy, measured through the library
def _toy(opt: str, lr: float, wd: float, mom: float, steps: int, keep_every: int, keep_last: int, *,
         start_norm: float, seed: int = 0, d: int = 256) -> list[Checkpoint]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w *= start_norm / np.linalg.norm(w)
    buf = np.zeros(d)
    m = np.zeros(d)
    v = np.zeros(d)
    hp = HParams(lr=lr, weight_decay=wd, momentum=mom, beta2=0.999, optimizer=opt, source="toy")
    cks: list[Checkpoint] = []
    for t in range(steps + 1):
        if t >= steps - keep_last and t % keep_every == 0:
            cks.append(Checkpoint(Path(f"toy_{t}.npz"), "toy", DictSource({"w": w.copy()}), step=t,
                                  step_source="contents", hparams={"w": hp}))
        n = np.linalg.norm(w)
        wh = w / n
        xi = rng.standard_normal(d) / math.sqrt(d)
        g = (xi - wh * (wh @ xi)) / n  # SI noise: ⟂ w, scales as 1/‖w‖
        if opt == "sgd":
            buf = mom * buf + g + wd * w
            w = w - lr * buf
        else:  # AdamW, bias-corrected, ε = 1e-12
            m = mom * m + (1 - mom) * g
            v = 0.999 * v + 0.001 * g * g
            mh, vh = m / (1 - mom ** (t + 1)), v / (1 - 0.999 ** (t + 1))
            w = (1 - lr * wd) * w - lr * mh / (np.sqrt(vh) + 1e-12)
    return cks


def _unit() -> list[Unit]:
    return [Unit("w", ("w",), "tensor", True, "user", "toy")]


def test_toy_sgd_momentum_angle_and_norm_at_equilibrium() -> None:
    lr, wd, mu, d = 0.1, 5e-4, 0.9, 256
    wstar = (lr * (d - 1) / d / (2 * wd * (1 - mu))) ** 0.25  # §11.3, L = 255/256 in the toy
    cks = _toy("sgd", lr, wd, mu, 4000, 1, 1500, start_norm=wstar)
    m = measure(_Series(cks), _unit())
    a = m.angles
    assert (a["steps"] == 1).all()
    assert a["angle_per_step"].mean() == pytest.approx(7.2548e-3, rel=0.03)  # §11.2 oracle
    assert a["predicted_angle_per_step"].iloc[0] == pytest.approx(7.2548e-3, rel=1e-4)
    assert m.norms["norm"].iloc[-500:].mean() == pytest.approx(wstar, rel=0.02)
    assert m.regimes["w"].regime == "equilibrium"


def test_toy_sgd_checkpoint_gaps_decorrelate_like_exp_minus_lambda_k() -> None:
    lr, wd, d = 0.1, 5e-4, 256
    wstar = (lr * (d - 1) / d / (wd * (2 - lr * wd))) ** 0.25
    cks = _toy("sgd", lr, wd, 0.0, 6000, 100, 6000, start_norm=wstar, seed=1)
    a = measure(_Series(cks), _unit()).angles
    assert (a["steps"] == 100).all()
    assert a["cosine"].mean() == pytest.approx(0.9950, abs=6e-4)  # §11.5 oracle, k = 100
    assert a["ratio"].mean() == pytest.approx(1.0, abs=0.05)


def test_toy_adamw_angle_and_closed_form_norm() -> None:
    lr, wd, d = 1e-3, 0.1, 256
    cks = _toy("adamw", lr, wd, 0.9, 3000, 1, 1000, start_norm=math.sqrt(lr * d / (2 * wd)), seed=2)
    m = measure(_Series(cks), _unit())
    assert m.angles["angle_per_step"].mean() == pytest.approx(3.2444e-3, rel=0.03)
    assert m.norms["norm_ratio"].iloc[-200:].mean() == pytest.approx(1.0, rel=0.03)
    assert m.norms["predicted_norm_source"].iloc[-1] == "closed-form"

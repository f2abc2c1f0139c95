"""The functional tier: scale-invariance by definition (docs/theory.md §2).

On a fixed probe batch, with normalizers in train mode (batch statistics), running statistics untouched (the
check works on a deep copy whose BatchNorm momentum is 0), dropout off and every normalizer ε set to ~0, scale a
unit by c ∈ {0.5, 2} through ``torch.func.functional_call`` and compare the outputs. The deviation
max|Δout| / max|out| is recorded with every decision.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .unit import Unit, unit_name

if TYPE_CHECKING:
    import torch
    from torch import nn

TOL = 1e-4
SCALES = (0.5, 2.0)
_EPS = 1e-12


def _first_tensor(out: Any) -> torch.Tensor:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    from ..errors import ModelError

    raise ModelError("the model's output holds no tensor",
                     hint="the model must return logits (or a tuple/dict of them)")


class FunctionalProbe:
    """A frozen copy of the model set up for invariance checks, with a baseline output on the probe."""

    def __init__(self, module: nn.Module, probe: torch.Tensor, *, seed: int = 0) -> None:
        import torch
        from torch import nn

        self.model = copy.deepcopy(module).float()
        self.model.train()
        self.norm_groups: dict[str, tuple[str, int]] = {}
        norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        rms = getattr(nn, "RMSNorm", None)
        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
            if isinstance(m, norm_types) or (rms is not None and isinstance(m, rms)):
                if hasattr(m, "eps"):
                    m.eps = _EPS  # ε alone moves outputs by up to 5e-2 at c = 0.3 (docs/theory.md §2)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0  # running statistics stay as they are
                if isinstance(m, nn.GroupNorm):
                    self.norm_groups[name] = ("group", m.num_groups)
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        self.probe = probe.float() if probe.is_floating_point() else probe
        self.gen = torch.Generator().manual_seed(seed)
        self.base = self._run(self.params)
        self.scale = float(self.base.abs().max()) or 1.0

    def _run(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch
        from torch.func import functional_call

        with torch.no_grad():
            return _first_tensor(functional_call(self.model, {**params, **self.buffers}, (self.probe,))).float()

    def deviation(self, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> float:
        out = self._run(change(dict(self.params)))
        return float((out - self.base).abs().max()) / self.scale

    def scaled(self, members: Sequence[str], c: float) -> float:
        def change(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            for m in members:
                p[m] = p[m] * c
            return p

        return self.deviation(change)

    def scale_deviation(self, members: Sequence[str]) -> float:
        return max(self.scaled(members, c) for c in SCALES)

    def row_deviation(self, members: Sequence[str], groups: int | None = None) -> float:
        """Independent factors in {0.5, 2} per output row (or per block of rows) of every member."""
        import torch

        rows = self.params[members[0]].shape[0]
        n = groups or rows
        if rows % n:
            return float("inf")
        factors = torch.where(torch.rand(n, generator=self.gen) < 0.5, 0.5, 2.0).repeat_interleave(rows // n)

        def change(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            for m in members:
                t = p[m]
                if t.shape[0] != rows:
                    return p
                p[m] = t * factors.reshape(-1, *([1] * (t.dim() - 1)))
            return p

        return self.deviation(change)

    def no_effect(self, name: str) -> float:
        """Deviation when the tensor is replaced by unrelated values: ~0 means it does not matter at all."""
        import torch

        def change(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            t = p[name]
            p[name] = t + (t.abs().mean() + 1.0) * torch.randn(t.shape, generator=self.gen)
            return p

        return self.deviation(change)


def _modules_with_params(model: nn.Module) -> list[tuple[str, list[str]]]:
    out = []
    for mod_name, m in model.named_modules():
        names = [f"{mod_name}.{p}" if mod_name else p for p, _ in m.named_parameters(recurse=False)]
        if names:
            out.append((mod_name, names))
    return out


def functional_units(module: nn.Module, probe: torch.Tensor, *, granularity: str = "tensor",
                     hypotheses: Sequence[Unit] = (), tol: float = TOL) -> list[Unit]:
    """Decide every parameter of ``module`` by measurement; ``hypotheses`` (joint units from the graph or name
    tiers) are verified the same way. Names are the module's own parameter names."""
    fp = FunctionalProbe(module, probe)
    decided: dict[str, Unit] = {}
    not_si: list[str] = []
    for _mod, names in _modules_with_params(fp.model):
        weight = next((n for n in names if n.endswith("weight")), names[0])
        others = [n for n in names if n != weight]
        dead = [n for n in others if n.endswith("bias") and fp.no_effect(n) < tol]
        for d in dead:
            decided[d] = Unit(unit_name([d]), (d,), "tensor", False, "functional",
                              "bias with no effect on the output (a normalizer removes it; zero gradient, only "
                              "weight decay moves it) — not a weight to track", deviation=fp.no_effect(d),
                              role="no-effect")
        cand = tuple([weight, *[n for n in others if n not in dead]])
        dev = fp.scale_deviation(cand)
        if dev >= tol:
            not_si.extend(cand)
            for n in cand:
                decided[n] = Unit(unit_name([n]), (n,), "tensor", False, "functional",
                                  f"scaling {unit_name(list(cand))} by 0.5/2 changes the output by {dev:.2e} "
                                  f"(relative, ≥ {tol:g})", deviation=dev, role="not-invariant")
            continue
        # Several tensors scaled together (e.g. a BatchNorm's γ and β) form a union: kind "joint".
        kind, groups, extra = ("joint" if len(cand) > 1 else "tensor"), None, ""
        if granularity != "tensor" and fp.params[weight].dim() >= 1:
            rdev = fp.row_deviation(cand)
            if rdev < tol:
                kind, extra = "channel", f"; per-channel factors too ({rdev:.1e})"
            else:
                for _norm, (_k, g) in fp.norm_groups.items():
                    if fp.params[weight].shape[0] % g == 0 and fp.row_deviation(cand, g) < tol:
                        kind, groups, extra = "group", g, f"; per-group factors ({g} groups) too"
                        break
        unit = Unit(unit_name(list(cand)), cand, kind, True, "functional",  # type: ignore[arg-type]
                    f"output unchanged when scaled by 0.5 and 2 (max relative deviation {dev:.1e}){extra}",
                    groups=groups, deviation=dev)
        for n in cand:
            decided[n] = unit
    for h in hypotheses:
        members = tuple(m for m in h.members if m in fp.params)
        if len(members) < 2 or not any(m in not_si for m in members):
            continue
        dev = fp.scale_deviation(members)
        if dev < tol:
            unit = Unit(h.name, members, "joint", True, "functional",
                        f"each alone is not SI, but scaling all {len(members)} together by 0.5/2 leaves the output "
                        f"unchanged (max relative deviation {dev:.1e}); {h.reason}", normalizer=h.normalizer,
                        deviation=dev)
            for m in members:
                decided[m] = unit
    seen: set[int] = set()
    out: list[Unit] = []
    for u in decided.values():
        if id(u) not in seen:
            seen.add(id(u))
            out.append(u)
    return out

"""The Unit record: one group of parameters the theory treats as a single scale-invariant (or not) object."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Kind = Literal["tensor", "channel", "group", "joint"]
Evidence = Literal["graph", "config-graph", "functional", "name-rule", "gradient", "user"]
# ``undetermined``: nothing seen says whether the tensor feeds a normalizer (not counted as SI, not claimed not-SI).
Role = Literal["unit", "no-effect", "not-invariant", "undetermined"]

# Best evidence first (docs/units.md): a user file overrides everything, then the definition (functional), a graph
# of the user's model, a graph from the files the framework wrote (config.json, .keras, ONNX), then names.
EVIDENCE_RANK: dict[str, int] = {"user": 0, "functional": 1, "graph": 2, "config-graph": 3, "name-rule": 4,
                                 "gradient": 5}


@dataclass(frozen=True, slots=True)
class Unit:
    """A decision about a set of tensors.

    ``kind`` ``channel`` means each output channel (row of ``w.reshape(out, -1)``) is its own SI unit and the
    metrics are per row, reduced by RMS; ``group`` splits the rows into ``groups`` contiguous blocks (GroupNorm).
    ``role`` says whether the tensors are tracked as a unit, have no effect at all (a bias right before a
    BatchNorm), or are simply not invariant (heads, normalizer affine parameters on their own).
    """

    name: str
    members: tuple[str, ...]
    kind: Kind
    scale_invariant: bool
    evidence: Evidence
    reason: str
    normalizer: str | None = None
    groups: int | None = None
    confidence: float = 1.0
    deviation: float | None = None
    role: Role = "unit"
    source: str | None = None  # the file the evidence came from (config.json, model.keras, model.onnx, ...)

    @property
    def heuristic(self) -> bool:
        return self.evidence in ("name-rule", "gradient")

    @property
    def members_text(self) -> str:
        return "+".join(self.members)

    def with_(self, **changes: object) -> Unit:
        return replace(self, **changes)  # type: ignore[arg-type]


def unit_name(members: tuple[str, ...] | list[str]) -> str:
    """A readable id: the module path of a single tensor, or the common prefix of a joint unit."""
    ms = list(members)
    if len(ms) == 1:
        name = ms[0]
        for suffix in (".weight", ".kernel", "/kernel", ".w"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name
    sep = "/" if all("/" in m for m in ms) else "."
    modules = {m.rsplit(sep, 1)[0] for m in ms}
    if len(modules) == 1 and all(sep in m for m in ms):
        return modules.pop()  # weight + bias of one module (a normalizer's (γ, β), a linear map and its bias)
    first = ms[0].split(sep)
    common: list[str] = []
    for i, part in enumerate(first):
        if all(len(m.split(sep)) > i and m.split(sep)[i] == part for m in ms):
            common.append(part)
        else:
            break
    stem = sep.join(common) if common else "model"
    return f"{stem}[joint:{len(ms)}]"

"""``--units FILE``: the user's own decision table, YAML or TOML, overriding every detector.

Format (either language)::

    stage1_writers:            # unit name
      members: ["layer1.*.conv2.weight", "conv1.weight"]   # glob patterns over tensor names
      kind: joint              # optional: tensor | channel | group | joint
      groups: 32               # optional, for kind = group
      scale_invariant: true    # optional, default true
    "layer2.0.conv1": ["layer2.0.conv1.weight"]   # short form: name -> patterns
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .unit import Unit

_KINDS = ("tensor", "channel", "group", "joint")


def _parse(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the units file ({exc.strerror})", path=path, hint="check the path") from exc
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            from ..safety import load_yaml  # safe loader with size/depth/alias limits (docs/security.md)

            data = load_yaml(text.encode("utf-8"), path=path, what="units file")
    except Exception as exc:  # both parsers raise their own error types
        raise UsageError(f"the units file is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}", path=path,
                         hint="see `ilr-inspect units --help` for the format") from exc
    if not isinstance(data, dict):
        raise UsageError("the units file must map unit names to tensor patterns", path=path,
                         hint="e.g. `stage1: [\"layer1.*.conv2.weight\"]`")
    return data


def load_units_file(path: str | Path, tensor_names: Sequence[str]) -> list[Unit]:
    """Resolve each unit's glob patterns against the checkpoint's tensor names (every pattern must match)."""
    p = Path(path)
    out: list[Unit] = []
    for name, spec in _parse(p).items():
        opts: dict[str, Any] = {}
        if isinstance(spec, str):
            patterns = [spec]
        elif isinstance(spec, list):
            patterns = [str(s) for s in spec]
        elif isinstance(spec, dict) and "members" in spec:
            m = spec["members"]
            patterns = [m] if isinstance(m, str) else [str(s) for s in m]
            opts = spec
        else:
            raise UsageError(f"unit {name!r}: expected a list of patterns or a table with 'members'", path=p,
                             hint="e.g. `stage1: {members: [\"layer1.*.conv2.weight\"], kind: joint}`")
        members: list[str] = []
        for pat in patterns:
            hits = [t for t in tensor_names if fnmatch.fnmatchcase(t, pat)]
            if not hits:
                raise UsageError(f"unit {name!r}: pattern {pat!r} matches no tensor", path=p,
                                 hint="run `ilr-inspect ls PATH --tensors` to see the names")
            members.extend(h for h in hits if h not in members)
        kind = str(opts.get("kind", "joint" if len(members) > 1 else "tensor"))
        if kind not in _KINDS:
            raise UsageError(f"unit {name!r}: kind must be one of {', '.join(_KINDS)}", path=p, hint="fix `kind`")
        groups = opts.get("groups")
        si = bool(opts.get("scale_invariant", True))
        out.append(Unit(str(name), tuple(members), kind, si, "user",  # type: ignore[arg-type]
                        f"declared in {p.name}", groups=int(groups) if groups is not None else None,
                        role="unit" if si else "not-invariant"))
    return out


def match_pattern(names: Sequence[str], pattern: str) -> list[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]

"""ilr-inspect: intrinsic learning rate, effective LR and equilibrium of normalized networks, from checkpoints.

The public API is small and imported lazily so that ``import ilr_inspect`` (and ``ilr-inspect --help``) stays
free of torch:

- :func:`open_series` / :func:`open_checkpoint` — read a checkpoint series from any supported framework;
  every function below takes a folder, a glob, a list of paths or an open :class:`Series` (:func:`borrow`), and
  closes only what it opened;
- :func:`ls`, :func:`hparams` — what was found, and the hyperparameter timeline;
- :func:`units`, :func:`norms`, :func:`angles` — scale-invariant units and the core measurements;
- :func:`distance` — function-space distances between checkpoints;
- :func:`equilibrium` — retrain from checkpoints and measure time to equilibrium;
- :func:`report` — the self-contained HTML report.

Each table function returns a :class:`Result` (a pandas DataFrame plus provenance ``meta``); its columns are
listed in :mod:`ilr_inspect.schema` and docs/schema.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the same names are imported on first use
    from .api import angles, norms, units
    from .checkpoint import Checkpoint, HParams
    from .formats import OpenOptions, open_checkpoint
    from .function_space import distance
    from .inventory import hparams, ls
    from .output import Result
    from .reporting import report
    from .retrain import equilibrium
    from .series import Series, SeriesSource, borrow, open_series

__version__ = "0.1.0"

_API = {
    "open_series": "ilr_inspect.series",
    "borrow": "ilr_inspect.series",
    "SeriesSource": "ilr_inspect.series",
    "open_checkpoint": "ilr_inspect.formats",
    "OpenOptions": "ilr_inspect.formats",
    "Series": "ilr_inspect.series",
    "Checkpoint": "ilr_inspect.checkpoint",
    "HParams": "ilr_inspect.checkpoint",
    "Result": "ilr_inspect.output",
    "ls": "ilr_inspect.inventory",
    "hparams": "ilr_inspect.inventory",
    "units": "ilr_inspect.api",
    "norms": "ilr_inspect.api",
    "angles": "ilr_inspect.api",
    "distance": "ilr_inspect.function_space",
    "equilibrium": "ilr_inspect.retrain",
    "report": "ilr_inspect.reporting",
}

__all__ = [
    "Checkpoint", "HParams", "OpenOptions", "Result", "Series", "SeriesSource", "__version__", "angles", "borrow",
    "distance", "equilibrium", "hparams", "ls", "norms", "open_checkpoint", "open_series", "report", "units",
]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ilr_inspect' has no attribute {name!r}")

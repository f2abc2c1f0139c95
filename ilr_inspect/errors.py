"""One typed error tree. The CLI turns each into ``Error: <message>`` plus a hint and an exit code."""

from __future__ import annotations

from pathlib import Path

# Exit codes are part of the CLI contract (docs/cli.md); keep them stable.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_THRESHOLD = 3
EXIT_INPUT = 4
EXIT_UNSAFE = 5
EXIT_MISSING_EXTRA = 6


class IlrError(Exception):
    """Base class: a failure the user can act on."""

    exit_code: int = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None) -> None:
        self.message = message
        self.hint = hint
        # A remote path (ilr_inspect.storage.RemotePath) is kept as is: it renders as its URL.
        self.path = (path if hasattr(path, "read_range") else Path(path)) if path is not None else None  # type: ignore[assignment]
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        return f"{where}{self.message}"


class UsageError(IlrError):
    """Options that do not fit together, or a malformed expression/config."""

    exit_code = EXIT_USAGE


class InputError(IlrError):
    """A file or folder that cannot be read as what it claims to be."""

    exit_code = EXIT_INPUT


class EmptySeriesError(InputError):
    """No checkpoint found where one was expected."""


class CorruptCheckpointError(InputError):
    """Truncated, zero-byte, or malformed file."""


class UnknownFormatError(InputError):
    """No reader recognises the file."""


class ArchitectureMismatchError(InputError):
    """A checkpoint whose tensors do not match the rest of the series."""


class HParamsError(InputError):
    """Optimizer state that cannot be mapped to parameter names without guessing."""


class ModelError(InputError):
    """A model spec that cannot be built or does not match the checkpoint."""


class ProbeError(InputError):
    """Probe data of the wrong shape or kind."""


class UnsafePickleError(IlrError):
    """A pickle that would import code; refused unless the user trusts it."""

    exit_code = EXIT_UNSAFE

    def __init__(self, path: str | Path, globals_needed: list[str]) -> None:
        self.globals_needed = globals_needed
        shown = ", ".join(globals_needed[:12]) + (" …" if len(globals_needed) > 12 else "")
        super().__init__(
            f"pickle would import code to load: {shown}",
            hint="inspect the file's origin; if you trust it, rerun with --trust-pickle",
            path=path,
        )


class MissingExtraError(IlrError):
    """An optional framework needed for this file is not installed."""

    exit_code = EXIT_MISSING_EXTRA

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed",
            hint=f"pip install 'ilr-inspect[{extra}]'",
        )


class ThresholdError(IlrError):
    """A --fail-if condition held."""

    exit_code = EXIT_THRESHOLD


def require(module: str, extra: str, purpose: str) -> object:
    """Import an optional dependency, or raise an error naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised in environments without the extra
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc

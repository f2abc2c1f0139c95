"""Optional scale-out on Ray (``pip install 'ilr-inspect[ray]'``). Nothing here imports ray at module level:
``--help`` and the local path never load it."""

from __future__ import annotations

from .cluster import ADDRESS_ENV, resolve_address, session

__all__ = ["ADDRESS_ENV", "resolve_address", "session"]

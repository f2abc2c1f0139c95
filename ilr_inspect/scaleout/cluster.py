"""Join or start a Ray cluster for one command.

``local`` starts a cluster inside this process (``ray.init(num_cpus=...)``) and shuts it down afterwards;
``auto`` joins the cluster started on this machine with ``ray start --head``; ``host:port`` joins a head's GCS
and ``ray://host:port`` goes through the Ray client. An already-initialised ray (a library user's own
``ray.init``) is reused and left running: only what this module started is shut down.

Workers open URLs themselves (docs/scale-out.md), so the storage settings of this process (endpoint, region,
credentials, ``ILR_INSPECT_STORAGE_OPTIONS``) travel with a job that joins a cluster, as its runtime_env
``env_vars``; the workers of a ``local`` cluster inherit this process's environment anyway.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from ..errors import InputError, MissingExtraError

ADDRESS_ENV = "ILR_INSPECT_RAY_ADDRESS"
_CONNECT_TIMEOUT_S = 5.0

# The environment a worker needs to read the same URLs as this process (ilr_inspect.storage and the fsspec
# backends read these): sent to the workers of a joined cluster. Paths to local credential files are not sent
# (a node has its own files); the nodes' own credentials apply to what is not set here.
FORWARD_ENV = (
    "ILR_INSPECT_STORAGE_OPTIONS", "ILR_INSPECT_TORCHZIP",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
    "HF_TOKEN", "HF_ENDPOINT", "GOOGLE_CLOUD_PROJECT",
)
FORWARD_PREFIX = "FSSPEC_"  # fsspec's own FSSPEC_<PROTOCOL>_<OPTION> settings


def forwarded_env() -> dict[str, str]:
    """The storage settings of this process that a joined cluster's workers get (see FORWARD_ENV): only when this
    process reads URLs (the driver opens the series before the tasks are sent), so a run on local files sends
    no credentials."""
    storage = sys.modules.get("ilr_inspect.storage")
    if storage is None or not storage.used():
        return {}
    return {k: v for k, v in os.environ.items() if k in FORWARD_ENV or k.startswith(FORWARD_PREFIX)}


class _DropNotices(logging.Filter):
    """Ray's start-up notices that reach stderr through Python's last-resort handler (``configure_logging=False``
    leaves Ray's loggers without handlers): the token-auth notice Ray 2.5x logs at WARNING on every
    ``ray.init`` that starts or joins a cluster with the default mode. Any other record passes."""

    NOTICES = ("Token authentication is enabled for this Ray cluster",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)


def _quiet_start_up() -> None:
    lg = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropNotices) for f in lg.filters):
        lg.addFilter(_DropNotices())


def resolve_address(flag: str | None) -> str | None:
    """The Ray address to use: the flag, else ILR_INSPECT_RAY_ADDRESS, else None (run locally without Ray)."""
    value = flag if flag is not None else os.environ.get(ADDRESS_ENV)
    value = value.strip() if value else None
    return value or None


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError("ray", "ray", "--ray") from exc
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``host:port`` or ``ray://host:port`` address; None for ``auto``/``local``."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _unreachable(address: str, why: str) -> InputError:
    return InputError(f"cannot reach a Ray cluster at {address!r}: {why}",
                      hint="start one with `ray start --head`, or use --ray local")


def _token_auth() -> None:
    """Use the token of this machine (~/.ray/auth_token, RAY_AUTH_TOKEN) for an explicit address too.

    Ray 2.5x enables token authentication for clusters it starts and, joining one, picks the token up only for
    ``auto``: a ``host:port`` join without RAY_AUTH_MODE is refused as unauthenticated. This calls Ray's own
    check (a no-op where RAY_AUTH_MODE is set, or where no token exists, or in Ray versions without it)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextmanager
def session(address: str, *, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[Any]:
    """Yield the imported ``ray`` module connected to ``address`` (see the module docstring)."""
    ray = import_ray()
    if ray.is_initialized():  # the caller's own ray.init: used as it is, and left running
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    _quiet_start_up()
    if address == "local":
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        ray.init(address="local", **kwargs)  # a new cluster even where RAY_ADDRESS names one
    else:
        hp = _host_port(address)
        if hp is not None:  # fail fast: ray.init would otherwise retry a dead GCS address for a minute
            try:
                socket.create_connection(hp, timeout=_CONNECT_TIMEOUT_S).close()
            except OSError as exc:
                raise _unreachable(address, exc.strerror or type(exc).__name__) from None
        elif address != "auto":
            raise _unreachable(address, "expected local, auto, host:port or ray://host:port")
        if address.startswith("ray://"):
            kwargs.pop("include_dashboard")
        env = forwarded_env()
        if env:  # the workers of a running cluster do not see this process's environment
            kwargs["runtime_env"] = {"env_vars": env}
        _token_auth()
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise _unreachable(address, first) from None
    try:
        # Ray's driver prints notices such as "A worker died ..." to stdout from a background thread; stdout
        # carries the tables (-f json/csv), so while the session is open stdout goes to stderr.
        with redirect_stdout(sys.stderr):
            yield ray
    finally:
        ray.shutdown()
